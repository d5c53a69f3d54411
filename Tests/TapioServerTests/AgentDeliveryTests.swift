import Foundation
import Logging
import TapioAgent
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The agent's outbox and sender against a real server: whatever the agent
/// held is either stored once or counted as dropped on the server.
final class AgentDeliveryTests: XCTestCase {
    private let node = "node-a"

    /// An agent process that sealed batches and then ended (killed, or stopped
    /// while the server was away): only its spool is left.
    private func earlierRun(spool: String, limits: Outbox.Limits = Outbox.Limits(), epoch: UInt64 = UInt64(wallClockNs()) - 60_000_000_000,
                            _ body: (Outbox) throws -> Void) throws {
        let outbox = try Outbox(node: node, epoch: epoch, limits: limits, spoolDirectory: spool)
        try body(outbox)
    }

    private func stored(_ h: ServerHarness) throws -> [StoredEvent] {
        try h.server.store.events(EventQuery(node: node, limit: 100_000))
    }

    private func storedComms(_ h: ServerHarness, prefix: String) throws -> [String] {
        try stored(h).map(\.comm).filter { $0.hasPrefix(prefix) }
    }

    private func serverDrops(_ h: ServerHarness, _ reason: String) throws -> UInt64 {
        try h.server.store.drops(node: node).filter { $0.reason == reason }.reduce(0) { $0 + $1.count }
    }

    /// The records in the spool's segment files, with the file each is in.
    private func segmentRecords(_ spool: String) -> [(path: String, piece: SpoolRecord.Piece)] {
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: spool)) ?? []).filter { $0.hasPrefix("segment-") && $0.hasSuffix(".spool") }
        return names.sorted().flatMap { name -> [(path: String, piece: SpoolRecord.Piece)] in
            let bytes = [UInt8](FileManager.default.contents(atPath: spool + "/" + name) ?? Data())
            return bytes.withUnsafeBytes { SpoolRecord.scan($0) }.map { (spool + "/" + name, $0) }
        }
    }

    private func limits(events: Int) -> Outbox.Limits {
        var limits = Outbox.Limits()
        limits.maxEvents = events
        return limits
    }

    // 7
    func testABatchLargerThanTheServersFrameLimitIsCountedAndEverythingElseArrives() throws {
        let h = try ServerHarness { $0.limits.maxFrameBytes = 16_384 }
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        try earlierRun(spool: spool, limits: limits(events: 1000)) { outbox in
            // About 25 kB: more than the server takes in one frame.
            for pid in 1...400 { outbox.add(event(UInt32(pid), comm: "big-\(pid)-" + String(repeating: "b", count: 40))) }
            outbox.sealIfDue(nowNs: wallClockNs(), force: true)
            for pid in 401...410 { outbox.add(event(UInt32(pid), comm: "small-\(pid)")) }
            outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        }
        let (outbox, sender) = try h.agent(node: node, spool: spool)
        defer { sender.drainAndStop(graceSeconds: 1) }
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 }, "the oversized batch does not block the one behind it")

        // After the hello-ack, new batches are sealed within the server's limit.
        for pid in 1001...2000 { outbox.add(event(UInt32(pid), comm: "fresh-\(pid)-" + String(repeating: "f", count: 40))) }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        XCTAssertEqual(try storedComms(h, prefix: "small-").count, 10)
        XCTAssertEqual(try storedComms(h, prefix: "fresh-").count, 1000)
        XCTAssertEqual(try storedComms(h, prefix: "big-").count, 0)
        XCTAssertTrue(try eventually { try serverDrops(h, "batch_too_large") == 400 }, "stored + counted = generated")
    }

    // 7: a batch sealed before the first hello-ack was never sent, so it can be sealed again.
    func testABatchSealedBeforeTheAgentKnewTheServersLimitsIsSealedAgainAndArrivesWhole() throws {
        let h = try ServerHarness { $0.limits.maxFrameBytes = 16_384 }
        let outbox = try Outbox(node: node, epoch: UInt64(wallClockNs()), limits: limits(events: 1000),
                                spoolDirectory: try TestSupport.temporaryDirectory("tapio-spool"))
        for pid in 1...400 { outbox.add(event(UInt32(pid), comm: "early-\(pid)-" + String(repeating: "e", count: 40))) }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertEqual(outbox.unacknowledged, 1)
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(h.ingestPort), serverName: "localhost", tls: h.nodeTLS(node),
                                          node: node, bootId: "test", capabilities: [], degraded: [])
        config.maximumBackoffMs = 200
        var logger = Logger(label: "tapio-agent-test")
        logger.logLevel = .critical
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        sender.start()
        defer { sender.drainAndStop(graceSeconds: 1) }
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        XCTAssertEqual(try storedComms(h, prefix: "early-").count, 400)
        XCTAssertEqual(try serverDrops(h, "batch_too_large"), 0)
    }

    // 8
    func testACorruptSpoolRecordIsCountedOnTheServerAndTheOthersArrive() throws {
        let h = try ServerHarness()
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        var epoch: UInt64 = 0
        try earlierRun(spool: spool, limits: limits(events: 10)) { outbox in
            epoch = outbox.epoch
            for pid in 1...30 { outbox.add(event(UInt32(pid), comm: "spooled")) }
        }
        // Sequence 2's payload damaged in its segment.
        let damaged = try XCTUnwrap(segmentRecords(spool).first { $0.piece.epoch == epoch && $0.piece.sequence == 2 })
        var bytes = [UInt8](try XCTUnwrap(FileManager.default.contents(atPath: damaged.path)))
        bytes[damaged.piece.offset + SpoolRecord.headerSize + (damaged.piece.length - SpoolRecord.headerSize) / 2] ^= 0x01
        try Data(bytes).write(to: URL(fileURLWithPath: damaged.path))

        let (outbox, sender) = try h.agent(node: node, spool: spool)
        defer { sender.drainAndStop(graceSeconds: 1) }
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 }, "one bad record does not block the agent")
        // The count travels in this run's batches; without events, in one of counts only.
        outbox.sealIfDue(nowNs: wallClockNs())
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        XCTAssertEqual(try storedComms(h, prefix: "spooled").count, 20)
        XCTAssertTrue(try eventually { try serverDrops(h, "spool_corrupt") == 10 })
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: spool + "/quarantine").count, 1)
    }

    // 9
    func testEventsThatDidNotFitTheSpoolAtShutdownReachTheServerAsDropsAfterTheNextStart() throws {
        let h = try ServerHarness()
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        var small = limits(events: 10)
        small.maxSpoolBytes = 600
        var lost = 0
        try earlierRun(spool: spool, limits: small) { outbox in
            for pid in 1...30 { outbox.add(event(UInt32(pid), comm: "before")) }
            lost = outbox.spoolRemaining()
        }
        XCTAssertGreaterThan(lost, 0)
        let (outbox, sender) = try h.agent(node: node, spool: spool)
        defer { sender.drainAndStop(graceSeconds: 1) }
        // No new event needed: the carried count goes out in a batch of counts only.
        outbox.sealIfDue(nowNs: wallClockNs())
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        let kept = try storedComms(h, prefix: "before").count
        XCTAssertEqual(kept + lost, 30)
        XCTAssertTrue(try eventually { try serverDrops(h, "spool_full") == UInt64(lost) }, "stored + counted = generated")
        XCTAssertFalse(FileManager.default.fileExists(atPath: spool + "/carried-drops"), "cleared once a batch carrying it is kept")
    }

    // 10
    func testWhatAKilledAgentHadSealedArrivesAfterItRestarts() throws {
        let h = try ServerHarness()
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        var earlier: UInt64 = 0
        try earlierRun(spool: spool, limits: limits(events: 10)) { outbox in
            earlier = outbox.epoch
            for pid in 1...95 { outbox.add(event(UInt32(pid), comm: "before-kill")) }
            outbox.sealIfDue(nowNs: wallClockNs(), force: true)
            // No shutdown, no spoolRemaining(): the process is gone.
        }
        let (outbox, sender) = try h.agent(node: node, spool: spool)
        defer { sender.drainAndStop(graceSeconds: 1) }
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        let pids = try stored(h).filter { $0.comm == "before-kill" }.map(\.pid)
        XCTAssertEqual(pids.sorted(), Array(1...95).map(UInt32.init), "each once")
        // The earlier run's segment held nothing but acknowledged batches: gone.
        XCTAssertEqual(segmentRecords(spool).filter { $0.piece.epoch == earlier }.count, 0, "acknowledged records are deleted")
    }

    // 4, agent side: an earlier epoch that does not start at sequence 1.
    func testAnEarlierRunsBatchesAreAllDeliveredWhateverSequenceTheyStartAt() throws {
        let h = try ServerHarness()
        let spool = try TestSupport.temporaryDirectory("tapio-spool")
        try earlierRun(spool: spool, limits: limits(events: 10)) { outbox in
            for pid in 1...50 { outbox.add(event(UInt32(pid), comm: "earlier")) }
            // The server had acknowledged 1 and 2 before the process stopped.
            outbox.acknowledge(epoch: outbox.epoch, sequence: 1)
            outbox.acknowledge(epoch: outbox.epoch, sequence: 2)
        }
        let (outbox, sender) = try h.agent(node: node, spool: spool)
        defer { sender.drainAndStop(graceSeconds: 1) }
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        XCTAssertEqual(try stored(h).filter { $0.comm == "earlier" }.map(\.pid).sorted(), Array(21...50).map(UInt32.init))
    }
}
