import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

final class EventStoreTests: XCTestCase {
    private func batch(_ node: String, epoch: UInt64, seq: UInt64, base: Int64, count: Int = 3) -> EventBatch {
        var events: [TapioEvent] = []
        for i in 0..<count {
            let time: Int64 = base + Int64(i) * 1000
            if i % 2 == 0 {
                events.append(TapioEvent(kind: .processExec, timeNs: time, pid: UInt32(100 + i), comm: "c\(i)", detail: .exec(filename: "/bin/c\(i)")))
            } else {
                events.append(TapioEvent(kind: .processExit, timeNs: time, pid: UInt32(100 + i), comm: "c\(i)", detail: .exit(exitCode: Int32(i), signal: 0, coreDumped: false)))
            }
        }
        return EventBatch(node: node, epoch: epoch, sequence: seq, events: events)
    }

    func testDuplicateBatchIsStoredOnce() throws {
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory())
        XCTAssertTrue(try store.append(batch("a", epoch: 1, seq: 1, base: 1_000), clock: .none, receivedNs: 0))
        XCTAssertFalse(try store.append(batch("a", epoch: 1, seq: 1, base: 1_000), clock: .none, receivedNs: 0))
        // Same sequence in another epoch or node is a different batch.
        XCTAssertTrue(try store.append(batch("a", epoch: 2, seq: 1, base: 2_000), clock: .none, receivedNs: 0))
        XCTAssertTrue(try store.append(batch("b", epoch: 1, seq: 1, base: 3_000), clock: .none, receivedNs: 0))
        XCTAssertEqual(try store.events(EventQuery()).count, 9)
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 1)
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 9), 0)
    }

    func testAGroupCommitStoresEveryBatchOnceAndTellsDuplicatesApart() throws {
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory())
        XCTAssertTrue(try store.append(batch("a", epoch: 1, seq: 1, base: 1_000), clock: .none, receivedNs: 0))
        let group = [batch("a", epoch: 1, seq: 1, base: 1_000), batch("a", epoch: 1, seq: 2, base: 2_000),
                     batch("b", epoch: 1, seq: 1, base: 3_000), batch("a", epoch: 1, seq: 2, base: 2_000)]
        let stored = try store.appendAll(group.map { BatchAppend(batch: $0, payload: $0.encoded(), clock: .none, receivedNs: 5) })
        XCTAssertEqual(stored, [false, true, true, false], "stored before, new, new, the same batch twice in one group")
        XCTAssertEqual(try store.events(EventQuery()).count, 9)
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 2)
        XCTAssertEqual(try store.batches(sinceNs: 0, limit: 10).count, 3)
    }

    func testQueriesFilterByTimeNodeKindAndKeepTheMostRecent() throws {
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory())
        for seq in 1...4 {
            _ = try store.append(batch(seq % 2 == 0 ? "a" : "b", epoch: 1, seq: UInt64(seq), base: Int64(seq) * 1_000_000), clock: .none, receivedNs: 0)
        }
        XCTAssertEqual(try store.events(EventQuery(node: "a")).map(\.node), Array(repeating: "a", count: 6))
        XCTAssertEqual(try store.events(EventQuery(kind: .processExit)).count, 4)
        XCTAssertEqual(try store.events(EventQuery(sinceNs: 3_000_000)).count, 6)
        XCTAssertEqual(try store.events(EventQuery(sinceNs: 2_000_000, untilNs: 3_000_000)).count, 3)
        XCTAssertEqual(try store.events(EventQuery(pid: 101)).count, 4)
        let recent = try store.events(EventQuery(limit: 2))
        XCTAssertEqual(recent.map(\.timeNs), [4_001_000, 4_002_000], "the most recent two, oldest first")
    }

    func testClockCorrectionIsAppliedAndRecorded() throws {
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory())
        // Agent clock 250 ms ahead of the server, known to ±2 ms.
        _ = try store.append(batch("a", epoch: 1, seq: 1, base: 10_250_000_000, count: 1), clock: ClockCorrection(offsetNs: 250_000_000, errorNs: 2_000_000), receivedNs: 0)
        let e = try XCTUnwrap(try store.events(EventQuery()).first)
        XCTAssertEqual(e.timeNs, 10_000_000_000)
        XCTAssertEqual(e.agentTimeNs, 10_250_000_000)
        XCTAssertEqual(e.timeErrorNs, 2_000_000)
        XCTAssertEqual(e.json["time"], .string("1970-01-01T00:00:10.000000000Z"))
    }

    func testReopeningKeepsEventsNodesAndDrops() throws {
        let dir = try TestSupport.temporaryDirectory()
        do {
            let store = try SegmentEventStore(directory: dir)
            var b = batch("a", epoch: 5, seq: 1, base: 1_000)
            b.drops = [DropCount(kind: .processExec, reason: "ringbuf_full", count: 4)]
            _ = try store.append(b, clock: .none, receivedNs: 0)
            b.sequence = 2
            b.drops = [DropCount(kind: .processExec, reason: "ringbuf_full", count: 9)]
            _ = try store.append(b, clock: .none, receivedNs: 0)
            try store.saveNode(NodeRecord(node: "a", agentVersion: "0.1.0", capabilities: ["process_exec"], eventsReceived: 6))
        }
        let reopened = try SegmentEventStore(directory: dir)
        XCTAssertEqual(try reopened.events(EventQuery()).count, 6)
        XCTAssertEqual(try reopened.durablePrefix(node: "a", epoch: 5), 2)
        XCTAssertEqual(try reopened.nodes().map(\.capabilities), [["process_exec"]])
        // Drop counters are cumulative per epoch: the larger value wins, nothing is double counted.
        XCTAssertEqual(try reopened.drops(node: "a"), [DropCount(kind: .processExec, reason: "ringbuf_full", count: 9)])
    }

    // Issue 14, defect 6: a gap (a batch whose store failed) ends what the
    // server may call durable, whatever was stored after it.
    func testTheDurablePrefixStopsAtTheFirstMissingSequence() throws {
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory())
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 0)
        for seq: UInt64 in [2, 3] { _ = try store.append(batch("a", epoch: 1, seq: seq, base: 1_000), clock: .none, receivedNs: 0) }
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 0, "without sequence 1 nothing is a prefix")
        _ = try store.append(batch("a", epoch: 1, seq: 1, base: 1_000), clock: .none, receivedNs: 0)
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 3)
        for seq: UInt64 in [5, 6, 9] { _ = try store.append(batch("a", epoch: 1, seq: seq, base: 1_000), clock: .none, receivedNs: 0) }
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 3, "4 is missing: 5, 6 and 9 are stored but not a prefix")
        _ = try store.append(batch("a", epoch: 1, seq: 4, base: 1_000), clock: .none, receivedNs: 0)
        XCTAssertEqual(try store.durablePrefix(node: "a", epoch: 1), 6)
        // The largest sequence the server accepts does not overflow the query.
        _ = try store.append(batch("b", epoch: 1, seq: 1, base: 1_000), clock: .none, receivedNs: 0)
        _ = try store.append(batch("b", epoch: 1, seq: UInt64(Int64.max), base: 1_000), clock: .none, receivedNs: 0)
        XCTAssertEqual(try store.durablePrefix(node: "b", epoch: 1), 1)
    }

    // Issue 14, defect 3: drop counters near and past Int64.max sum without
    // failing, for this node and every other.
    func testDropCountersSumWithoutOverflowAcrossEpochs() throws {
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory())
        for epoch: UInt64 in 1...3 {
            var b = batch("a", epoch: epoch, seq: 1, base: 1_000, count: 1)
            b.drops = [DropCount(kind: .dns, reason: "ringbuf_full", count: UInt64.max - 5)]
            _ = try store.append(b, clock: .none, receivedNs: 0)
        }
        var b = batch("b", epoch: 1, seq: 1, base: 1_000, count: 1)
        b.drops = [DropCount(kind: .dns, reason: "ringbuf_full", count: 7)]
        _ = try store.append(b, clock: .none, receivedNs: 0)
        XCTAssertEqual(try store.drops(node: "a"), [DropCount(kind: .dns, reason: "ringbuf_full", count: .max)])
        XCTAssertEqual(try store.drops(node: "b"), [DropCount(kind: .dns, reason: "ringbuf_full", count: 7)])
    }

    // Issue 14, defect 11: what a node was acknowledged is what `nodes`
    // shows after a crash: counters move in the batch's own transaction, and
    // a later save of the node's description never sets them back.
    func testNodeCountersAreDurableWithTheBatchesTheyCount() throws {
        let dir = try TestSupport.temporaryDirectory()
        do {
            let store = try SegmentEventStore(directory: dir)
            try store.saveNode(NodeRecord(node: "a", agentVersion: "0.1.0"))
            for seq: UInt64 in 1...5 { _ = try store.append(batch("a", epoch: 1, seq: seq, base: 1_000), clock: .none, receivedNs: 0) }
            _ = try store.append(batch("a", epoch: 1, seq: 2, base: 1_000), clock: .none, receivedNs: 0)
            // A stale snapshot of the node saved afterwards.
            try store.saveNode(NodeRecord(node: "a", agentVersion: "0.1.1", eventsReceived: 3, batchesReceived: 1))
        }
        let reopened = try SegmentEventStore(directory: dir)
        let node = try XCTUnwrap(try reopened.nodes().first)
        XCTAssertEqual(node.agentVersion, "0.1.1")
        XCTAssertEqual(node.eventsReceived, 15)
        XCTAssertEqual(node.batchesReceived, 5)
        XCTAssertEqual(node.duplicateBatches, 1)
    }

    // Events the server set aside are counted per node, added up, never
    // taken as the agent's cumulative counters.
    func testServerDropsAddUpPerBatch() throws {
        let store = try SegmentEventStore(directory: try TestSupport.temporaryDirectory())
        for seq: UInt64 in 1...2 {
            _ = try store.append(batch("a", epoch: 1, seq: seq, base: 1_000), payload: batch("a", epoch: 1, seq: seq, base: 1_000).encoded(), clock: .none, receivedNs: 0,
                                 serverDrops: [DropCount(kind: .unspecified, reason: "future_time", count: 2)])
        }
        // A resend is a duplicate: its drops are not counted again.
        _ = try store.append(batch("a", epoch: 1, seq: 2, base: 1_000), payload: batch("a", epoch: 1, seq: 2, base: 1_000).encoded(), clock: .none, receivedNs: 0,
                             serverDrops: [DropCount(kind: .unspecified, reason: "future_time", count: 2)])
        XCTAssertEqual(try store.drops(node: "a"), [DropCount(kind: .unspecified, reason: "future_time", count: 4)])
    }
}
