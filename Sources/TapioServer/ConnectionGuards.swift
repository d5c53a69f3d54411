import Logging
import NIOCore
import NIOSSL
import NIOTLS
import Synchronization
import TapioWire

/// The listener a connection arrived on; each has its own connection limit.
enum Listener: String, Sendable, CaseIterable {
    case ingest, query, metrics
}

/// Connections open per certificate name on one listener, so one valid
/// certificate cannot take the whole listener (or hold thousands of partial
/// frames in memory).
final class PeerConnections: Sendable {
    let maximum: Int
    private let open = Mutex<[String: Int]>([:])

    init(maximum: Int) {
        self.maximum = maximum
    }

    /// Counts a connection of `peer`; false when it already has `maximum`.
    func acquire(_ peer: String) -> Bool {
        open.withLock { o in
            guard o[peer, default: 0] < maximum else { return false }
            o[peer, default: 0] += 1
            return true
        }
    }

    func release(_ peer: String) {
        open.withLock { o in
            let n = o[peer, default: 0] - 1
            o[peer] = n > 0 ? n : nil
        }
    }

    func count(_ peer: String) -> Int { open.withLock { $0[peer] ?? 0 } }
}

/// What a TLS listener demands of its connections (docs/operations.md, "Limits").
struct ConnectionPolicy: Sendable {
    var listener: Listener
    /// The certificate role this listener serves.
    var role: String
    /// What the role may do here, for the refusal message ("query", "send events").
    var action: String
    var handshakeTimeout: TimeAmount
    var frameTimeout: TimeAmount
    var idleTimeout: TimeAmount
    var closeGrace: TimeAmount
    /// Connections per certificate name on this listener.
    var peers: PeerConnections
    /// The last frame a refused peer is sent (an `error` frame, or a
    /// `query_response` on the query listener).
    var refusal: @Sendable (WireErrorCode, String) -> Frame

    init(listener: Listener, role: String, action: String, limits: ServerConfiguration.Limits,
         refusal: @escaping @Sendable (WireErrorCode, String) -> Frame) {
        self.listener = listener
        peers = PeerConnections(maximum: max(1, limits.maxConnectionsPerPeer))
        self.role = role
        self.action = action
        handshakeTimeout = .nanoseconds(limits.handshakeTimeout.nanoseconds)
        frameTimeout = .nanoseconds(limits.frameTimeout.nanoseconds)
        idleTimeout = .nanoseconds(limits.idleTimeout.nanoseconds)
        closeGrace = .nanoseconds(limits.closeGrace.nanoseconds)
        self.refusal = refusal
    }
}

/// Sits right behind the TLS handler of an ingest or query connection and
/// bounds what a peer can hold on to:
///
/// - the TLS handshake must complete within `handshakeTimeout` of the accept
///   (a socket that never starts TLS is closed);
/// - when it completes, the client certificate must name a peer (see
///   `PeerIdentity`) with the listener's role, or the connection is refused
///   right then. Nothing is passed on before, so a peer without the role
///   never has a byte buffered;
/// - a frame whose first byte has arrived must be complete within
///   `frameTimeout` (bytes trickled one at a time do not count as progress);
/// - with no complete frame for `idleTimeout` the protocol handler is told
///   (`IdleStateHandler.IdleStateEvent.read`) and says why it closes.
///
/// Whenever the server closes, the last message gets `closeGrace`; then the
/// connection is closed without it (a peer that does not read cannot hold a
/// connection open by never taking the message).
///
/// While the server itself has stopped reading (flow control: the storage
/// window is full, or a graceful close), the frame and idle clocks do not
/// blame the peer: they start over.
final class ConnectionGuard: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State {
        case handshaking
        case open
        case closing
    }

    private let policy: ConnectionPolicy
    private let metrics: ServerMetrics
    private var logger: Logger
    private var state = State.handshaking
    private var handshakeTimer: Scheduled<Void>?
    private var frameTimer: Scheduled<Void>?
    private var idleTimer: Scheduled<Void>?
    private var closeTimer: Scheduled<Void>?
    /// Header bytes of the frame being received (fewer than a header's worth).
    private var header: [UInt8] = []
    /// Payload bytes of the frame being received still to come.
    private var remaining = 0
    private var frameStarted: NIODeadline?
    private var lastFrameEnded = NIODeadline.now()
    /// The certificate name this connection is counted under, once admitted.
    private var countedPeer: String?

    init(policy: ConnectionPolicy, metrics: ServerMetrics, logger: Logger) {
        self.policy = policy
        self.metrics = metrics
        self.logger = logger
        header.reserveCapacity(FrameHeader.size)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        logger[metadataKey: "peer"] = "\(context.channel.remoteAddress.map { "\($0)" } ?? "?")"
        logger[metadataKey: "listener"] = "\(policy.listener.rawValue)"
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        handshakeTimer = context.eventLoop.scheduleTask(in: policy.handshakeTimeout) {
            let (guardian, context) = bound.value
            guard case .handshaking = guardian.state else { return }
            guardian.state = .closing
            guardian.metrics.add("tapio_server_connections_rejected_total{reason=\"handshake_timeout\"}")
            guardian.logger.debug("closing connection: no TLS handshake in time")
            context.close(promise: nil)
            guardian.closeAfterGrace(context: context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        cancelTimers()
        closeTimer?.cancel()
        releasePeer()
    }

    private func releasePeer() {
        if let peer = countedPeer {
            countedPeer = nil
            policy.peers.release(peer)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        cancelTimers()
        closeTimer?.cancel()
        releasePeer()
        state = .closing
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        guard let tls = event as? TLSUserEvent, case .handshakeCompleted = tls else {
            context.fireUserInboundEventTriggered(event)
            return
        }
        handshakeTimer?.cancel()
        handshakeTimer = nil
        guard case .handshaking = state else { return }
        switch PeerIdentity.verified(context) {
        case .failure(let refusal):
            logger.warning("refusing connection: the client certificate names no peer", metadata: [
                "reason": "\(refusal.reason.rawValue)", "detail": "\(refusal.message)",
            ])
            refuse(context: context, metric: "identity", .identityMismatch, "the client certificate names no peer: \(refusal.message)")
        case .success(let peer) where peer.role != policy.role:
            logger.warning("refusing connection: wrong certificate role", metadata: [
                "cn": "\(peer.commonName)", "role": "\(peer.role)", "needs": "\(policy.role)",
            ])
            refuse(context: context, metric: "forbidden", .forbidden,
                   "certificate role \(peer.role) may not \(policy.action) (needs \(policy.role))")
        case .success(let peer) where !policy.peers.acquire(peer.commonName):
            logger.warning("refusing connection: too many connections of one peer", metadata: [
                "cn": "\(peer.commonName)", "limit": "\(policy.peers.maximum)",
            ])
            refuse(context: context, metric: "peer_limit", .forbidden,
                   "\(peer.commonName) already has \(policy.peers.maximum) connections open on this listener")
        case .success(let peer):
            countedPeer = peer.commonName
            state = .open
            lastFrameEnded = .now()
            scheduleIdleCheck(context: context, in: policy.idleTimeout)
            context.fireUserInboundEventTriggered(event)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        // Before the role is known, and once closing, nothing is passed on.
        guard case .open = state else { return }
        let buffer = unwrapInboundIn(data)
        track(buffer.readableBytesView, context: context)
        context.fireChannelRead(data)
    }

    // MARK: - Frame boundaries

    /// Follows frame boundaries through the byte stream (the decoder behind
    /// validates the headers; this only reads their length).
    private func track(_ bytes: ByteBufferView, context: ChannelHandlerContext) {
        var i = bytes.startIndex
        let end = bytes.endIndex
        while i < end {
            if remaining > 0 {
                let n = min(remaining, end - i)
                remaining -= n
                i += n
                if remaining == 0 { frameEnded() }
                continue
            }
            if header.isEmpty { frameStarted = .now() }
            let n = min(FrameHeader.size - header.count, end - i)
            header.append(contentsOf: bytes[i..<(i + n)])
            i += n
            if header.count == FrameHeader.size {
                remaining = Int(header[8]) << 24 | Int(header[9]) << 16 | Int(header[10]) << 8 | Int(header[11])
                header.removeAll(keepingCapacity: true)
                if remaining == 0 { frameEnded() }
            }
        }
        if let started = frameStarted, frameTimer == nil {
            scheduleFrameCheck(context: context, at: started + policy.frameTimeout)
        }
    }

    private func frameEnded() {
        frameStarted = nil
        frameTimer?.cancel()
        frameTimer = nil
        lastFrameEnded = .now()
    }

    private func scheduleFrameCheck(context: ChannelHandlerContext, at deadline: NIODeadline) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        frameTimer = context.eventLoop.scheduleTask(deadline: deadline) {
            let (guardian, context) = bound.value
            guardian.frameTimer = nil
            guardian.frameCheck(context: context)
        }
    }

    private func frameCheck(context: ChannelHandlerContext) {
        guard case .open = state, frameStarted != nil else { return }
        if readsPausedByServer(context) {
            // Not the peer's delay: the clock starts over.
            frameStarted = .now()
            scheduleFrameCheck(context: context, at: .now() + policy.frameTimeout)
            return
        }
        let seconds = policy.frameTimeout.nanoseconds / 1_000_000_000
        logger.notice("closing connection: a frame was not complete in time", metadata: ["frame_timeout_s": "\(seconds)"])
        refuse(context: context, metric: "frame_timeout", .unexpectedFrame, "a frame was not complete within \(seconds) s of its first byte")
    }

    // MARK: - Idle

    private func scheduleIdleCheck(context: ChannelHandlerContext, in delay: TimeAmount) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        idleTimer = context.eventLoop.scheduleTask(in: delay) {
            let (guardian, context) = bound.value
            guardian.idleCheck(context: context)
        }
    }

    private func idleCheck(context: ChannelHandlerContext) {
        guard case .open = state else { return }
        let now = NIODeadline.now()
        if readsPausedByServer(context) {
            lastFrameEnded = now
        }
        let idleFor = now - lastFrameEnded
        if idleFor < policy.idleTimeout {
            scheduleIdleCheck(context: context, in: policy.idleTimeout - idleFor)
            return
        }
        // The protocol handler says why (or just closes); the grace bounds it.
        idleTimer = nil
        closeAfterGrace(context: context)
        context.fireUserInboundEventTriggered(IdleStateHandler.IdleStateEvent.read)
    }

    // MARK: - Closing

    private func readsPausedByServer(_ context: ChannelHandlerContext) -> Bool {
        guard let options = context.channel.syncOptions, let autoRead = try? options.getOption(ChannelOptions.autoRead) else { return false }
        return !autoRead
    }

    /// Sends the peer one last frame, then closes (after `closeGrace` at the latest).
    private func refuse(context: ChannelHandlerContext, metric: String, _ code: WireErrorCode, _ message: String) {
        state = .closing
        cancelTimers()
        metrics.add("tapio_server_connections_rejected_total{reason=\"\(metric)\"}")
        guard context.channel.isActive else { return }
        let frame = policy.refusal(code, message).encoded()
        var buffer = context.channel.allocator.buffer(capacity: frame.count)
        buffer.writeBytes(frame)
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in bound.value.close(promise: nil) }
        closeAfterGrace(context: context)
    }

    private func closeAfterGrace(context: ChannelHandlerContext) {
        guard closeTimer == nil else { return }
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        closeTimer = context.eventLoop.scheduleTask(in: policy.closeGrace) {
            bound.value.close(promise: nil)
        }
    }

    /// The clocks (not the close after grace, which must still happen).
    private func cancelTimers() {
        for timer in [handshakeTimer, frameTimer, idleTimer] { timer?.cancel() }
        handshakeTimer = nil
        frameTimer = nil
        idleTimer = nil
    }
}

/// Closes an HTTP /metrics connection a fixed time after its accept, answered
/// or not: a scrape is one request, and idle or trickling sockets must not pile up.
final class ConnectionDeadline: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Any

    private let timeout: TimeAmount
    private let metric: String
    private let metrics: ServerMetrics
    private var timer: Scheduled<Void>?

    init(timeout: TimeAmount, metric: String, metrics: ServerMetrics) {
        self.timeout = timeout
        self.metric = metric
        self.metrics = metrics
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        let metrics = self.metrics
        let metric = self.metric
        timer = context.eventLoop.scheduleTask(in: timeout) {
            let context = bound.value
            guard context.channel.isActive else { return }
            metrics.add("tapio_server_connections_rejected_total{reason=\"\(metric)\"}")
            context.close(promise: nil)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        context.fireChannelInactive()
    }
}
