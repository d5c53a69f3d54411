import Foundation
import TapioAgent
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// Each misbehaving client is refused, and the server keeps serving a
/// well-behaved agent throughout.
final class RefusalTests: XCTestCase {
    private var harness: ServerHarness!
    private var goodOutbox: Outbox!
    private var goodSender: Sender!
    private var nextPid: UInt32 = 1

    override func setUpWithError() throws {
        harness = try ServerHarness()
        (goodOutbox, goodSender) = try harness.agent(node: "node-a")
        try assertGoodAgentStillServed()
    }

    override func tearDown() {
        goodSender?.drainAndStop(graceSeconds: 1)
        harness = nil
    }

    private func assertGoodAgentStillServed(file: StaticString = #filePath, line: UInt = #line) throws {
        let pid = nextPid
        nextPid += 1
        goodOutbox.add(event(pid, comm: "good"))
        goodOutbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { self.goodOutbox.unacknowledged == 0 }, "the good agent's batch is acknowledged", file: file, line: line)
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-a", pid: pid)).count, 1, file: file, line: line)
    }

    private func probe(_ mode: String, ca: String, cert: String? = nil, key: String? = nil) throws -> JSONValue {
        var args = ["probe", mode, "127.0.0.1", String(harness.ingestPort), ca]
        if let cert, let key { args += [cert, key] }
        let r = try harness.python(args)
        XCTAssertEqual(r.status, 0, r.stderr)
        return try JSONValue.parse(Array(r.stdout.utf8))
    }

    func testClientWithoutCertificateIsRefused() throws {
        let result = try probe("heartbeat", ca: harness.pki + "/ca/ca.crt")
        XCTAssertEqual(result["outcome"], .string("refused"), "\(result)")
        XCTAssertTrue(result["error"]?.stringValue?.contains("CERTIFICATE_REQUIRED") ?? false, "\(result)")
        try assertGoodAgentStillServed()
    }

    func testCertificateFromAnotherCAIsRefused() throws {
        let other = try TestSupport.temporaryDirectory("tapio-other-ca")
        let otherPKI = try TestSupport.makePKI(in: other, nodes: ["node-a"])
        // Trust the real server, present a node certificate it did not issue.
        let result = try probe("heartbeat", ca: harness.pki + "/ca/ca.crt", cert: otherPKI + "/nodes/node-a/tls.crt", key: otherPKI + "/nodes/node-a/tls.key")
        XCTAssertEqual(result["outcome"], .string("refused"), "\(result)")
        XCTAssertTrue(result["error"]?.stringValue?.lowercased().contains("unknown") ?? false, "\(result)")
        try assertGoodAgentStillServed()
    }

    func testAgentClaimingAnotherNodeIsRefused() throws {
        // node-a's certificate, hello says node-b.
        let (outbox, sender) = try harness.agent(node: "node-a", claiming: "node-b")
        outbox.add(event(999, comm: "impostor"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { sender.status.lastError.contains("certificate names node node-a but hello says node-b") }, sender.status.lastError)
        sender.drainAndStop(graceSeconds: 0)
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-b")).count, 0)
        XCTAssertGreaterThan(harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"protocol\"}"), 0)
        try assertGoodAgentStillServed()
    }

    func testFrameOverTheMaximumIsRefusedBeforeItsPayload() throws {
        let node = harness.pki + "/nodes/node-b"
        let result = try probe("oversize", ca: node + "/ca.crt", cert: node + "/tls.crt", key: node + "/tls.key")
        XCTAssertEqual(result["outcome"], .string("answered"), "\(result)")
        XCTAssertEqual(result["frame"], .string("error"))
        XCTAssertTrue(result["message"]?.stringValue?.contains("exceeds the maximum") ?? false, "\(result)")
        XCTAssertEqual(harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"too_large\"}"), 1)
        try assertGoodAgentStillServed()
    }

    func testRandomBytesAfterTheHandshakeAreRefused() throws {
        let node = harness.pki + "/nodes/node-b"
        for _ in 0..<3 {
            let result = try probe("random", ca: node + "/ca.crt", cert: node + "/tls.crt", key: node + "/tls.key")
            XCTAssertNotEqual(result["outcome"], .string("refused"), "TLS itself succeeded: \(result)")
            XCTAssertTrue(result["outcome"] == .string("closed") || result["frame"] == .string("error"), "\(result)")
        }
        XCTAssertGreaterThanOrEqual(harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"bad_header\"}"), 3)
        try assertGoodAgentStillServed()
    }

    func testFrameBeforeHelloIsRefused() throws {
        let node = harness.pki + "/nodes/node-b"
        let result = try probe("heartbeat", ca: node + "/ca.crt", cert: node + "/tls.crt", key: node + "/tls.key")
        XCTAssertEqual(result["frame"], .string("error"), "\(result)")
        try assertGoodAgentStillServed()
    }
}
