// One connection's protocol logic, on its event loop: wait for INFO, upgrade
// to TLS when either side wants it, send CONNECT and a PING, and call the
// connection open at the PONG (an -ERR before it — bad credentials — fails
// the handshake in the server's words). Once open: answer the server's PINGs,
// send our own and close the connection when too many go unanswered, hand
// messages to the client. The first error seen is kept as the reason the
// connection closed.

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

    private enum Phase { case awaitingInfo, awaitingPong, open, closed }
    private enum PongWaiter { case handshake, keepalive, flush(EventLoopPromise<Void>) }

    private let settings: Settings
    private let handshake: EventLoopPromise<NATSServerInfo>
    private let events: any NATSConnectionEvents
    private let closeReason: NATSCloseReason
    private var phase = Phase.awaitingInfo
    private var waiters = CircularBuffer<PongWaiter>()
    private var keepalivesOutstanding = 0
    private var timer: Scheduled<Void>?
    private var pingTask: RepeatedTask?

    init(settings: Settings, handshake: EventLoopPromise<NATSServerInfo>, events: any NATSConnectionEvents, closeReason: NATSCloseReason) {
        self.settings = settings
        self.closeReason = closeReason
        self.handshake = handshake
        self.events = events
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
            guard handler.value.phase == .awaitingInfo || handler.value.phase == .awaitingPong else { return }
            handler.value.fail(context: ctx.value, NATSError.timeout("no NATS handshake with \(handler.value.settings.server) within \(seconds) s"))
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let op = unwrapInboundIn(data)
        switch (phase, op) {
        case (.closed, _):
            return
        case (.awaitingInfo, .info(let info)):
            do {
                try startTLSIfWanted(context: context, info: info)
            } catch {
                return fail(context: context, error)
            }
            phase = .awaitingPong
            var options = settings.connect
            options.tlsRequired = settings.sslContext != nil
            var buffer = context.channel.allocator.buffer(capacity: 256)
            buffer.writeString("CONNECT ")
            buffer.writeBytes((try? JSONEncoder().encode(options)) ?? Data("{}".utf8))
            buffer.writeString("\r\nPING\r\n")
            waiters.append(.handshake)
            pendingInfo = info
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        case (.awaitingPong, .error(let text)), (.awaitingInfo, .error(let text)):
            fail(context: context, NATSError.serverError(text))
        case (.awaitingInfo, _):
            fail(context: context, NATSError.protocolViolation("the server's first operation is not INFO"))
        case (_, .ping):
            var buffer = context.channel.allocator.buffer(capacity: 6)
            buffer.writeString("PONG\r\n")
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        case (_, .pong):
            guard let waiter = waiters.popFirst() else {
                return fail(context: context, NATSError.protocolViolation("PONG without a PING"))
            }
            switch waiter {
            case .handshake:
                phase = .open
                timer?.cancel()
                startKeepalive(context: context)
                if let info = pendingInfo { handshake.succeed(info) }
            case .keepalive:
                keepalivesOutstanding -= 1
            case .flush(let promise):
                promise.succeed()
            }
        case (.open, .message(let message)):
            events.received(message)
        case (.open, .info(let info)):
            events.serverInfoChanged(info)
        case (.open, .error(let text)):
            // Permissions violations leave the connection open; for every other
            // -ERR the server closes it, and this text is the reason.
            closeReason.setIfFirst(NATSError.serverError(text))
            events.serverError(text)
        case (_, .ok):
            return
        case (.awaitingPong, .message), (.awaitingPong, .info):
            fail(context: context, NATSError.protocolViolation("message or INFO before the handshake's PONG"))
        }
    }

    private var pendingInfo: NATSServerInfo?

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
        guard phase == .open else { return }
        if keepalivesOutstanding >= settings.maxPingsOutstanding {
            return fail(context: context, NATSError.timeout("\(keepalivesOutstanding) PINGs to \(settings.server) unanswered"))
        }
        keepalivesOutstanding += 1
        waiters.append(.keepalive)
        var buffer = context.channel.allocator.buffer(capacity: 6)
        buffer.writeString("PING\r\n")
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        switch unwrapOutboundIn(data) {
        case .bytes(let bytes):
            guard phase == .open else {
                promise?.fail(NATSError.connectionLost)
                return
            }
            context.write(wrapOutboundOut(bytes), promise: promise)
        case .ping(let pong):
            guard phase == .open else {
                pong.fail(NATSError.connectionLost)
                promise?.fail(NATSError.connectionLost)
                return
            }
            waiters.append(.flush(pong))
            var buffer = context.channel.allocator.buffer(capacity: 6)
            buffer.writeString("PING\r\n")
            context.write(wrapOutboundOut(buffer), promise: promise)
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
        let wasOpen = phase == .open
        phase = .closed
        timer?.cancel()
        pingTask?.cancel()
        let reason = closeReason.error ?? (wasOpen ? NATSError.connectionLost : NATSError.serverError("\(settings.server) closed the connection during the handshake"))
        if !wasOpen { handshake.fail(reason) }
        while let waiter = waiters.popFirst() {
            if case .flush(let promise) = waiter { promise.fail(NATSError.connectionLost) }
        }
        context.fireChannelInactive()
    }

    private func fail(context: ChannelHandlerContext, _ error: any Error) {
        closeReason.setIfFirst(error)
        guard phase != .closed else { return }
        context.close(promise: nil)
    }
}
