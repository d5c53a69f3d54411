import Foundation
@testable import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

/// The crash counters: what a process read and never kept is reported by the
/// next start as `agent_killed`, exactly once. A process "killed" here is an
/// outbox dropped without `spoolRemaining`: its counters file keeps what the
/// page cache would keep after kill -9.
final class CrashCountersTests: XCTestCase {
    private var dir = ""
    private var spool: String { dir + "/spool" }

    override func setUpWithError() throws {
        dir = try TestSupport.temporaryDirectory("tapio-counters")
    }

    override func tearDown() {
        try? FileManager.default.removeItem(atPath: dir)
    }

    private func event(_ pid: UInt32, _ kind: EventKind = .processExec) -> TapioEvent {
        TapioEvent(kind: kind, timeNs: 1_000, pid: pid, comm: "c")
    }

    private func limits(events: Int) -> Outbox.Limits {
        var l = Outbox.Limits()
        l.maxEvents = events
        l.maxDelayNs = 1_000_000_000_000
        return l
    }

    private func drops(_ outbox: Outbox) -> [String: UInt64] {
        Dictionary(uniqueKeysWithValues: outbox.stats.drops.map { ("\($0.kind.name)/\($0.reason)", $0.count) })
    }

    private func spooledEvents(_ outbox: Outbox) throws -> Int {
        try outbox.sealedPayloadsForTesting().reduce(0) { $0 + (try EventBatch.decode($1).events.count) }
    }

    func testEventsReadButNeverSpooledAreReportedPerKindByTheNextStart() throws {
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
            for pid in 1...25 { outbox.add(event(UInt32(pid))) }
            for pid in 1...3 { outbox.add(event(UInt32(pid), .processExit)) }
            // Two batches of 10 on disk; 5 exec and 3 exit events pending in memory.
            XCTAssertEqual(try spooledEvents(outbox), 20)
        }
        let restarted = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        XCTAssertEqual(restarted.recovered?.epoch, 5)
        XCTAssertEqual(drops(restarted), ["process_exec/agent_killed": 5, "process_exit/agent_killed": 3])
        XCTAssertEqual(try spooledEvents(restarted), 20, "the spooled batches are sent again")
        // The count goes out at once, in a batch of counts only, and not twice.
        restarted.sealIfDue(nowNs: 0, force: true)
        let last = try EventBatch.decode(try XCTUnwrap(restarted.sealedPayloadsForTesting().last))
        XCTAssertEqual(last.epoch, 6)
        XCTAssertEqual(last.drops.map { "\($0.kind.name)/\($0.reason)=\($0.count)" }.sorted(),
                       ["process_exec/agent_killed=5", "process_exit/agent_killed=3"])
    }

    func testACrashBeforeTheCountIsDeliveredReportsItOnceMoreNeverTwice() throws {
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
            for pid in 1...7 { outbox.add(event(UInt32(pid))) }
        }
        do {
            // Killed again before any batch carried the count.
            let second = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
            XCTAssertEqual(drops(second), ["process_exec/agent_killed": 7])
            second.add(event(100))
        }
        let third = try Outbox(node: "n", epoch: 7, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        XCTAssertEqual(drops(third), ["process_exec/agent_killed": 8], "the first process's 7 once, and the second's 1")
    }

    func testACountCarriedByASpooledBatchIsNotReportedAgain() throws {
        do {
            let second: Outbox
            do {
                let first = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
                for pid in 1...4 { first.add(event(UInt32(pid))) }
            }
            second = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
            // The next batch carries the 4 and is on disk: the second process
            // owes nothing when it is killed now.
            for pid in 1...10 { second.add(event(UInt32(pid), .processExit)) }
            XCTAssertEqual(try spooledEvents(second), 10)
        }
        let third = try Outbox(node: "n", epoch: 7, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        XCTAssertEqual(drops(third), [:], "the spooled batch of epoch 6 carries the count")
        let carried = try third.sealedPayloadsForTesting().map { try EventBatch.decode($0) }.flatMap(\.drops)
        XCTAssertEqual(carried.map { "\($0.kind.name)/\($0.reason)=\($0.count)" }, ["process_exec/agent_killed=4"])
    }

    func testDropCountsNoDurableBatchCarriedAreRecovered() throws {
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
            outbox.setKernelDrops([DropCount(kind: .dns, reason: "ringbuf_full", count: 30)])
            for pid in 1...10 { outbox.add(event(UInt32(pid))) }
            // After the batch (which carries 30) is on disk the kernel counts 12 more.
            outbox.setKernelDrops([DropCount(kind: .dns, reason: "ringbuf_full", count: 42)])
        }
        let restarted = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        XCTAssertEqual(drops(restarted), ["dns/ringbuf_full": 12], "the 30 reach the server with the spooled batch of epoch 5")
    }

    func testACleanStopLeavesNothingToRecover() throws {
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
            for pid in 1...15 { outbox.add(event(UInt32(pid))) }
            outbox.sealIfDue(nowNs: 0, force: true)
            XCTAssertEqual(outbox.spoolRemaining(), 0)
            XCTAssertEqual(outbox.closeCrashCounters(), [:], "every event read is accounted for")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/counters"))
        let restarted = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        XCTAssertNil(restarted.recovered)
        XCTAssertEqual(drops(restarted), [:])
        XCTAssertEqual(try spooledEvents(restarted), 15)
    }

    func testAcknowledgedAndDroppedEventsAreAccountedForWithoutASpool() throws {
        do {
            var l = limits(events: 10)
            l.maxMemoryBytes = 1
            let outbox = try Outbox(node: "n", epoch: 5, limits: l, spoolDirectory: nil, stateDirectory: dir)
            for pid in 1...10 { outbox.add(event(UInt32(pid))) }
            // Memory holds nothing: the batch is dropped and counted (queue_full).
            XCTAssertEqual(drops(outbox), ["unspecified/queue_full": 10])
            for pid in 1...3 { outbox.add(event(UInt32(pid), .processExit)) }
        }
        let restarted = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: nil, stateDirectory: dir)
        XCTAssertEqual(drops(restarted), ["unspecified/queue_full": 10, "process_exit/agent_killed": 3],
                       "the count no batch carried, and the events in memory")
    }

    func testWithoutASpoolLossesAtAStopAreCountedAndReportedByTheNextStart() throws {
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: nil, stateDirectory: dir)
            for pid in 1...14 { outbox.add(event(UInt32(pid))) }
            outbox.sealIfDue(nowNs: 0, force: true)
            XCTAssertEqual(outbox.spoolRemaining(), 14)
            XCTAssertEqual(outbox.closeCrashCounters(), [:])
        }
        let restarted = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: nil, stateDirectory: dir)
        XCTAssertNil(restarted.recovered)
        XCTAssertEqual(drops(restarted), ["unspecified/queue_full": 14])
    }

    func testEventsThatDoNotFitTheSpoolAtAStopAreAccountedForAsDropped() throws {
        var small = limits(events: 10)
        small.maxSpoolBytes = 1
        let outbox = try Outbox(node: "n", epoch: 5, limits: small, spoolDirectory: spool, stateDirectory: dir)
        for pid in 1...30 { outbox.add(event(UInt32(pid))) }
        XCTAssertEqual(outbox.spoolRemaining(), 30)
        XCTAssertEqual(outbox.closeCrashCounters(), [:], "counted as spool_full, so accounted for")
        let restarted = try Outbox(node: "n", epoch: 6, limits: small, spoolDirectory: spool, stateDirectory: dir)
        XCTAssertEqual(drops(restarted), ["unspecified/spool_full": 30], "from carried-drops, not twice")
    }

    func testEventsCountedAsReadAndNotYetHandedOverAreReportedByTheNextStart() throws {
        do {
            let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
            // As the ring-buffer reader does: each event counted as it is
            // read, then handed over a group at a time.
            var group: [TapioEvent] = []
            for pid in 1...10 {
                outbox.countRead(.processExec)
                group.append(event(UInt32(pid)))
            }
            outbox.add(contentsOf: &group, critical: false)
            XCTAssertTrue(group.isEmpty, "the group is taken over")
            // Read and counted, killed before the hand-over.
            for _ in 1...4 { outbox.countRead(.processExit) }
            XCTAssertEqual(try spooledEvents(outbox), 10, "the group was a whole batch, sealed and spooled")
        }
        let restarted = try Outbox(node: "n", epoch: 6, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        XCTAssertEqual(drops(restarted), ["process_exit/agent_killed": 4])
        XCTAssertEqual(try spooledEvents(restarted), 10)
    }

    func testGroupsHandedOverWithTheSpoolerRunningAreAllAccountedForAtAStop() throws {
        let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        outbox.startSpooler()
        var pid: UInt32 = 0
        for size in [10, 3, 10, 7, 25, 1, 10] {
            var group: [TapioEvent] = []
            for _ in 0..<size {
                pid += 1
                outbox.countRead(.processExec)
                group.append(event(pid))
            }
            outbox.add(contentsOf: &group, critical: false)
            outbox.add(event(1000 + pid))
        }
        outbox.sealIfDue(nowNs: 0, force: true)
        outbox.stopSpooler()
        XCTAssertEqual(outbox.spoolRemaining(), 0)
        XCTAssertEqual(outbox.closeCrashCounters(), [:], "every event read is in a batch on disk")
        XCTAssertEqual(try spooledEvents(outbox), Int(pid) + 7)
    }

    func testTheSpoolerThreadSealsAndWritesWhatTheReaderAppends() throws {
        let outbox = try Outbox(node: "n", epoch: 5, limits: limits(events: 10), spoolDirectory: spool, stateDirectory: dir)
        outbox.startSpooler()
        for pid in 1...95 { outbox.add(event(UInt32(pid))) }
        XCTAssertTrue(eventually(timeout: 10) {
            // Records in the spool's segment files.
            ((try? FileManager.default.contentsOfDirectory(atPath: spool)) ?? []).filter { $0.hasPrefix("segment-") && $0.hasSuffix(".spool") }
                .flatMap { name in [UInt8](FileManager.default.contents(atPath: spool + "/" + name) ?? Data()).withUnsafeBytes { SpoolRecord.scan($0) } }
                .filter(\.intact).count == 9
        }, "the spooler sealed and wrote nine whole batches")
        XCTAssertEqual(outbox.pendingEvents, 5, "the rest waits for its batch to fill or its delay to pass")
        outbox.sealIfDue(nowNs: 0, force: true)
        outbox.stopSpooler()
        XCTAssertEqual(outbox.spoolRemaining(), 0)
        XCTAssertEqual(outbox.closeCrashCounters(), [:])
        XCTAssertEqual(try spooledEvents(outbox), 95)
    }

    func testWithASpoolOnlyASmallWindowOfBatchesStaysInMemoryAndTheRestIsReadBack() throws {
        var l = limits(events: 50)
        l.memoryWindowBytes = 4096
        let outbox = try Outbox(node: "n", epoch: 5, limits: l, spoolDirectory: spool, stateDirectory: dir)
        for pid in 1...2000 { outbox.add(event(UInt32(pid))) }
        XCTAssertLessThanOrEqual(outbox.stats.memoryBytes, 4096)
        var pids: [UInt32] = []
        while let next = outbox.nextToSend(window: 1000) { pids += try EventBatch.decode(next.payload).events.map(\.pid) }
        XCTAssertEqual(pids, Array(1...2000).map(UInt32.init), "every batch sent, oldest first, from the spool")
    }

    func testAnyCountersFileIsReadWithoutTrapping() throws {
        let path = dir + "/counters"
        var generator = SystemRandomNumberGenerator()
        let header = Array("TPAC".utf8) + [1, 0, 0, 0] + [UInt8](repeating: 0, count: 8)
        let inputs: [[UInt8]] = [[], [UInt8](repeating: 0xFF, count: 8192), Array("TPAC".utf8) + [UInt8](repeating: 0x41, count: 9000),
                                 header + [UInt8](repeating: 0xFF, count: 8192 - header.count),
                                 header + (header.count..<8192).map { _ in UInt8.random(in: 0...255, using: &generator) }]
        for bytes in inputs {
            FileManager.default.createFile(atPath: path, contents: Data(bytes))
            _ = CrashCounters.load(path: path)
            _ = try Outbox(node: "n", epoch: UInt64(bytes.count) + 1, spoolDirectory: spool, stateDirectory: dir)
        }
    }
}
