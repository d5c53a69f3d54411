import Foundation
import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

/// The agent's operational surface without the kernel: the metrics endpoint
/// under idle and excess connections, the readiness rule, which failures are
/// refusals, and which events are the agent's own traffic.
final class AgentOperabilityTests: XCTestCase {
    // MARK: - Metrics endpoint

    private func endpoint(deadlineMs: Int64 = 60_000, maximumConnections: Int = 32) throws -> MetricsEndpoint {
        let e = try MetricsEndpoint(host: "127.0.0.1", port: 0, render: { "tapio_test_metric 1\n" },
                                    live: { .init(ok: true, reason: "ok") }, ready: { .init(ok: false, reason: "not connected to the server yet") })
        e.deadlineMs = deadlineMs
        e.maximumConnections = maximumConnections
        e.start()
        return e
    }

    /// A connection that sends nothing.
    private func idleConnection(_ port: UInt16) throws -> Int32 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = port.bigEndian
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0 else { throw TestSupportError("connect failed") }
        return fd
    }

    /// A GET whose answer is awaited at most `timeout` seconds (nil: none came).
    private func get(_ port: UInt16, _ path: String, timeout: Int = 10) throws -> (status: Int, body: String)? {
        let fd = try idleConnection(port)
        defer { close(fd) }
        var tv = timeval(tv_sec: timeout, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let request = Array("GET \(path) HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        _ = request.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        var response: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buffer, buffer.count)
            if n <= 0 { break }
            response += buffer[0..<n]
        }
        guard !response.isEmpty else { return nil }
        let text = String(decoding: response, as: UTF8.self)
        let status = Int(text.split(separator: " ").dropFirst().first ?? "") ?? 0
        return (status, text.components(separatedBy: "\r\n\r\n").dropFirst().joined())
    }

    func testIdleConnectionsDoNotDelayAProbe() throws {
        // Idle clients are given a minute: an endpoint that served them one
        // at a time would answer nothing else for that long (one that gave
        // each 2 s would take 16 s to reach this GET).
        let e = try endpoint()
        defer { e.stop() }
        let idle = try (0..<8).map { _ in try idleConnection(e.port) }
        defer { idle.forEach { close($0) } }
        let metrics = try get(e.port, "/metrics", timeout: 5)
        XCTAssertEqual(metrics?.status, 200)
        XCTAssertEqual(metrics?.body, "tapio_test_metric 1\n")
        XCTAssertEqual(try get(e.port, "/healthz")?.status, 200)
        let ready = try get(e.port, "/readyz?verbose")
        XCTAssertEqual(ready?.status, 503)
        XCTAssertEqual(ready?.body, "not connected to the server yet\n")
        XCTAssertEqual(try get(e.port, "/nothing")?.status, 404)
    }

    func testConnectionsBeyondTheBoundMakeRoomByClosingTheOldest() throws {
        let e = try endpoint(maximumConnections: 4)
        defer { e.stop() }
        let idle = try (0..<10).map { _ in try idleConnection(e.port) }
        defer { idle.forEach { close($0) } }
        XCTAssertEqual(try get(e.port, "/healthz")?.status, 200)
        // The oldest idle connections were closed to make room.
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(idle[0], SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var byte: UInt8 = 0
        XCTAssertEqual(read(idle[0], &byte, 1), 0, "the oldest idle connection was closed")
    }

    func testAClientThatSendsNothingIsClosedAtItsDeadline() throws {
        let e = try endpoint(deadlineMs: 200)
        defer { e.stop() }
        let fd = try idleConnection(e.port)
        defer { close(fd) }
        var tv = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var byte: UInt8 = 0
        XCTAssertEqual(read(fd, &byte, 1), 0, "closed without an answer")
        XCTAssertEqual(try get(e.port, "/healthz")?.status, 200)
    }

    // MARK: - Readiness

    func testReadinessRidesOutAShortDisconnectButNotALongOne() {
        let s = Int64(1_000_000_000)
        var status = Sender.Status()
        func ready(_ now: Int64, reading: Bool = true, attached: Bool = true) -> Bool {
            Agent.readiness(reading: reading, programAttached: attached, session: status, graceSeconds: 60, nowNs: now).ok
        }
        XCTAssertFalse(ready(100 * s), "not ready before the first session")
        status.refused = true
        XCTAssertFalse(ready(100 * s), "nor while refused")
        status = Sender.Status()
        status.connected = true
        status.lastConnectedNs = 100 * s
        XCTAssertTrue(ready(100 * s))
        XCTAssertFalse(ready(100 * s, reading: false), "not ready once the kernel programs are not read")
        XCTAssertFalse(ready(100 * s, attached: false), "not ready without a program")
        // The server restarts: disconnected at 200 s.
        status.connected = false
        status.lastConnectedNs = 200 * s
        XCTAssertTrue(ready(205 * s), "a server restart does not make the agent not ready")
        XCTAssertTrue(ready(259 * s))
        XCTAssertFalse(ready(261 * s), "a minute without the server does")
        status.connected = true
        XCTAssertTrue(ready(400 * s))
    }

    // MARK: - Refusals

    func testTLSFailuresThatAreRefusalsAreToldFromTheNetworkFailingOrTheServerStarting() {
        for refused in [
            "server certificate verification failed for 127.0.0.1:7400: unable to get local issuer certificate (not issued by the CA in '/x/ca.crt')",
            "TLS handshake with 127.0.0.1:7400 failed: error:0A000412:SSL routines::sslv3 alert bad certificate",
            "error:0A00045C:SSL routines::tlsv13 alert certificate required",
            "cannot load client certificate from '/x/tls.crt'",
        ] {
            XCTAssertTrue(Sender.isTLSRefusal(refused), refused)
        }
        for transient in [
            "cannot connect to 127.0.0.1 port 7400: Connection refused",
            "cannot resolve 'tapio-server': Name or service not known",
            "TLS handshake with 127.0.0.1:7400 timed out after 5000 ms",
            "TLS handshake with 127.0.0.1:7400 failed: connection closed by peer",
            "server closed the connection",
        ] {
            XCTAssertFalse(Sender.isTLSRefusal(transient), transient)
        }
    }

    // MARK: - Own traffic

    private let agentPid: UInt32 = 4242
    private let agentCgroup: UInt64 = 77
    private let server = IPAddress("10.0.0.1")!
    private let me = IPAddress("10.0.0.2")!

    private func identified(_ traffic: SelfTraffic, probePort: UInt16) -> Bool {
        let probe = TapioEvent(kind: .tcpListen, timeNs: 0, pid: agentPid, cgroupId: agentCgroup, netns: traffic.netns,
                               detail: .tcpListen(address: IPAddress("127.0.0.1"), port: probePort, open: true))
        return traffic.isOwn(probe)
    }

    private func flowEvent(_ kind: EventKind, cgroup: UInt64, _ flow: Flow, netns: UInt32) -> TapioEvent {
        let detail: TapioEvent.Detail
        switch kind {
        case .tcpRetransmit: detail = .tcpRetransmit(flow: flow, count: 1, intervalNs: 1)
        case .tcpLatency: detail = .tcpLatency(flow: flow, srttUs: 1, responses: 1, responseNsTotal: 1, responseNsMax: 1, intervalNs: 1)
        default: detail = .tcpReset(flow: flow, sent: false, state: 2, count: 1)
        }
        return TapioEvent(kind: kind, timeNs: 0, cgroupId: cgroup, netns: netns, detail: detail)
    }

    func testTheAgentsOwnConnectionToTheServerIsRecognizedAndNothingElse() throws {
        let traffic = SelfTraffic(serverHost: "10.0.0.1", serverPort: 7400)
        let port = try XCTUnwrap(traffic.probe())
        XCTAssertTrue(identified(traffic, probePort: port), "the probe's own listener")
        XCTAssertEqual(traffic.pid, agentPid, "the pid is read off the probe listener's record")
        XCTAssertTrue(traffic.identified)
        let ns = traffic.netns
        let connect = TapioEvent(kind: .tcpConnect, timeNs: 0, pid: agentPid, cgroupId: agentCgroup, netns: ns,
                                 detail: .tcpConnect(flow: Flow(source: IPAddress("0.0.0.0"), destination: server, sourcePort: 40_001, destinationPort: 7400),
                                                     outcome: .established, latencyNs: 1, error: 0, count: 1))
        XCTAssertTrue(traffic.isOwn(connect))
        var workload = connect
        workload.pid = 999
        workload.cgroupId = 5
        XCTAssertFalse(traffic.isOwn(workload), "another process's connect to the same server is the workload's")
        let dns = TapioEvent(kind: .dns, timeNs: 0, pid: agentPid, detail: .dns(name: "tapio-server", qtype: 1, rcode: 0, latencyNs: 1, server: nil, serverPort: 53, id: 1, answers: []))
        XCTAssertTrue(traffic.isOwn(dns), "the agent's own lookups")
        // Aggregates without a process: the agent's socket to the server.
        XCTAssertTrue(traffic.isOwn(flowEvent(.tcpRetransmit, cgroup: agentCgroup, Flow(source: me, destination: server, sourcePort: 40_001, destinationPort: 7400), netns: ns)))
        XCTAssertTrue(traffic.isOwn(flowEvent(.tcpLatency, cgroup: agentCgroup, Flow(source: me, destination: server, sourcePort: 0, destinationPort: 7400), netns: ns)))
        // The server's end of the same connection, by the agent's local port.
        XCTAssertTrue(traffic.isOwn(flowEvent(.tcpRetransmit, cgroup: 9, Flow(source: server, destination: me, sourcePort: 7400, destinationPort: 40_001), netns: 1)))
        // A RST answering the agent's SYN to a closed server port (no socket, no cgroup).
        XCTAssertTrue(traffic.isOwn(flowEvent(.tcpReset, cgroup: 0, Flow(source: server, destination: me, sourcePort: 7400, destinationPort: 0), netns: ns)))
        // Not the agent's: another process's connection to the server, the
        // agent's cgroup talking to something else, another server port.
        XCTAssertFalse(traffic.isOwn(flowEvent(.tcpRetransmit, cgroup: 5, Flow(source: me, destination: server, sourcePort: 50_000, destinationPort: 7400), netns: ns)))
        XCTAssertFalse(traffic.isOwn(flowEvent(.tcpLatency, cgroup: agentCgroup, Flow(source: me, destination: IPAddress("10.9.9.9"), sourcePort: 0, destinationPort: 443), netns: ns)))
        XCTAssertFalse(traffic.isOwn(flowEvent(.tcpLatency, cgroup: agentCgroup, Flow(source: me, destination: server, sourcePort: 0, destinationPort: 7401), netns: ns)))
        XCTAssertFalse(traffic.isOwn(flowEvent(.tcpLatency, cgroup: 5, Flow(source: me, destination: server, sourcePort: 0, destinationPort: 7400), netns: ns)))
        let exec = TapioEvent(kind: .processExec, timeNs: 0, pid: agentPid, cgroupId: agentCgroup, detail: .exec(filename: "/bin/sh"))
        XCTAssertFalse(traffic.isOwn(exec), "only network events are filtered")
    }

    func testWithoutItsPidTheAgentRecognizesNoProcessEvent() {
        let traffic = SelfTraffic(serverHost: "tapio-server.tapio-system.svc", serverPort: 7400)
        if traffic.pid == nil {
            let connect = TapioEvent(kind: .tcpConnect, timeNs: 0, pid: agentPid, cgroupId: agentCgroup,
                                     detail: .tcpConnect(flow: Flow(source: nil, destination: server, sourcePort: 1, destinationPort: 7400),
                                                         outcome: .refused, latencyNs: 1, error: 111, count: 1))
            XCTAssertFalse(traffic.isOwn(connect))
        } else {
            // In the initial PID namespace getpid() is the kernel's pid.
            XCTAssertEqual(traffic.pid, UInt32(getpid()))
        }
    }
}
