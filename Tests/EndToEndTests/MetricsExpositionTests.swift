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
    private var replica: ChildProcess?
    private var nats: NATSTestServer?

    override func tearDown() {
        replica?.stop(signal: SIGKILL)
        nats?.kill9()
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
        XCTAssertTrue(serverText.contains("\ntapio_server_connections_rejected_total{reason=\"storage\"} 0\n"), serverText)
        XCTAssertTrue(serverText.contains("\ntapio_server_incidents_open{root_cause_kind=\"oom_kill\"} 0\n"), serverText)
        XCTAssertTrue(serverText.contains("\ntapio_server_build_info{version=\""), serverText)
        XCTAssertTrue(agentText.contains("\ntapio_agent_build_info{version=\""), agentText)
        XCTAssertTrue(agentText.contains("\ntapio_agent_ring_fill_bytes{ring=\"process\"} "), agentText)
        XCTAssertTrue(agentText.contains("\ntapio_agent_bpf_program_runs_total{program=\"handle_exec\"} "), agentText)
        for text in [serverText, agentText] {
            for family in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"] {
                XCTAssertGreaterThan(Self.value(family, in: text) ?? 0, 0, family)
            }
        }
        // Once batches are stored, the group commit has observed its time and the lag of each batch.
        func serverMetricsText() -> String { (try? TestSupport.httpGet(port: serverMetrics, path: "/metrics"))?.body ?? "" }
        XCTAssertTrue(eventually(timeout: 30) { (Self.value("tapio_server_batches_total", in: serverMetricsText()) ?? 0) > 0 }, "no batch stored")
        let later = serverMetricsText()
        XCTAssertGreaterThan(Self.value("tapio_server_batch_commit_seconds_count", in: later) ?? 0, 0, later)
        XCTAssertGreaterThan(Self.value("tapio_server_ingest_lag_seconds_count", in: later) ?? 0, 0, later)
        XCTAssertEqual(Self.value("tapio_server_ingest_lag_seconds_bucket{le=\"+Inf\"}", in: later), Self.value("tapio_server_ingest_lag_seconds_count", in: later))

        // An ingest replica (`--role ingest`, docs/scaling.md) exposes the
        // ingest families and the NATS publisher's: the same checks.
        let replicaText = try ingestReplicaMetrics(pki: pki)
        let replicaFile = dir + "/replica.prom"
        try replicaText.write(toFile: replicaFile, atomically: true, encoding: .utf8)
        let replicaCheck = try TestSupport.run("/bin/sh", ["-c", "\(promtool) check metrics < \(replicaFile)"])
        XCTAssertEqual(replicaCheck.status, 0, "promtool on the ingest replica's /metrics:\n\(replicaCheck.stdout)\(replicaCheck.stderr)")
        XCTAssertFalse(replicaText.contains("Not in the server's metrics catalog"), "a replica metric without its own help:\n\(replicaText)")
        XCTAssertTrue(replicaText.contains("\ntapio_server_nats_connected 1\n"), replicaText)

        let families = Self.families(serverText).union(Self.families(agentText)).union(Self.families(replicaText))
        try checkRules(promtool: promtool, families: families)
        try checkDashboard(promtool: promtool, families: families)
        try checkDocs(families: families)
    }

    /// deploy/prometheus/rules.yaml passes promtool and names only metrics that exist.
    private func checkRules(promtool: String, families: Set<String>) throws {
        let rules = TestSupport.packageRoot + "/deploy/prometheus/rules.yaml"
        let check = try TestSupport.run(promtool, ["check", "rules", rules])
        XCTAssertEqual(check.status, 0, "promtool check rules:\n\(check.stdout)\(check.stderr)")
        let text = try String(contentsOfFile: rules, encoding: .utf8)
        let expressions = text.split(separator: "\n").compactMap { line -> String? in
            let t = line.drop { $0 == " " }
            return t.hasPrefix("expr:") ? String(t.dropFirst(5)) : nil
        }
        XCTAssertGreaterThan(expressions.count, 5)
        for e in expressions { assertNamesExist(e, families: families, in: "rules.yaml") }
    }

    /// Every query of deploy/grafana/tapio-dashboard.json parses (promtool
    /// checks it as a recording rule, with Grafana's variables filled in) and
    /// names only metrics that exist.
    private func checkDashboard(promtool: String, families: Set<String>) throws {
        let path = TestSupport.packageRoot + "/deploy/grafana/tapio-dashboard.json"
        let json = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path)))
        var expressions: [String] = []
        func walk(_ v: Any) {
            if let o = v as? [String: Any] {
                if let e = o["expr"] as? String { expressions.append(e) }
                o.values.forEach(walk)
            } else if let a = v as? [Any] {
                a.forEach(walk)
            }
        }
        walk(json)
        XCTAssertGreaterThan(expressions.count, 20)
        var rules = "groups:\n  - name: dashboard\n    rules:\n"
        for (i, e) in expressions.enumerated() {
            assertNamesExist(e, families: families, in: "tapio-dashboard.json")
            let filled = e.replacingOccurrences(of: "$__rate_interval", with: "5m")
                .replacingOccurrences(of: "$server", with: ".*").replacingOccurrences(of: "$agent", with: ".*")
            let quoted = filled.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
            rules += "      - record: dashboard:query\(i)\n        expr: \"\(quoted)\"\n"
        }
        let file = dir + "/dashboard-rules.yaml"
        try rules.write(toFile: file, atomically: true, encoding: .utf8)
        let check = try TestSupport.run(promtool, ["check", "rules", file])
        XCTAssertEqual(check.status, 0, "the dashboard's queries:\n\(check.stdout)\(check.stderr)")
    }

    /// /metrics of `tapio-server --role ingest` publishing to a real
    /// nats-server (Debian's; `make deps` installs it), once it is ready.
    private func ingestReplicaMetrics(pki: String) throws -> String {
        let server = try NATSTestServer(name: "metrics-nats", directory: dir)
        nats = server
        try server.start()
        let ingest = TestSupport.freePort(), metrics = TestSupport.freePort()
        replica = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--role", "ingest", "--tls-dir", pki + "/server", "--listen", "127.0.0.1:\(ingest)",
            "--metrics-listen", "127.0.0.1:\(metrics)", "--nats", server.url,
        ], logPath: dir + "/replica.log")
        XCTAssertTrue(eventually(timeout: 40) { (try? TestSupport.httpGet(port: metrics, path: "/readyz"))?.status == 200 },
                      "ingest replica ready; its log:\n\(replica!.log.suffix(3000))")
        return try TestSupport.httpGet(port: metrics, path: "/metrics").body
    }

    /// The metrics tables of docs/operations.md ("Metrics and health") list
    /// every family the server (in both roles) and the agent expose, and
    /// nothing else.
    private func checkDocs(families: Set<String>) throws {
        let docs = try String(contentsOfFile: TestSupport.packageRoot + "/docs/operations.md", encoding: .utf8)
        guard let start = docs.range(of: "\n## Metrics and health\n") else { return XCTFail("docs/operations.md has no \"Metrics and health\" section") }
        let section = String(docs[start.upperBound...]).components(separatedBy: "\n## ").first ?? ""
        var documented = Set<String>()
        for line in section.split(separator: "\n") where line.hasPrefix("| `") {
            // The first cell: `name{labels}`, one family per row.
            let name = String(line.dropFirst(3).prefix { $0 != "`" && $0 != "{" })
            if name.hasPrefix("tapio_") || name.hasPrefix("process_") { documented.insert(name) }
        }
        XCTAssertEqual(documented.subtracting(families).sorted(), [], "in docs/operations.md but not exposed")
        XCTAssertEqual(families.subtracting(documented).sorted(), [], "exposed but not in docs/operations.md")
    }

    private func assertNamesExist(_ expression: String, families: Set<String>, in file: String) {
        for name in Self.metricNames(expression) {
            var family = name
            for suffix in ["_bucket", "_sum", "_count"] where name.hasSuffix(suffix) && !families.contains(name) {
                family = String(name.dropLast(suffix.count))
            }
            XCTAssertTrue(families.contains(family), "\(file) names \(name), which neither the server nor the agent exposes: \(expression)")
        }
    }

    /// Names of Tapio's and the process metrics in a PromQL expression.
    static func metricNames(_ expression: String) -> Set<String> {
        var names = Set<String>()
        var current = ""
        for c in expression + " " {
            if c.isLetter || c.isNumber || c == "_" || c == ":" {
                current.append(c)
            } else {
                if current.hasPrefix("tapio_") || current.hasPrefix("process_") { names.insert(current) }
                current = ""
            }
        }
        return names
    }

    /// Families of an exposition, from its TYPE lines.
    static func families(_ text: String) -> Set<String> {
        Set(text.split(separator: "\n").compactMap { line in
            line.hasPrefix("# TYPE ") ? line.split(separator: " ")[2].description : nil
        })
    }

    /// The value of one series (`name` or `name{labels}` as written).
    static func value(_ series: String, in text: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }
}
