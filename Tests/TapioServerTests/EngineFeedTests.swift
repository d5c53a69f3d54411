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
    private func events(_ n: Int, node: String = "node-a") -> [ObservedEvent] {
        let now = wallClockNs()
        return (0..<n).map { i in
            ObservedEvent(node: node, agentEvent: TapioEvent(kind: .processExec, timeNs: now - 10_000_000_000 + Int64(i), pid: UInt32(100 + i), comm: "sh",
                                                             detail: .exec(filename: "/bin/sh")),
                          clockOffsetNs: 0, clockErrorNs: 1000)
        }
    }

    private func service(queueEvents: Int) throws -> CorrelationService {
        let dir = try TestSupport.temporaryDirectory("tapio-feed")
        var config = CorrelationService.Configuration()
        config.queueEvents = queueEvents
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
