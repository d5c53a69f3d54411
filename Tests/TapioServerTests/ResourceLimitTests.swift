import CTapioTLS
import Foundation
import TapioAgent
import TapioClient
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// Peers that hold on to the server's resources (sockets that never start
/// TLS, idle /metrics connections, frames trickled a byte at a time, a wrong
/// role sending a big frame) are closed, and the well-behaved agent and
/// operator keep being served. Deadlines are short here; nothing asserts how
/// long anything took, only what happened.
final class ResourceLimitTests: XCTestCase {
    private var harness: ServerHarness!
    private var sender: Sender?
    private var outbox: Outbox?
    private var nextPid: UInt32 = 1

    override func tearDown() {
        sender?.drainAndStop(graceSeconds: 1)
        harness = nil
    }

    private func start(_ configure: (inout ServerConfiguration) -> Void) throws {
        harness = try ServerHarness(configure: configure)
    }

    /// node-a's agent sends one event and it is acknowledged and stored.
    private func assertGoodAgentServed(file: StaticString = #filePath, line: UInt = #line) throws {
        if sender == nil { (outbox, sender) = try harness.agent(node: "node-a") }
        let pid = nextPid
        nextPid += 1
        outbox!.add(event(pid, comm: "good"))
        outbox!.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { self.outbox!.unacknowledged == 0 }, "the good agent's batch is acknowledged", file: file, line: line)
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-a", pid: pid)).count, 1, file: file, line: line)
    }

    private func assertOperatorServed(file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertNoThrow(try harness.operatorClient().json("nodes"), "the operator's query is answered", file: file, line: line)
    }

    private func rejected(_ reason: String) -> Int64 {
        harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"\(reason)\"}")
    }

    // MARK: - Defect 12: sockets that never start TLS; one limit per listener

    func testSocketsThatNeverStartTLSAreClosedAndTheAgentGetsIn() throws {
        try start {
            $0.limits.maxConnections = 16
            $0.limits.handshakeTimeout = .seconds(1)
        }
        // More plain TCP sockets than the ingest listener admits; none sends a byte.
        let sockets = try (0..<24).map { _ in try PlainSocket(port: harness.ingestPort) }
        XCTAssertEqual(PlainSocket.stillOpen(sockets, awaiting: 24), [], "sockets that never start TLS are closed by the server")
        XCTAssertGreaterThanOrEqual(rejected("handshake_timeout"), 1)
        try assertGoodAgentServed()
        assertOperatorServed()
    }

    func testAFullIngestListenerDoesNotKeepOperatorsOut() throws {
        try start {
            $0.limits.maxConnections = 8
            $0.limits.handshakeTimeout = .seconds(120)
        }
        let sockets = try (0..<8).map { _ in try PlainSocket(port: harness.ingestPort) }
        XCTAssertTrue(eventually { self.harness.server.connectionCount == 8 }, "the ingest listener is full")
        let extra = try PlainSocket(port: harness.ingestPort)
        XCTAssertTrue(extra.closedByServer(within: 15), "a connection over the ingest limit is closed on accept")
        assertOperatorServed()
        XCTAssertFalse(sockets[0].closedByServer(within: 0), "connections within the limit are still open")
    }

    func testAFullQueryListenerDoesNotKeepAgentsOut() throws {
        try start {
            $0.limits.maxQueryConnections = 4
            $0.limits.handshakeTimeout = .seconds(120)
        }
        let sockets = try (0..<4).map { _ in try PlainSocket(port: harness.queryPort) }
        XCTAssertTrue(eventually { self.harness.server.connectionCount == 4 }, "the query listener is full")
        let extra = try PlainSocket(port: harness.queryPort)
        XCTAssertTrue(extra.closedByServer(within: 15), "a connection over the query limit is closed on accept")
        XCTAssertGreaterThanOrEqual(harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"limit\",listener=\"query\"}"), 1)
        try assertGoodAgentServed()
        XCTAssertFalse(sockets[0].closedByServer(within: 0), "connections within the limit are still open")
    }

    // MARK: - Defect 13: /metrics has a deadline and a limit

    func testIdleAndTricklingMetricsConnectionsAreClosed() throws {
        let metricsPort = TestSupport.freePort()
        try start {
            $0.metricsHost = "127.0.0.1"
            $0.metricsPort = metricsPort
            $0.limits.maxMetricsConnections = 4
            $0.limits.metricsTimeout = .seconds(1)
        }
        var sockets = try (0..<12).map { _ in try PlainSocket(port: metricsPort) }
        // One sends a request line and never finishes its headers.
        let trickler = try PlainSocket(port: metricsPort)
        trickler.send(Array("GET /metrics HTTP/1.1\r\n".utf8))
        sockets.append(trickler)
        XCTAssertEqual(PlainSocket.stillOpen(sockets, awaiting: sockets.count), [], "idle /metrics connections are closed by the server")
        XCTAssertGreaterThanOrEqual(harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"limit\",listener=\"metrics\"}"), 1)
        XCTAssertGreaterThanOrEqual(rejected("metrics_timeout"), 1)
        let scrape = try TestSupport.httpGet(port: metricsPort, path: "/metrics")
        XCTAssertEqual(scrape.status, 200)
        XCTAssertTrue(scrape.body.contains("tapio_server_listener_connections{listener=\"ingest\"}"), scrape.body)
        try assertGoodAgentServed()
    }

    func testAFullMetricsListenerDoesNotKeepAgentsOrOperatorsOut() throws {
        let metricsPort = TestSupport.freePort()
        try start {
            $0.metricsHost = "127.0.0.1"
            $0.metricsPort = metricsPort
            $0.limits.maxMetricsConnections = 4
            $0.limits.metricsTimeout = .seconds(120)
        }
        let sockets = try (0..<10).map { _ in try PlainSocket(port: metricsPort) }
        XCTAssertEqual(PlainSocket.stillOpen(sockets, awaiting: 6).count, 4, "connections over the /metrics limit are closed on accept, the others stay")
        try assertGoodAgentServed()
        assertOperatorServed()
    }

    // MARK: - Defect 18: the role at the handshake, a deadline per frame

    func testANodeCertificateIsRefusedOnTheQueryPortBeforeItsFrame() throws {
        try start { $0.limits.handshakeTimeout = .seconds(5) }
        let peer = try TLSPeer(port: harness.queryPort, directory: harness.pki + "/nodes/node-b")
        // The start of a 4 MiB frame; the rest never comes.
        var partial: [UInt8] = []
        FrameHeader(type: .query, length: FrameHeader.defaultMaximumPayload - 16).write(into: &partial)
        partial += [UInt8](repeating: 0x41, count: 256 << 10)
        peer.send(partial)
        let answer = peer.readUntilClosed(timeout: 15)
        XCTAssertTrue(answer.closed, "the server closes a node's query connection without waiting for its frame")
        if let frame = answer.firstFrame {
            XCTAssertEqual(frame.type, .queryResponse)
            let response = try QueryResponse.decode(frame.payload)
            XCTAssertEqual(response.status, WireErrorCode.forbidden.rawValue)
            XCTAssertTrue(response.error.contains("may not query"), response.error)
        }
        XCTAssertGreaterThanOrEqual(rejected("forbidden"), 1)
        assertOperatorServed()
    }

    func testAnOperatorCertificateIsRefusedOnTheIngestPortAtTheHandshake() throws {
        // A hello deadline this long leaves only the handshake check to close it.
        try start { $0.limits.helloTimeout = .seconds(120) }
        let peer = try TLSPeer(port: harness.ingestPort, directory: harness.pki + "/operators/alice")
        let answer = peer.readUntilClosed(timeout: 15)
        XCTAssertTrue(answer.closed, "the server closes an operator's ingest connection at the handshake")
        let frame = try XCTUnwrap(answer.firstFrame, "the refusal says why")
        XCTAssertEqual(frame.type, .error)
        let error = try WireError.decode(frame.payload)
        XCTAssertEqual(error.code, WireErrorCode.forbidden.rawValue)
        XCTAssertTrue(error.message.contains("may not send events"), error.message)
        try assertGoodAgentServed()
    }

    func testATrickledFrameIsClosedAtItsDeadline() throws {
        try start {
            $0.limits.frameTimeout = .seconds(1)
            $0.limits.helloTimeout = .seconds(120)
        }
        for (port, identity) in [(harness.queryPort, "/operators/alice"), (harness.ingestPort, "/nodes/node-b")] {
            let peer = try TLSPeer(port: port, directory: harness.pki + identity)
            var header: [UInt8] = []
            FrameHeader(type: port == harness.queryPort ? .query : .hello, length: 4000).write(into: &header)
            peer.send(header)
            // One byte every 100 ms: each read used to restart the idle clock.
            var closed = false
            for _ in 0..<150 where !closed {
                peer.send([0x0A])
                closed = peer.readUntilClosed(timeout: 0.1).closed
            }
            XCTAssertTrue(closed, "a frame trickled on port \(port) is closed before it completes")
        }
        XCTAssertGreaterThanOrEqual(rejected("frame_timeout"), 2)
        try assertGoodAgentServed()
        assertOperatorServed()
    }

    func testAQueryFrameOverTheQueryLimitIsRefusedBeforeItsPayload() throws {
        try start { _ in }
        let peer = try TLSPeer(port: harness.queryPort, directory: harness.pki + "/operators/alice")
        var header: [UInt8] = []
        FrameHeader(type: .query, length: 1 << 20).write(into: &header)
        peer.send(header)
        XCTAssertTrue(peer.readUntilClosed(timeout: 15).closed, "a 1 MiB query frame is refused from its header")
        assertOperatorServed()
    }
}

// MARK: - Raw peers

/// A TCP connection to 127.0.0.1 that speaks no protocol at all.
final class PlainSocket {
    private let fd: Int32

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket failed") }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            close(fd)
            throw TestSupportError("connect to 127.0.0.1:\(port) failed")
        }
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    /// Indices of the sockets still open once `count` of them have been closed
    /// by the server, or after 15 s if fewer are.
    static func stillOpen(_ sockets: [PlainSocket], awaiting count: Int) -> [Int] {
        var closed = Set<Int>()
        _ = eventually(timeout: 15) {
            for (i, socket) in sockets.enumerated() where !closed.contains(i) && socket.closedByServer(within: 0) { closed.insert(i) }
            return closed.count >= count
        }
        return sockets.indices.filter { !closed.contains($0) }
    }

    /// Whether the server closes (or resets) this connection within `seconds`;
    /// anything it sends meanwhile is read and ignored.
    func closedByServer(within seconds: TimeInterval) -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        var buffer = [UInt8](repeating: 0, count: 4096)
        repeat {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let wait = max(0, Int32(deadline.timeIntervalSinceNow * 1000))
            if poll(&pfd, 1, min(wait, 200)) > 0 {
                let n = recv(fd, &buffer, buffer.count, Int32(MSG_DONTWAIT))
                if n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) { return true }
            }
        } while Date() < deadline
        return false
    }
}

/// A mutually authenticated TLS 1.3 connection that sends whatever bytes the
/// test likes (CTapioTLS, the agent's own TLS client).
final class TLSPeer {
    private let tls: OpaquePointer

    /// `directory` holds ca.crt, tls.crt, tls.key.
    init(port: Int, directory: String) throws {
        var err = [CChar](repeating: 0, count: 512)
        guard let tls = tapio_tls_connect("127.0.0.1", UInt16(port), "localhost", directory + "/ca.crt", directory + "/tls.crt",
                                          directory + "/tls.key", 10_000, &err, err.count)
        else { throw TestSupportError("TLS connect failed: \(String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))") }
        self.tls = tls
    }

    deinit { tapio_tls_close(tls) }

    /// Sends, ignoring failures (the server may already have closed).
    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { tapio_tls_write_all(tls, $0.baseAddress, $0.count, 5_000) }
    }

    struct Answer {
        var bytes: [UInt8]
        var closed: Bool

        /// The first whole frame the server sent, if any.
        var firstFrame: Frame? {
            guard bytes.count >= FrameHeader.size,
                  let header = try? FrameHeader.parse(Array(bytes[0..<FrameHeader.size]), maximumPayload: .max),
                  bytes.count >= FrameHeader.size + Int(header.length)
            else { return nil }
            return Frame(type: header.type, payload: Array(bytes[FrameHeader.size..<(FrameHeader.size + Int(header.length))]))
        }
    }

    /// Reads until the server closes (or resets) the connection or `seconds` pass.
    func readUntilClosed(timeout seconds: TimeInterval) -> Answer {
        let deadline = Date(timeIntervalSinceNow: seconds)
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        repeat {
            let wait = max(1, min(200, Int32(deadline.timeIntervalSinceNow * 1000)))
            let n = tapio_tls_read(tls, &buffer, buffer.count, wait)
            if n > 0 {
                bytes += buffer[0..<Int(n)]
            } else if n < 0 {
                return Answer(bytes: bytes, closed: true)
            }
        } while Date() < deadline
        return Answer(bytes: bytes, closed: false)
    }
}
