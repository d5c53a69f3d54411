import Foundation
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// Retention in the running server: segments deleted between group commits,
/// counted, logged, and said in the answers of queries that reach them.
final class RetentionTests: XCTestCase {
    func testTheDiskLimitDeletesStoredSegmentsAndQueriesAndAcksStayTrue() throws {
        var operations = ServerConfiguration.Operations()
        operations.storeCheckInterval = .milliseconds(100)
        let harness = try ServerHarness(operations: operations) { c in
            c.storage.segmentBytes = 1  // every group commit seals its segment
            c.storage.maxDiskBytes = 1  // and every sealed segment is over the limit
        }
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 42)
        for seq: UInt64 in 1...5 {
            try agent.send(agent.batch(seq))
            XCTAssertEqual(try agent.acks(1).map(\.sequence), [seq])
        }
        XCTAssertTrue(eventually { harness.server.store.statistics().deletedEvents[.maxDisk, default: 0] >= 5 },
                      "the store check deletes the sealed segments")

        let answer = try harness.operatorClient().json("events", ["node": "node-a"])
        XCTAssertEqual(answer["count"]?.intValue, 0)
        let note = try XCTUnwrap(answer["retention"]?["note"]?.stringValue, "an answer short of deleted events says so")
        XCTAssertTrue(note.contains("deleted by retention"), note)
        XCTAssertNotNil(answer["retention"]?["deleted_before_ns"]?.intValue)

        // The deleted batches stay acknowledged: the hello-ack claims them
        // and a resend is a duplicate, not stored again.
        let again = try RawAgent(harness: harness, node: "node-a", epoch: 42)
        XCTAssertEqual(again.helloAck?.ackedSequence, 5)
        try again.send(again.batch(3))
        XCTAssertEqual(try again.acks(1).map(\.sequence), [3])
        XCTAssertEqual(harness.server.metrics.value("tapio_server_duplicate_batches_total"), 1)
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-a")).count, 0)

        let metrics = harness.server.metricsText()
        XCTAssertTrue(metrics.contains("tapio_server_store_deleted_segments_total{reason=\"max_disk\"} "), metrics)
        XCTAssertFalse(metrics.contains("tapio_server_store_deleted_segments_total{reason=\"max_disk\"} 0\n"), "counted")
        XCTAssertTrue(metrics.contains("tapio_server_store_deleted_segments_total{reason=\"retention\"} 0\n"), "the other reason at 0")
    }
}
