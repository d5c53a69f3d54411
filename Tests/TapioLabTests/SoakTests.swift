import Foundation
import TapioLab
import TapioTestSupport
import TapioWire
import XCTest

/// `tapio-lab soak`: the healthy scenarios' activities mixed on one cluster
/// and repeated, against one server and its agents.
final class SoakTests: XCTestCase {
    private let labDirectory = TestSupport.packageRoot + "/lab"

    private func healthyScenarios() throws -> [Scenario] {
        try LabFiles.scenarioNames(labDirectory: labDirectory)
            .map { try LabFiles.resolve($0, labDirectory: labDirectory) }
            .filter(\.isHealthy)
    }

    func testTheSoakMixesEveryHealthyScenarioAndRepeatsTheirActivities() throws {
        let healthy = try healthyScenarios()
        XCTAssertGreaterThanOrEqual(healthy.count, 5, "healthy plus the churn scenarios: \(healthy.map(\.name))")
        let soak = try LabSoak.scenario(mixing: healthy, minutes: 10)
        XCTAssertTrue(soak.isHealthy)
        XCTAssertEqual(soak.timing.warmupS + soak.timing.observeS, 600)
        // Every service of every scenario, once.
        let names = Set(healthy.flatMap { $0.services.map(\.name) })
        XCTAssertEqual(Set(soak.services.map(\.name)), names)
        XCTAssertEqual(soak.services.count, names.count)
        // A service changed by one scenario keeps the change (slow-client's api answers 128 KiB).
        if let slow = healthy.first(where: { $0.name == "slow-client" }) {
            XCTAssertEqual(soak.service("api")?.echoBytes, slow.service("api")?.echoBytes)
        }
        // Each activity recurs: in ten minutes, every scenario's faults more
        // than once, except an activity without an end (a CronJob started
        // once goes on).
        for s in healthy {
            for f in s.faults {
                let repeats = soak.faults.filter { $0.type == f.type && $0.target == f.target && $0.params == f.params }
                if f.type == "start", f.durationS == nil {
                    XCTAssertEqual(repeats.count, 1, "\(s.name): \(f.target) starts once")
                } else {
                    XCTAssertGreaterThan(repeats.count, s.faults.filter { $0.type == f.type && $0.target == f.target && $0.params == f.params }.count,
                                         "\(s.name): \(f.type) \(f.target) repeats")
                }
                XCTAssertTrue(repeats.allSatisfy { $0.atS < soak.timing.observeS })
            }
        }
        XCTAssertEqual(soak.faults.map(\.atS), soak.faults.map(\.atS).sorted())
        // The scenarios take turns: the first activity of each comes after the
        // last one of the scenario before it, in the first round.
        var previousEnd = -1.0
        for s in healthy {
            guard let first = s.faults.min(by: { $0.atS < $1.atS }),
                  let at = soak.faults.first(where: { $0.type == first.type && $0.target == first.target && $0.params == first.params })?.atS else { continue }
            XCTAssertGreaterThan(at, previousEnd, "\(s.name) starts after the scenario before it")
            let span = s.faults.map { $0.atS + ($0.durationS ?? 0) }.max() ?? 0
            previousEnd = at - first.atS + span
        }
    }

    func testASoakRefusesAScenarioWithAFault() throws {
        let fault = try LabFiles.resolve("oom-kill", labDirectory: labDirectory)
        XCTAssertThrowsError(try LabSoak.scenario(mixing: [fault], minutes: 5))
        XCTAssertThrowsError(try LabSoak.scenario(mixing: try healthyScenarios(), minutes: 0.25), "shorter than the warmup")
    }

    /// One minute of real soak: no incident pages, and the report carries the
    /// event rate and the server's and agents' CPU and RSS over time.
    func testAOneMinuteSoakPagesNobodyAndSamplesTheServerAndAgents() throws {
        try TestSupport.requireBPF()
        let dir = try TestSupport.temporaryDirectory("tapio-soak-test")
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var environment = ProcessInfo.processInfo.environment
        environment["TAPIO_LAB_STATE_DIR"] = dir + "/state"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try TestSupport.product("tapio-lab"))
        p.arguments = ["soak", "--minutes", "1", "--json", "--runs-dir", dir + "/runs", "--lab-dir", labDirectory]
        p.environment = environment
        FileManager.default.createFile(atPath: dir + "/out", contents: nil)
        FileManager.default.createFile(atPath: dir + "/err", contents: nil)
        p.standardOutput = FileHandle(forWritingAtPath: dir + "/out")
        p.standardError = FileHandle(forWritingAtPath: dir + "/err")
        try p.run()
        let deadline = Date(timeIntervalSinceNow: 120)
        while p.isRunning, Date() < deadline { usleep(100_000) }
        if p.isRunning { kill(p.processIdentifier, SIGINT) }
        p.waitUntilExit()
        let out = (try? String(contentsOfFile: dir + "/out", encoding: .utf8)) ?? ""
        let err = (try? String(contentsOfFile: dir + "/err", encoding: .utf8)) ?? ""
        XCTAssertEqual(p.terminationStatus, 0, "soak failed or paged:\n\(out)\n\(err)")
        let report = try JSONValue.parse(Array(out.utf8))
        XCTAssertEqual(report["passed"], .bool(true), out)
        XCTAssertEqual(report["paging"]?.intValue, 0, out)
        XCTAssertGreaterThan(report["load"]?["ok"]?.intValue ?? 0, 0, "the services answered the load")
        var eventsPerS = 0.0
        switch report["events_per_s"] {
        case .double(let d)?: eventsPerS = d
        case .int(let i)?: eventsPerS = Double(i)
        default: break
        }
        XCTAssertGreaterThan(eventsPerS, 0, "the server received events")
        let samples = report["samples"]?.arrayValue ?? []
        XCTAssertGreaterThanOrEqual(samples.count, 6, "a sample every 5 s over a minute: \(samples.count)")
        for s in samples {
            guard case .object(let rss)? = s["rss_bytes"] else { XCTFail("rss_bytes in \(s)"); continue }
            XCTAssertGreaterThan(rss["tapio-server"]?.intValue ?? 0, 0, "server RSS")
            for node in ["node1", "node2", "node3"] { XCTAssertGreaterThan(rss["agent-\(node)"]?.intValue ?? 0, 0, "agent-\(node) RSS") }
            XCTAssertNotNil(s["cpu_pct"]?["tapio-server"], "server CPU in \(s)")
        }
        let runDir = try XCTUnwrap(report["run_dir"]?.stringValue)
        XCTAssertTrue(FileManager.default.fileExists(atPath: runDir + "/soak.json"))
        // Everything the soak created is gone.
        XCTAssertEqual((try? FileManager.default.contentsOfDirectory(atPath: dir + "/state"))?.filter { $0.hasSuffix(".json") } ?? [], [])
        let text = (try? String(contentsOfFile: runDir + "/report.txt", encoding: .utf8)) ?? ""
        if let r = text.range(of: #"run [0-9a-f]{6}:"#, options: .regularExpression) {
            let id = String(text[r].dropFirst(4).dropLast())
            let netns = (try? FileManager.default.contentsOfDirectory(atPath: "/run/netns")) ?? []
            XCTAssertEqual(netns.filter { $0.hasPrefix("tlab-\(id)") }, [], "network namespaces")
        } else {
            XCTFail("no run id in \(runDir)/report.txt")
        }
    }
}
