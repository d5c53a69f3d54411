import TapioLab
import TapioWire
import XCTest

final class ScoringTests: XCTestCase {
    private let redisOOM = Cause(entity: "redis", kind: "oom_kill")

    func testAccuracyAtKCountsExpectedCausesInTheTopK() {
        let reported = [RankedCause(entity: "api", kind: "crash", confidence: 0.7),
                        RankedCause(entity: "redis", kind: "oom_kill", confidence: 0.6)]
        XCTAssertEqual(Scoring.accuracy(expected: [redisOOM], reported: reported, k: 1), 0)
        XCTAssertEqual(Scoring.accuracy(expected: [redisOOM], reported: reported, k: 3), 1)
        // Two expected causes: k=1 needs one of them first; k=3 needs both for a full score.
        let two = [redisOOM, Cause(entity: "api", kind: "crash")]
        XCTAssertEqual(Scoring.accuracy(expected: two, reported: reported, k: 1), 1)
        XCTAssertEqual(Scoring.accuracy(expected: two, reported: Array(reported.prefix(1)), k: 3), 0.5)
        // The kind must match as well as the entity.
        XCTAssertEqual(Scoring.accuracy(expected: [Cause(entity: "redis", kind: "crash")], reported: reported, k: 3), 0)
    }

    func testHealthyScenarioScoresOneOnlyWithoutReports() {
        XCTAssertEqual(Scoring.accuracy(expected: [], reported: [], k: 1), 1)
        XCTAssertEqual(Scoring.accuracy(expected: [], reported: [RankedCause(entity: "api", kind: "crash", confidence: 0.1)], k: 3), 0)
    }

    func testReportedMergesIncidentsByConfidenceAndSkipsOlderOnes() throws {
        let doc = try JSONValue.parse(Array("""
            {"incidents": [
              {"id": "inc-1", "opened_at": "2026-01-01T00:00:00Z",
               "root_causes": [{"entity": "nginx", "kind": "crash", "confidence": 0.99}]},
              {"id": "inc-2", "opened_at": "2026-01-01T00:01:00.5Z",
               "root_causes": [{"entity": "api", "kind": "crash", "confidence": 0.4},
                               {"entity": "redis", "kind": "oom_kill", "confidence": 0.8}]},
              {"id": "inc-3", "opened_at": "2026-01-01T00:01:02Z",
               "root_causes": [{"entity": "api", "kind": "crash", "confidence": 0.5}]}
            ]}
            """.utf8))
        let since = RFC3339.parseNs("2026-01-01T00:01:00Z")!
        let r = Scoring.reported(incidents: doc["incidents"]!.arrayValue!, sinceNs: since)
        XCTAssertEqual(r.map(\.cause), [redisOOM, Cause(entity: "api", kind: "crash")])
        XCTAssertEqual(r[1].confidence, 0.5)
    }

    func testRFC3339WithNanosecondsAndOffsets() {
        XCTAssertEqual(RFC3339.parseNs("1970-01-01T00:00:01Z"), 1_000_000_000)
        XCTAssertEqual(RFC3339.parseNs("2026-11-27T15:03:49.423395387Z"), 1_795_791_829_423_395_387)
        XCTAssertEqual(RFC3339.parseNs("2026-11-27T16:03:49.5+01:00"), 1_795_791_829_500_000_000)
        XCTAssertNil(RFC3339.parseNs("yesterday"))
    }

    private func event(_ kind: String, _ t: Int64, _ cgroup: Int64, _ extra: [String: JSONValue] = [:]) -> JSONValue {
        var o: [String: JSONValue] = ["kind": .string(kind), "time_ns": .int(t), "cgroup_id": .int(cgroup), "pid": .int(100 + cgroup)]
        for (k, v) in extra { o[k] = v }
        return .object(o)
    }

    func testBaselineTakesTheMostRecentOOMExitOrDropInScope() {
        let services: [Int64: String] = [1: "api", 2: "redis", 3: "batch"]
        let events = [
            event("process_exit", 10, 3, ["exit_code": .int(1)]),  // out of scope
            event("oom_kill", 20, 2, ["victim_pid": .int(102)]),
            event("process_exit", 21, 2, ["signal": .int(9)]),  // the OOM victim's exit: same cause
            event("process_exit", 22, 1, ["exit_code": .int(0)]),  // a clean exit is no cause
            event("process_exit", 25, 3, ["exit_code": .int(2)]),
        ]
        let b = Scoring.baseline(events: events, scope: ["api", "redis"]) { e in services[e["cgroup_id"]!.intValue!] }
        XCTAssertEqual(b.map(\.cause), [redisOOM])
    }

    func testBaselineCallsRepeatedExitsACrashLoopAndNamesNetfilterDrops() {
        let services: [Int64: String] = [1: "api", 2: "redis"]
        var events = (0..<3).map { event("process_exit", Int64($0), 1, ["exit_code": .int(1)]) }
        events.append(event("packet_drop", 1, 2, ["reason": .string("NETFILTER_DROP")]))
        let b = Scoring.baseline(events: events, scope: ["api", "redis"]) { e in services[e["cgroup_id"]!.intValue!] }
        XCTAssertEqual(b.map(\.cause), [Cause(entity: "api", kind: "crash_loop"), Cause(entity: "redis", kind: "firewall_drop")])
    }
}
