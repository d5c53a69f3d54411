// One connection's I/O on its event loop, driven by
// NATSConnectionStateMachine: at INFO, upgrade to TLS when either side wants
// it and send CONNECT and a PING; at the PONG, report the connection open (an
// -ERR before it — bad credentials — fails the handshake in the server's
// words). Once open: answer the server's PINGs, send our own on a timer and
// close the connection when too many go unanswered, hand messages to the
// client. The first error seen is kept as the reason the connection closed.

import Foundation
import NIOCore
import NIOSSL
import Synchronization

/// What the client writes to a connection.
enum NATSOutbound: Sendable {
    /// Encoded protocol operations.
    case bytes(ByteBuffer)
    /// A PING; the promise completes at its PONG (a flush: everything before it was processed).
    case ping(EventLoopPromise<Void>)
}

/// How a connection reports to the client that owns it; called on the connection's event loop.
protocol NATSConnectionEvents: AnyObject, Sendable {
    func received(_ message: NATSMessage)
    func serverInfoChanged(_ info: NATSServerInfo)
    func serverError(_ text: String)
}

/// The reason a connection closed, set by the handler, read by the client after the close.
final class NATSCloseReason: Sendable {
    private let value = Mutex<(any Error)?>(nil)
    var error: (any Error)? { value.withLock { $0 } }
    func setIfFirst(_ error: any Error) { value.withLock { if $0 == nil { $0 = error } } }
}

final class NATSConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = NATSServerOperation
    typealias OutboundIn = NATSOutbound
    typealias OutboundOut = ByteBuffer

    struct Settings {
        var server: NATSServerAddress
        var connect: NATSConnectOptions
        var sslContext: NIOSSLContext?
        var tlsServerHostname: String?
        var handshakeTimeout: TimeAmount
        var pingInterval: TimeAmount
        var maxPingsOutstanding: Int
    }

    private let settings: Settings
    private let handshake: EventLoopPromise<NATSServerInfo>
    private let events: any NATSConnectionEvents
    private let closeReason: NATSCloseReason
    private var state: NATSConnectionStateMachine
    private var timer: Scheduled<Void>?
    private var pingTask: RepeatedTask?

    init(settings: Settings, handshake: EventLoopPromise<NATSServerInfo>, events: any NATSConnectionEvents, closeReason: NATSCloseReason) {
        self.settings = settings
        self.handshake = handshake
        self.events = events
        self.closeReason = closeReason
        self.state = NATSConnectionStateMachine(maxPingsOutstanding: settings.maxPingsOutstanding)
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { startHandshakeTimer(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        startHandshakeTimer(context: context)
        context.fireChannelActive()
    }

    private func startHandshakeTimer(context: ChannelHandlerContext) {
        guard timer == nil else { return }
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
        let seconds = Double(settings.handshakeTimeout.nanoseconds) / 1e9
        timer = context.eventLoop.scheduleTask(in: settings.handshakeTimeout) {
            guard handler.value.state.isHandshaking else { return }
            handler.value.fail(context: ctx.value, NATSError.timeout("no NATS handshake with \(handler.value.settings.server) within \(seconds) s"))
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch state.received(unwrapInboundIn(data)) {
        case .none:
            return
        case .connect(let info):
            do {
                try startTLSIfWanted(context: context, info: info)
            } catch {
                return fail(context: context, error)
            }
            var buffer = context.channel.allocator.buffer(capacity: 256)
            buffer.writeString("CONNECT ")
            buffer.writeBytes((try? JSONEncoder().encode(settings.connect)) ?? Data("{}".utf8))
            buffer.writeString("\r\nPING\r\n")
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        case .sendPong:
            context.writeAndFlush(wrapOutboundOut(Self.pong), promise: nil)
        case .opened(let info):
            timer?.cancel()
            startKeepalive(context: context)
            handshake.succeed(info)
        case .completeFlush(let promise):
            promise.succeed()
        case .deliver(let message):
            events.received(message)
        case .infoChanged(let info):
            events.serverInfoChanged(info)
        case .serverError(let text):
            // Permissions violations leave the connection open; for every other
            // -ERR the server closes it, and this text is the reason.
            closeReason.setIfFirst(NATSError.serverError(text))
            events.serverError(text)
        case .close(let error):
            fail(context: context, error)
        }
    }

    private static let ping = ByteBuffer(string: "PING\r\n")
    private static let pong = ByteBuffer(string: "PONG\r\n")

    private func startTLSIfWanted(context: ChannelHandlerContext, info: NATSServerInfo) throws {
        guard let sslContext = settings.sslContext else {
            if info.tlsRequired {
                throw NATSError.tlsMismatch("server \(settings.server) requires TLS and the client has no TLS configuration")
            }
            return
        }
        let tls = try NIOSSLClientHandler(context: sslContext, serverHostname: settings.tlsServerHostname)
        try context.pipeline.syncOperations.addHandler(tls, position: .first)
    }

    private func startKeepalive(context: ChannelHandlerContext) {
        let handler = NIOLoopBound(self, eventLoop: context.eventLoop)
        let ctx = NIOLoopBound(context, eventLoop: context.eventLoop)
        pingTask = context.eventLoop.scheduleRepeatedTask(initialDelay: settings.pingInterval, delay: settings.pingInterval) { _ in
            handler.value.keepalive(context: ctx.value)
        }
    }

    private func keepalive(context: ChannelHandlerContext) {
        switch state.keepaliveDue() {
        case .sendPing: context.writeAndFlush(wrapOutboundOut(Self.ping), promise: nil)
        case .idle: return
        case .unanswered(let count): fail(context: context, NATSError.timeout("\(count) PINGs to \(settings.server) unanswered"))
        }
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .bytes(let bytes):
            guard state.isOpen else {
                promise?.fail(NATSError.connectionLost)
                return
            }
            context.write(wrapOutboundOut(bytes), promise: promise)
        case .ping(let pong):
            guard state.flushRequested(pong) else {
                pong.fail(NATSError.connectionLost)
                promise?.fail(NATSError.connectionLost)
                return
            }
            context.write(wrapOutboundOut(Self.ping), promise: promise)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if let nats = error as? NATSError {
            fail(context: context, nats)
        } else if error is NIOSSLError || error is BoringSSLError {
            fail(context: context, NATSError.tlsMismatch("TLS with \(settings.server) failed: \(error)"))
        } else if let io = error as? IOError {
            fail(context: context, NATSError.connectionFailed("connection to \(settings.server) failed: \(String(cString: strerror(io.errnoCode)))"))
        } else {
            fail(context: context, NATSError.protocolViolation("\(error)"))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        pingTask?.cancel()
        let (wasOpen, flushes) = state.closed()
        let reason = closeReason.error ?? (wasOpen ? NATSError.connectionLost : NATSError.serverError("\(settings.server) closed the connection during the handshake"))
        if !wasOpen { handshake.fail(reason) }
        for promise in flushes { promise.fail(NATSError.connectionLost) }
        context.fireChannelInactive()
    }

    private func fail(context: ChannelHandlerContext, _ error: any Error) {
        closeReason.setIfFirst(error)
        guard state.phase != .closed else { return }
        context.close(promise: nil)
    }
}
