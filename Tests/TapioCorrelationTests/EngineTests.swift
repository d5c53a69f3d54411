import TapioCorrelation
import TapioWire
import XCTest

final class EngineTests: XCTestCase {
    /// The three-tier cascade of RuleTests.
    static func cascade() -> SyntheticCluster {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 50, skip: ["api>redis", "frontend>api"])
        RuleTests.redisOOM(&c, until: 50)
        for (i, t) in [30.5, 33.5, 36.5, 39.5].enumerated() { c.exit(t, "api", code: 1, pid: 500 + UInt32(i)) }
        var t = 30.6
        while t < 50 { c.connect(t, "frontend", "api", .refused, count: 4); t += 0.5 }
        return c
    }

    func json(_ e: CorrelationEngine) -> String {
        var parts = [e.incidentsJSON().serialized()]
        for inc in e.incidents { parts.append(inc.explainJSON(weights: e.configuration.weights).serialized()) }
        return parts.joined(separator: "\n")
    }

    func testReplayTwiceGivesIdenticalJSON() {
        let c = EngineTests.cascade()
        let a = json(c.engine()), b = json(c.engine())
        XCTAssertEqual(a, b)
        XCTAssertTrue(a.contains("\"root_causes\""))
    }

    /// Agents' clocks off by up to ±500 ms, corrected with their offsets;
    /// events arriving shuffled in batches and time advanced in steps: the
    /// same incidents, byte for byte, as the ordered, unskewed stream.
    func testSkewCorrectionAndShuffledArrivalGiveTheSameResult() {
        let c = EngineTests.cascade()
        let reference = json(c.engine())
        let offsets: [String: Int64] = ["node1": 500_000_000, "node2": -480_000_000, "node3": 230_000_000]
        var rng = SplitMix(state: 42)
        // Each agent's view: its own (skewed) clock.
        var arrivals: [ObservedEvent] = c.events.map { o in
            var ev = o.event
            ev.timeNs = o.timeNs + offsets[o.node]!
            return ObservedEvent(node: o.node, agentEvent: ev, clockOffsetNs: offsets[o.node]!, clockErrorNs: o.errorNs)
        }
        // Batches of about a second per node, sent in shuffled order.
        arrivals.shuffle(using: &rng)
        arrivals.sort { ($0.timeNs / 1_000_000_000) < ($1.timeNs / 1_000_000_000) }
        var engine = CorrelationEngine()
        for (node, pods) in c.inventory.sorted(by: { $0.key < $1.key }) { engine.updateInventory(node: node, pods: pods) }
        var maxSeen = Int64.min
        for chunk in stride(from: 0, to: arrivals.count, by: 37) {
            let batch = Array(arrivals[chunk..<min(chunk + 37, arrivals.count)])
            engine.ingest(batch)
            maxSeen = max(maxSeen, batch.map(\.timeNs).max()!)
            if chunk % 3 == 0 { engine.advance(toNs: maxSeen) }
        }
        engine.finish()
        XCTAssertEqual(engine.statistics.late, 0)
        XCTAssertEqual(json(engine), reference)
    }

    /// Residual clock error within the stated uncertainty changes times but
    /// not the answer.
    func testResidualClockErrorWithinUncertaintyKeepsTheAnswer() {
        var c = EngineTests.cascade()
        let residual: [String: Int64] = ["node1": 40_000_000, "node2": -35_000_000, "node3": 45_000_000]
        c.events = c.events.map { o in ObservedEvent(node: o.node, timeNs: o.timeNs + residual[o.node]!, errorNs: 50_000_000, event: o.event) }
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 1)
        XCTAssertEqual(incidents.first?.rootCauses.first?.entity, "redis")
        XCTAssertEqual(incidents.first?.rootCauses.first?.kind, .oomKill)
    }

    func testTimelineMarksOverlappingEventsOfDifferentNodesConcurrent() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        RuleTests.redisOOM(&c)
        let inc = c.engine().incidents[0]
        let tl = inc.timeline
        XCTAssertEqual(tl.map(\.timeNs), tl.map(\.timeNs).sorted())
        let oom = tl.first { $0.kind == "oom_kill" }!
        let exit = tl.first { $0.kind == "process_exit" }!
        let firstRefused = tl.first { $0.kind == "tcp_connect" }!
        XCTAssertEqual(oom.role, "cause")
        XCTAssertEqual(firstRefused.role, "symptom")
        // Same node: one clock, a known order, never concurrent.
        XCTAssertFalse(oom.concurrentWith.contains(exit.id))
        // 50 ms apart with 1 ms uncertainty each: ordered.
        XCTAssertFalse(oom.concurrentWith.contains(firstRefused.id))

        // With 100 ms uncertainty the same two overlap: concurrent, both ways.
        var wide = c
        wide.events = c.events.map { ObservedEvent(node: $0.node, timeNs: $0.timeNs, errorNs: 100_000_000, event: $0.event) }
        let tl2 = wide.engine().incidents[0].timeline
        let oom2 = tl2.first { $0.kind == "oom_kill" }!
        let refused2 = tl2.first { $0.kind == "tcp_connect" }!
        XCTAssertTrue(oom2.concurrentWith.contains(refused2.id))
        XCTAssertTrue(refused2.concurrentWith.contains(oom2.id))
    }

    func testIncidentResolvesAfterQuietPeriodAndANewFaultOpensAnother() {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 40, skip: ["api>redis"])
        RuleTests.redisOOM(&c, until: 40)
        c.healthy(from: 40, until: 120)
        c.listen(100, "cart", open: false)
        var t = 100.05
        while t < 110 { c.connect(t, "frontend", "cart", .refused, count: 3); t += 0.5 }
        let incidents = c.engine().incidents
        XCTAssertEqual(incidents.count, 2)
        let first = incidents[0]
        XCTAssertEqual(first.status, .resolved)
        let resolvedAt = try! XCTUnwrap(first.resolvedNs)
        let lastSymptom = first.symptoms.map(\.lastNs).max()!
        XCTAssertEqual(resolvedAt - lastSymptom, 30_000_000_000, accuracy: 2_000_000_000)
        XCTAssertTrue(first.symptoms.allSatisfy { !$0.active })
        XCTAssertEqual(incidents[1].status, .open)
        XCTAssertEqual(incidents[1].rootCauses.first?.entity, "cart")
        XCTAssertEqual(c.engine().incidents(status: .open).count, 1)
        XCTAssertEqual(c.engine().incidents(status: .resolved).count, 1)
    }

    func testSymptomsOfOneFaultGroupAndIncidentsThatMeetMerge() {
        var c = SyntheticCluster()
        c.healthy(until: 28)
        c.healthy(from: 28, until: 45, skip: ["frontend>api", "api>redis"])
        // First: frontend times out on api (no cause seen yet).
        var t = 28.0
        while t < 45 { c.connect(t, "frontend", "api", .timeout, count: 2); t += 0.5 }
        // Separately: worker is refused by redis...
        c.oom(30, "redis")
        t = 30.05
        while t < 45 { c.connect(t, "worker", "redis", .refused, count: 3); t += 0.5 }
        // ...then api is too: the two incidents meet at redis and merge.
        t = 36.0
        while t < 45 { c.connect(t, "api", "redis", .refused, count: 3); t += 0.5 }
        let engine = c.engine()
        let incidents = engine.incidents
        XCTAssertEqual(incidents.count, 1, "\(incidents.map(\.title))")
        let inc = incidents[0]
        XCTAssertEqual(inc.mergedIds.count, 1)
        XCTAssertEqual(engine.incident(id: inc.mergedIds[0])?.id, inc.id)
        XCTAssertEqual(Set(inc.symptoms.map(\.entity)), ["frontend", "worker", "api"])
        XCTAssertEqual(inc.rootCauses.first?.entity, "redis")
        XCTAssertEqual(inc.rootCauses.first?.kind, .oomKill)
    }

    func testIncidentJSONHasTheContractsFields() throws {
        var c = SyntheticCluster()
        c.healthy(until: 30)
        c.healthy(from: 30, until: 45, skip: ["api>redis"])
        RuleTests.redisOOM(&c)
        let engine = c.engine()
        let doc = try JSONValue.parse(Array(engine.incidentsJSON().serialized().utf8))
        let inc = try XCTUnwrap(doc["incidents"]?.arrayValue?.first)
        for key in ["id", "status", "title", "opened_at", "updated_at", "resolved_at", "detected_at", "affected", "symptoms", "root_causes"] {
            XCTAssertNotNil(inc[key], key)
        }
        XCTAssertEqual(inc["resolved_at"], .null)
        XCTAssertTrue(inc["id"]?.stringValue?.hasPrefix("inc-") ?? false)
        XCTAssertTrue(inc["detected_at"]?.stringValue?.hasPrefix("2027-01-15T08:00:30.") ?? false, "\(String(describing: inc["detected_at"]))")
        let sym = try XCTUnwrap(inc["symptoms"]?.arrayValue?.first)
        for key in ["entity", "kind", "since", "count", "baseline"] { XCTAssertNotNil(sym[key], key) }
        let rc = try XCTUnwrap(inc["root_causes"]?.arrayValue?.first)
        for key in ["entity", "kind", "confidence", "factors", "first_seen", "evidence"] { XCTAssertNotNil(rc[key], key) }
        let factor = try XCTUnwrap(rc["factors"]?.arrayValue?.first)
        for key in ["name", "value", "weight"] { XCTAssertNotNil(factor[key], key) }
        let names = Set(rc["factors"]!.arrayValue!.compactMap { $0["name"]?.stringValue })
        XCTAssertEqual(names, Set(ConfidenceWeights.factorNames))
        let tl = try JSONValue.parse(Array(engine.incidents[0].timelineJSON().serialized().utf8))
        let entry = try XCTUnwrap(tl["timeline"]?.arrayValue?.first)
        for key in ["time", "time_error_ns", "node", "kind", "entity", "summary", "concurrent_with"] { XCTAssertNotNil(entry[key], key) }
        let explain = engine.incidents[0].explainJSON(weights: engine.configuration.weights)
        XCTAssertFalse(explain["links"]?.arrayValue?.isEmpty ?? true)
    }

    func testDependencyGraphLearnsEdgesFailuresLatencyAndNames() {
        var c = SyntheticCluster()
        c.healthy(until: 20)
        c.connect(20, "api", "redis", .refused, count: 3)
        let g = c.engine().graph
        let e = try! XCTUnwrap(g.edge(client: "api", server: "redis"))
        XCTAssertEqual(e.connects, 40 * 4 + 3)
        XCTAssertEqual(e.failures["refused"], 3)
        XCTAssertEqual(e.ports, [6379])
        XCTAssertEqual(e.responseLatency.count, 40 * 10)
        XCTAssertEqual(e.responseLatency.meanNs, 1_000_000, accuracy: 1)
        XCTAssertTrue(g.hasEdge("frontend", "api"))
        XCTAssertFalse(g.hasEdge("redis", "api"))
        XCTAssertEqual(g.dependencies(of: "api"), ["db", "redis"])
        XCTAssertEqual(g.names["redis.shop.svc"], "redis")
        XCTAssertEqual(g.toJSON()["services"]?.arrayValue?.count, 4)
    }

    /// An api that connects to ever new addresses (a crawler, a client of a
    /// CDN) keeps the graph within its bound, the cluster's own live edges
    /// stay, and edges not seen for `forgetEdgeAfterNs` go.
    func testTheGraphStaysBoundedAndForgetsEdgesNotSeenForLong() {
        var c = SyntheticCluster()
        c.healthy(until: 200)
        for i in 0..<5_000 {
            c.connect(10 + Double(i) / 100, "api", ip: "198.51.\(i / 250).\(i % 250)", port: 443, .established)
        }
        var configuration = CorrelationConfiguration()
        configuration.maxGraphEdges = 1_000
        configuration.forgetEdgeAfterNs = 100_000_000_000
        let g = c.engine(configuration: configuration).graph
        XCTAssertLessThanOrEqual(g.edgeCount, 1_000)
        XCTAssertTrue(g.hasEdge("frontend", "api"), "edges in use stay")
        XCTAssertTrue(g.hasEdge("api", "redis"))
        // The crawler's first peers were last seen over 100 s before the end.
        XCTAssertNil(g.edge(client: "api", server: "198.51.0.0"))

        var quiet = SyntheticCluster()
        quiet.healthy(until: 60)
        quiet.connect(30, "api", ip: "203.0.113.7", port: 443, .established)
        quiet.healthy(from: 60, until: 400, skip: ["api>db"])
        let aged = quiet.engine(configuration: configuration).graph
        XCTAssertFalse(aged.hasEdge("api", "db"), "not seen for 340 s, forgotten after 100")
        XCTAssertNil(aged.edge(client: "api", server: "203.0.113.7"))
        XCTAssertTrue(aged.hasEdge("api", "redis"))
    }

    /// A log replayed days after it was written (a restart after a long
    /// stop, a lab recording) and then advanced pass by pass to the present
    /// keeps the graph its events built: no event says the edges went unused.
    func testAnOldLogAdvancedToThePresentKeepsItsGraph() {
        var c = SyntheticCluster()
        c.healthy(until: 60)
        var engine = c.engine()
        XCTAssertTrue(engine.graph.hasEdge("api", "redis"))
        let now = SyntheticCluster.ns(60) + 10 * 86_400_000_000_000
        for pass in 0..<400 { engine.advance(toNs: now + Int64(pass) * 250_000_000) }
        XCTAssertTrue(engine.graph.hasEdge("api", "redis"), "forgotten by the wall clock alone")
    }

    func testBrierScoreOfTopOneConfidences() {
        func rc(_ e: String, _ k: CauseKind, _ p: Double) -> RootCause {
            RootCause(entity: e, kind: k, confidence: p, factors: [], firstSeenNs: 0, evidence: [], nodes: [], inferred: false)
        }
        let redis = KnownAnswer(entity: "redis", kind: .oomKill)
        let runs: [(top: RootCause?, answer: KnownAnswer?)] = [
            (rc("redis", .oomKill, 0.9), redis),  // right at 0.9: 0.01
            (rc("api", .crash, 0.6), redis),  // wrong at 0.6: 0.36
            (nil, redis),  // missed: 1
            (nil, nil),  // healthy, quiet: 0
            (rc("api", .crash, 0.5), nil),  // healthy, false alarm at 0.5: 0.25
        ]
        XCTAssertEqual(Calibration.brierScore(runs: runs), (0.01 + 0.36 + 1 + 0 + 0.25) / 5, accuracy: 1e-12)
        XCTAssertEqual(Calibration.brierScore([(0.8, true), (0.8, false)]), (0.04 + 0.64) / 2, accuracy: 1e-12)
        XCTAssertEqual(Calibration.brierScore(runs: []), 0)
    }

    func testCalibrationFitLowersTheBrierScoreOfMiscalibratedWeights() {
        // Candidates whose topology decides right from wrong; start from weights that ignore it.
        var samples: [Calibration.Sample] = []
        for i in 0..<40 {
            let right = i % 2 == 0
            samples.append(Calibration.Sample(values: ["time_proximity": 0.9, "topology_match": right ? 1 : 0.1, "metadata_match": 1,
                                                       "symptoms_explained": right ? 1 : 0.5, "pattern_prior": 0.8, "deepest": 1, "observed_cause": 1, "contradicted": 0],
                                              correct: right))
        }
        var start = ConfidenceWeights()
        start.topologyMatch = 0
        start.symptomsExplained = 0
        func brier(_ w: ConfidenceWeights) -> Double {
            Calibration.brierScore(samples.map { s in
                let f = ConfidenceWeights.factorNames.map { Factor(name: $0, value: s.values[$0]!, weight: w.weight($0)) }
                return (confidence(of: f, bias: w.bias), s.correct)
            })
        }
        let fitted = Calibration.fit(samples, start: start)
        XCTAssertLessThan(brier(fitted), brier(start) / 2)
        XCTAssertGreaterThan(fitted.topologyMatch, 0)
        XCTAssertEqual(Calibration.fit(samples, start: start), fitted, "deterministic")
    }

    func testWarmupAndLateEvents() {
        // A burst in the first seconds (no baseline yet) opens nothing.
        var c = SyntheticCluster()
        var t = 0.0
        while t < 8 { c.connect(t, "api", "redis", .refused, count: 5); t += 0.5 }
        c.healthy(until: 20)
        XCTAssertEqual(c.engine().incidents.count, 0)

        // An event later than the allowed lateness is counted, not lost silently.
        var engine = CorrelationEngine()
        let ev = { (s: Double) in ObservedEvent(node: "n", timeNs: SyntheticCluster.ns(s), errorNs: 0, event: TapioEvent(kind: .processExec, timeNs: 0, comm: "x")) }
        engine.ingest(ev(10))
        engine.advance(toNs: SyntheticCluster.ns(20))
        engine.ingest(ev(12))
        engine.advance(toNs: SyntheticCluster.ns(21))
        XCTAssertEqual(engine.statistics.processed, 2)
        XCTAssertEqual(engine.statistics.late, 1)
    }
}
