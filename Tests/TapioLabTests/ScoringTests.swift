@testable import TapioLab
import TapioQueryAPI
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
        let doc = try QueryCoding.decode(IncidentsAnswer.self, from: Array("""
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
        let r = Scoring.reported(incidents: doc.incidents, sinceNs: since)
        XCTAssertEqual(r.map(\.cause), [redisOOM, Cause(entity: "api", kind: "crash")])
        XCTAssertEqual(r[1].confidence, 0.5)
    }

    /// Time to a correct top-1 is also taken from the answer's first kernel
    /// event: the earliest `first_seen` of that entity and kind in any incident.
    func testTheFirstEvidenceOfAnAnswerIsItsEarliestFirstSeen() throws {
        let list = try incidents("""
            {"incidents": [
              {"id": "inc-1", "opened_at": "2026-01-01T00:00:10Z",
               "root_causes": [{"entity": "redis", "kind": "oom_kill", "confidence": 0.9, "first_seen": "2026-01-01T00:00:08.5Z"},
                               {"entity": "api", "kind": "crash", "confidence": 0.2, "first_seen": "2026-01-01T00:00:01Z"}]},
              {"id": "inc-2", "opened_at": "2026-01-01T00:00:12Z",
               "root_causes": [{"entity": "redis", "kind": "oom_kill", "confidence": 0.8, "first_seen": "2026-01-01T00:00:07.25Z"}]}
            ]}
            """)
        let oom = RankedCause(entity: "redis", kind: "oom_kill", confidence: 0.9)
        XCTAssertEqual(Scoring.firstEvidenceNs(of: oom, in: list), RFC3339.parseNs("2026-01-01T00:00:07.25Z"))
        XCTAssertNil(Scoring.firstEvidenceNs(of: RankedCause(entity: "redis", kind: "crash", confidence: 1), in: list))
        // A fault run never answered right counts as the slowest in the median.
        XCTAssertEqual(BenchReport.median([3, 1, .infinity]), 3)
        XCTAssertEqual(BenchReport.median([1, 2, 4, 10]), 3)
        XCTAssertNil(BenchReport.median([]))
    }

    /// Incidents as a server answers them (fields older servers lacked read as their defaults).
    private func incidents(_ text: String) throws -> [QueryIncident] {
        try QueryCoding.decode(IncidentsAnswer.self, from: Array(text.utf8)).incidents
    }

    /// A healthy run's observation (an inferred crash from clients that hung
    /// up, which pages nobody) and an incident that pages.
    private let healthyRun = """
        {"incidents": [
          {"id": "inc-1", "opened_at": "2026-01-01T00:00:10Z", "pages": false,
           "root_causes": [{"entity": "redis", "kind": "crash", "confidence": 0.09}]},
          {"id": "inc-2", "opened_at": "2026-01-01T00:00:20Z", "pages": true,
           "root_causes": [{"entity": "api", "kind": "listener_closed", "confidence": 0.59}]}
        ]}
        """

    func testAnIncidentPagesAsTheServerSaysAndOneWithoutTheFieldPages() throws {
        let list = try incidents("""
            {"incidents": [{"id": "a", "pages": false}, {"id": "b", "pages": true}, {"id": "c"}]}
            """)
        XCTAssertEqual(list.map(Scoring.pages), [false, true, true])
    }

    func testAHealthyRunScoresOnlyIncidentsThatPage() throws {
        let all = try incidents(healthyRun)
        let observationOnly = Array(all.prefix(1))
        // An observation alone is the right answer on a healthy run.
        let quiet = Scoring.reported(incidents: Scoring.scored(observationOnly, healthy: true), sinceNs: 0)
        XCTAssertEqual(quiet, [])
        XCTAssertEqual(Scoring.accuracy(expected: [], reported: quiet, k: 1), 1)
        // The incident that pages is a false page.
        let paged = Scoring.reported(incidents: Scoring.scored(all, healthy: true), sinceNs: 0)
        XCTAssertEqual(paged.map(\.cause), [Cause(entity: "api", kind: "listener_closed")])
        XCTAssertEqual(Scoring.accuracy(expected: [], reported: paged, k: 1), 0)
    }

    func testAFaultRunScoresEveryIncidentPagingOrNot() throws {
        // The right answer in an incident that does not page still counts.
        let list = try incidents("""
            {"incidents": [
              {"id": "inc-1", "opened_at": "2026-01-01T00:01:00Z", "pages": false,
               "root_causes": [{"entity": "redis", "kind": "oom_kill", "confidence": 0.47}]},
              {"id": "inc-2", "opened_at": "2026-01-01T00:01:01Z", "pages": true,
               "root_causes": [{"entity": "api", "kind": "crash", "confidence": 0.4}]}
            ]}
            """)
        XCTAssertEqual(Scoring.scored(list, healthy: false).count, 2)
        let r = Scoring.reported(incidents: Scoring.scored(list, healthy: false), sinceNs: 0)
        XCTAssertEqual(r.map(\.cause), [redisOOM, Cause(entity: "api", kind: "crash")])
        XCTAssertEqual(Scoring.accuracy(expected: [redisOOM], reported: r, k: 1), 1)
    }

    private func report(healthy: Bool, incidents list: [QueryIncident], beforeFault: Int = 0) -> RunReport {
        let expected = healthy ? [] : [redisOOM]
        let reported = Scoring.reported(incidents: Scoring.scored(list, healthy: healthy), sinceNs: 0)
        return RunReport(scenario: healthy ? "healthy" : "oom-kill", expected: expected, reported: reported,
                         ac1: Scoring.accuracy(expected: expected, reported: reported, k: 1),
                         ac3: Scoring.accuracy(expected: expected, reported: reported, k: 3),
                         timeToDetectS: nil, timeToTop1S: nil,
                         incidents: list.count, paging: list.filter(Scoring.pages).count, incidentsBeforeFault: beforeFault,
                         baseline: [], baselineAc1: 0, baselineAc3: 0, notes: [], runDirectory: "runs/x",
                         labTimeline: [], serverIncidents: list, serverTimeline: [], load: LoadSummary(), healthy: healthy)
    }

    func testBenchCountsOnlyPagingIncidentsAsFalsePagesOnHealthyRuns() throws {
        let all = try incidents(healthyRun)
        let runs = [report(healthy: true, incidents: Array(all.prefix(1))), report(healthy: true, incidents: all)]
        let row = BenchReport.row(name: "healthy", reports: runs, failed: 0, baseline: false)
        XCTAssertEqual(row.incidentsOnHealthy, 0.5, "one page in two runs; the observations are not counted")
        XCTAssertEqual(row.ac1, 0.5)
        // Each run's report keeps the observation, marked as such.
        XCTAssertEqual(runs[0].json["incidents"], .int(1))
        XCTAssertEqual(runs[0].json["paging"], .int(0))
        XCTAssertEqual(runs[0].json["observations"], .int(1))
        XCTAssertTrue(runs[1].text.contains("2 incidents (1 paging, 1 observation that pages nobody)"), runs[1].text)
        let line = try XCTUnwrap(runs[1].text.split(separator: "\n").first { $0.contains("inc-1") })
        XCTAssertTrue(line.contains("observation (does not page)"), String(line))
        XCTAssertFalse(try XCTUnwrap(runs[1].text.split(separator: "\n").first { $0.contains("inc-2") }).contains("observation"))
    }

    func testBenchScoresFaultRunsAsBeforePagingOrNot() throws {
        let list = try incidents("""
            {"incidents": [
              {"id": "inc-0", "opened_at": "2026-01-01T00:00:00Z", "pages": false, "root_causes": []},
              {"id": "inc-1", "opened_at": "2026-01-01T00:01:00Z", "pages": false,
               "root_causes": [{"entity": "redis", "kind": "oom_kill", "confidence": 0.47}]}
            ]}
            """)
        let row = BenchReport.row(name: "oom-kill", reports: [report(healthy: false, incidents: list, beforeFault: 1)],
                                  failed: 0, baseline: false)
        XCTAssertEqual(row.ac1, 1)
        XCTAssertEqual(row.incidentsOnHealthy, 1, "incidents opened before the fault count whether they page or not")
    }

    func testRFC3339WithNanosecondsAndOffsets() {
        XCTAssertEqual(RFC3339.parseNs("1970-01-01T00:00:01Z"), 1_000_000_000)
        XCTAssertEqual(RFC3339.parseNs("2026-11-27T15:03:49.423395387Z"), 1_795_791_829_423_395_387)
        XCTAssertEqual(RFC3339.parseNs("2026-11-27T16:03:49.5+01:00"), 1_795_791_829_500_000_000)
        XCTAssertNil(RFC3339.parseNs("yesterday"))
    }

    private func event(_ kind: String, _ t: Int64, _ cgroup: Int64, _ extra: [String: JSONValue] = [:]) -> QueryEvent {
        var o: [String: JSONValue] = ["kind": .string(kind), "time": .string(rfc3339(ns: t)), "time_ns": .int(t), "time_error_ns": .int(0),
                                      "agent_time": .string(rfc3339(ns: t)), "node": .string("node-a"), "cgroup_id": .int(cgroup), "pid": .int(100 + cgroup)]
        for (k, v) in extra { o[k] = v }
        return try! QueryEvent(fields: o)
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
        let b = Scoring.baseline(events: events, scope: ["api", "redis"]) { e in services[e.cgroupId!] }
        XCTAssertEqual(b.map(\.cause), [redisOOM])
    }

    func testBaselineCallsRepeatedExitsACrashLoopAndNamesNetfilterDrops() {
        let services: [Int64: String] = [1: "api", 2: "redis"]
        var events = (0..<3).map { event("process_exit", Int64($0), 1, ["exit_code": .int(1)]) }
        events.append(event("packet_drop", 1, 2, ["reason": .string("NETFILTER_DROP")]))
        let b = Scoring.baseline(events: events, scope: ["api", "redis"]) { e in services[e.cgroupId!] }
        XCTAssertEqual(b.map(\.cause), [Cause(entity: "api", kind: "crash_loop"), Cause(entity: "redis", kind: "firewall_drop")])
    }
}
