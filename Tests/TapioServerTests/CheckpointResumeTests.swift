import Foundation
import Logging
import TapioCorrelation
@testable import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// Checkpoints without the events still waiting for the watermark
/// (docs/storage.md, "Engine checkpoints"): a restore feeds the log again
/// from the position before the oldest batch that still waited and skips
/// what the engine had processed; every event is processed once.
final class CheckpointResumeTests: XCTestCase {
    func testWaitingBatchesResumeBeforeTheOldestBatchStillWaiting() {
        var w = WaitingBatches()
        XCTAssertEqual(w.resumeAfter(lastTaken: 7), 7, "nothing taken waits")
        w.taken(position: 8, newestNs: 100)
        w.taken(position: 9, newestNs: 300)
        w.taken(position: 10, newestNs: 200)
        XCTAssertEqual(w.resumeAfter(lastTaken: 10), 7)
        w.passed(watermarkNs: 150)
        XCTAssertEqual(w.resumeAfter(lastTaken: 10), 8, "batch 8 has nothing after the watermark")
        w.passed(watermarkNs: 250)
        XCTAssertEqual(w.resumeAfter(lastTaken: 10), 8, "batch 9 still waits; 10 behind it is kept")
        w.passed(watermarkNs: 300)
        XCTAssertEqual(w.resumeAfter(lastTaken: 10), 10)
        w.taken(position: 11, events: [])
        XCTAssertEqual(w.resumeAfter(lastTaken: 11), 11, "an empty batch leaves nothing waiting")
    }

    func testACheckpointKeepsTheOldFormWhenNothingWaits() throws {
        let state = Array("{}".utf8)
        let plain = CorrelationService.positioned(resumeAfter: 42, lastTaken: 42, state)
        XCTAssertEqual(plain.count, 8 + state.count, "position, then the state, as checkpoints of before")
        XCTAssertEqual(CorrelationService.checkpointPosition(plain), 42)
        let skipping = CorrelationService.positioned(resumeAfter: 40, lastTaken: 42, state)
        let parts = try XCTUnwrap(CorrelationService.checkpointParts(skipping))
        XCTAssertEqual(parts.resumeAfter, 40)
        XCTAssertEqual(parts.lastTaken, 42)
        XCTAssertEqual(Array(parts.state), state)
        XCTAssertEqual(CorrelationService.checkpointPosition(skipping), 40)
    }

    /// The recorded lab runs cut into batches in arrival order, a pass
    /// every few batches; a checkpoint after the pass in the middle (with
    /// events waiting), restored and fed again from its resume position:
    /// the same incidents, graph and counts as an engine that never stopped.
    func testARestoreFedAgainFromTheResumePositionEndsAsIfNeverStopped() throws {
        let runs = try RecordedRun.loadAll(directory: RecordedRunTests.directory)
        var skipped = 0
        var withIncidents = 0
        for run in runs {
            let log = run.log
            guard log.events.count > 100 else { continue }
            let arrivals = log.arrivalNs.count == log.events.count ? log.arrivalNs : log.events.map(\.timeNs)
            let order = log.events.indices.sorted { (arrivals[$0], $0) < (arrivals[$1], $1) }
            let size = 16
            // batches[p - 1] is the batch at log position p.
            let batches = stride(from: 0, to: order.count, by: size).map { Array(order[$0..<min(order.count, $0 + size)]) }
            let passEvery = 4
            let middle = (batches.count / 2 / passEvery) * passEvery
            guard middle > 0 else { continue }
            func feed(_ engine: inout CorrelationEngine, _ waits: inout WaitingBatches, position p: Int, skip: ReplaySkip?) {
                var events = batches[p - 1].map { log.events[$0] }
                skip?.removeProcessed(from: &events, position: Int64(p))
                engine.ingest(events)
                waits.taken(position: Int64(p), events: events)
                if p % passEvery == 0 {
                    engine.advance(toNs: arrivals[batches[p - 1].last!])
                    waits.passed(watermarkNs: engine.watermarkNs)
                }
            }
            var kept = CorrelationEngine()
            for node in log.inventory.keys.sorted() { kept.updateInventory(node: node, pods: log.inventory[node]!) }
            var keptWaits = WaitingBatches()
            for p in 1...middle { feed(&kept, &keptWaits, position: p, skip: nil) }
            let resume = keptWaits.resumeAfter(lastTaken: Int64(middle))
            if resume < Int64(middle) { skipped += 1 }
            let bytes = CorrelationService.positioned(resumeAfter: resume, lastTaken: Int64(middle), try kept.checkpoint(omittingPending: true))
            for p in (middle + 1)...batches.count { feed(&kept, &keptWaits, position: p, skip: nil) }
            kept.finish()

            let parts = try XCTUnwrap(CorrelationService.checkpointParts(bytes))
            var restored = try CorrelationEngine(checkpoint: Array(parts.state))
            var restoredWaits = WaitingBatches()
            let skip = ReplaySkip(resumeAfter: parts.resumeAfter, lastTaken: parts.lastTaken, watermarkNs: restored.watermarkNs)
            for p in Int(parts.resumeAfter + 1)...batches.count { feed(&restored, &restoredWaits, position: p, skip: skip) }
            restored.finish()

            XCTAssertEqual(restored.incidents, kept.incidents, "\(run.name): the same incidents")
            XCTAssertEqual(restored.graph, kept.graph, run.name)
            XCTAssertEqual(restored.statistics.processed, kept.statistics.processed, "\(run.name): every event processed once")
            XCTAssertEqual(restored.statistics.late, kept.statistics.late, run.name)
            if !kept.incidents.isEmpty { withIncidents += 1 }
        }
        XCTAssertGreaterThan(skipped, 0, "some checkpoint was taken with events waiting")
        XCTAssertGreaterThan(withIncidents, 0, "some recording has an incident to carry over")
    }

    /// A kill -9 leaves a checkpoint taken while the last batches' events
    /// still waited: the start replays from before them and processes every
    /// stored event exactly once.
    func testACrashWithEventsWaitingLosesNoneAndCountsNoneTwice() throws {
        let harness = try ServerHarness { c in c.correlation.checkpointIntervalNs = 100_000_000 }
        let checkpoint = harness.dir + "/data/engine.checkpoint"
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 9)
        // Batches until a checkpoint is written while some of them wait:
        // each has an event dated now, which waits a second and a half, and
        // one dated 5 s ago, which the next pass processes at once (late);
        // fed again after the crash, that one must be skipped.
        func batch(_ seq: UInt64) -> EventBatch {
            let now = wallClockNs()
            return agent.batch(seq, events: [event(UInt32(seq), comm: "new-\(seq)", time: now),
                                             event(UInt32(seq), comm: "old-\(seq)", time: now - 5_000_000_000)])
        }
        var seq: UInt64 = 0
        var waiting: [UInt8]?
        let deadline = Date().addingTimeInterval(20)
        while waiting == nil && Date() < deadline {
            seq += 1
            try agent.send(batch(seq))
            XCTAssertEqual(try agent.acks(1).map(\.sequence), [seq])
            if let bytes = try? CheckpointFile.read(checkpoint), let parts = CorrelationService.checkpointParts(bytes),
               parts.resumeAfter < parts.lastTaken, parts.lastTaken >= 2 {
                waiting = FileManager.default.contents(atPath: checkpoint).map { Array($0) }
            }
            Thread.sleep(forTimeInterval: 0.05)
        }
        let atCrash = try XCTUnwrap(waiting, "a checkpoint with events waiting within 20 s")
        for _ in 1...3 {
            seq += 1
            try agent.send(batch(seq))
            XCTAssertEqual(try agent.acks(1).map(\.sequence), [seq])
        }
        let stored = try harness.server.store.events(EventQuery(node: "node-a", limit: 100_000)).count
        XCTAssertEqual(stored, 2 * Int(seq))
        harness.server.shutdown()

        XCTAssertTrue(FileManager.default.createFile(atPath: checkpoint, contents: Data(atCrash)))
        var logger = Logger(label: "tapio-server-test")
        logger.logLevel = .notice
        let restarted = try TapioServer(configuration: harness.server.configuration, logger: logger)
        _ = try restarted.start()
        defer { restarted.shutdown() }
        XCTAssertEqual(restarted.correlation.lastRestore.source, "checkpoint")
        let parts = try XCTUnwrap(CorrelationService.checkpointParts(XCTUnwrap(try CheckpointFile.read(checkpoint))))
        XCTAssertEqual(restarted.correlation.lastRestore.batchesReplayed, Int(seq) - Int(parts.resumeAfter),
                       "the batches from the oldest one still waiting")
        XCTAssertTrue(eventually { restarted.correlation.statistics.processed >= UInt64(stored) })
        Thread.sleep(forTimeInterval: 2)
        XCTAssertEqual(restarted.correlation.statistics.processed, UInt64(stored), "every event once, none twice")
    }
}
