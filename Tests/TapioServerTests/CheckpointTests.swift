import Foundation
import Logging
import TapioCorrelation
@testable import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The engine's checkpoint: a restored engine goes on as if it had never
/// stopped, and a restarted server reads the checkpoint and replays only the
/// log after it (docs/storage.md, "Engine checkpoints").
final class CheckpointTests: XCTestCase {
    func testARestoredEngineGoesOnAsIfItHadNeverStopped() throws {
        let runs = try RecordedRun.loadAll(directory: RecordedRunTests.directory)
        XCTAssertGreaterThan(runs.count, 0)
        var withIncidents = 0
        for run in runs {
            let events = run.log.events.sorted { $0.timeNs < $1.timeNs }
            guard events.count > 10 else { continue }
            let half = events.count / 2
            var kept = CorrelationEngine()
            for node in run.log.inventory.keys.sorted() { kept.updateInventory(node: node, pods: run.log.inventory[node]!) }
            kept.ingest(Array(events[..<half]))
            // A pass mid-way, so the checkpoint holds decided buckets,
            // incidents and events still waiting for the watermark.
            kept.advance(toNs: events[half].timeNs)
            var restored = try CorrelationEngine(checkpoint: kept.checkpoint())
            XCTAssertEqual(restored.incidents, kept.incidents, run.name)
            XCTAssertEqual(restored.statistics, kept.statistics, run.name)
            kept.ingest(Array(events[half...]))
            kept.finish()
            restored.ingest(Array(events[half...]))
            restored.finish()
            XCTAssertEqual(restored.incidents, kept.incidents, "\(run.name): the same incidents after the restore")
            XCTAssertEqual(restored.graph, kept.graph, run.name)
            if !kept.incidents.isEmpty { withIncidents += 1 }
        }
        XCTAssertGreaterThan(withIncidents, 0, "some recording has an incident to carry over")
    }

    func testADamagedCheckpointIsRefusedInWords() throws {
        let dir = try TestSupport.temporaryDirectory()
        let path = dir + "/engine.checkpoint"
        try CheckpointFile.write(Array("not an engine".utf8), to: path)
        XCTAssertThrowsError(try CorrelationEngine(checkpoint: XCTUnwrap(try CheckpointFile.read(path)))) { error in
            XCTAssertTrue("\(error)".contains("not an engine checkpoint"), "\(error)")
        }
        var bytes = try XCTUnwrap(FileManager.default.contents(atPath: path))
        bytes[bytes.count - 3] ^= 0xFF
        XCTAssertTrue(FileManager.default.createFile(atPath: path, contents: bytes))
        XCTAssertThrowsError(try CheckpointFile.read(path)) { error in
            XCTAssertTrue("\(error)".contains("damaged"), "\(error)")
        }
    }

    /// At a high rate the interval alone would leave a crash to replay
    /// millions of events: a checkpoint also follows every
    /// `checkpointEveryEvents` events taken (here every batch; the interval,
    /// an hour, never comes).
    func testACheckpointFollowsEnoughEventsWhateverTheInterval() throws {
        let harness = try ServerHarness { c in
            c.correlation.checkpointIntervalNs = 3_600_000_000_000
            c.correlation.checkpointEveryEvents = 1
        }
        defer { harness.server.shutdown() }
        let checkpoint = harness.dir + "/data/engine.checkpoint"
        // The last batch the checkpoint covers (its events may still wait
        // for the watermark, so it resumes before them).
        func position() -> Int64? {
            guard let bytes = try? CheckpointFile.read(checkpoint) else { return nil }
            return CorrelationService.checkpointParts(bytes)?.lastTaken
        }
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 7)
        for seq: UInt64 in 1...2 {
            try agent.send(agent.batch(seq))
            XCTAssertEqual(try agent.acks(1).map(\.sequence), [seq])
            XCTAssertTrue(eventually { position() == Int64(seq) }, "a checkpoint after batch \(seq): \(String(describing: position()))")
        }
    }

    func testARestartReadsTheCheckpointAndReplaysOnlyTheLogAfterIt() throws {
        let harness = try ServerHarness { c in c.correlation.checkpointIntervalNs = 200_000_000 }
        let checkpoint = harness.dir + "/data/engine.checkpoint"
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 7)
        for seq: UInt64 in 1...3 {
            try agent.send(agent.batch(seq))
            XCTAssertEqual(try agent.acks(1).map(\.sequence), [seq])
        }
        func position() -> Int64? {
            guard let bytes = try? CheckpointFile.read(checkpoint) else { return nil }
            return CorrelationService.checkpointPosition(bytes)
        }
        XCTAssertTrue(eventually { position() == 3 }, "a periodic checkpoint at the third batch")
        // What a kill -9 now would leave: this checkpoint.
        let atThree = try XCTUnwrap(FileManager.default.contents(atPath: checkpoint))
        try agent.send(agent.batch(4))
        try agent.send(agent.batch(5))
        XCTAssertEqual(try agent.acks(2).map(\.sequence), [4, 5])
        let stored = try harness.server.store.events(EventQuery(node: "node-a", limit: 100_000)).count
        XCTAssertTrue(eventually { harness.server.correlation.statistics.processed == UInt64(stored) })
        harness.server.shutdown()
        XCTAssertEqual(position(), 5, "the checkpoint written at stop has every batch")

        XCTAssertTrue(FileManager.default.createFile(atPath: checkpoint, contents: atThree))
        var logger = Logger(label: "tapio-server-test")
        logger.logLevel = .notice
        let restarted = try TapioServer(configuration: harness.server.configuration, logger: logger)
        _ = try restarted.start()
        defer { restarted.shutdown() }
        XCTAssertEqual(restarted.correlation.lastRestore.source, "checkpoint")
        XCTAssertEqual(restarted.correlation.lastRestore.batchesReplayed, 2)
        // Three batches from the checkpoint, two replayed from the log:
        // every event once, none twice.
        XCTAssertTrue(eventually { restarted.correlation.statistics.processed >= UInt64(stored) })
        Thread.sleep(forTimeInterval: 2)
        XCTAssertEqual(restarted.correlation.statistics.processed, UInt64(stored))
    }
}
