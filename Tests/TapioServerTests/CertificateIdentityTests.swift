import Foundation
import Logging
import TapioAgent
import TapioClient
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// Certificates the CA did sign but that name no peer: a leaf that is itself a
/// CA, a subject with two O values (two roles) or two CNs. The server refuses
/// them (a log line, a counted metric), and the ordinary agent and operator
/// keep being served. The odd certificates are made with the openssl CLI,
/// signed by the test PKI's CA.
final class CertificateIdentityTests: XCTestCase {
    private var harness: ServerHarness!

    override func setUpWithError() throws {
        // A hello deadline this long leaves only the certificate check to refuse.
        harness = try ServerHarness { $0.limits.helloTimeout = .seconds(120) }
    }

    override func tearDown() {
        harness = nil
    }

    private var identityRefusals: Int64 {
        harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"identity\"}")
    }

    /// Issues a client certificate with `subject` (openssl -subj syntax) and
    /// the given extensions into a new directory in the cert-manager layout.
    private func issue(subject: String, basicConstraints: String = "critical,CA:FALSE",
                       keyUsage: String = "critical,digitalSignature") throws -> String {
        let dir = try TestSupport.temporaryDirectory("tapio-odd-cert")
        let ca = harness.pki + "/ca"
        try FileManager.default.copyItem(atPath: ca + "/ca.crt", toPath: dir + "/ca.crt")
        let ext = """
        [leaf]
        basicConstraints = \(basicConstraints)
        keyUsage = \(keyUsage)
        extendedKeyUsage = clientAuth
        subjectKeyIdentifier = hash
        authorityKeyIdentifier = keyid:always

        """
        try ext.write(toFile: dir + "/ext.cnf", atomically: true, encoding: .utf8)
        try openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-keyout", dir + "/tls.key", "-subj", subject, "-out", dir + "/req.csr"])
        try openssl(["x509", "-req", "-in", dir + "/req.csr", "-CA", ca + "/ca.crt", "-CAkey", ca + "/ca.key",
                     "-set_serial", "\(UInt32.random(in: 1...UInt32.max))", "-days", "1", "-sha256",
                     "-extfile", dir + "/ext.cnf", "-extensions", "leaf", "-out", dir + "/tls.crt"])
        return dir
    }

    private func openssl(_ arguments: [String]) throws {
        let r = try TestSupport.run("/usr/bin/openssl", arguments)
        guard r.status == 0 else { throw TestSupportError("openssl \(arguments.first ?? "") failed: \(r.stderr)") }
    }

    private func der(_ dir: String) throws -> [UInt8] {
        try openssl(["x509", "-in", dir + "/tls.crt", "-outform", "DER", "-out", dir + "/tls.der"])
        return Array(try Data(contentsOf: URL(fileURLWithPath: dir + "/tls.der")))
    }

    private func assertGoodAgentServed(file: StaticString = #filePath, line: UInt = #line) throws {
        let (outbox, sender) = try harness.agent(node: "node-b")
        defer { sender.drainAndStop(graceSeconds: 1) }
        outbox.add(event(7, comm: "good"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 }, "the good agent's batch is acknowledged", file: file, line: line)
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-b", pid: 7)).count, 1, file: file, line: line)
    }

    func testALeafThatIsACAIsNotANode() throws {
        let dir = try issue(subject: "/O=tapio-node/CN=node-a", basicConstraints: "critical,CA:TRUE")
        XCTAssertNil(PeerIdentity(der: try der(dir)))
        guard case .failure(let refusal) = PeerIdentity.parse(der: try der(dir)) else { return XCTFail("a CA leaf parsed") }
        XCTAssertEqual(refusal.reason, .certificateAuthority)

        // The real agent with it: refused, nothing stored.
        let (caOutbox, caSender) = try agent(directory: dir, node: "node-a")
        defer { caSender.drainAndStop(graceSeconds: 0) }
        caOutbox.add(event(66, comm: "ca-leaf"))
        caOutbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { self.identityRefusals >= 1 }, "the CA leaf is refused and counted")
        XCTAssertTrue(eventually { caSender.status.lastError.contains("names no peer") }, caSender.status.lastError)
        XCTAssertEqual(caOutbox.unacknowledged, 1)
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-a", pid: 66)).count, 0)
        try assertGoodAgentServed()
    }

    func testALeafThatMaySignCertificatesIsNotANode() throws {
        let dir = try issue(subject: "/O=tapio-node/CN=node-a", basicConstraints: "critical,CA:FALSE",
                            keyUsage: "critical,digitalSignature,keyCertSign")
        XCTAssertNil(PeerIdentity(der: try der(dir)))
        let peer = try TLSPeer(port: harness.ingestPort, directory: dir)
        let answer = peer.readUntilClosed(timeout: 15)
        XCTAssertTrue(answer.closed)
        XCTAssertGreaterThanOrEqual(identityRefusals, 1)
    }

    func testTwoRolesCannotQuery() throws {
        // The first O used to win.
        let dir = try issue(subject: "/O=tapio-operator/O=tapio-node/CN=mallory")
        guard case .failure(let refusal) = PeerIdentity.parse(der: try der(dir)) else { return XCTFail("two O values parsed") }
        XCTAssertEqual(refusal.reason, .organization)
        XCTAssertTrue(refusal.message.contains("2 O values"), refusal.message)

        let client = try QueryClient(host: "127.0.0.1", port: harness.queryPort, ca: dir + "/ca.crt",
                                     certificate: dir + "/tls.crt", key: dir + "/tls.key")
        XCTAssertThrowsError(try client.json("nodes")) { error in
            XCTAssertTrue("\(error)".contains("names no peer"), "\(error)")
        }
        XCTAssertGreaterThanOrEqual(identityRefusals, 1)
        XCTAssertNoThrow(try harness.operatorClient().json("nodes"), "the real operator still queries")
    }

    func testTwoRolesCannotSendEvents() throws {
        let dir = try issue(subject: "/O=tapio-node/O=tapio-operator/CN=node-a")
        XCTAssertNil(PeerIdentity(der: try der(dir)))
        let (outbox, sender) = try agent(directory: dir, node: "node-a")
        defer { sender.drainAndStop(graceSeconds: 0) }
        outbox.add(event(67, comm: "two-roles"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { self.identityRefusals >= 1 }, "two roles are refused and counted")
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-a", pid: 67)).count, 0)
        try assertGoodAgentServed()
    }

    func testTwoNamesAreNoNode() throws {
        let dir = try issue(subject: "/O=tapio-node/CN=node-a/CN=node-b")
        guard case .failure(let refusal) = PeerIdentity.parse(der: try der(dir)) else { return XCTFail("two CNs parsed") }
        XCTAssertEqual(refusal.reason, .commonName)
        let peer = try TLSPeer(port: harness.ingestPort, directory: dir)
        XCTAssertTrue(peer.readUntilClosed(timeout: 15).closed)
        XCTAssertGreaterThanOrEqual(identityRefusals, 1)
    }

    func testAnOrdinaryNodeCertificateStillNamesItsNode() throws {
        let dir = try issue(subject: "/O=tapio-node/CN=node-a")
        XCTAssertEqual(PeerIdentity(der: try der(dir)), PeerIdentity(commonName: "node-a", role: PeerIdentity.nodeRole))
        let (outbox, sender) = try agent(directory: dir, node: "node-a")
        defer { sender.drainAndStop(graceSeconds: 1) }
        outbox.add(event(68, comm: "ordinary"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        XCTAssertEqual(identityRefusals, 0)
    }

    /// A real agent (outbox and sender) presenting the certificate in `directory`.
    private func agent(directory: String, node: String) throws -> (Outbox, Sender) {
        let outbox = try Outbox(node: node, epoch: UInt64(wallClockNs()), limits: Outbox.Limits(), spoolDirectory: nil)
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(harness.ingestPort), serverName: "localhost",
                                          tls: AgentTLSFiles(directory: directory), node: node, bootId: "test",
                                          capabilities: ["process_exec"], degraded: [])
        config.maximumBackoffMs = 200
        var logger = Logger(label: "tapio-agent-test")
        logger.logLevel = .critical
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        sender.start()
        return (outbox, sender)
    }
}
