import Foundation
import TapioTestSupport
import TapioWire
import XCTest

/// `tapio-lab run --distributed`: the same scenario as LabRunTests' short
/// run, with the server as docs/scaling.md's distributed mode (nats-server,
/// clickhouse-server, an ingest, a correlate and a query replica), scored
/// from what the correlate and query replicas answer. It must name the
/// scenario's answer at the top, as the single process does, and leave
/// nothing running.
final class DistributedLabTests: XCTestCase {
    private var dir = ""
    private var environment: [String: String] = [:]
    private let scenario = TestSupport.packageRoot + "/lab/smoke/oom-kill-short.json"

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        // Skipped without them, failed under TAPIO_REQUIRE_BPF=1.
        _ = try NATSTestServer.binary()
        _ = try ClickHouseTestServer.binary()
        dir = try TestSupport.temporaryDirectory("tapio-lab-dist-test")
        environment = ProcessInfo.processInfo.environment
        environment["TAPIO_LAB_STATE_DIR"] = dir + "/state"
    }

    override func tearDown() {
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    func testDistributedModeScoresTheScenariosRootCauseAtTheTopAndStopsEverything() throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try TestSupport.product("tapio-lab"))
        p.arguments = ["run", scenario, "--distributed", "--json", "--runs-dir", dir + "/runs", "--lab-dir", TestSupport.packageRoot + "/lab"]
        p.environment = environment
        FileManager.default.createFile(atPath: dir + "/out", contents: nil)
        FileManager.default.createFile(atPath: dir + "/err", contents: nil)
        p.standardOutput = FileHandle(forWritingAtPath: dir + "/out")
        p.standardError = FileHandle(forWritingAtPath: dir + "/err")
        try p.run()
        let deadline = Date(timeIntervalSinceNow: 180)
        while p.isRunning, Date() < deadline { usleep(50_000) }
        if p.isRunning { kill(p.processIdentifier, SIGKILL) }
        p.waitUntilExit()
        let output = (try? String(contentsOfFile: dir + "/out", encoding: .utf8)) ?? ""
        let errors = (try? String(contentsOfFile: dir + "/err", encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationStatus, 0, "stderr:\n\(errors)")

        let report = try JSONValue.parse(Array(output.utf8))
        XCTAssertEqual(report["mode"]?.stringValue, "distributed", output)
        let expected = try XCTUnwrap(report["expected"]?.arrayValue?.first, output)
        XCTAssertEqual(expected["entity"]?.stringValue, "redis")
        XCTAssertEqual(expected["kind"]?.stringValue, "oom_kill")
        // The scored top-1 root cause, from the correlate replica's incidents.
        let top = try XCTUnwrap(report["reported"]?.arrayValue?.first, "no root cause reported: \(output)")
        XCTAssertEqual(top["entity"]?.stringValue, expected["entity"]?.stringValue, output)
        XCTAssertEqual(top["kind"]?.stringValue, expected["kind"]?.stringValue, output)
        XCTAssertEqual(report["ac1"]?.intValue, 1, output)
        // The baseline reads the run's events from the query replica
        // (ClickHouse): the real OOM kill is among them.
        let baseline = report["baseline"]?["reported"]?.arrayValue ?? []
        XCTAssertTrue(baseline.prefix(3).contains { $0["entity"]?.stringValue == "redis" && $0["kind"]?.stringValue == "oom_kill" },
                      "baseline from the query replica's events: \(baseline)")
        XCTAssertGreaterThan(report["load"]?["ok"]?.intValue ?? 0, 0, "the services answered the load")

        let runDir = try XCTUnwrap(report["run_dir"]?.stringValue)
        let text = (try? String(contentsOfFile: runDir + "/report.txt", encoding: .utf8)) ?? ""
        XCTAssertTrue(text.contains("server: distributed mode"), "report.txt names the mode:\n\(text.prefix(600))")
        // node1's agent runs 2.5 s behind; the ingest replica corrects its
        // events (the answer above depends on it). Where the replica exports
        // its estimate, the report shows it.
        if let offset = text.range(of: #"node1 [-+][0-9.]+ ms"#, options: .regularExpression).map({ text[$0].split(separator: " ")[1] }) {
            XCTAssertEqual(try XCTUnwrap(Double(offset)), -2500, accuracy: 50, "the ingest replica's clock estimate for node1")
        } else {
            XCTAssertTrue(text.contains("clock offsets: not known in the distributed mode"), text)
        }
        for log in ["nats-server", "clickhouse-server", "tapio-ingest", "tapio-correlate", "tapio-query"] {
            XCTAssertTrue(FileManager.default.fileExists(atPath: "\(runDir)/logs/\(log).log"), "logs/\(log).log")
        }

        // Nothing of the run is left running: no role, no nats-server, no clickhouse-server of this run.
        var strays: [String] = []
        for pid in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] where Int(pid) != nil {
            let cmd = (try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)) ?? ""
            if cmd.contains(dir + "/runs") { strays.append(cmd.replacingOccurrences(of: "\0", with: " ")) }
        }
        XCTAssertEqual(strays, [], "processes of the run still running")
        XCTAssertEqual((try? FileManager.default.contentsOfDirectory(atPath: dir + "/state"))?.filter { $0.hasSuffix(".json") } ?? [], [],
                       "state files")
    }
}
