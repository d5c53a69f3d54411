import Foundation
import TapioTestSupport
import TapioWire
import XCTest

/// The programs as an operator runs them: tapio-server and tapio-agent as
/// processes, real BPF in this kernel, real TLS, answers read through
/// `tapio events -o json`.
final class EndToEndTests: XCTestCase {
    private var dir = ""
    private var pki = ""
    private var ingestPort = 0
    private var queryPort = 0
    private var agentMetricsPort = 0
    private var server: ChildProcess?
    private var agent: ChildProcess?
    private var cleanups: [() -> Void] = []

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        dir = try TestSupport.temporaryDirectory("tapio-e2e")
        pki = try TestSupport.makePKI(in: dir, nodes: ["e2e-node"])
        ingestPort = TestSupport.freePort()
        queryPort = TestSupport.freePort()
        agentMetricsPort = TestSupport.freePort()
    }

    override func tearDown() {
        agent?.stop()
        server?.stop()
        for c in cleanups.reversed() { c() }
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    private func startServer() throws {
        server = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--data-dir", dir + "/data", "--tls-dir", pki + "/server",
            "--listen", "127.0.0.1:\(ingestPort)", "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "off",
        ], logPath: dir + "/server-\(Date().timeIntervalSince1970).log")
    }

    private func startAgent(_ extra: [String] = []) throws {
        agent = try ChildProcess(try TestSupport.product("tapio-agent"), extra + [
            "--server", "127.0.0.1:\(ingestPort)", "--node-name", "e2e-node", "--tls-dir", pki + "/nodes/e2e-node",
            "--server-name", "localhost", "--data-dir", dir + "/agent", "--spool-dir", dir + "/spool", "--batch-max-delay-ms", "100",
            "--metrics-listen", "127.0.0.1:\(agentMetricsPort)",
        ], logPath: dir + "/agent.log")
        // Running once the server lists the node as connected with its programs.
        let up = eventually(timeout: 30) {
            let nodes = try? query(["nodes"])
            return nodes?["nodes"]?.arrayValue?.first?["connected"] == .bool(true)
        }
        XCTAssertTrue(up, "agent connected; agent log:\n\(agent!.log)\nserver log:\n\(server?.log ?? "")")
    }

    private func query(_ arguments: [String]) throws -> JSONValue {
        let r = try TestSupport.run(try TestSupport.product("tapio"),
                                    ["--server", "127.0.0.1:\(queryPort)", "--tls-dir", pki + "/operators/alice"] + arguments + ["-o", "json"])
        guard r.status == 0 else { throw TestSupportError("tapio \(arguments) failed: \(r.stderr)") }
        return try JSONValue.parse(Array(r.stdout.utf8))
    }

    private func events(pid: Int32) throws -> [JSONValue] {
        try query(["events", "--pid", String(pid)])["events"]?.arrayValue ?? []
    }

    /// A link to /bin/sh under a unique name, so the kernel's comm is unique.
    private func uniqueShell(_ prefix: String) throws -> (path: String, comm: String) {
        let comm = prefix + String(UInt32.random(in: 0..<1_000_000))
        let path = dir + "/" + comm
        try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: "/bin/sh")
        return (path, String(comm.prefix(15)))
    }

    private func runToExit(_ path: String, _ arguments: [String]) throws -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        try p.run()
        p.waitUntilExit()
        return p.processIdentifier
    }

    func testExecAndExitOfRealProcessesReachTheCLI() throws {
        try startServer()
        try startAgent()
        let three = try uniqueShell("tpx3-")
        let killed = try uniqueShell("tpk9-")
        let pid3 = try runToExit(three.path, ["-c", "exit 3"])
        let pid9 = try runToExit(killed.path, ["-c", "kill -9 $$"])

        var exit3: JSONValue?
        var exit9: JSONValue?
        var exec3: JSONValue?
        XCTAssertTrue(try eventually {
            let e3 = try events(pid: pid3)
            exit3 = e3.first { $0["kind"] == .string("process_exit") }
            exec3 = e3.first { $0["kind"] == .string("process_exec") }
            exit9 = try events(pid: pid9).first { $0["kind"] == .string("process_exit") }
            return exit3 != nil && exit9 != nil && exec3 != nil
        }, "events arrive; agent log:\n\(agent!.log)")
        XCTAssertEqual(exec3?["comm"], .string(three.comm))
        XCTAssertEqual(exec3?["filename"], .string(three.path))
        XCTAssertEqual(exec3?["node"], .string("e2e-node"))
        XCTAssertEqual(exec3?["ppid"]?.intValue, Int64(getpid()))
        XCTAssertEqual(exit3?["comm"], .string(three.comm))
        XCTAssertEqual(exit3?["exit_code"]?.intValue, 3)
        XCTAssertEqual(exit3?["signal"]?.intValue, 0)
        XCTAssertEqual(exit3?["node"], .string("e2e-node"))
        XCTAssertEqual(exit9?["comm"], .string(killed.comm))
        XCTAssertEqual(exit9?["signal"]?.intValue, 9)
        XCTAssertEqual(exit9?["pid"]?.intValue, Int64(pid9))
        // RFC 3339 with nanoseconds, server-corrected.
        XCTAssertNotNil(exit3?["time"]?.stringValue?.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$"#, options: .regularExpression))
        // The agent's own /metrics shows what runs and what it read.
        let metrics = try TestSupport.httpGet(port: agentMetricsPort, path: "/metrics")
        XCTAssertEqual(metrics.status, 200)
        XCTAssertTrue(metrics.body.contains("tapio_agent_program_attached{program=\"handle_exit\",signal=\"process_exit\"} 1"), metrics.body)
        XCTAssertTrue(metrics.body.contains("tapio_agent_connected 1"), metrics.body)
        XCTAssertEqual(try TestSupport.httpGet(port: agentMetricsPort, path: "/healthz").status, 200)
        // SIGTERM: the agent flushes, waits for its last ack and says goodbye.
        XCTAssertEqual(agent!.stop(), 0, agent!.log)
        XCTAssertTrue(agent!.log.contains("stopped"), agent!.log)
    }

    func testOOMKillInAMemoryLimitedCgroupIsReportedWithTheVictimsExit() throws {
        let memcg = "/sys/fs/cgroup/memory/tapio-e2e-\(getpid())"
        guard FileManager.default.fileExists(atPath: "/sys/fs/cgroup/memory") else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup v1 memory controller at /sys/fs/cgroup/memory") }
            throw XCTSkip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
        }
        try FileManager.default.createDirectory(atPath: memcg, withIntermediateDirectories: false)
        cleanups.append { _ = rmdir(memcg) }
        try "32M".write(toFile: memcg + "/memory.limit_in_bytes", atomically: false, encoding: .utf8)
        try startServer()
        try startAgent()

        // The shell moves itself into the cgroup, then becomes `tail`, which
        // reads /dev/zero into memory until the kernel kills it.
        let hog = try uniqueShell("tpoom-")
        let pid = try runToExit(hog.path, ["-c", "echo $$ > \(memcg)/cgroup.procs && exec tail /dev/zero"])
        var oom: JSONValue?
        var exit: JSONValue?
        XCTAssertTrue(try eventually(timeout: 30) {
            let e = try events(pid: pid)
            oom = e.first { $0["kind"] == .string("oom_kill") }
            exit = e.first { $0["kind"] == .string("process_exit") }
            return oom != nil && exit != nil
        }, "oom_kill and exit for pid \(pid); agent log:\n\(agent!.log)")
        XCTAssertEqual(oom?["victim_pid"]?.intValue, Int64(pid))
        XCTAssertEqual(oom?["victim_comm"], .string("tail"))
        XCTAssertGreaterThan(oom?["anon_rss_kb"]?.intValue ?? 0, 10_000)
        XCTAssertEqual(exit?["signal"]?.intValue, 9)
        XCTAssertEqual(exit?["comm"], .string("tail"))
    }

    func testServerKilledMidStreamLosesAndDuplicatesNothing() throws {
        try startServer()
        try startAgent()
        let seq = try uniqueShell("tpseq-")
        // Each run exits with its own sequence number: the count per code is the proof.
        let total = 150
        for n in 1...total {
            if n == 50 {
                server!.stop(signal: SIGKILL)
            }
            if n == 100 {
                try startServer()
            }
            _ = try runToExit(seq.path, ["-c", "exit \(n)"])
        }
        var codes: [Int64] = []
        let complete = try eventually(timeout: 40) {
            let all = try query(["events", "--kind", "process_exit", "--limit", "100000"])["events"]?.arrayValue ?? []
            codes = all.filter { $0["comm"] == .string(seq.comm) }.compactMap { $0["exit_code"]?.intValue }
            return codes.count >= total
        }
        XCTAssertTrue(complete, "got \(codes.count) of \(total); agent log:\n\(agent!.log)")
        XCTAssertEqual(codes.sorted(), Array(1...Int64(total)), "every exit exactly once")
    }

    /// A process in a kubelet-style cgroup is attributed to its pod from a
    /// --metadata-file in the API's PodList format, and the pod list reaches
    /// the server.
    func testEventsAreAttributedToPodsFromAMetadataFile() throws {
        let unified = "/sys/fs/cgroup/unified"
        let uid = "6f1c2d3e-0000-4000-8000-\(String(format: "%012d", getpid()))"
        let containerId = String(repeating: "ab", count: 32)
        let base = unified + "/tapio-e2e-\(getpid())"
        let group = base + "/kubepods/burstable/pod\(uid)/\(containerId)"
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: true)
        cleanups.append {
            var dirs = [group]
            var d = group
            while d != base { d = (d as NSString).deletingLastPathComponent; dirs.append(d) }
            for x in dirs { rmdir(x) }
        }
        let podList = """
            {"kind": "PodList", "apiVersion": "v1", "items": [{
              "metadata": {"name": "checkout-7d9f8b6c5-x2x9q", "namespace": "shop", "uid": "\(uid)",
                           "labels": {"app": "checkout", "pod-template-hash": "7d9f8b6c5"},
                           "ownerReferences": [{"kind": "ReplicaSet", "name": "checkout-7d9f8b6c5", "controller": true}]},
              "spec": {"nodeName": "e2e-node", "containers": [{"name": "checkout"}]},
              "status": {"phase": "Running", "podIP": "10.42.0.17", "podIPs": [{"ip": "10.42.0.17"}], "qosClass": "Burstable",
                         "containerStatuses": [{"name": "checkout", "containerID": "containerd://\(containerId)"}]}
            }]}
            """
        try podList.write(toFile: dir + "/pods.json", atomically: true, encoding: .utf8)
        try startServer()
        try startAgent(["--metadata-file", dir + "/pods.json"])

        let shell = try uniqueShell("tppod-")
        let pid = try runToExit(shell.path, ["-c", "echo $$ > \(group)/cgroup.procs && exit 4"])
        var exit: JSONValue?
        XCTAssertTrue(try eventually {
            exit = try events(pid: pid).first { $0["kind"] == .string("process_exit") }
            return exit != nil
        }, "agent log:\n\(agent!.log)")
        XCTAssertEqual(exit?["pod"], .string("checkout-7d9f8b6c5-x2x9q"))
        XCTAssertEqual(exit?["namespace"], .string("shop"))
        XCTAssertEqual(exit?["container_id"], .string(containerId))
        let byPod = try query(["events", "--pod", "checkout-7d9f8b6c5-x2x9q", "--namespace", "shop"])["events"]?.arrayValue ?? []
        XCTAssertTrue(byPod.contains { $0["pid"]?.intValue == Int64(pid) })

        let pods = try query(["pods"])["pods"]?.arrayValue ?? []
        let pod = try XCTUnwrap(pods.first { $0["uid"] == .string(uid) })
        XCTAssertEqual(pod["node"], .string("e2e-node"))
        XCTAssertEqual(pod["ips"], .array([.string("10.42.0.17")]))
        XCTAssertEqual(pod["service"], .string("checkout"))
        XCTAssertEqual(pod["owner_kind"], .string("Deployment"))
    }
}

/// Two agents on one kernel, each limited to its own cgroup2 subtree (how the
/// lab runs several nodes): each reports only its own processes.
final class CgroupRootEndToEndTests: XCTestCase {
    func testTwoAgentsWithDifferentCgroupRootsSeeOnlyTheirOwnSubtree() throws {
        try TestSupport.requireBPF()
        let dir = try TestSupport.temporaryDirectory("tapio-two-roots")
        let pki = try TestSupport.makePKI(in: dir, nodes: ["left", "right"])
        let base = "/sys/fs/cgroup/unified/tapio-two-roots-\(getpid())"
        for side in ["left", "right"] { try FileManager.default.createDirectory(atPath: base + "/" + side, withIntermediateDirectories: true) }
        defer { rmdir(base + "/left"); rmdir(base + "/right"); rmdir(base) }
        let ingest = TestSupport.freePort(), query = TestSupport.freePort()
        let server = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--data-dir", dir + "/data", "--tls-dir", pki + "/server", "--listen", "127.0.0.1:\(ingest)",
            "--query-listen", "127.0.0.1:\(query)", "--metrics-listen", "off",
        ], logPath: dir + "/server.log")
        defer { server.stop() }
        var agents: [ChildProcess] = []
        defer { for a in agents { a.stop() } }
        for side in ["left", "right"] {
            agents.append(try ChildProcess(try TestSupport.product("tapio-agent"), [
                "--server", "127.0.0.1:\(ingest)", "--node-name", side, "--tls-dir", pki + "/nodes/" + side, "--server-name", "localhost",
                "--cgroup-root", base + "/" + side, "--batch-max-delay-ms", "100", "--data-dir", dir + "/agent-" + side,
            ], logPath: dir + "/agent-\(side).log"))
        }
        func events(_ node: String) throws -> [JSONValue] {
            let r = try TestSupport.run(try TestSupport.product("tapio"), ["--server", "127.0.0.1:\(query)", "--tls-dir", pki + "/operators/alice",
                                                                           "events", "--node", node, "--kind", "process_exit", "-o", "json"])
            guard r.status == 0 else { throw TestSupportError(r.stderr) }
            return try JSONValue.parse(Array(r.stdout.utf8))["events"]?.arrayValue ?? []
        }
        XCTAssertTrue(eventually(timeout: 30) {
            let r = try? TestSupport.run(try TestSupport.product("tapio"), ["--server", "127.0.0.1:\(query)", "--tls-dir", pki + "/operators/alice", "nodes", "-o", "json"])
            let nodes = r.flatMap { try? JSONValue.parse(Array($0.stdout.utf8)) }?["nodes"]?.arrayValue ?? []
            return nodes.filter { $0["connected"] == .bool(true) }.count == 2
        })
        _ = try TestSupport.run("/bin/sh", ["-c", "echo $$ > \(base)/left/cgroup.procs && exit 41"])
        _ = try TestSupport.run("/bin/sh", ["-c", "echo $$ > \(base)/right/cgroup.procs && exit 42"])
        _ = try TestSupport.run("/bin/sh", ["-c", "exit 43"])
        var left: [Int64] = [], right: [Int64] = []
        XCTAssertTrue(try eventually {
            left = try events("left").compactMap { $0["exit_code"]?.intValue }
            right = try events("right").compactMap { $0["exit_code"]?.intValue }
            return left.contains(41) && right.contains(42)
        })
        XCTAssertFalse(left.contains(42) || left.contains(43), "left saw others' exits: \(left)")
        XCTAssertFalse(right.contains(41) || right.contains(43), "right saw others' exits: \(right)")
    }
}
