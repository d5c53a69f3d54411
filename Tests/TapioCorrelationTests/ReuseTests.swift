@testable import TapioCorrelation
import Foundation
import TapioWire
import XCTest

/// An open incident answered from its last evaluation (Reuse.swift) is
/// answered as a fresh evaluation would answer it, and is evaluated again
/// when anything it read changed. (Debug builds also check every reuse
/// against a fresh evaluation: `checkReuse`.)
final class ReuseTests: XCTestCase {
    func configuration(reuse: Bool) -> CorrelationConfiguration {
        var cfg = CorrelationConfiguration()
        cfg.reuseEvaluations = reuse
        cfg.checkReuse = true
        return cfg
    }

    func json(_ e: CorrelationEngine) -> String {
        var parts = [e.incidentsJSON().serialized()]
        for inc in e.incidents { parts.append(inc.explainJSON(weights: e.configuration.weights).serialized()) }
        return parts.joined(separator: "\n")
    }

    func testReusedEvaluationsGiveTheSameIncidentsAsEvaluatingEveryBucket() {
        let c = EngineTests.cascade()
        let every = c.engine(configuration: configuration(reuse: false))
        let reused = c.engine(configuration: configuration(reuse: true))
        XCTAssertEqual(every.reusedEvaluations, 0)
        XCTAssertGreaterThan(reused.reusedEvaluations, 0, "the quiet period's evaluations are reused")
        XCTAssertFalse(every.incidents.isEmpty)
        XCTAssertEqual(json(reused), json(every))
    }

    /// The graph alone changes what an incident's candidates are: refused
    /// connections to cart, then (the symptoms over, the incident still
    /// open) cart is seen connecting to db, which was OOM-killed before
    /// the refusals began. The new edge makes db a candidate; nothing else
    /// the incident read changed.
    func testAnIncidentIsEvaluatedAgainWhenOnlyTheGraphAroundItChanged() throws {
        var c = SyntheticCluster()
        c.healthy(until: 60, skip: ["api>db"])
        c.oom(29, "db")
        var t = 30.5
        while t < 40 {
            c.connect(t, "frontend", "cart", .refused, count: 4)
            t += 0.5
        }
        c.connect(50, "cart", "db", .established)
        let every = c.engine(configuration: configuration(reuse: false))
        let reused = c.engine(configuration: configuration(reuse: true))
        XCTAssertGreaterThan(reused.reusedEvaluations, 0)
        XCTAssertEqual(json(reused), json(every))
        let inc = try XCTUnwrap(reused.incidents.first { $0.symptoms.contains { $0.entity == "frontend" && $0.peer == "cart" } })
        XCTAssertTrue(inc.rootCauses.contains { $0.entity == "db" && $0.kind == .oomKill }, "db's OOM kill, found through the new edge")

        // Without the edge, db is no candidate: the edge is what changed the answer.
        c.events.removeAll { $0.event.kind == .tcpConnect && $0.timeNs == SyntheticCluster.ns(50) }
        let without = c.engine(configuration: configuration(reuse: true))
        XCTAssertFalse(without.incidents.contains { $0.rootCauses.contains { $0.entity == "db" } })
    }

    /// Time advanced in steps shorter and longer than a bucket (decisions
    /// within a bucket at every step, several buckets closed at once after
    /// the events up to the watermark) gives the same incidents, reused or not.
    func testTimeAdvancedInLargeStepsGivesTheSameIncidents() {
        let c = EngineTests.cascade()
        let events = c.events.sorted { $0.timeNs < $1.timeNs }
        func run(reuse: Bool, step: Int64) -> CorrelationEngine {
            var e = CorrelationEngine(configuration: configuration(reuse: reuse))
            for (node, pods) in c.inventory.sorted(by: { $0.key < $1.key }) { e.updateInventory(node: node, pods: pods) }
            e.ingest(events)
            var now = events[0].timeNs
            while now < events.last!.timeNs + 60_000_000_000 {
                now += step
                e.advance(toNs: now)
            }
            e.finish()
            return e
        }
        for step: Int64 in [250_000_000, 3_100_000_000, 10_000_000_000] {
            let reused = run(reuse: true, step: step)
            XCTAssertGreaterThan(reused.reusedEvaluations, 0, "step \(step)")
            XCTAssertEqual(json(reused), json(run(reuse: false, step: step)), "step \(step)")
        }
    }

    /// A process exit read by the evaluation (was the listener closed on
    /// purpose?) that comes after it is seen.
    func testALaterExitOfTheClosingProcessIsSeen() {
        var c = SyntheticCluster()
        c.healthy(until: 70)
        c.listen(30, "redis", open: false)
        var t = 30.05
        while t < 40 {
            c.connect(t, "api", "redis", .refused, count: 3)
            t += 0.5
        }
        c.exit(45, "redis", signal: 9)
        let every = c.engine(configuration: configuration(reuse: false))
        let reused = c.engine(configuration: configuration(reuse: true))
        XCTAssertEqual(json(reused), json(every))
    }

    /// A checkpoint holds no evaluations: a restored engine evaluates afresh
    /// and goes on to the same incidents.
    func testCheckpointsHoldNoEvaluations() throws {
        let c = EngineTests.cascade()
        let events = c.events.sorted { $0.timeNs < $1.timeNs }
        var e = CorrelationEngine(configuration: configuration(reuse: true))
        for (node, pods) in c.inventory.sorted(by: { $0.key < $1.key }) { e.updateInventory(node: node, pods: pods) }
        e.ingest(events)
        e.advance(toNs: SyntheticCluster.ns(45))
        let bytes = try e.checkpoint()
        XCTAssertFalse(String(decoding: bytes, as: UTF8.self).contains("evaluations"))
        var restored = try CorrelationEngine(checkpoint: bytes, configuration: configuration(reuse: true))
        e.finish()
        restored.finish()
        XCTAssertEqual(json(restored), json(e))
    }
}
