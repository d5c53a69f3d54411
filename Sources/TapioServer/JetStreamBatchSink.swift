import Foundation
import Logging
import NIOCore
import NIOSSL
import Synchronization
import TapioCorrelation
import TapioNATS
import TapioStore
import TapioWire

/// Where an ingest replica publishes (`tapio-server --role ingest`, docs/scaling.md).
public struct NATSIngestConfiguration: Sendable {
    /// The NATS servers, tried in order (nats:// or tls:// URLs, or host:port).
    public var servers: [NATSServerAddress]
    /// The JetStream stream, created or updated at start.
    public var stream = "TAPIO_EVENTS"
    /// Replicas of the stream (3 in a cluster of three or more NATS servers).
    public var replicas = 1
    /// How long JetStream remembers a message id: a batch resent within it is
    /// acknowledged as a duplicate and stored once. Ten minutes covers an
    /// agent's reconnect (backoff at most 5 s, after a refusal at most 60 s)
    /// many times over; JetStream keeps every id of the window in memory.
    public var duplicateWindow: Duration = .seconds(600)
    /// Messages older than this are deleted by JetStream (0: kept until `maxBytes`).
    public var maxAge: Duration = .seconds(7 * 86_400)
    /// The stream's size limit in bytes (-1: none); the oldest messages go first.
    public var maxBytes: Int64 = -1
    /// How long one publish waits for its acknowledgement (also for a
    /// connection while the client reconnects).
    public var publishTimeout: Duration = .seconds(5)
    /// TLS towards NATS (CA to verify the servers; a client certificate when the servers ask for one).
    public var tls: TLSConfiguration?
    public var authentication: NATSClient.Authentication = .none
    /// The connection's name on the NATS servers.
    public var clientName = "tapio-server ingest"

    public init(servers: [NATSServerAddress]) {
        self.servers = servers
    }
}

/// One batch as it travels through the stream: the batch exactly as the agent
/// sent it (the payload), and in headers what the local store keeps beside it
/// (docs/scaling.md): where the server placed it on its clock, when it
/// arrived, the events the server itself set aside. The subject and the
/// message id say whose batch it is.
public struct StreamedBatch: Sendable, Equatable {
    public static let subjectPrefix = "tapio.events"
    public static let inventoryPrefix = "tapio.inventory"

    public var node: String
    public var epoch: UInt64
    public var sequence: UInt64
    public var receivedNs: Int64
    public var clock: ClockCorrection
    public var serverDrops: [DropCount]
    public var payload: [UInt8]

    public init(_ append: BatchAppend) {
        self.node = append.batch.node
        self.epoch = append.batch.epoch
        self.sequence = append.batch.sequence
        self.receivedNs = append.receivedNs
        self.clock = append.clock
        self.serverDrops = append.serverDrops
        self.payload = append.payload
    }

    /// `tapio.events.<node>`: one subject token per node, whatever its name
    /// holds (bytes other than letters, digits, `-` and `_` as `%XX`, so a
    /// node `ip-10-0-0-1.ec2.internal` is one token).
    public static func subject(node: String) -> String { subjectPrefix + "." + token(node) }

    /// `Nats-Msg-Id`: node, epoch and sequence, so a resend within the
    /// stream's duplicate window is stored once.
    public static func messageID(node: String, epoch: UInt64, sequence: UInt64) -> String { "\(token(node)):\(epoch):\(sequence)" }

    public var subject: String { Self.subject(node: node) }
    public var messageID: String { Self.messageID(node: node, epoch: epoch, sequence: sequence) }

    public var headers: NATSHeaders {
        var h = NATSHeaders()
        h.append("Tapio-Epoch", String(epoch))
        h.append("Tapio-Sequence", String(sequence))
        h.append("Tapio-Received-Ns", String(receivedNs))
        h.append("Tapio-Clock-Offset-Ns", String(clock.offsetNs))
        h.append("Tapio-Clock-Error-Ns", String(clock.errorNs))
        if !serverDrops.isEmpty {
            h.append("Tapio-Server-Drops", serverDrops.map { "\($0.kind.rawValue)/\(Self.token($0.reason))=\($0.count)" }.joined(separator: ","))
        }
        return h
    }

    /// A message read back from the stream; throws saying what is missing or wrong.
    public init(headers: NATSHeaders, payload: [UInt8]) throws {
        try self.init(headers: headers, payload: payload, batch: EventBatch.decode(payload))
    }

    /// A message of the stream as a consumer takes it: the message and its
    /// batch, decoded with the same bound on events as ingest applies
    /// (`Limits.maxBatchEvents`); throws saying what is wrong.
    public static func read(headers: NATSHeaders, payload: [UInt8], maxEvents: Int) throws -> (message: StreamedBatch, batch: EventBatch) {
        let batch = try EventBatch.decode(payload, maxEvents: maxEvents)
        return (try StreamedBatch(headers: headers, payload: payload, batch: batch), batch)
    }

    private init(headers: NATSHeaders, payload: [UInt8], batch: EventBatch) throws {
        func field<T: LosslessStringConvertible>(_ name: String, _: T.Type) throws -> T {
            guard let text = headers[name], let value = T(text) else {
                throw WireError(.malformed, "streamed batch without a valid \(name) header (\(headers[name] ?? "absent"))")
            }
            return value
        }
        self.node = batch.node
        self.epoch = try field("Tapio-Epoch", UInt64.self)
        self.sequence = try field("Tapio-Sequence", UInt64.self)
        guard epoch == batch.epoch, sequence == batch.sequence else {
            throw WireError(.malformed, "streamed batch headers say \(epoch)/\(sequence), its payload \(batch.epoch)/\(batch.sequence)")
        }
        self.receivedNs = try field("Tapio-Received-Ns", Int64.self)
        self.clock = ClockCorrection(offsetNs: try field("Tapio-Clock-Offset-Ns", Int64.self), errorNs: try field("Tapio-Clock-Error-Ns", Int64.self))
        self.serverDrops = try (headers["Tapio-Server-Drops"] ?? "").split(separator: ",").map { item in
            let parts = item.split(separator: "=", maxSplits: 1)
            let kr = parts.first?.split(separator: "/", maxSplits: 1) ?? []
            guard parts.count == 2, kr.count == 2, let raw = UInt32(kr[0]), let kind = EventKind(rawValue: raw), let count = UInt64(parts[1]),
                  let reason = String(kr[1]).removingPercentEncoding else {
                throw WireError(.malformed, "streamed batch with a bad Tapio-Server-Drops item '\(item)'")
            }
            return DropCount(kind: kind, reason: reason, count: count)
        }
        self.payload = payload
    }

    /// The batch as the local store takes it.
    public func append() throws -> BatchAppend {
        BatchAppend(batch: try EventBatch.decode(payload), payload: payload, clock: clock, receivedNs: receivedNs, serverDrops: serverDrops)
    }

    static func token(_ text: String) -> String {
        var out = ""
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "_"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                out += String(format: "%%%02X", byte)
            }
        }
        return out
    }
}

/// Role `ingest`: each batch is published to a JetStream stream with a
/// message id from (node, epoch, sequence) and is durable once JetStream's
/// publish acknowledgement arrives (the stream has stored it on a quorum of
/// its replicas). A duplicate acknowledgement means the stream held it
/// already. The NATS connection is made in the background and kept up by the
/// client (reconnecting to the other servers of the list); until it is up
/// and the stream exists, every batch fails (the agent keeps it and resends)
/// and /readyz says why.
final class JetStreamBatchSink: BatchSink {
    enum FailureReason: String, CaseIterable {
        /// No acknowledgement within the publish timeout (or no connection within it).
        case timeout
        /// The connection went while the publish was in flight: its outcome is unknown.
        case connectionLost = "connection_lost"
        /// No NATS connection (yet, or the client gave up), or the stream is not set up.
        case notConnected = "not_connected"
        /// No stream takes the subject right now (a cluster electing the stream's leader answers so).
        case noResponders = "no_responders"
        /// JetStream refused the message (its error in the log).
        case refused
        /// A stream other than the configured one acknowledged it.
        case wrongStream = "wrong_stream"
    }

    private struct State {
        var client: NATSClient?
        var streamReady = false
        var stopped = false
        /// The background connect and stream set-up is running.
        var settingUp = false
        /// What went wrong last while connecting or setting up the stream.
        var problem = "connecting to NATS"
    }

    let configuration: NATSIngestConfiguration
    private let metrics: ServerMetrics
    private let logger: Logger
    private let state = Mutex(State())
    private let connector = Mutex<Task<Void, Never>?>(nil)
    /// Time from publish to JetStream's acknowledgement.
    let publishLatency = MetricsHistogram(bounds: MetricsHistogram.secondsBounds)

    init(configuration: NATSIngestConfiguration, metrics: ServerMetrics, logger: Logger) {
        self.configuration = configuration
        self.metrics = metrics
        self.logger = logger
        for reason in FailureReason.allCases { metrics.add(Self.failureMetric(reason), 0) }
        metrics.add("tapio_server_nats_inventory_failures_total", 0)
    }

    static func failureMetric(_ reason: FailureReason) -> String { "tapio_server_nats_publish_failures_total{reason=\"\(reason.rawValue)\"}" }

    /// The stream as this replica asks for it.
    var streamConfiguration: StreamConfiguration {
        var s = StreamConfiguration(name: configuration.stream, subjects: [StreamedBatch.subjectPrefix + ".>", StreamedBatch.inventoryPrefix + ".>"])
        s.storage = .file
        s.replicas = configuration.replicas
        s.duplicateWindow = configuration.duplicateWindow
        s.maxAge = configuration.maxAge
        s.maxBytes = configuration.maxBytes
        // The last message on a subject is read by the lookups of later roles.
        s.allowDirect = true
        return s
    }

    /// Connects and creates or updates the stream in the background, retrying
    /// every second (logging each new reason once) until both are done. Called
    /// again when publishes find no stream (deleted, or its leader lost): a
    /// run already under way is left to finish.
    func start() {
        let begin = state.withLock { s -> Bool in
            guard !s.stopped, !s.settingUp else { return false }
            s.settingUp = true
            return true
        }
        guard begin else { return }
        let task = Task { [self] in
            var lastLogged = ""
            func note(_ problem: String) {
                state.withLock { $0.problem = problem }
                if problem != lastLogged {
                    logger.warning("NATS not ready; retrying every second", metadata: ["reason": "\(problem)"])
                    lastLogged = problem
                }
            }
            while !Task.isCancelled {
                if state.withLock({ $0.client == nil }) {
                    do {
                        let client = try await NATSClient.connect(configuration.clientConfiguration, logger: logger)
                        let keep = state.withLock { s -> Bool in
                            guard !s.stopped else { return false }
                            s.client = client
                            return true
                        }
                        guard keep else { await client.close(); return }
                        logger.info("connected to NATS", metadata: ["server": "\(client.connectedServer.map { "\($0)" } ?? "?")"])
                    } catch {
                        note("cannot connect to NATS: \(error)")
                        try? await Task.sleep(for: .seconds(1))
                        continue
                    }
                }
                guard let client = state.withLock({ $0.client }) else { continue }
                do {
                    let js = JetStream(client: client, timeout: configuration.publishTimeout)
                    let info = try await js.createOrUpdateStream(streamConfiguration)
                    state.withLock {
                        $0.streamReady = true
                        $0.problem = ""
                        $0.settingUp = false
                    }
                    logger.info("JetStream stream ready", metadata: [
                        "stream": "\(info.config.name)", "replicas": "\(info.config.replicas)", "subjects": "\(info.config.subjects.joined(separator: ","))",
                        "duplicate_window_s": "\(info.config.duplicateWindow.components.seconds)", "messages": "\(info.state.messages)",
                    ])
                    return
                } catch {
                    note("cannot create or update stream \(configuration.stream): \(error)")
                    try? await Task.sleep(for: .seconds(1))
                }
            }
        }
        connector.withLock { $0 = task }
    }

    /// nil when publishing can go ahead, else why not (for /readyz).
    var notReadyReason: String? {
        state.withLock { s -> String? in
            if s.stopped { return "stopped" }
            guard let client = s.client, s.streamReady else { return s.problem }
            if client.isClosed { return "the NATS client gave up: \(client.lastError.map { "\($0)" } ?? "closed")" }
            if client.connectedServer == nil {
                return "reconnecting to NATS\(client.lastError.map { " (lost: \($0))" } ?? "")"
            }
            return nil
        }
    }

    var connectedServer: NATSServerAddress? { state.withLock { $0.client?.connectedServer } }
    var reconnects: Int { state.withLock { $0.client?.reconnectCount ?? 0 } }

    func append(_ append: BatchAppend, observed: [ObservedEvent], eventLoop: any EventLoop) -> EventLoopFuture<GroupCommit.Outcome> {
        let promise = eventLoop.makePromise(of: GroupCommit.Outcome.self)
        let (client, ready) = state.withLock { ($0.client, $0.streamReady && !$0.stopped) }
        let message = StreamedBatch(append)
        guard let client, ready else {
            let why = notReadyReason ?? "not connected"
            metrics.add(Self.failureMetric(.notConnected))
            logger.warning("batch not published: NATS is not ready", metadata: [
                "node": "\(message.node)", "epoch": "\(message.epoch)", "sequence": "\(message.sequence)", "reason": "\(why)"])
            promise.fail(PublishError(reason: .notConnected, description: "NATS is not ready: \(why)"))
            return promise.futureResult
        }
        let js = JetStream(client: client, timeout: configuration.publishTimeout)
        let stream = configuration.stream
        let (metrics, logger, latency) = (self.metrics, self.logger, self.publishLatency)
        promise.completeWithTask { [self] in
            let started = ContinuousClock.now
            do {
                let ack = try await js.publish(message.subject, payload: message.payload, messageID: message.messageID, headers: message.headers)
                guard ack.stream == stream else {
                    throw PublishError(reason: .wrongStream, description: "stream \(ack.stream) acknowledged a batch meant for \(stream): another stream takes \(message.subject)")
                }
                let took = ContinuousClock.now - started
                latency.observe(nanoseconds: took.components.seconds * 1_000_000_000 + took.components.attoseconds / 1_000_000_000)
                return GroupCommit.Outcome(stored: !ack.duplicate, room: true)
            } catch {
                let failure = PublishError(error)
                metrics.add(Self.failureMetric(failure.reason))
                if failure.reason == .noResponders { self.streamMissing() }
                logger.warning("publishing a batch to JetStream failed; not acknowledged, the agent resends it", metadata: [
                    "node": "\(message.node)", "epoch": "\(message.epoch)", "sequence": "\(message.sequence)",
                    "reason": "\(failure.reason.rawValue)", "error": "\(failure.description)",
                    "server": "\(client.connectedServer.map { "\($0)" } ?? "none")"])
                throw failure
            }
        }
        return promise.futureResult
    }

    /// No stream answered a publish: JetStream answers so for a moment while
    /// it elects the stream's leader, and for good when the stream was
    /// deleted. Set it up again (a no-op update in the first case), and be
    /// not ready until that worked.
    private func streamMissing() {
        let wasReady = state.withLock { s -> Bool in
            defer {
                s.streamReady = false
                s.problem = "no stream answered on \(StreamedBatch.subjectPrefix).>: setting up stream \(configuration.stream) again"
            }
            return s.streamReady
        }
        if wasReady {
            logger.warning("no stream answers for the batches; creating or updating it again", metadata: ["stream": "\(configuration.stream)"])
            start()
        }
    }

    /// Claims no batch. The stream cannot say cheaply which sequences of an
    /// epoch it holds without a gap: its last message on the node's subject
    /// is the newest stored, and a batch before it may have failed (its
    /// publish timed out while the next one went through), so claiming up to
    /// it would make the agent drop a batch nobody stored. With 0 the agent
    /// resends what it still holds; each resend is acknowledged, as a
    /// duplicate when the stream has it (docs/scaling.md).
    func durablePrefix(node: String, epoch: UInt64, eventLoop: any EventLoop) -> EventLoopFuture<UInt64> {
        eventLoop.makeSucceededFuture(0)
    }

    /// Node records live in each replica's registry only (/metrics of that replica).
    func saveNode(_ record: NodeRecord, logger: Logger) {}

    /// The node's pods go to the stream too, on `tapio.inventory.<node>`, for
    /// the consumers of the stream. Agents resend their inventory on every
    /// connection; a failure is counted and logged, not retried.
    func savePods(node: String, pods: [PodInfo], logger: Logger) {
        guard let client = state.withLock({ $0.streamReady ? $0.client : nil }) else {
            metrics.add("tapio_server_nats_inventory_failures_total")
            logger.warning("pods not published: NATS is not ready", metadata: ["node": "\(node)"])
            return
        }
        let js = JetStream(client: client, timeout: configuration.publishTimeout)
        let subject = StreamedBatch.inventoryPrefix + "." + StreamedBatch.token(node)
        let payload = Inventory(pods: pods).encoded()
        let metrics = self.metrics
        Task {
            do {
                _ = try await js.publish(subject, payload: payload)
            } catch {
                metrics.add("tapio_server_nats_inventory_failures_total")
                logger.warning("publishing pods to JetStream failed", metadata: ["node": "\(node)", "error": "\(PublishError(error).description)"])
            }
        }
    }

    /// Nothing downstream to wait for in this role.
    func whenRoom(_ body: @escaping @Sendable () -> Void) { body() }

    func stop() async {
        connector.withLock { $0?.cancel() }
        let client = state.withLock { s -> NATSClient? in
            s.stopped = true
            defer { s.client = nil }
            return s.client
        }
        await client?.close()
    }
}

/// Why a publish was not acknowledged, in words.
struct PublishError: Error, CustomStringConvertible {
    var reason: JetStreamBatchSink.FailureReason
    var description: String

    init(reason: JetStreamBatchSink.FailureReason, description: String) {
        self.reason = reason
        self.description = description
    }

    init(_ error: any Error) {
        if let e = error as? PublishError {
            self = e
            return
        }
        switch error {
        case NATSError.timeout(let what): self.init(reason: .timeout, description: "no acknowledgement in time: \(what)")
        case NATSError.connectionLost: self.init(reason: .connectionLost, description: "the NATS connection was lost with the publish in flight")
        case NATSError.closed: self.init(reason: .notConnected, description: "the NATS client is closed")
        case NATSError.noResponders(let subject): self.init(reason: .noResponders, description: "no stream answers on \(subject) (leader election?)")
        case let e as JetStreamError: self.init(reason: .refused, description: "JetStream refused it: \(e)")
        default: self.init(reason: .refused, description: "\(error)")
        }
    }
}

extension NATSIngestConfiguration {
    /// TLS towards NATS from a directory in the cert-manager layout
    /// (`ClientTLSDirectory`).
    public static func tls(directory: String) throws -> TLSConfiguration {
        try ClientTLSDirectory.configuration(directory: directory, servers: "the NATS servers")
    }

    /// The NATS client's settings: these servers, TLS, credentials, the
    /// connection's name; requests wait `publishTimeout`.
    public var clientConfiguration: NATSClient.Configuration {
        var c = NATSClient.Configuration(servers: servers)
        c.name = clientName
        c.tls = tls
        c.authentication = authentication
        c.requestTimeout = publishTimeout
        c.connectTimeout = .seconds(3)
        return c
    }

    /// The default TLS of a `tls://` server when no directory is given: the system's trust store.
    public static var systemTLS: TLSConfiguration { ClientTLSDirectory.systemTrust }
}
