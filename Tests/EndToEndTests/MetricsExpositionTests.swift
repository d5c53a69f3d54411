import Foundation
import TapioTestSupport
import XCTest

/// What Prometheus scrapes from the real binaries passes `promtool check
/// metrics` (Debian's prometheus package, installed by `make deps`): HELP and
/// TYPE on every family, counters named `_total`, base units. The agent and
/// the server are started as an operator would, the agent connected, so the
/// per-node families have series.
final class MetricsExpositionTests: XCTestCase {
    private var dir = ""
    private var server: ChildProcess?
    private var agent: ChildProcess?

    override func tearDown() {
        agent?.stop(signal: SIGKILL)
        server?.stop(signal: SIGKILL)
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    func testTheAgentsAndTheServersMetricsPassPromtool() throws {
        try TestSupport.requireBPF()
        guard let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            if TestSupport.bpfRequired { throw TestSupportError("promtool is not installed (Debian package prometheus; make deps installs it)") }
            throw XCTSkip("promtool is not installed (Debian package prometheus; make deps installs it)")
        }
        dir = try TestSupport.temporaryDirectory("tapio-metrics")
        let node = "metrics-node"
        let pki = try TestSupport.makePKI(in: dir, nodes: [node])
        let ingest = TestSupport.freePort(), query = TestSupport.freePort(), serverMetrics = TestSupport.freePort(), agentMetrics = TestSupport.freePort()
        server = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--data-dir", dir + "/data", "--tls-dir", pki + "/server", "--listen", "127.0.0.1:\(ingest)",
            "--query-listen", "127.0.0.1:\(query)", "--metrics-listen", "127.0.0.1:\(serverMetrics)",
        ], logPath: dir + "/server.log")
        agent = try ChildProcess(try TestSupport.product("tapio-agent"), [
            "--server", "127.0.0.1:\(ingest)", "--server-name", "localhost", "--node-name", node, "--tls-dir", pki + "/nodes/" + node,
            "--data-dir", dir + "/agent", "--metrics-listen", "127.0.0.1:\(agentMetrics)",
        ], logPath: dir + "/agent.log")
        XCTAssertTrue(eventually(timeout: 30) {
            (try? TestSupport.httpGet(port: serverMetrics, path: "/metrics"))?.body.contains("tapio_node_connected{node=\"\(node)\"} 1") == true
        }, "agent connected; server log:\n\(server!.log)\nagent log:\n\(agent!.log)")

        let serverText = try TestSupport.httpGet(port: serverMetrics, path: "/metrics").body
        let agentText = try TestSupport.httpGet(port: agentMetrics, path: "/metrics").body
        for (who, text) in [("server", serverText), ("agent", agentText)] {
            let file = dir + "/\(who).prom"
            try text.write(toFile: file, atomically: true, encoding: .utf8)
            let check = try TestSupport.run("/bin/sh", ["-c", "\(promtool) check metrics < \(file)"])
            XCTAssertEqual(check.status, 0, "promtool on the \(who)'s /metrics:\n\(check.stdout)\(check.stderr)")
            XCTAssertFalse(text.contains("Not in the server's metrics catalog"), "a \(who) metric without its own help:\n\(text)")
        }
        // Attribution comes from the kernel's cgroup ids, not from /proc per
        // event: 100 processes (200 exec and exit events) read /proc rarely.
        func agentValue(_ name: String) -> Double {
            let text = (try? TestSupport.httpGet(port: agentMetrics, path: "/metrics"))?.body ?? ""
            return text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ")[1]) } ?? -1
        }
        let readBefore = agentValue("tapio_agent_events_read_total"), procBefore = agentValue("tapio_agent_proc_cgroup_reads_total")
        XCTAssertGreaterThanOrEqual(procBefore, 0)
        _ = try TestSupport.run("/bin/sh", ["-c", "for i in $(seq 100); do /bin/true; done"])
        XCTAssertTrue(eventually(timeout: 10) { agentValue("tapio_agent_events_read_total") >= readBefore + 200 })
        XCTAssertLessThan(agentValue("tapio_agent_proc_cgroup_reads_total") - procBefore, 10, "/proc/PID/cgroup read per event")
        // Counters exist before their first increment; per-node series are there.
        XCTAssertTrue(serverText.contains("\ntapio_server_events_future_total 0\n"), serverText)
        XCTAssertTrue(serverText.contains("tapio_node_clock_offset_seconds{node=\"\(node)\"}"), serverText)
        XCTAssertTrue(agentText.contains("\ntapio_agent_ring_wakeups_total "), agentText)
    }
}
