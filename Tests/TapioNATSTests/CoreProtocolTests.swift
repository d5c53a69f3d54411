import Foundation
import NIOCore
import TapioNATS
import TapioTestSupport
import XCTest

/// The core protocol against a real nats-server: publish and subscribe with
/// headers, request-reply, no responders, the server's limits and credentials.
final class CoreProtocolTests: NATSTestCase {
    func testPublishedMessagesArriveInOrderWithTheirHeaders() async throws {
        let server = try startServer(jetStream: false)
        let client = try await connect([server])
        XCTAssertEqual(client.serverInfo?.serverName, "n1")
        XCTAssertEqual(client.serverInfo?.headers, true)
        let subscription = try client.subscribe("orders.>")
        try await client.flush()
        try await client.publish("orders.eu.1", string: "first", headers: NATSHeaders([("Nats-Msg-Id", "n1-7-1"), ("Trace", "a"), ("Trace", "b")]))
        try await client.publish("orders.us", string: "second")
        try await client.publish("other", string: "not for this subscription")
        try await client.publish("orders.eu.2", payload: [UInt8](), headers: NATSHeaders([("Empty-Payload", "yes")]))

        let received = await receive(3, from: subscription)
        guard received.count == 3 else { return XCTFail("received \(received.count) of 3 messages") }
        XCTAssertEqual(received.map(\.subject), ["orders.eu.1", "orders.us", "orders.eu.2"])
        XCTAssertEqual(received.map(\.string), ["first", "second", ""])
        XCTAssertEqual(received[0].headers?["Nats-Msg-Id"], "n1-7-1")
        XCTAssertEqual(received[0].headers?.fields.filter { $0.name == "Trace" }.map(\.value), ["a", "b"])
        XCTAssertNil(received[1].headers, "a message published without headers arrives as MSG")
        XCTAssertEqual(received[2].headers?["Empty-Payload"], "yes")
        XCTAssertEqual(subscription.droppedCount, 0)
    }

    func testARequestGetsItsReplyAndARequestToNobodyIsReportedAsNoResponders() async throws {
        let server = try startServer(jetStream: false)
        let responder = try await connect([server])
        let requester = try await connect([server])
        let service = try responder.subscribe("svc.upper", queue: "workers")
        try await responder.flush()
        let serving = Task {
            for await message in service {
                guard let reply = message.replyTo else { continue }
                try await responder.publish(reply, string: message.string.uppercased(), headers: NATSHeaders([("Served-By", "responder")]))
            }
        }
        defer { serving.cancel(); service.unsubscribe() }

        for word in ["alpha", "beta", "gamma"] {
            let reply = try await requester.request("svc.upper", payload: Array(word.utf8))
            XCTAssertEqual(reply.string, word.uppercased())
            XCTAssertEqual(reply.headers?["Served-By"], "responder")
        }
        do {
            _ = try await requester.request("svc.nobody", payload: Array("x".utf8), timeout: .seconds(30))
            XCTFail("a request to a subject without subscribers succeeded")
        } catch NATSError.noResponders(let subject) {
            XCTAssertEqual(subject, "svc.nobody")
        }
        // A responder that never answers: a timeout, named as such.
        let silent = try responder.subscribe("svc.silent")
        try await responder.flush()
        do {
            _ = try await requester.request("svc.silent", payload: [UInt8](), timeout: .milliseconds(300))
            XCTFail("a request without a reply succeeded")
        } catch NATSError.timeout(let what) {
            XCTAssertTrue(what.contains("svc.silent"), what)
        }
        silent.unsubscribe()
    }

    func testAMessageOverTheServersMaxPayloadIsRefusedBeforeItIsSent() async throws {
        let server = try startServer(jetStream: false, maxPayload: 1024)
        let client = try await connect([server])
        XCTAssertEqual(client.serverInfo?.maxPayload, 1024)
        let subscription = try client.subscribe("big")
        try await client.flush()
        do {
            try await client.publish("big", payload: [UInt8](repeating: 1, count: 1000), headers: NATSHeaders([("Padding", String(repeating: "x", count: 100))]))
            XCTFail("a message over max_payload was sent")
        } catch NATSError.payloadTooLarge(let bytes, let limit) {
            XCTAssertGreaterThan(bytes, 1024)
            XCTAssertEqual(limit, 1024)
        }
        // Nothing was written: the connection is still open and the next message arrives first.
        try await client.publish("big", payload: [UInt8](repeating: 2, count: 1024))
        let next = await receive(1, from: subscription).first
        XCTAssertEqual(next?.payload.readableBytes, 1024)
        XCTAssertNil(client.lastError)
        XCTAssertEqual(client.reconnectCount, 0)
        // Names the server would refuse are refused here.
        for subject in ["", "a b", "a..b", "a.", "tab\there"] {
            do {
                try await client.publish(subject, string: "x")
                XCTFail("subject '\(subject)' was accepted")
            } catch NATSError.invalidName {}
        }
    }

    func testWrongCredentialsAreRefusedInTheServersWords() async throws {
        let server = try startServer(jetStream: false, auth: .userPassword("tapio", "s3cret"))
        do {
            _ = try await connect([server]) { $0.authentication = .userPassword(user: "tapio", password: "wrong") }
            XCTFail("wrong password accepted")
        } catch NATSError.cannotConnect(let reasons) {
            XCTAssertTrue(reasons.joined().contains("Authorization Violation"), "\(reasons)")
        }
        let client = try await connect([server]) { $0.authentication = .userPassword(user: "tapio", password: "s3cret") }
        try await client.flush()

        let tokenServer = try startServer(name: "n2", jetStream: false, auth: .token("t0ken"))
        do {
            _ = try await connect([tokenServer])
            XCTFail("connected without the token")
        } catch NATSError.cannotConnect(let reasons) {
            XCTAssertTrue(reasons.joined().contains("Authorization Violation"), "\(reasons)")
        }
        let withToken = try await connect([tokenServer]) { $0.authentication = .token("t0ken") }
        try await withToken.publish("anything", string: "allowed")
        try await withToken.flush()
        XCTAssertNil(withToken.lastError)
    }

    func testSubscriptionsAreSentAgainAfterTheServerComesBack() async throws {
        let server = try startServer(jetStream: false)
        let client = try await connect([server])
        let subscription = try client.subscribe("events.*")
        try await client.flush()
        server.kill9()
        try server.start()
        let back = eventually(timeout: 20) { client.reconnectCount == 1 && client.connectedServer != nil }
        XCTAssertTrue(back, "no reconnect; last error: \(String(describing: client.lastError))")
        XCTAssertEqual(client.lastError as? NATSError, NATSError.connectionLost)
        let publisher = try await connect([server])
        try await publisher.publish("events.a", string: "after restart")
        let message = await receive(1, from: subscription).first
        XCTAssertEqual(message?.string, "after restart")
    }

    func testTheClientAnswersTheServersPingsAndStaysConnected() async throws {
        // The server PINGs every second and drops a client after 2 unanswered.
        let server = try startServer(jetStream: false, extraConfig: ["ping_interval: \"1s\"", "ping_max: 2"])
        let client = try await connect([server])
        try await Task.sleep(for: .seconds(4))
        XCTAssertEqual(client.reconnectCount, 0, "the server dropped the client: \(String(describing: client.lastError))")
        XCTAssertNil(client.lastError)
        try await client.flush()
    }

    func testOperationsWaitForAReconnectUpToTheirTimeoutAndFailOnceTheClientGivesUp() async throws {
        let server = try startServer(jetStream: false)
        let client = try await connect([server]) {
            $0.requestTimeout = .milliseconds(500)
            $0.reconnect = .rounds(8)
            $0.reconnectWait = .milliseconds(250)
        }
        server.kill9()
        // Once the client knows the connection is gone (a publish written
        // before it noticed fails as lost with the connection instead).
        XCTAssertTrue(eventually(timeout: 10) { client.connectedServer == nil }, "the client noticed the server went away")
        do {
            try await client.publish("x", string: "while the server is down")
            XCTFail("a publish succeeded with no server")
        } catch NATSError.timeout(let what) {
            XCTAssertTrue(what.contains("no connection"), what)
        }
        let gaveUp = eventually(timeout: 20) { client.isClosed }
        XCTAssertTrue(gaveUp, "the client did not give up after its reconnect rounds")
        guard case NATSError.cannotConnect(let reasons)? = client.lastError as? NATSError else {
            return XCTFail("last error: \(String(describing: client.lastError))")
        }
        XCTAssertTrue(reasons.joined().contains("127.0.0.1:\(server.port)"), "\(reasons)")
        do {
            _ = try await client.request("x", payload: [UInt8]())
            XCTFail("a request succeeded on a client that gave up")
        } catch NATSError.closed {}
    }
}
