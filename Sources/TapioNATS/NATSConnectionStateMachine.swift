// The protocol state of one connection as a value without I/O: the handler
// feeds it what arrives and what the client asks for, and carries out the
// action it returns. The handshake order (INFO, then CONNECT and PING, open at
// the PONG), which PONG answers which PING, and when unanswered keepalives
// end the connection are all decided here, so they are tested without sockets.

import NIOCore

struct NATSConnectionStateMachine {
    enum Phase: Equatable { case awaitingInfo, awaitingPong, open, closed }

    enum Action {
        case none
        /// INFO arrived: upgrade to TLS if wanted, then send CONNECT and PING.
        case connect(NATSServerInfo)
        case sendPong
        /// The handshake's PONG: the connection is open with this INFO.
        case opened(NATSServerInfo)
        case completeFlush(EventLoopPromise<Void>)
        case deliver(NATSMessage)
        case infoChanged(NATSServerInfo)
        /// An -ERR on an open connection: kept as the close reason and reported.
        case serverError(String)
        /// Close the connection for this reason.
        case close(NATSError)
    }

    private enum PongWaiter { case handshake, keepalive, flush(EventLoopPromise<Void>) }

    private(set) var phase = Phase.awaitingInfo
    private var info: NATSServerInfo?
    private var waiters = CircularBuffer<PongWaiter>()
    private(set) var keepalivesOutstanding = 0
    let maxPingsOutstanding: Int

    init(maxPingsOutstanding: Int) {
        self.maxPingsOutstanding = maxPingsOutstanding
    }

    mutating func received(_ op: NATSServerOperation) -> Action {
        switch (phase, op) {
        case (.closed, _):
            return .none
        case (.awaitingInfo, .info(let info)):
            self.info = info
            phase = .awaitingPong
            waiters.append(.handshake)
            return .connect(info)
        case (.awaitingInfo, .error(let text)), (.awaitingPong, .error(let text)):
            return .close(.serverError(text))
        case (.awaitingInfo, _):
            return .close(.protocolViolation("the server's first operation is not INFO"))
        case (_, .ping):
            return .sendPong
        case (_, .pong):
            guard let waiter = waiters.popFirst() else { return .close(.protocolViolation("PONG without a PING")) }
            switch waiter {
            case .handshake:
                phase = .open
                return .opened(info!)
            case .keepalive:
                keepalivesOutstanding -= 1
                return .none
            case .flush(let promise):
                return .completeFlush(promise)
            }
        case (.open, .message(let message)):
            return .deliver(message)
        case (.open, .info(let info)):
            self.info = info
            return .infoChanged(info)
        case (.open, .error(let text)):
            return .serverError(text)
        case (_, .ok):
            return .none
        case (.awaitingPong, .message), (.awaitingPong, .info):
            return .close(.protocolViolation("message or INFO before the handshake's PONG"))
        }
    }

    enum Keepalive: Equatable {
        case sendPing
        /// Not open (yet or any more): nothing to do.
        case idle
        /// This many PINGs went unanswered: close the connection.
        case unanswered(Int)
    }

    /// The keepalive timer fired.
    mutating func keepaliveDue() -> Keepalive {
        guard phase == .open else { return .idle }
        if keepalivesOutstanding >= maxPingsOutstanding { return .unanswered(keepalivesOutstanding) }
        keepalivesOutstanding += 1
        waiters.append(.keepalive)
        return .sendPing
    }

    /// A flush asked for: true to send its PING; false when the connection is not open (fail it).
    mutating func flushRequested(_ promise: EventLoopPromise<Void>) -> Bool {
        guard phase == .open else { return false }
        waiters.append(.flush(promise))
        return true
    }

    var isOpen: Bool { phase == .open }
    var isHandshaking: Bool { phase == .awaitingInfo || phase == .awaitingPong }

    /// The connection closed: whether it had been open, and the flushes to fail.
    mutating func closed() -> (wasOpen: Bool, flushes: [EventLoopPromise<Void>]) {
        let wasOpen = phase == .open
        phase = .closed
        var flushes: [EventLoopPromise<Void>] = []
        while let waiter = waiters.popFirst() {
            if case .flush(let promise) = waiter { flushes.append(promise) }
        }
        return (wasOpen, flushes)
    }
}
