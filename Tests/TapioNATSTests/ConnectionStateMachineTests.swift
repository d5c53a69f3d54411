import NIOCore
import NIOEmbedded
@testable import TapioNATS
import XCTest

/// The connection's protocol state without sockets: handshake order, which
/// PONG answers which PING, and when unanswered keepalives end a connection.
final class ConnectionStateMachineTests: XCTestCase {
    private let info = try! JSONDecoder().decode(
        NATSServerInfo.self, from: Data(#"{"server_id":"S","max_payload":1024,"headers":true}"#.utf8))
    private let loop = EmbeddedEventLoop()

    private func message(_ subject: String) -> NATSServerOperation {
        .message(NATSMessage(subject: subject, sid: 2, payload: ByteBuffer(string: "x")))
    }

    func testTheConnectionOpensAtThePongThatAnswersTheHandshakesPing() {
        var machine = NATSConnectionStateMachine(maxPingsOutstanding: 2)
        guard case .connect(let got) = machine.received(.info(info)) else { return XCTFail("INFO did not start the handshake") }
        XCTAssertEqual(got, info)
        XCTAssertTrue(machine.isHandshaking)
        // The server may PING during the handshake; it is answered and changes nothing.
        guard case .sendPong = machine.received(.ping) else { return XCTFail("PING not answered") }
        guard case .opened(let opened) = machine.received(.pong) else { return XCTFail("PONG did not open") }
        XCTAssertEqual(opened, info)
        XCTAssertTrue(machine.isOpen)
        guard case .deliver(let m) = machine.received(message("a")) else { return XCTFail("message not delivered") }
        XCTAssertEqual(m.subject, "a")
    }

    func testAnythingButInfoFirstAndMessagesBeforeThePongAreViolations() {
        var first = NATSConnectionStateMachine(maxPingsOutstanding: 2)
        guard case .close(.protocolViolation) = first.received(message("a")) else { return XCTFail("message before INFO accepted") }
        var early = NATSConnectionStateMachine(maxPingsOutstanding: 2)
        _ = early.received(.info(info))
        guard case .close(.protocolViolation) = early.received(message("a")) else { return XCTFail("message before PONG accepted") }
        var denied = NATSConnectionStateMachine(maxPingsOutstanding: 2)
        _ = denied.received(.info(info))
        guard case .close(.serverError("Authorization Violation")) = denied.received(.error("Authorization Violation")) else {
            return XCTFail("-ERR in the handshake did not close with the server's words")
        }
        var stray = NATSConnectionStateMachine(maxPingsOutstanding: 2)
        _ = stray.received(.info(info))
        _ = stray.received(.pong)
        guard case .close(.protocolViolation("PONG without a PING")) = stray.received(.pong) else { return XCTFail("stray PONG accepted") }
    }

    func testPongsAnswerPingsInOrderAndUnansweredKeepalivesCloseTheConnection() throws {
        var machine = NATSConnectionStateMachine(maxPingsOutstanding: 2)
        XCTAssertEqual(machine.keepaliveDue(), .idle, "keepalive before the connection is open")
        _ = machine.received(.info(info))
        _ = machine.received(.pong)
        let flush = loop.makePromise(of: Void.self)
        XCTAssertEqual(machine.keepaliveDue(), .sendPing)
        XCTAssertTrue(machine.flushRequested(flush))
        // The first PONG answers the keepalive, the second the flush.
        guard case .none = machine.received(.pong) else { return XCTFail("keepalive PONG") }
        XCTAssertEqual(machine.keepalivesOutstanding, 0)
        guard case .completeFlush(let done) = machine.received(.pong) else { return XCTFail("flush PONG") }
        XCTAssertTrue(done.futureResult === flush.futureResult)
        done.succeed()
        XCTAssertEqual(machine.keepaliveDue(), .sendPing)
        XCTAssertEqual(machine.keepaliveDue(), .sendPing)
        XCTAssertEqual(machine.keepaliveDue(), .unanswered(2))

        // Closing hands back the flushes still waiting, to be failed.
        let pending = loop.makePromise(of: Void.self)
        XCTAssertTrue(machine.flushRequested(pending))
        let (wasOpen, flushes) = machine.closed()
        XCTAssertTrue(wasOpen)
        XCTAssertEqual(flushes.count, 1)
        flushes.forEach { $0.fail(NATSError.connectionLost) }
        XCTAssertFalse(machine.flushRequested(loop.makePromise(of: Void.self).failing()))
        guard case .none = machine.received(message("late")) else { return XCTFail("message after close delivered") }
    }
}

private extension EventLoopPromise {
    /// Failed at once, so an unused promise does not trip NIO's leak check.
    func failing() -> EventLoopPromise {
        fail(NATSError.closed)
        return self
    }
}
