// The part of JetStream's JSON API ($JS.API.*) the distributed mode needs:
// streams (create, update, info, get a message), publishing with an
// acknowledgement and a message id for deduplication, and durable pull
// consumers (create, fetch a batch, ack). Every API answer is checked for the
// API's error object first, so a refusal arrives as a JetStreamError in the
// server's words.

import Foundation
import NIOCore

/// Where a stream keeps its messages.
public enum JetStreamStorage: String, Codable, Sendable { case file, memory }

/// A stream's configuration (the fields Tapio sets; others keep the server's defaults).
public struct StreamConfiguration: Codable, Sendable, Equatable {
    public var name: String
    public var subjects: [String]
    public var storage: JetStreamStorage = .file
    /// Copies in a cluster (1, 3 or 5).
    public var replicas: Int = 1
    /// Messages with the same `Nats-Msg-Id` within this window are stored once.
    public var duplicateWindow: Duration = .seconds(120)
    /// Oldest message kept; zero keeps them without an age limit.
    public var maxAge: Duration = .zero
    /// Largest size of the stream in bytes; -1 for no limit.
    public var maxBytes: Int64 = -1
    /// Messages kept per subject (KV history); -1 for no limit.
    public var maxMessagesPerSubject: Int64 = -1
    /// "old" drops the oldest messages at a limit, "new" refuses new ones.
    public var discard: String = "old"
    public var allowRollup = false
    public var denyDelete = false
    /// Lets any replica answer `$JS.API.DIRECT.GET`.
    public var allowDirect = false

    public init(name: String, subjects: [String]) {
        self.name = name
        self.subjects = subjects
    }

    enum CodingKeys: String, CodingKey {
        case name, subjects, storage, replicas = "num_replicas", duplicateWindow = "duplicate_window", maxAge = "max_age"
        case maxBytes = "max_bytes", maxMessagesPerSubject = "max_msgs_per_subject", discard
        case allowRollup = "allow_rollup_hdrs", denyDelete = "deny_delete", allowDirect = "allow_direct", retention
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(name, forKey: .name)
        try c.encode(subjects, forKey: .subjects)
        try c.encode("limits", forKey: .retention)
        try c.encode(storage, forKey: .storage)
        try c.encode(replicas, forKey: .replicas)
        try c.encode(duplicateWindow.nanoseconds, forKey: .duplicateWindow)
        try c.encode(maxAge.nanoseconds, forKey: .maxAge)
        try c.encode(maxBytes, forKey: .maxBytes)
        try c.encode(maxMessagesPerSubject, forKey: .maxMessagesPerSubject)
        try c.encode(discard, forKey: .discard)
        try c.encode(allowRollup, forKey: .allowRollup)
        try c.encode(denyDelete, forKey: .denyDelete)
        try c.encode(allowDirect, forKey: .allowDirect)
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        subjects = try c.decodeIfPresent([String].self, forKey: .subjects) ?? []
        storage = try c.decodeIfPresent(JetStreamStorage.self, forKey: .storage) ?? .file
        replicas = try c.decodeIfPresent(Int.self, forKey: .replicas) ?? 1
        duplicateWindow = .nanoseconds(try c.decodeIfPresent(Int64.self, forKey: .duplicateWindow) ?? 0)
        maxAge = .nanoseconds(try c.decodeIfPresent(Int64.self, forKey: .maxAge) ?? 0)
        maxBytes = try c.decodeIfPresent(Int64.self, forKey: .maxBytes) ?? -1
        maxMessagesPerSubject = try c.decodeIfPresent(Int64.self, forKey: .maxMessagesPerSubject) ?? -1
        discard = try c.decodeIfPresent(String.self, forKey: .discard) ?? "old"
        allowRollup = try c.decodeIfPresent(Bool.self, forKey: .allowRollup) ?? false
        denyDelete = try c.decodeIfPresent(Bool.self, forKey: .denyDelete) ?? false
        allowDirect = try c.decodeIfPresent(Bool.self, forKey: .allowDirect) ?? false
    }
}

/// What the server says about a stream.
public struct StreamInfo: Decodable, Sendable {
    public struct State: Decodable, Sendable {
        public var messages: UInt64
        public var bytes: UInt64
        public var firstSequence: UInt64
        public var lastSequence: UInt64
        enum CodingKeys: String, CodingKey { case messages, bytes, firstSequence = "first_seq", lastSequence = "last_seq" }
    }
    public struct Cluster: Decodable, Sendable {
        public var leader: String?
    }
    public var config: StreamConfiguration
    public var state: State
    public var cluster: Cluster?
}

/// The acknowledgement of a JetStream publish.
public struct PublishAck: Decodable, Sendable, Equatable {
    public var stream: String
    /// The stream sequence of the message (of the first copy for a duplicate).
    public var sequence: UInt64
    /// True when the message id was seen within the duplicate window: nothing was stored.
    public var duplicate: Bool

    enum CodingKeys: String, CodingKey { case stream, sequence = "seq", duplicate }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        stream = try c.decode(String.self, forKey: .stream)
        sequence = try c.decode(UInt64.self, forKey: .sequence)
        duplicate = try c.decodeIfPresent(Bool.self, forKey: .duplicate) ?? false
    }
}

/// A pull consumer's configuration: durable (named), or ephemeral (an empty
/// `durableName`, see `ConsumerConfiguration.ephemeral`).
public struct ConsumerConfiguration: Encodable, Sendable {
    /// Where a new consumer starts in the stream.
    public enum DeliverPolicy: Sendable, Equatable {
        /// The first message the stream holds.
        case all
        /// The message with this stream sequence (or the first after it, when it is gone).
        case startSequence(UInt64)
        /// The last message of every subject (a KV bucket's current values).
        case lastPerSubject
        /// The first message stored at or after this time.
        case startTime(Date)
    }
    /// How deliveries are acknowledged.
    public enum AckPolicy: String, Sendable {
        /// Each message on its own.
        case explicit
        /// A message and every one delivered before it.
        case all
        /// Not at all: delivered is done (the consumer keeps its own position).
        case none
    }

    /// Empty for an ephemeral consumer (the server names it).
    public var durableName: String
    /// Only messages on this subject (wildcards allowed); nil for the whole stream.
    public var filterSubject: String?
    /// Unacknowledged messages are delivered again after this long.
    public var ackWait: Duration = .seconds(30)
    /// Deliveries of one message at most; -1 for no limit.
    public var maxDeliver: Int = -1
    /// Messages delivered and not yet acknowledged, at most.
    public var maxAckPending: Int = 10_000
    public var deliverPolicy: DeliverPolicy = .all
    public var ackPolicy: AckPolicy = .explicit
    /// An ephemeral consumer no client has pulled from for this long is
    /// deleted by the server (nil: the server's default, 5 s).
    public var inactiveThreshold: Duration?

    public init(durableName: String) { self.durableName = durableName }

    /// An ephemeral pull consumer: the server names it and deletes it once
    /// nobody pulls for `inactiveThreshold`. In a cluster it lives on one
    /// server; when that one goes, the consumer goes with it (make a new one
    /// from the position the client has reached).
    public static func ephemeral(deliver: DeliverPolicy, ack: AckPolicy = .none, filterSubject: String? = nil,
                                 inactiveThreshold: Duration = .seconds(10)) -> ConsumerConfiguration {
        var c = ConsumerConfiguration(durableName: "")
        c.deliverPolicy = deliver
        c.ackPolicy = ack
        c.filterSubject = filterSubject
        c.inactiveThreshold = inactiveThreshold
        return c
    }

    enum CodingKeys: String, CodingKey {
        case durableName = "durable_name", filterSubject = "filter_subject", ackWait = "ack_wait", maxDeliver = "max_deliver"
        case maxAckPending = "max_ack_pending", ackPolicy = "ack_policy", deliverPolicy = "deliver_policy", replayPolicy = "replay_policy"
        case optStartSequence = "opt_start_seq", optStartTime = "opt_start_time", inactiveThreshold = "inactive_threshold"
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        if !durableName.isEmpty { try c.encode(durableName, forKey: .durableName) }
        try c.encodeIfPresent(filterSubject, forKey: .filterSubject)
        try c.encode(ackWait.nanoseconds, forKey: .ackWait)
        try c.encode(maxDeliver, forKey: .maxDeliver)
        if ackPolicy != .none { try c.encode(maxAckPending, forKey: .maxAckPending) }
        try c.encode(ackPolicy.rawValue, forKey: .ackPolicy)
        switch deliverPolicy {
        case .all: try c.encode("all", forKey: .deliverPolicy)
        case .lastPerSubject: try c.encode("last_per_subject", forKey: .deliverPolicy)
        case .startSequence(let seq):
            try c.encode("by_start_sequence", forKey: .deliverPolicy)
            try c.encode(max(1, seq), forKey: .optStartSequence)
        case .startTime(let date):
            try c.encode("by_start_time", forKey: .deliverPolicy)
            let format = ISO8601DateFormatter()
            format.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
            try c.encode(format.string(from: date), forKey: .optStartTime)
        }
        try c.encode("instant", forKey: .replayPolicy)
        try c.encodeIfPresent(inactiveThreshold?.nanoseconds, forKey: .inactiveThreshold)
    }
}

/// What the server says about a consumer.
public struct ConsumerInfo: Decodable, Sendable {
    public struct Position: Decodable, Sendable {
        public var consumerSequence: UInt64
        public var streamSequence: UInt64
        enum CodingKeys: String, CodingKey { case consumerSequence = "consumer_seq", streamSequence = "stream_seq" }
    }
    public var name: String
    public var streamName: String
    public var delivered: Position
    public var ackFloor: Position
    /// Messages not yet delivered.
    public var pending: UInt64
    public var ackPending: Int
    /// In a cluster: the server leading this consumer.
    public var cluster: StreamInfo.Cluster?

    enum CodingKeys: String, CodingKey {
        case name, streamName = "stream_name", delivered, ackFloor = "ack_floor", pending = "num_pending", ackPending = "num_ack_pending"
        case cluster
    }
}

/// A message fetched from a pull consumer.
public struct JetStreamMessage: Sendable {
    public var message: NATSMessage
    /// Its sequence in the stream (from the ack subject).
    public var streamSequence: UInt64
    /// Its sequence in the consumer's deliveries.
    public var consumerSequence: UInt64
    /// 1 on the first delivery, more when redelivered.
    public var deliveryCount: UInt64
    /// Messages left for the consumer after this one.
    public var pending: UInt64

    public var subject: String { message.subject }
    public var payload: ByteBuffer { message.payload }
    public var headers: NATSHeaders? { message.headers }

    init(_ message: NATSMessage) throws {
        guard let reply = message.replyTo else {
            throw NATSError.protocolViolation("JetStream message on '\(message.subject)' has no ack subject")
        }
        let parsed = try Self.parseAckSubject(reply)
        self.message = message
        deliveryCount = parsed.delivered
        streamSequence = parsed.stream
        consumerSequence = parsed.consumer
        pending = parsed.pending
    }

    /// `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>`, or the
    /// newer form with a domain and an account hash after `$JS.ACK` (and a token at the end).
    static func parseAckSubject(_ subject: String) throws -> (delivered: UInt64, stream: UInt64, consumer: UInt64, pending: UInt64) {
        let tokens = subject.split(separator: ".", omittingEmptySubsequences: false)
        guard tokens.count >= 9, tokens[0] == "$JS", tokens[1] == "ACK" else {
            throw NATSError.protocolViolation("'\(subject)' is not a JetStream ack subject")
        }
        let first = tokens.count == 9 ? 4 : 6
        guard tokens.count == 9 || tokens.count >= 11,
              let delivered = UInt64(tokens[first]), let stream = UInt64(tokens[first + 1]),
              let consumer = UInt64(tokens[first + 2]), let pending = UInt64(tokens[first + 4]) else {
            throw NATSError.protocolViolation("JetStream ack subject '\(subject)' has unexpected tokens")
        }
        return (delivered, stream, consumer, pending)
    }
}

/// JetStream through one client.
public struct JetStream: Sendable {
    public let client: NATSClient
    /// "$JS.API" (another for a JetStream domain).
    public var apiPrefix: String
    /// Time an API call waits for its answer.
    public var timeout: Duration

    public init(client: NATSClient, apiPrefix: String = "$JS.API", timeout: Duration = .seconds(5)) {
        self.client = client
        self.apiPrefix = apiPrefix
        self.timeout = timeout
    }

    // MARK: Streams

    /// Creates the stream, or updates it when it exists with another configuration.
    @discardableResult
    public func createOrUpdateStream(_ config: StreamConfiguration) async throws -> StreamInfo {
        do {
            return try await createStream(config)
        } catch let error as JetStreamError where error.errorCode == JetStreamError.streamNameInUse {
            return try await updateStream(config)
        }
    }

    @discardableResult
    public func createStream(_ config: StreamConfiguration) async throws -> StreamInfo {
        try Self.validateName(config.name, "stream")
        return try await call("STREAM.CREATE.\(config.name)", body: config)
    }

    @discardableResult
    public func updateStream(_ config: StreamConfiguration) async throws -> StreamInfo {
        try Self.validateName(config.name, "stream")
        return try await call("STREAM.UPDATE.\(config.name)", body: config)
    }

    public func streamInfo(_ name: String) async throws -> StreamInfo {
        try Self.validateName(name, "stream")
        return try await call("STREAM.INFO.\(name)")
    }

    /// A stored message by its stream sequence, from the stream's leader.
    public func message(stream: String, sequence: UInt64) async throws -> StoredMessage {
        try Self.validateName(stream, "stream")
        let answer: StoredMessageAnswer = try await call("STREAM.MSG.GET.\(stream)", body: ["seq": sequence])
        return try answer.message.decoded()
    }

    /// The last message on `subject`, from the stream's leader; nil when there is none.
    public func lastMessage(stream: String, subject: String) async throws -> StoredMessage? {
        try Self.validateName(stream, "stream")
        do {
            let answer: StoredMessageAnswer = try await call("STREAM.MSG.GET.\(stream)", body: ["last_by_subj": subject])
            return try answer.message.decoded()
        } catch let error as JetStreamError where error.errorCode == JetStreamError.noMessageFound {
            return nil
        }
    }

    /// The last message on `subject` from any replica (`$JS.API.DIRECT.GET`, the
    /// stream needs `allowDirect`); a replica may lag the leader. nil when there is none.
    public func lastMessageDirect(stream: String, subject: String) async throws -> StoredMessage? {
        try Self.validateName(stream, "stream")
        let body = try JSONEncoder().encode(["last_by_subj": subject])
        let reply = try await client.request("\(apiPrefix).DIRECT.GET.\(stream)", payload: ByteBuffer(bytes: body), timeout: timeout)
        if let status = reply.status {
            if status == 404 { return nil }
            throw JetStreamError(code: status, errorCode: 0, text: reply.headers?.statusDescription ?? "direct get failed")
        }
        guard let headers = reply.headers, let seqText = headers["Nats-Sequence"], let seq = UInt64(seqText),
              let subject = headers["Nats-Subject"] else {
            throw NATSError.protocolViolation("direct get answer without Nats-Sequence and Nats-Subject headers")
        }
        var own = NATSHeaders()
        for field in headers.fields where !["Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp"].contains(field.name) {
            own.append(field.name, field.value)
        }
        return StoredMessage(subject: subject, sequence: seq, headers: own, payload: Array(reply.payload.readableBytesView))
    }

    // MARK: Publishing

    /// Publishes to a stream's subject and waits for the stream's acknowledgement.
    /// Not retried here: after `connectionLost`, `timeout` or `noResponders`
    /// (a cluster electing the stream's leader answers so for a moment) the
    /// caller resends with the same `messageID`, and the stream stores it once.
    /// - Parameters:
    ///   - messageID: `Nats-Msg-Id`; a resend with the same id within the
    ///     stream's duplicate window is acknowledged as a duplicate and not stored again.
    ///   - expectedLastSubjectSequence: `Nats-Expected-Last-Subject-Sequence`; the
    ///     stream refuses the message (JetStreamError 10071) unless the last message
    ///     on this subject has this sequence (0: there is none). A compare-and-set.
    public func publish(
        _ subject: String, payload: some Sequence<UInt8>, messageID: String? = nil,
        expectedLastSubjectSequence: UInt64? = nil, headers: NATSHeaders = NATSHeaders()
    ) async throws -> PublishAck {
        var headers = headers
        if let messageID { headers["Nats-Msg-Id"] = messageID }
        if let expectedLastSubjectSequence { headers["Nats-Expected-Last-Subject-Sequence"] = String(expectedLastSubjectSequence) }
        let reply = try await client.request(subject, payload: ByteBuffer(bytes: payload), headers: headers.isEmpty ? nil : headers, timeout: timeout)
        return try Self.decodeAnswer(PublishAck.self, reply, what: "publish to '\(subject)'")
    }

    // MARK: Consumers

    /// Creates a durable pull consumer, or returns the existing one of that name
    /// when its configuration is the same.
    @discardableResult
    public func createConsumer(stream: String, _ config: ConsumerConfiguration) async throws -> ConsumerInfo {
        try Self.validateName(stream, "stream")
        try Self.validateName(config.durableName, "consumer")
        struct Body: Encodable {
            var streamName: String
            var config: ConsumerConfiguration
            enum CodingKeys: String, CodingKey { case streamName = "stream_name", config }
        }
        return try await call("CONSUMER.DURABLE.CREATE.\(stream).\(config.durableName)", body: Body(streamName: stream, config: config))
    }

    /// Creates an ephemeral pull consumer (`ConsumerConfiguration.ephemeral`);
    /// its server-given name is in the answer (`name`), for `fetch`.
    public func createEphemeralConsumer(stream: String, _ config: ConsumerConfiguration) async throws -> ConsumerInfo {
        try Self.validateName(stream, "stream")
        guard config.durableName.isEmpty else { throw NATSError.invalidName("an ephemeral consumer has no durable name (got '\(config.durableName)')") }
        struct Body: Encodable {
            var streamName: String
            var config: ConsumerConfiguration
            enum CodingKeys: String, CodingKey { case streamName = "stream_name", config }
        }
        return try await call("CONSUMER.CREATE.\(stream)", body: Body(streamName: stream, config: config))
    }

    public func consumerInfo(stream: String, consumer: String) async throws -> ConsumerInfo {
        try Self.validateName(stream, "stream")
        try Self.validateName(consumer, "consumer")
        return try await call("CONSUMER.INFO.\(stream).\(consumer)")
    }

    /// Fetches up to `batch` messages from a pull consumer. With `noWait`, only
    /// what is there now; otherwise the server holds the request up to `expires`
    /// for messages to arrive. Returns what arrived (possibly none).
    public func fetch(stream: String, consumer: String, batch: Int, expires: Duration = .seconds(1), noWait: Bool = false) async throws -> [JetStreamMessage] {
        try Self.validateName(stream, "stream")
        try Self.validateName(consumer, "consumer")
        guard batch >= 1, batch <= 10_000 else { throw NATSError.invalidName("fetch batch must be 1…10000, not \(batch)") }
        guard expires >= .milliseconds(10) else { throw NATSError.invalidName("fetch expires must be at least 10 ms") }
        let inbox = "\(client.inboxPrefix).fetch.\(NATSClient.randomToken())"
        let subscription = try client.subscribe(inbox)
        defer { subscription.unsubscribe() }
        struct PullRequest: Encodable {
            var batch: Int
            /// Nanoseconds the server holds the request open.
            var expires: Int64?
            var noWait: Bool?
            enum CodingKeys: String, CodingKey { case batch, expires, noWait = "no_wait" }
        }
        let request = noWait ? PullRequest(batch: batch, noWait: true) : PullRequest(batch: batch, expires: expires.nanoseconds)
        let body = try JSONEncoder().encode(request)
        try await client.publish("\(apiPrefix).CONSUMER.MSG.NEXT.\(stream).\(consumer)", payload: ByteBuffer(bytes: body), replyTo: inbox)
        // The server ends a short batch with a 404 (no messages) or 408 (expired);
        // the local deadline only guards against a server that says nothing.
        let deadline = Task {
            try await Task.sleep(for: (noWait ? timeout : expires) + .seconds(2))
            subscription.unsubscribe()
        }
        defer { deadline.cancel() }
        var messages: [JetStreamMessage] = []
        for await message in subscription {
            switch message.status {
            case nil:
                messages.append(try JetStreamMessage(message))
                if messages.count == batch { return messages }
            case 404, 408:
                return messages
            case 100:
                continue
            case let status?:
                if !messages.isEmpty { return messages }
                throw JetStreamError(code: status, errorCode: 0, text: message.headers?.statusDescription ?? "pull request failed")
            }
        }
        return messages
    }

    /// Acknowledges a fetched message and waits for the server to confirm it
    /// (so it will not be delivered again). Fire-and-forget acks are `ack(_:confirm: false)`.
    public func ack(_ message: JetStreamMessage, confirm: Bool = true) async throws {
        guard let reply = message.message.replyTo else { return }
        if confirm {
            _ = try await client.request(reply, payload: Array("+ACK".utf8), timeout: timeout)
        } else {
            try await client.publish(reply, string: "+ACK")
        }
    }

    /// Asks for the message to be delivered again (now, or after `delay`).
    public func nak(_ message: JetStreamMessage, delay: Duration? = nil) async throws {
        guard let reply = message.message.replyTo else { return }
        let body = delay.map { "-NAK {\"delay\":\($0.nanoseconds)}" } ?? "-NAK"
        try await client.publish(reply, string: body)
    }

    // MARK: The API

    /// An API call with a JSON body.
    func call<Answer: Decodable>(_ api: String, body: some Encodable) async throws -> Answer {
        try await call(api, payload: JSONEncoder().encode(body))
    }

    /// An API call with an empty body (INFO, STREAM.INFO, CONSUMER.INFO).
    func call<Answer: Decodable>(_ api: String) async throws -> Answer {
        try await call(api, payload: Data())
    }

    private func call<Answer: Decodable>(_ api: String, payload: Data) async throws -> Answer {
        let reply = try await client.request("\(apiPrefix).\(api)", payload: ByteBuffer(bytes: payload), timeout: timeout)
        return try Self.decodeAnswer(Answer.self, reply, what: api)
    }

    static func decodeAnswer<Answer: Decodable>(_ type: Answer.Type, _ reply: NATSMessage, what: String) throws -> Answer {
        let data = Data(reply.payload.readableBytesView)
        if let status = reply.status, data.isEmpty {
            throw JetStreamError(code: status, errorCode: 0, text: reply.headers?.statusDescription ?? "\(what) failed")
        }
        if let envelope = try? JSONDecoder().decode(ErrorEnvelope.self, from: data), let error = envelope.error {
            throw JetStreamError(code: error.code, errorCode: error.errCode ?? 0, text: error.description ?? "\(what) failed")
        }
        do {
            return try JSONDecoder().decode(Answer.self, from: data)
        } catch {
            throw NATSError.protocolViolation("JetStream answer to \(what) is not the expected JSON (\(error)): \(String(decoding: data.prefix(200), as: UTF8.self))")
        }
    }

    static func validateName(_ name: String, _ what: String) throws {
        guard !name.isEmpty, name.utf8.count <= 255,
              !name.utf8.contains(where: { $0 <= 32 || $0 == 127 || $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "*") || $0 == UInt8(ascii: ">") || $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: "\\") }) else {
            throw NATSError.invalidName("invalid JetStream \(what) name '\(name)'")
        }
    }
}

/// A message as stored in a stream.
public struct StoredMessage: Sendable {
    public var subject: String
    public var sequence: UInt64
    public var headers: NATSHeaders
    public var payload: [UInt8]
}

private struct ErrorEnvelope: Decodable {
    struct APIError: Decodable {
        var code: Int
        var errCode: Int?
        var description: String?
        enum CodingKeys: String, CodingKey { case code, errCode = "err_code", description }
    }
    var error: APIError?
}

private struct StoredMessageAnswer: Decodable {
    struct Raw: Decodable {
        var subject: String
        var seq: UInt64
        var hdrs: String?
        var data: String?

        func decoded() throws -> StoredMessage {
            var headers = NATSHeaders()
            if let hdrs, !hdrs.isEmpty {
                guard let bytes = Data(base64Encoded: hdrs) else { throw NATSError.protocolViolation("stored message headers are not base64") }
                headers = try NATSHeaders.parse(bytes)
            }
            var payload: [UInt8] = []
            if let data, !data.isEmpty {
                guard let bytes = Data(base64Encoded: data) else { throw NATSError.protocolViolation("stored message data is not base64") }
                payload = Array(bytes)
            }
            return StoredMessage(subject: subject, sequence: seq, headers: headers, payload: payload)
        }
    }
    var message: Raw
}

extension Duration {
    /// Whole nanoseconds (JetStream's unit for durations).
    var nanoseconds: Int64 {
        let (seconds, attoseconds) = components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }
}
