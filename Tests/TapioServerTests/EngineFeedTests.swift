import Foundation
import Logging
import Synchronization
import TapioCorrelation
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The queue between ingest and the engine's thread: ingest never waits for
/// the engine; a full queue tells the caller to stop reading and calls back
/// once there is room; nothing queued is lost, and stopping drains it.
final class EngineFeedTests: XCTestCase {
    /// `n` events dated `ageNs` ago (negative: ahead).
    private func events(_ n: Int, node: String = "node-a", ageNs: Int64 = 10_000_000_000) -> [ObservedEvent] {
        let now = wallClockNs()
        return (0..<n).map { i in
            ObservedEvent(node: node, agentEvent: TapioEvent(kind: .processExec, timeNs: now - ageNs + Int64(i), pid: UInt32(100 + i), comm: "sh",
                                                             detail: .exec(filename: "/bin/sh")),
                          clockOffsetNs: 0, clockErrorNs: 1000)
        }
    }

    private func service(queueEvents: Int, maxPendingEvents: Int = 786_432) throws -> CorrelationService {
        let dir = try TestSupport.temporaryDirectory("tapio-feed")
        var config = CorrelationService.Configuration()
        config.queueEvents = queueEvents
        config.maxPendingEvents = maxPendingEvents
        return CorrelationService(configuration: config, store: try SegmentEventStore(directory: dir), logger: Logger(label: "test"))
    }

    func testAFullQueueAsksForBackpressureAndCallsBackWhenTheEngineHasTakenIt() throws {
        let s = try service(queueEvents: 100)
        let calls = Mutex(0)
        // Not started: nothing is taken, so the queue fills.
        XCTAssertTrue(s.submit(events(60)) { calls.withLock { $0 += 1 } })
        XCTAssertFalse(s.submit(events(60)) { calls.withLock { $0 += 1 } }, "at capacity the caller is told to stop reading")
        XCTAssertFalse(s.submit(events(10)) { calls.withLock { $0 += 1 } }, "still full: the batch is queued all the same")
        XCTAssertEqual(s.queueDepth, 130)
        XCTAssertEqual(calls.withLock { $0 }, 0)
        s.start()
        XCTAssertTrue(eventually(timeout: 10) { calls.withLock { $0 } == 2 && s.queueDepth == 0 }, "both waiting callers are told once there is room")
        s.stop()
        XCTAssertEqual(s.statistics.processed, 130, "every queued event reached the engine; none dropped")
    }

    /// An engine holding `maxPendingEvents` events that wait for its
    /// watermark takes nothing more until a pass has processed some: what
    /// arrives stays queued (so a full queue stops connections reading)
    /// instead of piling up in the engine; nothing is lost.
    func testAnEngineFullOfWaitingEventsLeavesTheRestQueued() throws {
        let s = try service(queueEvents: 1_000, maxPendingEvents: 100)
        s.start()
        // Dated 4 s ahead: they wait for the watermark (now − 1.5 s) for 5.5 s.
        XCTAssertTrue(s.submit(events(150, ageNs: -4_000_000_000)) {})
        XCTAssertTrue(eventually(timeout: 5) { s.queueDepth == 0 && s.statistics.pending == 150 }, "the first batch is taken")
        XCTAssertTrue(s.submit(events(60, ageNs: -4_000_000_000)) {})
        // Several passes (every 250 ms), none of which can process anything yet.
        Thread.sleep(forTimeInterval: 1)
        XCTAssertEqual(s.queueDepth, 60, "over the limit the engine takes nothing more")
        XCTAssertEqual(s.statistics.pending, 150)
        XCTAssertTrue(eventually(timeout: 30) { s.statistics.processed == 210 }, "once the watermark passes, everything: \(s.statistics.processed)")
        s.stop()
        XCTAssertEqual(s.queueDepth, 0)
    }

    func testStoppingDrainsTheQueueIntoTheEngine() throws {
        let s = try service(queueEvents: 1_000_000)
        for _ in 0..<20 { XCTAssertTrue(s.submit(events(50)) {}) }
        s.start()
        s.stop()
        XCTAssertEqual(s.queueDepth, 0)
        XCTAssertEqual(s.statistics.processed, 1000)
        XCTAssertEqual(s.statistics.pending, 0)
    }

    func testAServerWhoseEngineQueueIsFullStopsReadingAndLosesNothing() throws {
        // A queue smaller than one batch: every batch finds it full.
        let h = try ServerHarness(nodes: ["node-a"]) { $0.correlation.queueEvents = 100 }
        let (outbox, sender) = try h.agent(node: "node-a")
        for pid in 1...5000 { outbox.add(event(UInt32(pid), comm: "worker")) }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 }, "every batch acknowledged")
        sender.drainAndStop(graceSeconds: 2)
        XCTAssertGreaterThan(h.server.metrics.value("tapio_server_engine_backpressure_total"), 0)
        XCTAssertTrue(eventually { h.server.correlation.statistics.processed == 5000 }, "the engine got every event")
        XCTAssertEqual(h.server.correlation.queueDepth, 0)
    }
}
