import Foundation
import Logging
import Synchronization
import TapioWire

/// The agent's side of the wire, on its own thread: connect with backoff,
/// hello, answer time syncs, send batches within the server's window and
/// limits, drop each from the outbox only when the server acknowledges
/// exactly that batch (or, in the hello-ack, the durable prefix of this
/// process's epoch), and resend every unacknowledged one after a reconnect.
public final class Sender: Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: UInt16
        public var serverName: String?
        public var tls: AgentTLSFiles
        public var node: String
        public var bootId: String
        public var capabilities: [String]
        public var degraded: [String]
        public var connectTimeoutMs: Int32 = 5000
        /// Backoff after an ordinary disconnect (the server restarting or
        /// unreachable): quick, doubling up to `maximumBackoffMs`.
        public var initialBackoffMs: Int = 100
        public var maximumBackoffMs: Int = 5000
        /// Backoff after a refusal (an error frame in answer to hello, a
        /// failed TLS handshake): the same attempt would be refused again
        /// until someone fixes the node's identity or the server, so it
        /// doubles from `refusalInitialBackoffMs` up to a larger ceiling.
        public var refusalInitialBackoffMs: Int = 1000
        public var refusalMaximumBackoffMs: Int = 60_000
        public var heartbeatIntervalNs: Int64 = 15_000_000_000
        /// The clock stamped into time-sync answers (skewed only in the lab).
        public var clock = AgentClock()

        public init(host: String, port: UInt16, serverName: String?, tls: AgentTLSFiles, node: String, bootId: String, capabilities: [String], degraded: [String]) {
            self.host = host
            self.port = port
            self.serverName = serverName
            self.tls = tls
            self.node = node
            self.bootId = bootId
            self.capabilities = capabilities
            self.degraded = degraded
        }
    }

    public struct Status: Sendable {
        /// A session is open: the server acknowledged this agent's hello.
        public var connected = false
        public var connects: UInt64 = 0
        /// Attempts and sessions that ended in an error (refusals included).
        public var connectFailures: UInt64 = 0
        /// Attempts the server refused (error frame in answer to hello, TLS handshake failure).
        public var refusals: UInt64 = 0
        /// The last attempt was refused, and no session has opened since.
        public var refused = false
        /// How long the sender waits before its next attempt (0 while connected).
        public var retryInMs: Int = 0
        /// Monotonic time (ns) the last session ended, or opened if it is still
        /// open; nil until the first session opens.
        public var lastConnectedNs: Int64?
        public var batchesSent: UInt64 = 0
        /// Frame bytes of event batches written (resends included).
        public var batchBytesSent: UInt64 = 0
        public var lastError = ""

        public init() {}
    }

    private enum Phase: Sendable {
        case running
        /// Stop after everything is acknowledged or at the deadline (monotonic ns).
        case draining(deadlineNs: Int64)
        case stopped
    }

    public let configuration: Configuration
    private let outbox: Outbox
    private let logger: Logger
    private let phase = Mutex(Phase.running)
    private let statusBox = Mutex(Status())
    private let finished = DispatchSemaphore(value: 0)
    /// The latest inventory and its version; sent after every hello and when it changes.
    private let inventory = Mutex<(version: UInt64, payload: [UInt8])?>(nil)

    public init(configuration: Configuration, outbox: Outbox, logger: Logger) {
        self.configuration = configuration
        self.outbox = outbox
        self.logger = logger
    }

    public var status: Status { statusBox.withLock { $0 } }

    /// Replaces the pods this node reports to the server.
    public func setInventory(_ value: Inventory) {
        let payload = value.encoded()
        inventory.withLock { current in current = ((current?.version ?? 0) + 1, payload) }
    }

    public func start() {
        let thread = Thread { [self] in
            self.run()
            self.finished.signal()
        }
        thread.name = "tapio-sender"
        thread.start()
    }

    /// Waits (up to `graceSeconds`) until every batch is acknowledged, then
    /// says goodbye and stops.
    public func drainAndStop(graceSeconds: Double) {
        phase.withLock { $0 = .draining(deadlineNs: monotonicNs() + Int64(graceSeconds * 1e9)) }
        finished.wait()
    }

    private var shouldStop: Bool {
        phase.withLock { p in
            switch p {
            case .running: return false
            case .stopped: return true
            case .draining(let deadline):
                return outbox.unacknowledged == 0 && outbox.pendingEvents == 0 || monotonicNs() >= deadline
            }
        }
    }

    private var isDraining: Bool {
        phase.withLock { if case .running = $0 { return false } else { return true } }
    }

    private func run() {
        var backoffMs = configuration.initialBackoffMs
        var refusalBackoffMs = configuration.refusalInitialBackoffMs
        var loggedReason: String?
        var failuresSinceLogged: UInt64 = 0
        while !shouldStop {
            let endpoint = TLSConnection.Endpoint(host: configuration.host, port: configuration.port, serverName: configuration.serverName, tls: configuration.tls)
            var waitMs: Int
            do {
                let connection: TLSConnection
                do {
                    connection = try TLSConnection(endpoint: endpoint, timeoutMs: configuration.connectTimeoutMs)
                } catch let error as ConnectionError where Self.isTLSRefusal(error.description) {
                    throw Refusal(reason: error.description)
                }
                try serve(connection) {
                    // The hello was acknowledged: a session, whatever ends it.
                    backoffMs = configuration.initialBackoffMs
                    refusalBackoffMs = configuration.refusalInitialBackoffMs
                    statusBox.withLock { s in
                        s.connects += 1
                        s.connected = true
                        s.refused = false
                        s.retryInMs = 0
                        s.lastConnectedNs = monotonicNs()
                    }
                    if loggedReason != nil {
                        logger.info("connection to server restored", metadata: ["failed_attempts": "\(failuresSinceLogged)"])
                    }
                    loggedReason = nil
                    failuresSinceLogged = 0
                }
                markDisconnected()
                return
            } catch {
                let refusal = error as? Refusal
                let reason = "\(error)"
                if refusal != nil {
                    waitMs = refusalBackoffMs
                    refusalBackoffMs = min(refusalBackoffMs * 2, configuration.refusalMaximumBackoffMs)
                } else {
                    waitMs = backoffMs
                    backoffMs = min(backoffMs * 2, configuration.maximumBackoffMs)
                }
                // Jitter spreads a fleet's attempts after a common cause.
                waitMs = Int(Double(waitMs) * Double.random(in: 0.8...1.2))
                markDisconnected()
                statusBox.withLock { s in
                    s.connectFailures += 1
                    if refusal != nil { s.refusals += 1 }
                    s.refused = refusal != nil
                    s.lastError = "\(error)"
                    s.retryInMs = waitMs
                }
                // One line per change of reason, not per attempt: the
                // counters on /metrics show every attempt.
                failuresSinceLogged += 1
                if reason != loggedReason {
                    logger.warning(refusal != nil ? "server refused this agent; backing off" : "connection to server lost or not established",
                                   metadata: ["error": "\(reason)", "retry_ms": "\(waitMs)",
                                              "attempts_with_previous_reason": "\(failuresSinceLogged - 1)"])
                    loggedReason = reason
                    failuresSinceLogged = 1
                } else {
                    logger.debug("connection attempt failed again", metadata: ["error": "\(reason)", "retry_ms": "\(waitMs)"])
                }
            }
            // Wait, waking early when shutdown begins.
            let until = monotonicNs() + Int64(waitMs) * 1_000_000
            while monotonicNs() < until, !shouldStop { Thread.sleep(forTimeInterval: 0.02) }
        }
        statusBox.withLock { $0.retryInMs = 0 }
    }

    private func markDisconnected() {
        statusBox.withLock { s in
            if s.connected { s.lastConnectedNs = monotonicNs() }
            s.connected = false
        }
    }

    /// A refusal: retrying at once would be refused again.
    struct Refusal: Error, CustomStringConvertible {
        var reason: String
        var description: String { "server refused: \(reason)" }
    }

    /// Whether a connect or first-read failure is the TLS layer refusing this
    /// agent (certificate, CA, protocol), rather than the network or a
    /// server that is not (yet) there.
    public static func isTLSRefusal(_ message: String) -> Bool {
        let m = message.lowercased()
        let transient = ["cannot connect", "cannot resolve", "timed out", "closed by peer", "reset by peer", "connection refused", "server closed the connection"]
        if transient.contains(where: m.contains) { return false }
        return m.contains("alert") || m.contains("verification failed") || m.contains("tls handshake") || m.contains("cannot load")
            || m.contains("does not match") || m.contains("certificate")
    }

    /// One connection's life. Returns normally only when the agent is done.
    private func serve(_ connection: TLSConnection, opened: () -> Void) throws {
        let hello = Hello(node: configuration.node, agentVersion: Agent.version, bootId: configuration.bootId,
                          capabilities: configuration.capabilities, degraded: configuration.degraded, streamEpoch: outbox.epoch)
        var helloAck: HelloAck?
        let helloDeadline = monotonicNs() + 10_000_000_000
        var firstSyncSeen = false
        do {
            try connection.send(.hello, hello.encoded())
            while helloAck == nil {
                guard monotonicNs() < helloDeadline else { throw ConnectionError("no hello-ack within 10 s") }
                if let frame = try connection.receive(timeoutMs: 100) {
                    switch frame.type {
                    case .helloAck: helloAck = try HelloAck.decode(frame.payload)
                    case .error: throw Refusal(reason: errorText(frame))
                    default: throw ConnectionError("expected hello-ack, got \(frame.type)")
                    }
                }
            }
        } catch let error as ConnectionError where Self.isTLSRefusal(error.description) {
            // In TLS 1.3 the server judges the client certificate after the
            // client's handshake: its verdict is an alert on the first read.
            throw Refusal(reason: error.description)
        }
        let ack = helloAck!
        opened()
        // Only this epoch's prefix is known; batches of earlier epochs are
        // resent and acknowledged one by one.
        outbox.acknowledgePrefix(epoch: outbox.epoch, through: ack.ackedSequence)
        outbox.applyServerLimits(maxBatchEvents: Int(ack.maxBatchEvents), maxFrameBytes: Int(ack.maxFrameBytes))
        outbox.markAllUnsent()
        let window = max(1, Int(ack.windowBatches))
        logger.info("connected to server", metadata: ["server": "\(configuration.host):\(configuration.port)", "protocol": "\(connection.protocolName)",
                                                       "acked": "\(ack.ackedSequence)", "window": "\(window)",
                                                       "max_batch_events": "\(ack.maxBatchEvents)", "max_frame_bytes": "\(ack.maxFrameBytes)"])

        // Let the first time-sync exchange finish before the first batch, so
        // the server can place it on its clock (bounded wait).
        let syncDeadline = monotonicNs() + 500_000_000
        while !firstSyncSeen, monotonicNs() < syncDeadline {
            if let frame = try connection.receive(timeoutMs: 50) {
                firstSyncSeen = try handle(frame, on: connection) || firstSyncSeen
            }
        }

        var lastWriteNs = monotonicNs()
        var sentInventory: UInt64 = 0
        while true {
            if let (version, payload) = inventory.withLock({ $0 }), version != sentInventory {
                try connection.send(.inventory, payload)
                sentInventory = version
            }
            if shouldStop {
                try? connection.send(.goodbye, Goodbye(reason: isDraining ? "agent shutting down" : "stopped", lastSequence: outbox.lastSequence).encoded(), timeoutMs: 1000)
                return
            }
            while let next = outbox.nextToSend(window: window) {
                try connection.send(.eventBatch, next.payload)
                statusBox.withLock {
                    $0.batchesSent += 1
                    $0.batchBytesSent += UInt64(FrameHeader.size + next.payload.count)
                }
                lastWriteNs = monotonicNs()
            }
            if monotonicNs() - lastWriteNs > configuration.heartbeatIntervalNs {
                try connection.send(.heartbeat, Heartbeat(timeNs: configuration.clock.now()).encoded())
                lastWriteNs = monotonicNs()
            }
            if let frame = try connection.receive(timeoutMs: 20) {
                _ = try handle(frame, on: connection)
            }
        }
    }

    /// Handles a frame from the server; returns true for a time sync.
    private func handle(_ frame: Frame, on connection: TLSConnection) throws -> Bool {
        switch frame.type {
        case .ack:
            let ack = try Ack.decode(frame.payload)
            outbox.acknowledge(epoch: ack.epoch, sequence: ack.sequence)
        case .timeSync:
            let t2 = configuration.clock.now()
            var sync = try TimeSync.decode(frame.payload)
            sync.t2 = t2
            sync.t3 = configuration.clock.now()
            try connection.send(.timeSync, sync.encoded())
            return true
        case .heartbeat:
            break
        case .error:
            throw ConnectionError("server closed the session: \(errorText(frame))")
        case .goodbye:
            let bye = try Goodbye.decode(frame.payload)
            throw ConnectionError("server said goodbye: \(bye.reason)")
        default:
            throw ConnectionError("unexpected \(frame.type) frame from the server")
        }
        return false
    }

    private func errorText(_ frame: Frame) -> String {
        let e = (try? WireError.decode(frame.payload)) ?? WireError(code: 0, message: "unreadable error frame")
        return "\(e.message) (code \(e.code))"
    }
}
