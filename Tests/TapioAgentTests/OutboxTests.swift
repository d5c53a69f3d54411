import Foundation
import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

final class OutboxTests: XCTestCase {
    private func exitEvent(_ pid: UInt32, time: Int64 = 1_000, kind: EventKind = .processExit) -> TapioEvent {
        TapioEvent(kind: kind, timeNs: time, pid: pid, comm: "c")
    }

    func testSealsByCountByAgeAndAtOnceForCriticalEvents() throws {
        var limits = Outbox.Limits()
        limits.maxEvents = 3
        limits.maxDelayNs = 1_000
        let outbox = try Outbox(node: "n", epoch: 1, limits: limits, spoolDirectory: nil)
        for pid in 1...3 { outbox.add(exitEvent(UInt32(pid))) }
        XCTAssertEqual(outbox.unacknowledged, 1, "sealed at three events")
        outbox.add(exitEvent(4, time: 10_000))
        outbox.sealIfDue(nowNs: 10_500)
        XCTAssertEqual(outbox.unacknowledged, 1, "not old enough yet")
        outbox.sealIfDue(nowNs: 11_000)
        XCTAssertEqual(outbox.unacknowledged, 2)
        outbox.add(exitEvent(5, kind: .oomKill))
        XCTAssertEqual(outbox.unacknowledged, 3, "an OOM kill goes out at once")
        let sequences = try outbox.sealedPayloadsForTesting().map { try EventBatch.decode($0).sequence }
        XCTAssertEqual(sequences, [1, 2, 3])
    }

    func testUnacknowledgedBatchesSurviveARestartThroughTheSpool() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let outbox = try Outbox(node: "n", epoch: 5, spoolDirectory: spool)
            for pid in 1...10 { outbox.add(exitEvent(UInt32(pid))) }
            outbox.sealIfDue(nowNs: 0, force: true)
            XCTAssertEqual(outbox.spoolRemaining(), 0, "nothing lost")
        }
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        XCTAssertEqual(restarted.unacknowledged, 1)
        let batch = try EventBatch.decode(try XCTUnwrap(restarted.sealedPayloadsForTesting().first))
        XCTAssertEqual(batch.epoch, 5, "a spooled batch keeps its epoch so the server can deduplicate it")
        XCTAssertEqual(batch.events.map(\.pid), Array(1...10).map(UInt32.init))
    }

    func testOverflowSpillsToTheSpoolThenDropsAndCountsIt() throws {
        var limits = Outbox.Limits()
        limits.maxEvents = 100
        limits.maxMemoryBytes = 3_000
        limits.maxSpoolBytes = 3_000
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        let outbox = try Outbox(node: "n", epoch: 1, limits: limits, spoolDirectory: spool)
        for pid in 0..<2_000 { outbox.add(exitEvent(UInt32(pid), time: Int64(pid))) }
        let stats = outbox.stats
        XCTAssertLessThanOrEqual(stats.memoryBytes, limits.maxMemoryBytes)
        XCTAssertLessThanOrEqual(stats.spoolBytes, limits.maxSpoolBytes)
        XCTAssertGreaterThan(stats.spoolBytes, 0)
        let dropped = stats.drops.first { $0.reason == "spool_full" }?.count ?? 0
        let kept = try outbox.sealedPayloadsForTesting().reduce(0) { $0 + (try EventBatch.decode($1).events.count) }
        XCTAssertGreaterThan(dropped, 0)
        XCTAssertEqual(UInt64(kept) + dropped, 2_000, "every event is either kept or counted as dropped")
    }
}
