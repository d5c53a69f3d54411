import Foundation
import TapioTestSupport
import TapioWire
import XCTest

/// The agent leaves its own connection to the server out of what it reports
/// (docs/events.md, "The agent's own traffic"): a real agent watching the
/// whole host (no --cgroup-root) and a real server, the agent in the host's
/// PID namespace and in one of its own (as in a pod, where the pid the kernel
/// reports is not the agent's getpid()).
final class SelfFilterTests: XCTestCase {
    private var dir = ""
    private var pki = ""
    private var ingestPort = 0
    private var queryPort = 0
    private var agentMetricsPort = 0
    private var server: ChildProcess?
    private var agent: ChildProcess?
    /// The agent itself when `agent` is the unshare that started it.
    private var agentInNamespace: pid_t?

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        dir = try TestSupport.temporaryDirectory("tapio-self")
        pki = try TestSupport.makePKI(in: dir, nodes: ["self-node"])
        ingestPort = TestSupport.freePort()
        queryPort = TestSupport.freePort()
        agentMetricsPort = TestSupport.freePort()
    }

    override func tearDown() {
        // unshare does not pass SIGTERM on; the agent stops on its own.
        if let pid = agentInNamespace { kill(pid, SIGTERM) }
        agent?.stop()
        server?.stop()
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    private func startServer() throws {
        server = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--data-dir", dir + "/data", "--tls-dir", pki + "/server",
            "--listen", "127.0.0.1:\(ingestPort)", "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "off",
        ], logPath: dir + "/server-\(Date().timeIntervalSince1970).log")
        XCTAssertTrue(eventually(timeout: 30) { (try? query(["nodes"])) != nil }, "server answers; log:\n\(server!.log)")
    }

    private func startAgent(ownPIDNamespace: Bool) throws {
        let product = try TestSupport.product("tapio-agent")
        let arguments = [
            "--server", "127.0.0.1:\(ingestPort)", "--node-name", "self-node", "--tls-dir", pki + "/nodes/self-node",
            "--server-name", "localhost", "--data-dir", dir + "/agent", "--spool-dir", dir + "/spool", "--batch-max-delay-ms", "100",
            "--metrics-listen", "127.0.0.1:\(agentMetricsPort)",
        ]
        if ownPIDNamespace {
            agent = try ChildProcess("/usr/bin/unshare", ["--pid", "--mount-proc", "--kill-child=SIGTERM", product] + arguments, logPath: dir + "/agent.log")
        } else {
            agent = try ChildProcess(product, arguments, logPath: dir + "/agent.log")
        }
        XCTAssertTrue(eventually(timeout: 30) { connected() }, "agent connected; agent log:\n\(agent!.log)\nserver log:\n\(server?.log ?? "")")
    }

    private func connected() -> Bool {
        (try? query(["nodes"]))?["nodes"]?.arrayValue?.first?["connected"] == .bool(true)
    }

    private func query(_ arguments: [String]) throws -> JSONValue {
        let r = try TestSupport.run(try TestSupport.product("tapio"),
                                    ["--server", "127.0.0.1:\(queryPort)", "--tls-dir", pki + "/operators/alice"] + arguments + ["-o", "json"])
        guard r.status == 0 else { throw TestSupportError("tapio \(arguments) failed: \(r.stderr)") }
        return try JSONValue.parse(Array(r.stdout.utf8))
    }

    private func events(_ kind: String) throws -> [JSONValue] {
        try query(["events", "--kind", kind, "--limit", "100000"])["events"]?.arrayValue ?? []
    }

    /// The agent's pid as the kernel (and this test) sees it.
    private func agentPid(ownPIDNamespace: Bool) -> Int64? {
        guard let agent else { return nil }
        guard ownPIDNamespace else { return Int64(agent.pid) }
        let children = (try? String(contentsOfFile: "/proc/\(agent.pid)/task/\(agent.pid)/children", encoding: .utf8)) ?? ""
        let pid = children.split(separator: " ").first.flatMap { Int64($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        agentInNamespace = pid.map { pid_t($0) }
        return pid
    }

    /// A plain TCP connect from this process to the server's ingest port:
    /// a workload's connection to the same server, which must be reported.
    private func connectToIngest() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(ingestPort).bigEndian
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard rc == 0 else { throw TestSupportError("connect to the ingest port failed: errno \(errno)") }
    }

    private func metric(_ name: String) -> Int64? {
        let body = (try? TestSupport.httpGet(port: agentMetricsPort, path: "/metrics"))?.body ?? ""
        return body.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Int64($0.split(separator: " ").last ?? "") }
    }

    func testTheAgentsOwnConnectionIsNotReportedInTheHostPIDNamespace() throws {
        try run(ownPIDNamespace: false)
    }

    func testTheAgentsOwnConnectionIsNotReportedInAPIDNamespaceOfItsOwn() throws {
        try run(ownPIDNamespace: true)
    }

    private func run(ownPIDNamespace: Bool) throws {
        try startServer()
        try startAgent(ownPIDNamespace: ownPIDNamespace)
        let pid = try XCTUnwrap(agentPid(ownPIDNamespace: ownPIDNamespace), "the agent's pid")
        // The server goes away and comes back: the agent's reconnects meet a
        // closed port (refused connects, resets) before they succeed again.
        XCTAssertEqual(server!.stop(), 0, server!.log)
        Thread.sleep(forTimeInterval: 2)
        try startServer()
        XCTAssertTrue(eventually(timeout: 30) { connected() }, "agent reconnected; agent log:\n\(agent!.log)")
        // Connects are folded per cgroup and destination each second, under
        // the first caller's pid; this process shares the agent's cgroup, so
        // its connect waits for the next second.
        Thread.sleep(forTimeInterval: 2)
        try connectToIngest()
        let me = Int64(getpid())
        // The workload's connect arrives, so everything before it has too.
        var connects: [JSONValue] = []
        XCTAssertTrue(try eventually(timeout: 30) {
            connects = try events("tcp_connect")
            return connects.contains { $0["pid"]?.intValue == me && $0["dst_port"]?.intValue == Int64(ingestPort) }
        }, "this process's connect to the ingest port is reported: \(connects.filter { $0["dst_port"]?.intValue == Int64(ingestPort) }); agent log:\n\(agent!.log)")
        // Several harvest intervals of the agent's session traffic.
        Thread.sleep(forTimeInterval: 3)
        let filtered = try XCTUnwrap(metric("tapio_agent_self_events_filtered_total"))
        XCTAssertGreaterThan(filtered, 0, "the agent saw its own traffic and left it out")

        var own: [String] = []
        for kind in ["tcp_connect", "tcp_listen", "dns"] {
            for e in try events(kind) where e["pid"]?.intValue == pid { own.append("\(e)") }
        }
        // The agent's end of its session (client role: the local port is kept
        // as 0), and the resets of its connects to the stopped server.
        for e in try events("tcp_latency") where e["dst_port"]?.intValue == Int64(ingestPort) && e["src_port"]?.intValue == 0 {
            own.append("\(e)")
        }
        for e in try events("tcp_reset") {
            let toServer = e["dst_port"]?.intValue == Int64(ingestPort) && e["src_port"]?.intValue == 0
            let fromServer = e["src_port"]?.intValue == Int64(ingestPort) && e["dst_port"]?.intValue == 0
            if toServer || fromServer { own.append("\(e)") }
        }
        XCTAssertEqual(own, [], "no event of the agent's own traffic is reported; agent log:\n\(agent!.log)")
        // Not counted as lost either.
        let drops = (try? TestSupport.httpGet(port: agentMetricsPort, path: "/metrics"))?.body
            .split(separator: "\n").filter { $0.hasPrefix("tapio_agent_dropped_events_total{") && $0.contains("self") } ?? []
        XCTAssertEqual(drops, [])
    }
}
