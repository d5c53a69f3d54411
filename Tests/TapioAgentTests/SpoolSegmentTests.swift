import Foundation
@testable import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

/// The spool as append-only segments (issue 15): many batches share a
/// segment, settle marks keep acknowledged ones from coming back after a
/// restart, and nothing damaged is ever read back as a batch.
final class SpoolSegmentTests: XCTestCase {
    private func exitEvent(_ pid: UInt32) -> TapioEvent {
        TapioEvent(kind: .processExit, timeNs: 1_000, pid: pid, comm: "c")
    }

    private func limits(events: Int) -> Outbox.Limits {
        var limits = Outbox.Limits()
        limits.maxEvents = events
        return limits
    }

    private func drops(_ outbox: Outbox, _ reason: String) -> UInt64 {
        outbox.stats.drops.filter { $0.reason == reason }.reduce(0) { $0 + $1.count }
    }

    private func batches(_ outbox: Outbox) throws -> [EventBatch] {
        try outbox.sealedPayloadsForTesting().map { try EventBatch.decode($0) }
    }

    private func files(_ dir: String) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).sorted()
    }

    private func segments(_ dir: String) -> [String] {
        files(dir).filter { $0.hasPrefix("segment-") && $0.hasSuffix(".spool") }
    }

    private func segmentRecords(_ dir: String) -> [(path: String, piece: SpoolRecord.Piece)] {
        segments(dir).flatMap { name -> [(path: String, piece: SpoolRecord.Piece)] in
            let path = dir + "/" + name
            let bytes = [UInt8](FileManager.default.contents(atPath: path) ?? Data())
            return bytes.withUnsafeBytes { SpoolRecord.scan($0) }.map { (path, $0) }
        }
    }

    private func flip(_ path: String, at offset: Int, mask: UInt8 = 0x10) throws {
        var bytes = [UInt8](try XCTUnwrap(FileManager.default.contents(atPath: path)))
        bytes[offset] ^= mask
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    /// An earlier process (epoch 5) that sealed `count` batches of `events` events and died.
    private func earlierRun(_ spool: String, batches count: Int, events: Int = 1) throws {
        let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: events), spoolDirectory: spool)
        for pid in 1...(count * events) { outbox.add(exitEvent(UInt32(pid))) }
        XCTAssertEqual(outbox.unacknowledged, count)
    }

    func testManyBatchesShareOneSegmentWhichGoesOnlyWhenAllAreAcknowledgedInAnyOrder() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        try earlierRun(spool, batches: 20)
        XCTAssertEqual(segments(spool).count, 1, "twenty batches, one file: \(files(spool))")
        XCTAssertEqual(segmentRecords(spool).map(\.piece.sequence), Array(1...20))
        XCTAssertTrue(segmentRecords(spool).allSatisfy(\.piece.intact))

        let outbox = try Outbox(node: "n", epoch: 6, limits: limits(events: 1), spoolDirectory: spool)
        var order = Array(UInt64(1)...20)
        order.shuffle()
        for (i, sequence) in order.enumerated() {
            XCTAssertEqual(segments(spool).count, 1, "\(i) of 20 acknowledged")
            outbox.acknowledge(epoch: 5, sequence: sequence)
        }
        XCTAssertEqual(outbox.unacknowledged, 0)
        XCTAssertEqual(files(spool).filter { $0.hasPrefix("segment-") }, [], "the segment and its marks are gone once all are acknowledged")
        XCTAssertEqual(outbox.stats.spoolBytes, 0)
    }

    func testTheSegmentBeingAppendedToStartsOverOnceEverythingInItIsAcknowledged() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 1), spoolDirectory: spool)
        for pid in 1...10 { outbox.add(exitEvent(UInt32(pid))) }
        outbox.acknowledgePrefix(epoch: 5, through: 10)
        XCTAssertEqual(outbox.stats.spoolBytes, 0, "nothing held counts against the budget")
        outbox.add(exitEvent(11))
        XCTAssertEqual(segmentRecords(spool).map(\.piece.sequence), [11], "the same file, from its start: \(files(spool))")
        let next = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        XCTAssertEqual(try batches(next).map(\.sequence), [11])
    }

    func testARestartWithAPartlyAcknowledgedSegmentDeliversExactlyTheUnacknowledgedBatches() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 1), spoolDirectory: spool)
            for pid in 1...30 { outbox.add(exitEvent(UInt32(pid))) }
            for sequence in stride(from: UInt64(1), through: 30, by: 2) { outbox.acknowledge(epoch: 5, sequence: sequence) }
            // No shutdown: the process dies here.
        }
        XCTAssertEqual(segments(spool).count, 1)
        let restarted = try Outbox(node: "n", epoch: 6, limits: limits(events: 1), spoolDirectory: spool)
        XCTAssertEqual(try batches(restarted).map(\.sequence), Array(stride(from: UInt64(2), through: 30, by: 2)))
        XCTAssertEqual(try batches(restarted).flatMap(\.events).map(\.pid), Array(stride(from: UInt32(2), through: 30, by: 2)))
        XCTAssertEqual(drops(restarted, "spool_corrupt"), 0)
        // Acknowledged after the restart: the next start has fewer still.
        for sequence in [UInt64(2), 4, 30] { restarted.acknowledge(epoch: 5, sequence: sequence) }
        let again = try Outbox(node: "n", epoch: 7, limits: limits(events: 1), spoolDirectory: spool)
        XCTAssertEqual(try batches(again).map(\.sequence), Array(stride(from: UInt64(6), through: 28, by: 2)))
    }

    func testATornTailIsCountedOnceAndTheRecordsBeforeItAreDelivered() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        try earlierRun(spool, batches: 3, events: 4)
        let last = try XCTUnwrap(segmentRecords(spool).last)
        XCTAssertEqual(last.piece.sequence, 3)
        // The write of the last record was interrupted halfway through its payload.
        XCTAssertEqual(truncate(last.path, off_t(last.piece.offset + last.piece.length - 7)), 0)
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        XCTAssertEqual(try batches(restarted).map(\.sequence), [1, 2])
        XCTAssertEqual(drops(restarted, "spool_corrupt"), 4, "its header still tells how many events it held")
        XCTAssertEqual(files(spool + "/quarantine").count, 1)
        let again = try Outbox(node: "n", epoch: 7, spoolDirectory: spool)
        XCTAssertEqual(drops(again, "spool_corrupt"), 4, "counted once, not again at the next start")
        XCTAssertEqual(try batches(again).map(\.sequence), [1, 2])
        XCTAssertEqual(files(spool + "/quarantine").count, 1)
    }

    func testAFlippedBitInMiddleRecordsCountsThoseRecordsAndDeliversTheRest() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        try earlierRun(spool, batches: 5, events: 3)
        let records = segmentRecords(spool)
        XCTAssertEqual(records.map(\.piece.sequence), [1, 2, 3, 4, 5])
        // One bit in record 2's header (its length is unknown now: the scan
        // finds record 3 by its own header), one in record 4's payload.
        try flip(records[1].path, at: records[1].piece.offset + 13)
        try flip(records[3].path, at: records[3].piece.offset + records[3].piece.length - 2)
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        let kept = try batches(restarted)
        XCTAssertEqual(kept.map(\.sequence), [1, 3, 5])
        XCTAssertEqual(kept.flatMap(\.events).map(\.pid), [1, 2, 3, 7, 8, 9, 13, 14, 15])
        XCTAssertEqual(drops(restarted, "spool_corrupt"), 1 + 3, "the damaged header as at least one, the damaged payload's three exactly")
        XCTAssertEqual(files(spool + "/quarantine").count, 2)
        for sequence in [UInt64(1), 3, 5] { restarted.acknowledge(epoch: 5, sequence: sequence) }
        XCTAssertEqual(segments(spool), [], "settled, damaged pieces included")
    }

    func testASpoolLeftByTheOldVersionIsDeliveredOnceThenRemoved() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        for sequence in UInt64(1)...3 {
            let events = (1...3).map { exitEvent(UInt32(sequence * 10) + $0) }
            let payload = EventBatch(node: "n", epoch: 4, sequence: sequence, events: events).encoded()
            try Data(SpoolRecord(epoch: 4, sequence: sequence, eventCount: 3, payload: payload).encode())
                .write(to: URL(fileURLWithPath: spool + "/4-\(sequence).batch"))
        }
        let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 2), spoolDirectory: spool)
        for pid in 100...101 { outbox.add(exitEvent(UInt32(pid))) }
        XCTAssertEqual(files(spool).filter { $0.hasSuffix(".batch") }, ["4-1.batch", "4-2.batch", "4-3.batch"], "new batches go to a segment")
        XCTAssertEqual(segmentRecords(spool).map(\.piece.epoch), [5])
        var sent: [String] = []
        while let next = outbox.nextToSend(window: 32) {
            sent.append("\(next.epoch)-\(next.sequence)")
            XCTAssertEqual(try EventBatch.decode(next.payload).sequence, next.sequence)
        }
        XCTAssertEqual(sent, ["4-1", "4-2", "4-3", "5-1"])
        for sequence in UInt64(1)...3 { outbox.acknowledge(epoch: 4, sequence: sequence) }
        XCTAssertEqual(files(spool).filter { $0.contains(".batch") }, [], "each old file goes once its batch is acknowledged")
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        XCTAssertEqual(try batches(restarted).map { "\($0.epoch)-\($0.sequence)" }, ["5-1"], "delivered once")
    }

    func testGivingBackTheNewestRecordAtAFullDiskCutsTheSegmentPastSettledRecordsAfterIt() throws {
        let dir = try TestSupport.temporaryDirectory("tapio-spool")
        let store = SpoolSegments(directory: dir, segmentBytes: 1 << 20)
        XCTAssertEqual(try store.load().batches.count, 0)
        let records = (UInt64(1)...3).map { sequence in
            SpoolSegments.Record(epoch: 5, sequence: sequence, events: 1,
                                 payload: EventBatch(node: "n", epoch: 5, sequence: sequence, events: [exitEvent(UInt32(sequence))]).encoded())
        }
        let locations = store.append(records).compactMap { $0 }
        XCTAssertEqual(locations.count, 3)
        guard case .segment(let first) = locations[0] else { return XCTFail("\(locations)") }
        store.release([locations[2]])
        // Sequence 2 makes room: the bytes of 2 and of the settled 3 go back.
        store.releaseFreeing(locations[1])
        let path = dir + "/" + (try XCTUnwrap(segments(dir).first))
        XCTAssertEqual(try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int, first.length)
        XCTAssertEqual(store.deadBytes, 0)
        XCTAssertEqual(try store.read(locations[0]).get(), records[0].payload)
        // The next append goes where the cut left off.
        let next = store.append([records[2]])
        guard case .segment(let again)? = next.first else { return XCTFail("\(next)") }
        XCTAssertEqual(again.offset, first.length)
        XCTAssertEqual(try store.read(.segment(again)).get(), records[2].payload)
    }

    /// A process killed between the append and its fdatasync (or a machine
    /// that lost the end of the write) leaves a segment cut short anywhere,
    /// or the right length with zeros or garbage at the end. At no cut is
    /// anything read back that is not exactly a batch that was written.
    func testASegmentCutAnywhereNeverYieldsARecordReadBackWrong() throws {
        let source = try TestSupport.temporaryDirectory("tapio-spool")
        try earlierRun(source, batches: 3, events: 2)
        let original = try XCTUnwrap(segments(source).first)
        let bytes = [UInt8](try XCTUnwrap(FileManager.default.contents(atPath: source + "/" + original)))
        let written = try batches(Outbox(node: "n", epoch: 6, spoolDirectory: source))
        XCTAssertEqual(written.count, 3)
        let ends = segmentRecords(source).map { $0.piece.offset + $0.piece.length }
        let spool = try TestSupport.temporaryDirectory("tapio-spool-cut")
        var random = SystemRandomNumberGenerator()
        for cut in 0..<bytes.count {
            for tail in ["none", "zeros", "garbage"] {
                for name in files(spool) { try FileManager.default.removeItem(atPath: spool + "/" + name) }
                var damaged = Array(bytes[0..<cut])
                switch tail {
                case "zeros": damaged += [UInt8](repeating: 0, count: bytes.count - cut)
                case "garbage": damaged += (cut..<bytes.count).map { _ in UInt8.random(in: 0...255, using: &random) }
                default: break
                }
                try Data(damaged).write(to: URL(fileURLWithPath: spool + "/" + original))
                let outbox = try Outbox(node: "n", epoch: 7, spoolDirectory: spool)
                let kept = try batches(outbox)
                let whole = ends.filter { $0 <= cut }.count
                XCTAssertEqual(kept.count, whole, "cut at \(cut) (\(tail)): the records written in full, and no other")
                XCTAssertEqual(kept, Array(written.prefix(kept.count)), "cut at \(cut) (\(tail))")
                // Cut between records with nothing after it: a write that never began.
                if cut < bytes.count, tail != "none" || !([0] + ends).contains(cut) {
                    XCTAssertGreaterThan(drops(outbox, "spool_corrupt"), 0, "cut at \(cut) (\(tail)): the torn record is counted")
                }
            }
        }
    }
}
