import Foundation
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The segment log under the store: records cut at a crash, retention under
/// both limits, queries that skip batches by their index row.
final class SegmentLogTests: XCTestCase {
    private let hour: Int64 = 3_600_000_000_000

    private func batch(_ node: String, epoch: UInt64 = 1, seq: UInt64, base: Int64, count: Int = 4, pod: String = "") -> EventBatch {
        Self.batch(node, epoch: epoch, seq: seq, base: base, count: count, pod: pod)
    }

    private static func batch(_ node: String, epoch: UInt64 = 1, seq: UInt64, base: Int64, count: Int = 4, pod: String = "") -> EventBatch {
        var events: [TapioEvent] = []
        for i in 0..<count {
            let detail: TapioEvent.Detail = i % 2 == 0 ? .exec(filename: "/bin/c\(i)") : .exit(exitCode: Int32(i), signal: 0, coreDumped: false)
            let kind: EventKind = i % 2 == 0 ? .processExec : .processExit
            var e = TapioEvent(kind: kind, timeNs: base + Int64(i) * 1000, pid: UInt32(100 + i), comm: "c\(i)", detail: detail)
            e.pod = pod
            e.namespace = pod.isEmpty ? "" : "shop"
            events.append(e)
        }
        return EventBatch(node: node, epoch: epoch, sequence: seq, events: events)
    }

    private func segments(_ store: SegmentEventStore) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: store.segmentDirectory).filter { $0.hasSuffix(".seg") }.sorted()
    }

    private func fileSize(_ path: String) throws -> Int64 {
        (try FileManager.default.attributesOfItem(atPath: path)[.size] as? NSNumber)?.int64Value ?? -1
    }

    func testARecordTheIndexDoesNotNameIsCutOffAtOpen() throws {
        let dir = try TestSupport.temporaryDirectory()
        var segment = ""
        var indexedSize: Int64 = 0
        do {
            let store = try SegmentEventStore(directory: dir)
            XCTAssertTrue(try store.append(batch("a", seq: 1, base: 1_000), clock: .none, receivedNs: 1))
            segment = store.segmentDirectory + "/" + (try segments(store).last ?? "")
            indexedSize = try fileSize(segment)
        }
        // What a process killed between its segment write and its index
        // commit leaves: bytes after the last indexed record.
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: segment))
        handle.seekToEndOfFile()
        handle.write(Data(repeating: 0xAB, count: 777))
        try handle.close()

        let store = try SegmentEventStore(directory: dir)
        XCTAssertEqual(try fileSize(segment), indexedSize, "cut back to what the index names")
        XCTAssertTrue(try store.append(batch("a", seq: 2, base: 2_000), clock: .none, receivedNs: 2))
        XCTAssertEqual(try store.events(EventQuery(node: "a")).count, 8)
        XCTAssertEqual(try store.batches(sinceNs: 0, limit: 10).map(\.batch.sequence), [1, 2])
    }

    /// `tapio-server replay` on a running server's data directory: it reads,
    /// and cuts nothing the server may be appending.
    func testAReadOnlyStoreReadsAndTouchesNothing() throws {
        let dir = try TestSupport.temporaryDirectory()
        let store = try SegmentEventStore(directory: dir)
        XCTAssertTrue(try store.append(batch("a", seq: 1, base: 1_000), clock: .none, receivedNs: 1))
        let segment = store.segmentDirectory + "/" + (try segments(store).last ?? "")
        // Bytes of an append the writer has not indexed yet.
        let handle = try XCTUnwrap(FileHandle(forWritingAtPath: segment))
        handle.seekToEndOfFile()
        handle.write(Data(repeating: 0xAB, count: 100))
        try handle.close()
        let size = try fileSize(segment)

        let reader = try SegmentEventStore(directory: dir, readOnly: true)
        XCTAssertEqual(try fileSize(segment), size, "a read-only open cuts nothing")
        XCTAssertEqual(try reader.batches(afterId: 0, limit: 10).map(\.batch.sequence), [1])
        XCTAssertEqual(try reader.events(EventQuery(node: "a")).count, 4)
        XCTAssertThrowsError(try reader.append(batch("a", seq: 2, base: 2_000), clock: .none, receivedNs: 2)) { error in
            XCTAssertTrue("\(error)".contains("reading only"), "\(error)")
        }
        XCTAssertThrowsError(try SegmentEventStore(directory: dir + "/nothing", readOnly: true)) { error in
            XCTAssertTrue("\(error)".contains("no event store"), "\(error)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/nothing"), "nor created")
    }

    func testADamagedRecordFailsItsQueryInWords() throws {
        let dir = try TestSupport.temporaryDirectory()
        let store = try SegmentEventStore(directory: dir)
        XCTAssertTrue(try store.append(batch("a", seq: 1, base: 1_000, count: 64), clock: .none, receivedNs: 1))
        let segment = store.segmentDirectory + "/" + (try segments(store).last ?? "")
        // Flip a byte inside the frame: zstd's content checksum catches it.
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: segment))
        let size = try fileSize(segment)
        handle.seek(toFileOffset: UInt64(size - 20))
        let byte = handle.readData(ofLength: 1)[0]
        handle.seek(toFileOffset: UInt64(size - 20))
        handle.write(Data([byte ^ 0xFF]))
        try handle.close()
        XCTAssertThrowsError(try store.events(EventQuery())) { error in
            XCTAssertTrue("\(error)".contains("segment 1 offset"), "\(error)")
        }
    }

    func testBatchesAreSealedIntoSegmentsAndQueriesSkipByKindPodAndTime() throws {
        var configuration = SegmentEventStore.Configuration()
        configuration.segmentBytes = 1  // every group of batches seals its segment
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory(), configuration: configuration)
        for seq in 1...6 {
            _ = try store.append(batch("a", seq: UInt64(seq), base: Int64(seq) * 1_000_000, pod: seq % 2 == 0 ? "api-1" : "db-1"),
                                 clock: .none, receivedNs: Int64(seq))
        }
        XCTAssertEqual(try segments(store).count, 7, "six sealed and an empty active one")
        XCTAssertEqual(try store.events(EventQuery(pod: "api-1")).count, 12)
        XCTAssertEqual(try store.events(EventQuery(pod: "api-1", namespace: "shop")).count, 12)
        XCTAssertEqual(try store.events(EventQuery(pod: "api-1", namespace: "other")).count, 0)
        XCTAssertEqual(try store.events(EventQuery(kind: .processExit, limit: 3)).map(\.timeNs), [5_003_000, 6_001_000, 6_003_000])
        XCTAssertEqual(try store.events(EventQuery(kind: .dns)).count, 0)
        XCTAssertEqual(try store.events(EventQuery(sinceNs: 2_500_000, untilNs: 4_000_000)).count, 4)
        let stats = store.statistics()
        XCTAssertEqual(stats.batchesAppended, 6)
        XCTAssertEqual(stats.eventsAppended, 24)
        XCTAssertEqual(stats.segments, 7)
        XCTAssertGreaterThan(stats.segmentBytes, 0)
    }

    func testTimeRetentionDeletesWholeOldSegmentsAndSaysSo() throws {
        var configuration = SegmentEventStore.Configuration()
        configuration.segmentBytes = 1
        configuration.retentionNs = hour
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory(), configuration: configuration)
        let now = wallClockNs()
        for seq in 1...10 {
            // Five batches that arrived two hours ago, five just now.
            let received = seq <= 5 ? now - 2 * hour : now
            _ = try store.append(batch("a", seq: UInt64(seq), base: received + Int64(seq)), clock: .none, receivedNs: received)
        }
        XCTAssertNil(try store.retainedFromNs())
        let deleted = try store.enforceRetention(nowNs: now)
        XCTAssertEqual(deleted.map(\.reason), Array(repeating: .retention, count: 5))
        XCTAssertEqual(deleted.map(\.events).reduce(0, +), 20)
        XCTAssertEqual(try store.batches(sinceNs: 0, limit: 100).map(\.batch.sequence), Array(6...10))
        XCTAssertEqual(try store.events(EventQuery(limit: 1000)).count, 20)
        let horizon = try XCTUnwrap(try store.retainedFromNs())
        XCTAssertEqual(horizon, now - 2 * hour + 5 + 3000, "the newest event deleted")
        XCTAssertEqual(store.statistics().deletedEvents[.retention], 20)
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 10, "deleted sequences still count as acknowledged")
        XCTAssertFalse(try store.append(batch("a", seq: 3, base: now), clock: .none, receivedNs: now), "a resend of a deleted batch is a duplicate")
        XCTAssertTrue(try store.enforceRetention(nowNs: now).isEmpty, "nothing more is old enough")
    }

    func testTheDiskLimitDeletesTheOldestFirstAndKeepsTheNewest() throws {
        var configuration = SegmentEventStore.Configuration()
        configuration.segmentBytes = 64 << 10
        configuration.retentionNs = nil
        let dir = try TestSupport.temporaryDirectory()
        // The index's WAL alone may reach 4 MiB before it is checkpointed.
        configuration.maxDiskBytes = 6 << 20
        let store = try SegmentEventStore(directory: dir + "/store", configuration: configuration)
        var sequence: UInt64 = 0
        let now = wallClockNs()
        // Events that do not compress away: random pids and commands.
        var rng = SystemRandomNumberGenerator()
        func noisy(_ seq: UInt64) -> EventBatch {
            let events = (0..<256).map { i in
                TapioEvent(kind: .processExec, timeNs: now + Int64(seq) * 1_000_000 + Int64(i), pid: UInt32.random(in: 1...UInt32.max, using: &rng),
                           comm: String(UInt64.random(in: 0...UInt64.max, using: &rng), radix: 36), detail: .exec(filename: "/bin/\(UInt64.random(in: 0...UInt64.max, using: &rng))"))
            }
            return EventBatch(node: "a", epoch: 1, sequence: seq, events: events)
        }
        var deleted: [RetentionDeletion] = []
        while sequence < 1000 {
            let group = (1...10).map { i in noisy(sequence + UInt64(i)) }
            sequence += 10
            _ = try store.appendAll(group.map { BatchAppend(batch: $0, payload: $0.encoded(), clock: .none, receivedNs: now) })
            deleted += try store.enforceRetention(nowNs: now)
        }
        deleted += try store.enforceRetention(nowNs: now)
        XCTAssertFalse(deleted.isEmpty)
        XCTAssertTrue(deleted.allSatisfy { $0.reason == .maxDisk })
        let stats = store.statistics()
        XCTAssertLessThanOrEqual(stats.segmentBytes + stats.indexBytes, try XCTUnwrap(configuration.maxDiskBytes))
        let kept = try store.batches(sinceNs: 0, limit: 1000).map(\.batch.sequence)
        XCTAssertEqual(kept.last, 1000, "the newest batch stays")
        XCTAssertEqual(kept, Array((kept.first ?? 0)...1000), "what stays is the newest, without holes")
        XCTAssertEqual(Int64(kept.count) * 256 + deleted.map(\.events).reduce(0, +), 1000 * 256, "every event is kept or counted as deleted")
    }

    /// Retention running beside ingest: nothing acknowledged within retention
    /// is lost, and what is deleted is exactly what arrived before it.
    func testRetentionWhileIngestRunsLosesNothingWithinRetention() throws {
        var configuration = SegmentEventStore.Configuration()
        configuration.segmentBytes = 8 << 10
        configuration.retentionNs = hour
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory(), configuration: configuration)
        let now = wallClockNs()
        let total: UInt64 = 400
        // The first half arrived long ago (replayed from an agent's spool,
        // say), the second half now, while retention runs on another thread.
        let hour = self.hour
        let writing = DispatchGroup()
        DispatchQueue.global().async(group: writing) {
            for seq in 1...total {
                let received = seq <= total / 2 ? now - 3 * hour : now
                _ = try? store.append(Self.batch("a", seq: seq, base: received + Int64(seq) * 10_000), clock: .none, receivedNs: received)
            }
        }
        var deleted: [RetentionDeletion] = []
        while writing.wait(timeout: .now()) == .timedOut {
            deleted += try store.enforceRetention(nowNs: now)
        }
        XCTAssertEqual(store.statistics().batchesAppended, Int64(total))
        deleted += try store.enforceRetention(nowNs: now)
        let kept = Set(try store.batches(sinceNs: 0, limit: 10_000).map(\.batch.sequence))
        XCTAssertTrue(kept.isSuperset(of: Set((total / 2 + 1)...total)), "every batch within retention is kept")
        XCTAssertEqual(Int64(kept.count * 4) + deleted.map(\.events).reduce(0, +), Int64(total * 4))
        XCTAssertTrue(deleted.allSatisfy { $0.reason == .retention })
    }
}
