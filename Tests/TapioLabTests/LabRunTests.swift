import Foundation
import TapioTestSupport
import TapioWire
import XCTest

/// tapio-lab as an operator runs it, on this machine: real namespaces,
/// cgroups, services, agents and server. Each test proves the machine is
/// clean afterwards — after a normal run, after Ctrl-C, and after a kill -9
/// finished by `tapio-lab cleanup`.
final class LabRunTests: XCTestCase {
    private var dir = ""
    private var environment: [String: String] = [:]
    private let scenario = TestSupport.packageRoot + "/lab/smoke/oom-kill-short.json"

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        dir = try TestSupport.temporaryDirectory("tapio-lab-test")
        // State files of these runs only, so leftovers of other runs never confuse a test.
        environment = ProcessInfo.processInfo.environment
        environment["TAPIO_LAB_STATE_DIR"] = dir + "/state"
    }

    override func tearDown() {
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    private func lab(_ arguments: [String]) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try TestSupport.product("tapio-lab"))
        p.arguments = arguments + ["--runs-dir", dir + "/runs", "--lab-dir", TestSupport.packageRoot + "/lab"]
        p.environment = environment
        FileManager.default.createFile(atPath: dir + "/out", contents: nil)
        FileManager.default.createFile(atPath: dir + "/err", contents: nil)
        p.standardOutput = FileHandle(forWritingAtPath: dir + "/out")
        p.standardError = FileHandle(forWritingAtPath: dir + "/err")
        try p.run()
        return p
    }

    private func finish(_ p: Process, timeout: TimeInterval) -> Int32 {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while p.isRunning, Date() < deadline { usleep(50_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        return p.terminationStatus
    }

    private var output: String { (try? String(contentsOfFile: dir + "/out", encoding: .utf8)) ?? "" }
    private var errors: String { (try? String(contentsOfFile: dir + "/err", encoding: .utf8)) ?? "" }

    /// The run's id once its state file lists the load client (everything is up).
    private func waitUntilLoadRuns() throws -> String {
        var id: String?
        let up = eventually(timeout: 40) {
            for f in (try? FileManager.default.contentsOfDirectory(atPath: dir + "/state")) ?? [] where f.hasSuffix(".json") {
                let text = (try? String(contentsOfFile: dir + "/state/" + f, encoding: .utf8)) ?? ""
                if text.contains("\"loadgen\"") { id = String(f.dropLast(5)); return true }
            }
            return false
        }
        XCTAssertTrue(up, "the run started its load; stderr:\n\(errors)")
        return try XCTUnwrap(id)
    }

    /// Nothing the run created is left: namespaces, cgroups, mounts, processes, state.
    private func assertClean(_ id: String, file: StaticString = #filePath, line: UInt = #line) {
        let netns = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
        XCTAssertEqual(netns.filter { $0.hasPrefix("tlab-\(id)") }, [], "network namespaces", file: file, line: line)
        for mount in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu"] {
            XCTAssertFalse(FileManager.default.fileExists(atPath: "\(mount)/tapio-lab/\(id)"), "cgroups under \(mount)", file: file, line: line)
        }
        let mounts = (try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? ""
        XCTAssertFalse(mounts.contains("tapio-lab-\(id)"), "tmpfs volumes", file: file, line: line)
        var strays: [String] = []
        for pid in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] where Int(pid) != nil {
            let cmd = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
            if cmd.contains(dir + "/runs") || cmd.contains("tlab-\(id)") { strays.append(cmd.replacingOccurrences(of: "\0", with: " ")) }
        }
        XCTAssertEqual(strays, [], "processes", file: file, line: line)
        XCTAssertEqual((try? FileManager.default.contentsOfDirectory(atPath: dir + "/state"))?.filter { $0.hasSuffix(".json") } ?? [], [],
                       "state files", file: file, line: line)
    }

    func testShortScenarioIsScoredFromTheServerAndLeavesTheMachineClean() throws {
        let p = try lab(["run", scenario, "--json"])
        XCTAssertEqual(finish(p, timeout: 90), 0, "stderr:\n\(errors)")
        let report = try JSONValue.parse(Array(output.utf8))
        for key in ["scenario", "expected", "reported", "ac1", "ac3", "time_to_detect_s", "time_to_top1_s", "incidents"] {
            XCTAssertNotNil(report[key], "report has \(key): \(output)")
        }
        XCTAssertEqual(report["scenario"]?.stringValue, "oom-kill-short")
        XCTAssertEqual(report["expected"], .array([.object(["entity": .string("redis"), "kind": .string("oom_kill")])]))
        XCTAssertGreaterThan(report["load"]?["ok"]?.intValue ?? 0, 0, "the services answered the load")
        // The agents saw the real OOM kill: the baseline, computed from the
        // server's events, names redis/oom_kill among its first three.
        let baseline = report["baseline"]?["reported"]?.arrayValue ?? []
        XCTAssertTrue(baseline.prefix(3).contains { $0["entity"]?.stringValue == "redis" && $0["kind"]?.stringValue == "oom_kill" },
                      "baseline: \(baseline)")
        let runDir = try XCTUnwrap(report["run_dir"]?.stringValue)
        XCTAssertTrue(FileManager.default.fileExists(atPath: runDir + "/data"), "the server's data is kept in the run directory")
        // node1's agent runs 2.5 s behind (`clock_offset_ms: -2500`, passed as
        // one word): it started, and the server measured the offset.
        let text = (try? String(contentsOfFile: runDir + "/report.txt", encoding: .utf8)) ?? ""
        let offset = text.range(of: #"node1 [-+][0-9.]+ ms"#, options: .regularExpression).map { text[$0].split(separator: " ")[1] }
        let ms = try XCTUnwrap(offset.flatMap { Double($0) }, "the server's clock estimate for node1 in report.txt:\n\(text)")
        XCTAssertEqual(ms, -2500, accuracy: 50, "node1's agent clock offset as the server measured it")
        XCTAssertFalse((report["notes"]?.arrayValue ?? []).contains { ($0.stringValue ?? "").contains("clock offset") }, "\(output)")
        let id = try XCTUnwrap(runID(runDir), "run id in \(runDir)/report.txt")
        assertClean(id)
    }

    /// The id from the run's own report (the netns names carry it).
    private func runID(_ runDir: String) -> String? {
        let text = (try? String(contentsOfFile: runDir + "/report.txt", encoding: .utf8)) ?? ""
        guard let r = text.range(of: #"run [0-9a-f]{6}:"#, options: .regularExpression) else { return nil }
        return String(text[r].dropFirst(4).dropLast())
    }

    func testCtrlCRemovesEverything() throws {
        let p = try lab(["run", scenario])
        let id = try waitUntilLoadRuns()
        kill(p.processIdentifier, SIGINT)
        XCTAssertEqual(finish(p, timeout: 40), 130, "stderr:\n\(errors)")
        XCTAssertTrue(errors.contains("interrupted"), errors)
        assertClean(id)
    }

    func testCleanupFinishesARunThatWasKilled() throws {
        let p = try lab(["run", scenario])
        let id = try waitUntilLoadRuns()
        kill(p.processIdentifier, SIGKILL)
        _ = finish(p, timeout: 10)
        // Its services, agents and server live on without it, until cleanup.
        XCTAssertTrue(FileManager.default.fileExists(atPath: "/run/netns/tlab-\(id)-fab"))
        let c = try lab(["cleanup"])
        XCTAssertEqual(finish(c, timeout: 60), 0, "cleanup: \(output)\n\(errors)")
        XCTAssertTrue(output.contains("run \(id)"), output)
        assertClean(id)
    }
}
