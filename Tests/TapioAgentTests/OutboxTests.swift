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

    func testGroupsAndSingleEventsAreSealedOnceEachInOrderInWholeBatches() throws {
        var limits = Outbox.Limits()
        limits.maxEvents = 10
        limits.maxDelayNs = 1_000_000_000_000
        let outbox = try Outbox(node: "n", epoch: 1, limits: limits, spoolDirectory: nil)
        var pid: UInt32 = 0
        // Groups that are a batch on their own, smaller, larger, and single
        // events between them: batches fill across them in order.
        for size in [10, 4, 10, 10, 23, 0, 1, 10, 6] {
            var group: [TapioEvent] = []
            for _ in 0..<size {
                pid += 1
                group.append(exitEvent(pid))
            }
            outbox.add(contentsOf: &group, critical: false)
            if size % 2 == 0 {
                pid += 1
                outbox.add(exitEvent(pid))
            }
        }
        XCTAssertEqual(outbox.pendingEvents, Int(pid) % 10, "whole batches sealed, the rest waits")
        outbox.sealIfDue(nowNs: 0, force: true)
        let all = try outbox.sealedPayloadsForTesting().map { try EventBatch.decode($0) }
        XCTAssertEqual(all.flatMap(\.events).map(\.pid), Array(1...pid))
        XCTAssertEqual(all.map(\.events.count), Array(repeating: 10, count: Int(pid) / 10) + [Int(pid) % 10])
        var oom = [exitEvent(pid + 1, kind: .oomKill)]
        outbox.add(contentsOf: &oom, critical: true)
        XCTAssertEqual(outbox.unacknowledged, all.count + 1, "a group with an OOM kill goes out at once")
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

/// Defects of issue 14, agent side: each test fails on the outbox as it was at 8a06dfd.
final class OutboxDeliveryTests: XCTestCase {
    private func exitEvent(_ pid: UInt32, comm: String = "c") -> TapioEvent {
        TapioEvent(kind: .processExit, timeNs: 1_000, pid: pid, comm: comm)
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

    /// The records in the spool's segment files, oldest first, with the file each is in.
    private func segmentRecords(_ dir: String) -> [(path: String, piece: SpoolRecord.Piece)] {
        files(dir).filter { $0.hasPrefix("segment-") && $0.hasSuffix(".spool") }.flatMap { name -> [(path: String, piece: SpoolRecord.Piece)] in
            let path = dir + "/" + name
            let bytes = [UInt8](FileManager.default.contents(atPath: path) ?? Data())
            return bytes.withUnsafeBytes { SpoolRecord.scan($0) }.map { (path, $0) }
        }
    }

    /// Overwrites bytes of a file in place.
    private func overwrite(_ path: String, at offset: Int, with bytes: [UInt8]) throws {
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: path))
        defer { handle.closeFile() }
        handle.seek(toFileOffset: UInt64(offset))
        handle.write(Data(bytes))
    }

    // MARK: 7: batches the server refuses

    func testSealedBatchesStayWithinTheByteBudgetAndKeepEveryEventInOrder() throws {
        var limits = Outbox.Limits()
        limits.maxBatchBytes = 4_000
        let outbox = try Outbox(node: "n", epoch: 1, limits: limits, spoolDirectory: nil)
        // Distinct strings: the batch's string table would share equal ones.
        for pid in 1...300 { outbox.add(exitEvent(UInt32(pid), comm: String(repeating: "x", count: 200) + "\(pid)")) }
        outbox.sealIfDue(nowNs: 0, force: true)
        let payloads = outbox.sealedPayloadsForTesting()
        XCTAssertGreaterThan(payloads.count, 10, "about 66 kB of events in batches of at most 4 kB")
        XCTAssertTrue(payloads.allSatisfy { $0.count <= 4_000 }, "\(payloads.map(\.count).max() ?? 0) bytes")
        let all = try batches(outbox)
        XCTAssertEqual(all.map(\.sequence), Array(1...UInt64(all.count)))
        XCTAssertEqual(all.flatMap(\.events).map(\.pid), Array(1...300).map(UInt32.init))
    }

    func testWithDefaultLimitsNoBatchIsLargerThanTheServersDefaultFrameLimit() throws {
        let outbox = try Outbox(node: "n", epoch: 1, spoolDirectory: nil)
        // 512 events of 10 kB each: one 5 MB batch would be refused forever.
        for pid in 1...512 { outbox.add(exitEvent(UInt32(pid), comm: String(repeating: "z", count: 10_000) + "\(pid)")) }
        let sizes = outbox.sealedPayloadsForTesting().map(\.count)
        XCTAssertTrue(sizes.allSatisfy { $0 <= Outbox.Limits().maxBatchBytes && $0 < Int(FrameHeader.defaultMaximumPayload) }, "\(sizes)")
        XCTAssertEqual(try batches(outbox).reduce(0) { $0 + $1.events.count }, 512)
    }

    func testABatchNeverSentIsSealedAgainWithinTheLimitsTheServerAnnounced() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let outbox = try Outbox(node: "n", epoch: 1, limits: limits(events: 100), spoolDirectory: spool)
            for pid in 1...105 { outbox.add(exitEvent(UInt32(pid))) }
            outbox.sealIfDue(nowNs: 0, force: true)
            outbox.applyServerLimits(maxBatchEvents: 40, maxFrameBytes: 4 << 20)
            var sent: [UInt64] = []
            while let next = outbox.nextToSend(window: 32) {
                sent.append(next.sequence)
                XCTAssertLessThanOrEqual(try EventBatch.decode(next.payload).events.count, 40)
            }
            XCTAssertEqual(sent, [1, 3, 4, 2], "the first part keeps the sequence, which was never used")
            XCTAssertEqual(drops(outbox, "batch_too_large"), 0)
        }
        let restarted = try Outbox(node: "n", epoch: 2, spoolDirectory: spool)
        let kept = try batches(restarted)
        XCTAssertEqual(kept.map(\.sequence), [1, 2, 3, 4], "the spool holds the parts, not the refused whole")
        XCTAssertEqual(kept.flatMap(\.events).map(\.pid).sorted(), Array(1...105).map(UInt32.init))
    }

    func testABatchSentBeforeTheServerAnnouncedLowerLimitsIsDroppedAndCountedInsteadOfBlockingTheRest() throws {
        let outbox = try Outbox(node: "n", epoch: 1, limits: limits(events: 100), spoolDirectory: nil)
        for pid in 1...100 { outbox.add(exitEvent(UInt32(pid))) }
        for pid in 101...105 { outbox.add(exitEvent(UInt32(pid))) }
        outbox.sealIfDue(nowNs: 0, force: true)
        XCTAssertEqual(outbox.unacknowledged, 2)
        // Sent once without an ack (a server with other limits, then a reconnect): it may be stored.
        XCTAssertEqual(outbox.nextToSend(window: 1)?.sequence, 1)
        outbox.markAllUnsent()

        outbox.applyServerLimits(maxBatchEvents: 50, maxFrameBytes: 4 << 20)
        let next = try XCTUnwrap(outbox.nextToSend(window: 32))
        XCTAssertEqual(next.sequence, 2, "the batch of 100 is not sent to be refused forever")
        XCTAssertEqual(drops(outbox, "batch_too_large"), 100, "its events are counted")
        outbox.acknowledge(epoch: 1, sequence: 2)
        XCTAssertEqual(outbox.unacknowledged, 0)

        // Later batches are sealed within the announced limit.
        for pid in 201...320 { outbox.add(exitEvent(UInt32(pid))) }
        outbox.sealIfDue(nowNs: 0, force: true)
        XCTAssertEqual(try batches(outbox).map(\.events.count), [50, 50, 20])
        let counted = try XCTUnwrap(try batches(outbox).first?.drops.first { $0.reason == "batch_too_large" })
        XCTAssertEqual(counted.count, 100, "the count reaches the server in the next batches")
    }

    func testABatchSentBeforeAndLargerThanTheServersFrameLimitIsDroppedAndCounted() throws {
        let outbox = try Outbox(node: "n", epoch: 1, limits: limits(events: 200), spoolDirectory: nil)
        for pid in 1...200 { outbox.add(exitEvent(UInt32(pid), comm: String(repeating: "y", count: 100) + "\(pid)")) }
        outbox.add(exitEvent(999))
        outbox.sealIfDue(nowNs: 0, force: true)
        XCTAssertEqual(outbox.nextToSend(window: 1)?.sequence, 1)
        outbox.markAllUnsent()
        outbox.applyServerLimits(maxBatchEvents: 0, maxFrameBytes: 8_000)
        XCTAssertEqual(outbox.nextToSend(window: 32)?.sequence, 2)
        XCTAssertEqual(drops(outbox, "batch_too_large"), 200)
    }

    // MARK: 8: unreadable spool records

    func testSpoolRecordsRoundTripAndEveryTruncationOrFlippedBitIsRefusedWithoutTrapping() throws {
        let record = SpoolRecord(epoch: 7, sequence: 9, eventCount: 3, payload: Array("payload bytes".utf8))
        let bytes = record.encode()
        XCTAssertEqual(try SpoolRecord.decode(bytes), record)
        for n in 0..<bytes.count {
            XCTAssertThrowsError(try SpoolRecord.decode(Array(bytes[0..<n])), "truncated to \(n)")
        }
        for i in 0..<bytes.count {
            for bit in 0..<8 {
                var damaged = bytes
                damaged[i] ^= 1 << UInt8(bit)
                XCTAssertThrowsError(try SpoolRecord.decode(damaged), "byte \(i) bit \(bit)")
            }
        }
        XCTAssertThrowsError(try SpoolRecord.decode(bytes + [0]), "trailing bytes")
        var random = SystemRandomNumberGenerator()
        for _ in 0..<2_000 {
            let garbage = (0..<Int.random(in: 0...80, using: &random)).map { _ in UInt8.random(in: 0...255, using: &random) }
            _ = try? SpoolRecord.decode(garbage)
            _ = try? SpoolRecord.decode(Array(bytes[0..<8]) + garbage)
        }
        // A damaged payload behind an intact header still tells how many events were lost.
        var payloadDamaged = bytes
        payloadDamaged[bytes.count - 1] ^= 0xFF
        XCTAssertThrowsError(try SpoolRecord.decode(payloadDamaged)) { error in
            XCTAssertEqual((error as? SpoolRecord.DecodeError)?.eventCount, 3)
        }
        XCTAssertThrowsError(try SpoolRecord.decode(Array(bytes.dropLast(4)))) { error in
            XCTAssertEqual((error as? SpoolRecord.DecodeError)?.eventCount, 3, "a torn write")
        }
    }

    func testAnUnreadableSpoolRecordIsQuarantinedAndCountedAndTheOthersAreStillSent() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool)
            for pid in 1...30 { outbox.add(exitEvent(UInt32(pid))) }
        }
        // Sequence 2's payload damaged in its segment, and (as an older agent
        // left them) a garbage file and a "file" that cannot be read at all.
        let damaged = try XCTUnwrap(segmentRecords(spool).first { $0.piece.sequence == 2 })
        let at = damaged.piece.offset + damaged.piece.length - 3
        let byte = try XCTUnwrap(FileManager.default.contents(atPath: damaged.path))[at]
        try overwrite(damaged.path, at: at, with: [byte ^ 0x40])
        try Data("not a batch".utf8).write(to: URL(fileURLWithPath: spool + "/5-7.batch"))
        try FileManager.default.createDirectory(atPath: spool + "/5-8.batch", withIntermediateDirectories: false)

        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        XCTAssertEqual(restarted.unacknowledged, 2)
        XCTAssertEqual(drops(restarted, "spool_corrupt"), 12, "10 events of the damaged record, at least 1 for each unreadable one")
        XCTAssertEqual(files(spool + "/quarantine").count, 3)
        XCTAssertEqual(restarted.nextToSend(window: 32)?.sequence, 1)
        XCTAssertEqual(restarted.nextToSend(window: 32)?.sequence, 3)
        XCTAssertNil(restarted.nextToSend(window: 32))

        // Until a batch carries the count, it survives another restart.
        let again = try Outbox(node: "n", epoch: 7, spoolDirectory: spool)
        XCTAssertEqual(drops(again, "spool_corrupt"), 12)
        XCTAssertEqual(again.unacknowledged, 2)
    }

    func testARecordDamagedWhileSpooledIsQuarantinedWhenItsTurnComes() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool)
            for pid in 1...20 { outbox.add(exitEvent(UInt32(pid))) }
        }
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        let first = try XCTUnwrap(segmentRecords(spool).first { $0.piece.sequence == 1 })
        try overwrite(first.path, at: first.piece.offset, with: Array("overwritten".utf8))
        XCTAssertEqual(restarted.nextToSend(window: 32)?.sequence, 2)
        XCTAssertEqual(drops(restarted, "spool_corrupt"), 10)
        XCTAssertEqual(files(spool + "/quarantine").count, 1)
    }

    func testAnInterruptedSpoolWriteIsKeptWhenCompleteAndCountedWhenTorn() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        let complete = SpoolRecord(epoch: 3, sequence: 1, eventCount: 1,
                                   payload: EventBatch(node: "n", epoch: 3, sequence: 1, events: [exitEvent(1)]).encoded()).encode()
        let torn = SpoolRecord(epoch: 3, sequence: 2, eventCount: 4,
                               payload: EventBatch(node: "n", epoch: 3, sequence: 2, events: (1...4).map { exitEvent($0) }).encoded()).encode()
        try Data(complete).write(to: URL(fileURLWithPath: spool + "/3-1.batch.tmp"))
        try Data(torn.dropLast(5)).write(to: URL(fileURLWithPath: spool + "/3-2.batch.tmp"))
        let outbox = try Outbox(node: "n", epoch: 4, spoolDirectory: spool)
        XCTAssertEqual(try batches(outbox).map(\.sequence), [1])
        XCTAssertEqual(drops(outbox, "spool_corrupt"), 4)
        XCTAssertTrue(files(spool).contains("3-1.batch"))
    }

    func testABatchSpooledBeforeRecordsExistedIsKept() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        let bare = EventBatch(node: "n", epoch: 3, sequence: 4, events: (1...5).map { exitEvent($0) }).encoded()
        try Data(bare).write(to: URL(fileURLWithPath: spool + "/3-4.batch"))
        let outbox = try Outbox(node: "n", epoch: 4, spoolDirectory: spool)
        XCTAssertEqual(try batches(outbox).map(\.events.count), [5])
        XCTAssertEqual(drops(outbox, "spool_corrupt"), 0)
        XCTAssertEqual(try SpoolRecord.decode([UInt8](try XCTUnwrap(FileManager.default.contents(atPath: spool + "/3-4.batch")))).payload, bare)
    }

    func testAnyCarriedCountFileIsReadWithoutTrapping() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        try Data("0 spool_corrupt 18446744073709551615\ngarbage\n99 x 1\n1 queue_full -3\n\n".utf8).write(to: URL(fileURLWithPath: spool + "/carried-drops"))
        try Data("junk".utf8).write(to: URL(fileURLWithPath: spool + "/1-1.batch"))
        let outbox = try Outbox(node: "n", epoch: 2, spoolDirectory: spool)
        XCTAssertEqual(outbox.stats.drops, [DropCount(kind: .unspecified, reason: "spool_corrupt", count: .max)], "saturated, not overflowed")
    }

    // MARK: 9: losses at shutdown reach the server

    func testEventsThatDoNotFitTheSpoolAtShutdownAreCountedAndReportedByTheNextStart() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        var small = limits(events: 10)
        let probe = try Outbox(node: "n", epoch: 5, limits: small, spoolDirectory: nil)
        for pid in 1...10 { probe.add(exitEvent(UInt32(pid))) }
        let recordBytes = SpoolRecord.headerSize + (probe.sealedPayloadsForTesting().first?.count ?? 0)
        small.maxSpoolBytes = recordBytes * 3 / 2
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: small, spoolDirectory: spool)
            for pid in 1...30 { outbox.add(exitEvent(UInt32(pid))) }
            XCTAssertEqual(outbox.spoolRemaining(), 20, "one batch fits the spool, two do not")
            XCTAssertEqual(drops(outbox, "spool_full"), 20)
        }
        let restarted = try Outbox(node: "n", epoch: 6, limits: small, spoolDirectory: spool)
        XCTAssertEqual(drops(restarted, "spool_full"), 20, "carried over into the new epoch's counters")
        XCTAssertTrue(files(spool).contains("carried-drops"))
        // The previous run's batch is acknowledged; the next batch carries the count and is kept on disk.
        restarted.acknowledge(epoch: 5, sequence: 1)
        restarted.add(exitEvent(99))
        restarted.sealIfDue(nowNs: 0, force: true)
        let batch = try XCTUnwrap(try batches(restarted).first)
        XCTAssertEqual(batch.drops.first { $0.reason == "spool_full" }?.count, 20)
        XCTAssertFalse(files(spool).contains("carried-drops"), "cleared once a kept batch carries it")

        let third = try Outbox(node: "n", epoch: 7, limits: small, spoolDirectory: spool)
        XCTAssertEqual(drops(third, "spool_full"), 0, "not counted twice")
        XCTAssertEqual(try batches(third).map(\.epoch), [6], "the batch carrying it is resent instead")
    }

    func testWhenTheSpoolHasNoRoomEvenForTheCountTheNewestSpooledBatchMakesRoomAndIsCounted() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        let mounted = getuid() == 0 && (try? TestSupport.run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=64k", "tmpfs", spool]))?.status == 0
        try XCTSkipUnless(mounted, "needs root to mount a tiny tmpfs")
        defer { _ = try? TestSupport.run("/usr/bin/umount", ["-l", spool]) }
        do {
            // 30 batches of about 3 kB: the 64 kB filesystem takes about 16 of them.
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool)
            for pid in 1...300 { outbox.add(exitEvent(UInt32(pid), comm: String(repeating: "s", count: 250) + "\(pid)")) }
            let lost = outbox.spoolRemaining()
            XCTAssertGreaterThan(lost, 0)
            XCTAssertEqual(drops(outbox, "spool_full"), UInt64(lost))
            XCTAssertTrue(files(spool).contains("carried-drops"), "\(files(spool))")
        }
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        let kept = try batches(restarted).reduce(0) { $0 + $1.events.count }
        XCTAssertGreaterThan(kept, 0)
        XCTAssertEqual(UInt64(kept) + drops(restarted, "spool_full"), 300, "every event kept or counted")
    }

    func testACountThatCannotBeSavedForAnotherReasonCostsNoSpooledBatch() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        try FileManager.default.createDirectory(atPath: spool + "/carried-drops.tmp", withIntermediateDirectories: false)
        let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool)
        for pid in 1...20 { outbox.add(exitEvent(UInt32(pid))) }
        outbox.countDrop(kind: .processExec, reason: "queue_full", count: 2)
        XCTAssertEqual(outbox.spoolRemaining(), 0)
        XCTAssertEqual(outbox.unacknowledged, 2)
    }

    func testCountsNoBatchCarriesYetAreSavedAtShutdown() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool)
            for pid in 1...10 { outbox.add(exitEvent(UInt32(pid))) }
            outbox.acknowledge(epoch: 5, sequence: 1)
            outbox.countDrop(kind: .processExec, reason: "queue_full", count: 3)
            outbox.setKernelDrops([DropCount(kind: .processExec, reason: "ringbuf_full", count: 4)])
            XCTAssertEqual(outbox.spoolRemaining(), 0)
        }
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        XCTAssertEqual(Set(restarted.stats.drops), [DropCount(kind: .processExec, reason: "queue_full", count: 3),
                                                     DropCount(kind: .processExec, reason: "ringbuf_full", count: 4)])
        restarted.setKernelDrops([DropCount(kind: .processExec, reason: "ringbuf_full", count: 2)])
        XCTAssertEqual(restarted.stats.drops.first { $0.reason == "ringbuf_full" }?.count, 6, "the new kernel count adds to the carried one")
    }

    func testCountsNoBatchCarriesGoOutWithoutWaitingForAnEvent() throws {
        var quick = limits(events: 10)
        quick.maxDelayNs = 1_000
        let outbox = try Outbox(node: "n", epoch: 5, limits: quick, spoolDirectory: nil)
        outbox.sealIfDue(nowNs: 10_000)
        XCTAssertEqual(outbox.unacknowledged, 0, "nothing to say")
        outbox.countDrop(kind: .processExec, reason: "queue_full", count: 3)
        outbox.sealIfDue(nowNs: 20_000)
        let batch = try XCTUnwrap(try batches(outbox).first)
        XCTAssertEqual(batch.events, [])
        XCTAssertEqual(batch.drops, [DropCount(kind: .processExec, reason: "queue_full", count: 3)])
        outbox.sealIfDue(nowNs: 30_000)
        XCTAssertEqual(outbox.unacknowledged, 1, "the same counts go out once")
        outbox.countDrop(kind: .processExec, reason: "queue_full")
        outbox.sealIfDue(nowNs: 20_500)
        XCTAssertEqual(outbox.unacknowledged, 1, "at most one batch of counts only per batch delay")
        outbox.sealIfDue(nowNs: 21_000)
        XCTAssertEqual(outbox.unacknowledged, 2)
        XCTAssertEqual(try batches(outbox).last?.drops.first?.count, 4)
    }

    // MARK: 10: a crash loses nothing sealed

    func testEverySealedBatchIsOnDiskAtOnceSoAKilledAgentLosesNone() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool)
            for pid in 1...25 { outbox.add(exitEvent(UInt32(pid))) }
            outbox.sealIfDue(nowNs: 0, force: true)
            outbox.acknowledge(epoch: 5, sequence: 2)
            // No shutdown: the process dies here.
        }
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        let kept = try batches(restarted)
        XCTAssertEqual(kept.map(\.sequence), [1, 3], "the acknowledged batch's file is gone")
        XCTAssertEqual(kept.flatMap(\.events).map(\.pid), Array(1...10).map(UInt32.init) + Array(21...25).map(UInt32.init))
    }

    // MARK: 11: spool losses count events

    func testASpooledBatchThatVanishesCountsItsEventsNotOne() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        var oneBatchEach = limits(events: 10)
        oneBatchEach.segmentBytes = 1
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: oneBatchEach, spoolDirectory: spool)
            for pid in 1...20 { outbox.add(exitEvent(UInt32(pid))) }
        }
        let restarted = try Outbox(node: "n", epoch: 6, spoolDirectory: spool)
        try FileManager.default.removeItem(atPath: try XCTUnwrap(segmentRecords(spool).first { $0.piece.sequence == 1 }).path)
        XCTAssertEqual(restarted.nextToSend(window: 32)?.sequence, 2)
        XCTAssertEqual(drops(restarted, "spool_lost"), 10)
    }

    // MARK: Acknowledgements (protocol version 2)

    func testAnAckRemovesExactlyItsBatchAndTheHelloAckPrefixOnlyThisEpochs() throws {
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        do {
            let old = try Outbox(node: "n", epoch: 5, limits: limits(events: 1), spoolDirectory: spool)
            for pid in 1...3 { old.add(exitEvent(UInt32(pid))) }
        }
        let outbox = try Outbox(node: "n", epoch: 6, limits: limits(events: 1), spoolDirectory: spool)
        for pid in 4...7 { outbox.add(exitEvent(UInt32(pid))) }
        func held() throws -> [String] { try batches(outbox).map { "\($0.epoch)-\($0.sequence)" } }
        XCTAssertEqual(try held(), ["5-1", "5-2", "5-3", "6-1", "6-2", "6-3", "6-4"])
        outbox.acknowledge(epoch: 6, sequence: 2)
        XCTAssertEqual(try held(), ["5-1", "5-2", "5-3", "6-1", "6-3", "6-4"], "an ack says nothing about the batches before it")
        outbox.acknowledge(epoch: 5, sequence: 3)
        XCTAssertEqual(try held(), ["5-1", "5-2", "6-1", "6-3", "6-4"])
        outbox.acknowledgePrefix(epoch: 6, through: 3)
        XCTAssertEqual(try held(), ["5-1", "5-2", "6-4"])
        // What the spool holds for the next start: exactly the batches not acknowledged.
        let next = try Outbox(node: "n", epoch: 7, limits: limits(events: 1), spoolDirectory: spool)
        XCTAssertEqual(try batches(next).map { "\($0.epoch)-\($0.sequence)" }, ["5-1", "5-2", "6-4"])
    }
}
