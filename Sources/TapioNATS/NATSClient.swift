// The NATS client: one connection at a time to one server of a list,
// subscriptions that survive a reconnect (they are sent again, with the same
// ids, before anything else on the new connection), request-reply through one
// inbox subscription per client, and publishing checked against the server's
// limits before a byte is written. All state is behind one lock; the
// connection handler on the event loop feeds it.

import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// A server to connect to.
public struct NATSServerAddress: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int = 4222) {
        self.host = host
        self.port = port
    }

    /// "host:port", "nats://host:port", "tls://host:port" or "[::1]:4222"; the port defaults to 4222.
    public init(_ text: String) throws {
        var rest = Substring(text)
        for scheme in ["nats://", "tls://"] where rest.hasPrefix(scheme) { rest = rest.dropFirst(scheme.count) }
        var host = rest
        var port = 4222
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { throw NATSError.invalidName("invalid server address '\(text)'") }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if after.hasPrefix(":") {
                guard let p = Int(after.dropFirst()) else { throw NATSError.invalidName("invalid port in '\(text)'") }
                port = p
            } else if !after.isEmpty { throw NATSError.invalidName("invalid server address '\(text)'") }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            guard let p = Int(rest[rest.index(after: colon)...]) else { throw NATSError.invalidName("invalid port in '\(text)'") }
            port = p
        }
        guard !host.isEmpty, (1...65535).contains(port) else { throw NATSError.invalidName("invalid server address '\(text)'") }
        self.host = String(host)
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
}

extension NATSClient {
    public enum Authentication: Sendable {
        case none
        case userPassword(user: String, password: String)
        case token(String)
    }

    /// What happens when the connection is lost.
    public enum Reconnect: Sendable {
        /// The client closes; waiting operations fail with `connectionLost`.
        case off
        /// Through the server list again and again until `close()`.
        case forever
        /// At most this many passes through the server list, then the client closes.
        case rounds(Int)
    }

    public struct Configuration: Sendable {
        /// Tried in order at the start; after a loss, from the server after the lost one.
        public var servers: [NATSServerAddress]
        /// The connection's name as the server shows it (monitoring, logs).
        public var name: String = "tapio"
        public var authentication: Authentication = .none
        /// TLS for every connection; the upgrade happens after the server's
        /// plain-text INFO, as the protocol has it. nil: plain TCP, and a server
        /// that requires TLS is refused with a clear error.
        public var tls: TLSConfiguration?
        /// The name the server's certificate must carry; nil: the host when it
        /// is a name, the peer's IP address when it is an address.
        public var tlsServerHostname: String?
        /// TCP connect plus INFO, TLS, CONNECT and PONG, per server.
        public var connectTimeout: Duration = .seconds(5)
        /// The default time a request waits for its reply; also how long an
        /// operation waits for a connection while the client reconnects.
        public var requestTimeout: Duration = .seconds(5)
        /// How often the client PINGs the server; `maxPingsOutstanding` unanswered
        /// ones close the connection (and start a reconnect).
        public var pingInterval: Duration = .seconds(20)
        public var maxPingsOutstanding: Int = 2
        public var reconnect: Reconnect = .forever
        /// Pause before trying again the server just lost (or the only one),
        /// and between passes through the list; other servers are tried at once.
        public var reconnectWait: Duration = .milliseconds(250)
        /// Longest control line accepted from the server (bytes).
        public var maxControlLine: Int = 4096
        /// Largest message accepted from the server (bytes, headers included).
        public var maxIncomingPayload: Int = 8 << 20
        /// Messages a subscription buffers for a slow reader; more are dropped and counted.
        public var subscriptionPendingLimit: Int = 65536

        public init(servers: [NATSServerAddress]) {
            self.servers = servers
        }
    }
}

/// A NATS client (core protocol, request-reply; `JetStream` builds on it).
/// Its connection keeps it alive: end it with `close()`.
public final class NATSClient: Sendable {
    public let configuration: Configuration
    private let group: any EventLoopGroup
    private let logger: Logger
    private let sslContext: NIOSSLContext?
    /// "_INBOX.<random>": replies to this client's requests arrive under it.
    let inboxPrefix: String
    private let inboxSID: UInt64 = 1
    private let state = Mutex(State())

    private enum Phase {
        case connecting
        case connected(channel: any Channel, server: NATSServerAddress, info: NATSServerInfo, index: Int)
        case reconnecting(lastIndex: Int)
        case closed
    }

    private struct Subscription {
        var subject: String
        var queue: String?
        /// nil for the inbox subscription.
        var continuation: AsyncStream<NATSMessage>.Continuation?
        var dropped = 0
    }

    private struct PendingRequest {
        var subject: String
        var promise: EventLoopPromise<NATSMessage>
        var timeout: Scheduled<Void>?
    }

    private struct State {
        var phase = Phase.connecting
        var nextSID: UInt64 = 2
        var subscriptions: [UInt64: Subscription] = [:]
        var nextToken: UInt64 = 1
        var requests: [UInt64: PendingRequest] = [:]
        var connectionWaiters: [UInt64: EventLoopPromise<(any Channel, NATSServerInfo)>] = [:]
        var reconnects = 0
        var lastError: (any Error)?
    }

    private init(configuration: Configuration, group: any EventLoopGroup, logger: Logger) throws {
        self.configuration = configuration
        self.group = group
        self.logger = logger
        self.sslContext = try configuration.tls.map { try NIOSSLContext(configuration: $0) }
        self.inboxPrefix = "_INBOX." + NATSClient.randomToken()
        state.withLock {
            $0.subscriptions[inboxSID] = Subscription(subject: inboxPrefix + ".*", queue: nil, continuation: nil)
        }
    }

    /// Connects to the first server of the list that completes the handshake.
    public static func connect(
        _ configuration: Configuration,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "tapio.nats")
    ) async throws -> NATSClient {
        guard !configuration.servers.isEmpty else { throw NATSError.cannotConnect(["no servers configured"]) }
        guard configuration.maxPingsOutstanding >= 1, configuration.subscriptionPendingLimit >= 1,
              configuration.maxControlLine >= 64, configuration.maxIncomingPayload >= 1 else {
            throw NATSError.invalidName("NATS configuration: limits must be positive (control line at least 64 bytes)")
        }
        let client = try NATSClient(configuration: configuration, group: eventLoopGroup, logger: logger)
        var reasons: [String] = []
        for (index, server) in configuration.servers.enumerated() {
            do {
                let (channel, info, reason) = try await client.open(server)
                client.install(channel: channel, info: info, server: server, index: index, reason: reason)
                return client
            } catch {
                reasons.append("\(server): \(error)")
            }
        }
        client.state.withLock { $0.phase = .closed }
        throw NATSError.cannotConnect(reasons)
    }

    // MARK: - State the owner can read

    /// The server of the current connection, nil while (re)connecting or closed.
    public var connectedServer: NATSServerAddress? {
        state.withLock { if case .connected(_, let server, _, _) = $0.phase { return server } else { return nil } }
    }

    /// The current connection's INFO.
    public var serverInfo: NATSServerInfo? {
        state.withLock { if case .connected(_, _, let info, _) = $0.phase { return info } else { return nil } }
    }

    /// Connections made after the first.
    public var reconnectCount: Int { state.withLock { $0.reconnects } }

    /// Why the last connection closed (or the last -ERR), nil when none has.
    public var lastError: (any Error)? { state.withLock { $0.lastError } }

    public var isClosed: Bool { state.withLock { if case .closed = $0.phase { return true } else { return false } } }

    // MARK: - Core operations

    /// Publishes a message. Waits up to `requestTimeout` for a connection while
    /// reconnecting; returns when the bytes are written (NATS core has no ack:
    /// use JetStream for that).
    public func publish(_ subject: String, payload: ByteBuffer = ByteBuffer(), replyTo: String? = nil, headers: NATSHeaders? = nil) async throws {
        try Self.validateSubject(subject)
        if let replyTo { try Self.validateSubject(replyTo) }
        let headerBytes = try headers.map { try $0.validate(); return $0.encoded() }
        let (channel, info) = try await connection()
        let total = (headerBytes?.count ?? 0) + payload.readableBytes
        guard total <= info.maxPayload else { throw NATSError.payloadTooLarge(bytes: total, limit: info.maxPayload) }
        if headerBytes != nil, !info.headers { throw NATSError.headersNotSupported }
        var buffer = channel.allocator.buffer(capacity: subject.utf8.count + (replyTo?.utf8.count ?? 0) + total + 40)
        if let headerBytes {
            buffer.writeString("HPUB \(subject) \(replyTo.map { $0 + " " } ?? "")\(headerBytes.count) \(total)\r\n")
            buffer.writeBytes(headerBytes)
        } else {
            buffer.writeString("PUB \(subject) \(replyTo.map { $0 + " " } ?? "")\(total)\r\n")
        }
        var body = payload
        buffer.writeBuffer(&body)
        buffer.writeString("\r\n")
        try await channel.writeAndFlush(NATSOutbound.bytes(buffer))
    }

    public func publish(_ subject: String, payload: some Sequence<UInt8>, replyTo: String? = nil, headers: NATSHeaders? = nil) async throws {
        try await publish(subject, payload: ByteBuffer(bytes: payload), replyTo: replyTo, headers: headers)
    }

    public func publish(_ subject: String, string: String, replyTo: String? = nil, headers: NATSHeaders? = nil) async throws {
        try await publish(subject, payload: ByteBuffer(string: string), replyTo: replyTo, headers: headers)
    }

    /// Returns when the server has processed everything this client sent before (a PING answered by a PONG).
    public func flush() async throws {
        let (channel, _) = try await connection()
        let pong = channel.eventLoop.makePromise(of: Void.self)
        // A channel that closed meanwhile never hands the PING to the handler: fail the PONG here.
        channel.writeAndFlush(NATSOutbound.ping(pong)).whenFailure { pong.fail($0) }
        try await pong.futureResult.get()
    }

    /// Subscribes to `subject` (wildcards allowed), in `queue` group when given.
    /// The subscription is sent again after every reconnect.
    public func subscribe(_ subject: String, queue: String? = nil) throws -> NATSSubscription {
        try Self.validateSubject(subject)
        if let queue { try Self.validateSubject(queue) }
        let (stream, continuation) = AsyncStream.makeStream(
            of: NATSMessage.self, bufferingPolicy: .bufferingOldest(configuration.subscriptionPendingLimit))
        let sid: UInt64 = try state.withLock { state in
            if case .closed = state.phase { throw NATSError.closed }
            let sid = state.nextSID
            state.nextSID += 1
            state.subscriptions[sid] = Subscription(subject: subject, queue: queue, continuation: continuation)
            if case .connected(let channel, _, _, _) = state.phase {
                channel.writeAndFlush(NATSOutbound.bytes(Self.subLine(sid: sid, subject: subject, queue: queue)), promise: nil)
            }
            return sid
        }
        let client = self
        continuation.onTermination = { _ in client.unsubscribe(sid: sid) }
        return NATSSubscription(sid: sid, subject: subject, stream: stream, client: self)
    }

    func unsubscribe(sid: UInt64) {
        let continuation: AsyncStream<NATSMessage>.Continuation? = state.withLock { state in
            guard let removed = state.subscriptions.removeValue(forKey: sid) else { return nil }
            if case .connected(let channel, _, _, _) = state.phase {
                channel.writeAndFlush(NATSOutbound.bytes(ByteBuffer(string: "UNSUB \(sid)\r\n")), promise: nil)
            }
            return removed.continuation
        }
        continuation?.finish()
    }

    /// Messages a subscription dropped because its reader fell `subscriptionPendingLimit` behind.
    func droppedCount(sid: UInt64) -> Int { state.withLock { $0.subscriptions[sid]?.dropped ?? 0 } }

    /// Publishes with a reply subject in this client's inbox and waits for the
    /// first reply. A 503 status (nothing subscribes to `subject`) is reported
    /// as `NATSError.noResponders`.
    public func request(_ subject: String, payload: ByteBuffer = ByteBuffer(), headers: NATSHeaders? = nil, timeout: Duration? = nil) async throws -> NATSMessage {
        let timeout = timeout ?? configuration.requestTimeout
        let promise = group.next().makePromise(of: NATSMessage.self)
        let token: UInt64 = try state.withLock { state in
            if case .closed = state.phase {
                promise.fail(NATSError.closed)
                throw NATSError.closed
            }
            let token = state.nextToken
            state.nextToken += 1
            state.requests[token] = PendingRequest(subject: subject, promise: promise, timeout: nil)
            return token
        }
        let seconds = Double(timeout.components.seconds) + Double(timeout.components.attoseconds) / 1e18
        let timer = group.next().scheduleTask(in: TimeAmount(timeout)) { [self] in
            finishRequest(token, .failure(NATSError.timeout("no reply to a request on '\(subject)' within \(seconds) s")))
        }
        state.withLock { $0.requests[token]?.timeout = timer }
        return try await withTaskCancellationHandler {
            do {
                try await publish(subject, payload: payload, replyTo: "\(inboxPrefix).\(token)", headers: headers)
            } catch {
                finishRequest(token, .failure(error))
            }
            return try await promise.futureResult.get()
        } onCancel: {
            finishRequest(token, .failure(CancellationError()))
        }
    }

    public func request(_ subject: String, payload: some Sequence<UInt8>, headers: NATSHeaders? = nil, timeout: Duration? = nil) async throws -> NATSMessage {
        try await request(subject, payload: ByteBuffer(bytes: payload), headers: headers, timeout: timeout)
    }

    private func finishRequest(_ token: UInt64, _ result: Result<NATSMessage, any Error>) {
        guard let pending = state.withLock({ $0.requests.removeValue(forKey: token) }) else { return }
        pending.timeout?.cancel()
        switch result {
        case .success(let message) where message.status == 503:
            pending.promise.fail(NATSError.noResponders(subject: pending.subject))
        case .success(let message):
            pending.promise.succeed(message)
        case .failure(let error):
            pending.promise.fail(error)
        }
    }

    /// Closes the connection and ends every subscription; waiting operations fail with `closed`.
    public func close() async {
        let (channel, requests, waiters, subscriptions): ((any Channel)?, [PendingRequest], [EventLoopPromise<(any Channel, NATSServerInfo)>], [Subscription]) =
            state.withLock { state in
                var channel: (any Channel)?
                if case .connected(let c, _, _, _) = state.phase { channel = c }
                state.phase = .closed
                defer { state.requests = [:]; state.connectionWaiters = [:]; state.subscriptions = [:] }
                return (channel, Array(state.requests.values), Array(state.connectionWaiters.values), Array(state.subscriptions.values))
            }
        for r in requests { r.timeout?.cancel(); r.promise.fail(NATSError.closed) }
        for w in waiters { w.fail(NATSError.closed) }
        for s in subscriptions { s.continuation?.finish() }
        if let channel { try? await channel.close() }
    }

    // MARK: - Connections

    /// The current connection, waiting up to `requestTimeout` while reconnecting.
    private func connection() async throws -> (any Channel, NATSServerInfo) {
        enum Now { case ready(any Channel, NATSServerInfo), wait(UInt64, EventLoopPromise<(any Channel, NATSServerInfo)>) }
        let now: Now = try state.withLock { state in
            switch state.phase {
            case .connected(let channel, _, let info, _):
                return .ready(channel, info)
            case .closed:
                throw NATSError.closed
            case .connecting, .reconnecting:
                let id = state.nextToken
                state.nextToken += 1
                let promise = group.next().makePromise(of: (any Channel, NATSServerInfo).self)
                state.connectionWaiters[id] = promise
                return .wait(id, promise)
            }
        }
        switch now {
        case .ready(let channel, let info):
            return (channel, info)
        case .wait(let waiter, let promise):
            let timeout = configuration.requestTimeout
            let timer = group.next().scheduleTask(in: TimeAmount(timeout)) { [self] in
                let p = state.withLock { $0.connectionWaiters.removeValue(forKey: waiter) }
                p?.fail(NATSError.timeout("no connection to a NATS server within \(timeout)"))
            }
            promise.futureResult.whenComplete { _ in timer.cancel() }
            return try await promise.futureResult.get()
        }
    }

    /// TCP, then the handshake; the channel, the server's INFO and where its close reason will be.
    private func open(_ server: NATSServerAddress) async throws -> (any Channel, NATSServerInfo, NATSCloseReason) {
        let handshake = group.next().makePromise(of: NATSServerInfo.self)
        let tlsHostname = configuration.tlsServerHostname ?? (Self.isIPAddress(server.host) ? nil : server.host)
        var connect = NATSConnectOptions(tlsRequired: sslContext != nil, name: configuration.name)
        switch configuration.authentication {
        case .none: break
        case .userPassword(let user, let password): connect.user = user; connect.pass = password
        case .token(let token): connect.authToken = token
        }
        let settings = NATSConnectionHandler.Settings(
            server: server, connect: connect, sslContext: sslContext, tlsServerHostname: tlsHostname,
            handshakeTimeout: TimeAmount(configuration.connectTimeout), pingInterval: TimeAmount(configuration.pingInterval),
            maxPingsOutstanding: configuration.maxPingsOutstanding)
        let decoder = NATSFrameDecoder(maxControlLine: configuration.maxControlLine, maxPayload: configuration.maxIncomingPayload)
        let reason = NATSCloseReason()
        let client = self
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(TimeAmount(configuration.connectTimeout))
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let handler = NATSConnectionHandler(settings: settings, handshake: handshake, events: client, closeReason: reason)
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(decoder))
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: server.host, port: server.port).get()
        } catch {
            handshake.fail(error)
            throw Self.connectFailure(error)
        }
        do {
            let info = try await handshake.futureResult.get()
            return (channel, info, reason)
        } catch {
            channel.close(promise: nil)
            throw error
        }
    }

    /// Makes a handshaken connection the current one: subscriptions are sent
    /// again first, then waiting operations go ahead.
    private func install(channel: any Channel, info: NATSServerInfo, server: NATSServerAddress, index: Int, reason: NATSCloseReason) {
        let waiters: [EventLoopPromise<(any Channel, NATSServerInfo)>]? = state.withLock { state in
            if case .closed = state.phase { return nil }
            if case .reconnecting = state.phase { state.reconnects += 1 }
            var subs = channel.allocator.buffer(capacity: 64 * state.subscriptions.count)
            for (sid, s) in state.subscriptions.sorted(by: { $0.key < $1.key }) {
                var line = Self.subLine(sid: sid, subject: s.subject, queue: s.queue)
                subs.writeBuffer(&line)
            }
            channel.writeAndFlush(NATSOutbound.bytes(subs), promise: nil)
            state.phase = .connected(channel: channel, server: server, info: info, index: index)
            defer { state.connectionWaiters = [:] }
            return Array(state.connectionWaiters.values)
        }
        guard let waiters else {
            channel.close(promise: nil)
            return
        }
        logger.info("connected to NATS", metadata: ["server": "\(server)", "server_name": "\(info.serverName)", "version": "\(info.version)"])
        for w in waiters { w.succeed((channel, info)) }
        channel.closeFuture.whenComplete { [self] _ in connectionLost(channel, reason: reason.error ?? NATSError.connectionLost) }
    }

    private func connectionLost(_ channel: any Channel, reason: any Error) {
        let outcome: (requests: [PendingRequest], index: Int)? = state.withLock { state in
            guard case .connected(let current, _, _, let index) = state.phase, current === channel else { return nil }
            state.lastError = reason
            state.phase = .reconnecting(lastIndex: index)
            defer { state.requests = [:] }
            return (Array(state.requests.values), index)
        }
        guard let outcome else { return }
        logger.warning("NATS connection lost", metadata: ["reason": "\(reason)"])
        // A request in flight may have been answered on the lost connection: its outcome is unknown.
        for r in outcome.requests { r.timeout?.cancel(); r.promise.fail(NATSError.connectionLost) }
        if case .off = configuration.reconnect {
            giveUp(reason)
            return
        }
        Task { await reconnect(after: outcome.index) }
    }

    private func reconnect(after lastIndex: Int) async {
        let servers = configuration.servers
        var round = 0
        while true {
            var reasons: [String] = []
            for step in 1...servers.count {
                let index = (lastIndex + step) % servers.count
                // The other servers at once (fail over fast); the one just lost,
                // or the only one, after a pause: a server that accepts and then
                // drops every connection must not get a connection storm.
                if index == lastIndex || round > 0 && step == 1 { try? await Task.sleep(for: configuration.reconnectWait) }
                if isClosed { return }
                do {
                    let (channel, info, reason) = try await open(servers[index])
                    install(channel: channel, info: info, server: servers[index], index: index, reason: reason)
                    return
                } catch {
                    reasons.append("\(servers[index]): \(error)")
                    logger.debug("NATS reconnect attempt failed", metadata: ["server": "\(servers[index])", "error": "\(error)"])
                }
            }
            round += 1
            if case .rounds(let limit) = configuration.reconnect, round >= limit {
                giveUp(NATSError.cannotConnect(reasons))
                return
            }
        }
    }

    /// The client closes itself after the reconnect policy ran out.
    private func giveUp(_ error: any Error) {
        let (waiters, subscriptions) = state.withLock { state in
            state.phase = .closed
            state.lastError = error
            defer { state.connectionWaiters = [:]; state.subscriptions = [:] }
            return (Array(state.connectionWaiters.values), Array(state.subscriptions.values))
        }
        logger.error("NATS client gave up reconnecting", metadata: ["error": "\(error)"])
        for w in waiters { w.fail(error) }
        for s in subscriptions { s.continuation?.finish() }
    }

    // MARK: - Helpers

    /// A TCP connect failure in the system's words ("Connection refused");
    /// the server's address is added by the caller.
    private static func connectFailure(_ error: any Error) -> NATSError {
        let reasons: [String]
        if let failures = error as? NIOConnectionError {
            reasons = failures.connectionErrors.map { failure in
                (failure.error as? IOError).map { String(cString: strerror($0.errnoCode)) } ?? "\(failure.error)"
            } + (failures.dnsAError.map { ["DNS: \($0)"] } ?? []) + (failures.dnsAAAAError.map { ["DNS: \($0)"] } ?? [])
        } else if let io = error as? IOError {
            reasons = [String(cString: strerror(io.errnoCode))]
        } else {
            reasons = ["\(error)"]
        }
        return .connectionFailed("TCP connect failed: \(reasons.isEmpty ? "\(error)" : Set(reasons).sorted().joined(separator: ", "))")
    }

    private static func subLine(sid: UInt64, subject: String, queue: String?) -> ByteBuffer {
        ByteBuffer(string: "SUB \(subject) \(queue.map { $0 + " " } ?? "")\(sid)\r\n")
    }

    /// A subject: not empty, no whitespace or control bytes, no empty token.
    static func validateSubject(_ subject: String) throws {
        guard !subject.isEmpty, subject.utf8.count <= 1024,
              !subject.utf8.contains(where: { $0 <= 32 || $0 == 127 }),
              !subject.split(separator: ".", omittingEmptySubsequences: false).contains(where: \.isEmpty) else {
            throw NATSError.invalidName("invalid NATS subject '\(subject)'")
        }
    }

    static func randomToken() -> String {
        let alphabet = Array("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        return String((0..<22).map { _ in alphabet.randomElement()! })
    }

    private static func isIPAddress(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}

extension NATSClient: NATSConnectionEvents {
    func received(_ message: NATSMessage) {
        if message.sid == inboxSID {
            guard message.subject.hasPrefix(inboxPrefix + "."),
                  let token = UInt64(message.subject.dropFirst(inboxPrefix.count + 1)) else { return }
            finishRequest(token, .success(message))
            return
        }
        guard let continuation = state.withLock({ $0.subscriptions[message.sid]?.continuation }) else { return }
        if case .dropped = continuation.yield(message) {
            let dropped = state.withLock { state -> Int in
                state.subscriptions[message.sid]?.dropped += 1
                return state.subscriptions[message.sid]?.dropped ?? 0
            }
            if dropped == 1 || dropped.isMultiple(of: 1000) {
                logger.warning("NATS subscription is too slow: messages dropped", metadata: ["subject": "\(message.subject)", "dropped": "\(dropped)"])
            }
        }
    }

    func serverInfoChanged(_ info: NATSServerInfo) {
        state.withLock { state in
            if case .connected(let channel, let server, _, let index) = state.phase {
                state.phase = .connected(channel: channel, server: server, info: info, index: index)
            }
        }
    }

    func serverError(_ text: String) {
        state.withLock { $0.lastError = NATSError.serverError(text) }
        logger.warning("NATS server error", metadata: ["error": "\(text)"])
    }
}

/// Messages of one subscription, in order. Ends when unsubscribed or the client closes.
public struct NATSSubscription: AsyncSequence, Sendable {
    public typealias Element = NATSMessage
    public let sid: UInt64
    public let subject: String
    private let stream: AsyncStream<NATSMessage>
    private let client: NATSClient

    init(sid: UInt64, subject: String, stream: AsyncStream<NATSMessage>, client: NATSClient) {
        self.sid = sid
        self.subject = subject
        self.stream = stream
        self.client = client
    }

    public func makeAsyncIterator() -> AsyncStream<NATSMessage>.AsyncIterator { stream.makeAsyncIterator() }

    /// Stops the subscription; the sequence ends after the messages already buffered.
    public func unsubscribe() { client.unsubscribe(sid: sid) }

    /// Messages dropped because the reader fell too far behind.
    public var droppedCount: Int { client.droppedCount(sid: sid) }
}
