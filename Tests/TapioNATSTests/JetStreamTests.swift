import Foundation
import NIOCore
import TapioNATS
import TapioTestSupport
import XCTest

/// The JetStream subset against one real nats-server with file storage.
final class JetStreamTests: NATSTestCase {
    func testAResendWithinTheDuplicateWindowIsAcknowledgedAsADuplicateAndStoredOnce() async throws {
        let server = try startServer()
        let client = try await connect([server])
        let js = JetStream(client: client)
        try await waitForJetStream(js)

        var config = StreamConfiguration(name: "EVENTS", subjects: ["events.>"])
        config.duplicateWindow = .seconds(60)
        config.maxAge = .seconds(3600)
        config.maxBytes = 10 << 20
        let info = try await js.createStream(config)
        XCTAssertEqual(info.config.storage, .file)
        XCTAssertEqual(info.config.duplicateWindow, .seconds(60))
        XCTAssertEqual(info.config.maxAge, .seconds(3600))
        XCTAssertEqual(info.config.maxBytes, 10 << 20)

        let first = try await js.publish("events.n1", payload: Array("batch 1".utf8), messageID: "n1-e1-1")
        XCTAssertEqual(first.stream, "EVENTS")
        XCTAssertEqual(first.sequence, 1)
        XCTAssertFalse(first.duplicate)
        let resend = try await js.publish("events.n1", payload: Array("batch 1".utf8), messageID: "n1-e1-1")
        XCTAssertTrue(resend.duplicate, "a resend with the same Nats-Msg-Id is not reported as a duplicate")
        XCTAssertEqual(resend.sequence, 1)
        let second = try await js.publish("events.n1", payload: Array("batch 2".utf8), messageID: "n1-e1-2")
        XCTAssertEqual(second.sequence, 2)
        XCTAssertFalse(second.duplicate)

        let state = try await js.streamInfo("EVENTS").state
        XCTAssertEqual(state.messages, 2, "the resend was stored again")
        XCTAssertEqual(state.lastSequence, 2)
        let stored = try await js.message(stream: "EVENTS", sequence: 1)
        XCTAssertEqual(String(decoding: stored.payload, as: UTF8.self), "batch 1")
        XCTAssertEqual(stored.headers["Nats-Msg-Id"], "n1-e1-1")

        // Update: the same name with another limit.
        config.maxAge = .seconds(7200)
        let updated = try await js.createOrUpdateStream(config)
        XCTAssertEqual(updated.config.maxAge, .seconds(7200))

        // Errors come in the API's own words.
        do {
            _ = try await js.streamInfo("MISSING")
            XCTFail("info of a missing stream succeeded")
        } catch let error as JetStreamError {
            XCTAssertEqual(error.code, 404)
            XCTAssertEqual(error.errorCode, JetStreamError.streamNotFound)
            XCTAssertTrue(error.text.contains("not found"), error.text)
        }
        do {
            _ = try await js.publish("nostream.x", payload: Array("x".utf8))
            XCTFail("a publish to a subject no stream holds was acknowledged")
        } catch NATSError.noResponders(let subject) {
            XCTAssertEqual(subject, "nostream.x")
        }
        do {
            _ = try await js.createStream(StreamConfiguration(name: "bad.name", subjects: ["x"]))
            XCTFail("a stream name with a dot was sent")
        } catch NATSError.invalidName {}
    }

    /// The server stops gracefully (SIGTERM): it writes the consumer's state
    /// before it goes, so what was acknowledged stays acknowledged. After a
    /// kill -9 of a single 2.9 server, acknowledgements since its last state
    /// write can be lost and those messages come again (at-least-once; see
    /// docs/nats.md); in a cluster the consumer state is replicated.
    func testADurablePullConsumerResumesAfterTheServerRestartsAndAckedMessagesAreNotRedelivered() async throws {
        let server = try startServer()
        let client = try await connect([server])
        let js = JetStream(client: client)
        try await waitForJetStream(js)
        try await js.createStream(StreamConfiguration(name: "FEED", subjects: ["feed.*"]))
        for i in 1...10 {
            _ = try await js.publish("feed.a", payload: Array("m\(i)".utf8), messageID: "m\(i)")
        }
        var consumer = ConsumerConfiguration(durableName: "engine")
        consumer.ackWait = .seconds(2)
        let created = try await js.createConsumer(stream: "FEED", consumer)
        XCTAssertEqual(created.name, "engine")
        XCTAssertEqual(created.pending, 10)

        let firstBatch = try await js.fetch(stream: "FEED", consumer: "engine", batch: 4, expires: .seconds(2))
        XCTAssertEqual(firstBatch.map(\.streamSequence), [1, 2, 3, 4])
        XCTAssertEqual(firstBatch.map { String(buffer: $0.payload) }, ["m1", "m2", "m3", "m4"])
        XCTAssertEqual(firstBatch.map(\.deliveryCount), [1, 1, 1, 1])
        XCTAssertEqual(firstBatch.last?.pending, 6)
        for m in firstBatch { try await js.ack(m) }
        // Fetched and not acknowledged: delivered again after the ack wait.
        let unacked = try await js.fetch(stream: "FEED", consumer: "engine", batch: 2, expires: .seconds(2))
        XCTAssertEqual(unacked.map(\.streamSequence), [5, 6])

        server.stop()
        try server.start()
        let back = eventually(timeout: 20) { client.reconnectCount == 1 && client.connectedServer != nil }
        XCTAssertTrue(back, "no reconnect after the restart; last error: \(String(describing: client.lastError))")
        try await waitForJetStream(js)

        var seen: [UInt64: UInt64] = [:]  // stream sequence → delivery count
        let deadline = ContinuousClock.now + .seconds(20)
        while Set(seen.keys) != Set(5...10), ContinuousClock.now < deadline {
            for m in try await js.fetch(stream: "FEED", consumer: "engine", batch: 10, expires: .seconds(1)) {
                XCTAssertGreaterThanOrEqual(m.streamSequence, 5, "acknowledged message \(m.streamSequence) delivered again")
                seen[m.streamSequence] = max(seen[m.streamSequence] ?? 0, m.deliveryCount)
                try await js.ack(m)
            }
        }
        XCTAssertEqual(Set(seen.keys), Set(5...10))
        XCTAssertGreaterThanOrEqual(seen[5] ?? 0, 2, "message 5 was not a redelivery")
        XCTAssertEqual(seen[10], 1)
        let empty = try await js.fetch(stream: "FEED", consumer: "engine", batch: 5, noWait: true)
        XCTAssertEqual(empty.count, 0)
        let info = try await js.consumerInfo(stream: "FEED", consumer: "engine")
        XCTAssertEqual(info.ackFloor.streamSequence, 10)
        XCTAssertEqual(info.ackPending, 0)
    }

    func testANakedMessageComesAgainAtOnceWithItsDeliveryCountRaised() async throws {
        let server = try startServer()
        let client = try await connect([server])
        let js = JetStream(client: client)
        try await waitForJetStream(js)
        try await js.createStream(StreamConfiguration(name: "WORK", subjects: ["work"]))
        _ = try await js.publish("work", payload: Array("job".utf8))
        var config = ConsumerConfiguration(durableName: "worker")
        config.ackWait = .seconds(60)  // a redelivery within the test can only come from the nak
        try await js.createConsumer(stream: "WORK", config)
        let first = try await js.fetch(stream: "WORK", consumer: "worker", batch: 1, expires: .seconds(2))
        XCTAssertEqual(first.map(\.deliveryCount), [1])
        try await js.nak(try XCTUnwrap(first.first))
        let again = try await js.fetch(stream: "WORK", consumer: "worker", batch: 1, expires: .seconds(5))
        XCTAssertEqual(again.map(\.streamSequence), [1])
        XCTAssertEqual(again.map(\.deliveryCount), [2])
        XCTAssertEqual(again.map(\.consumerSequence), [2])
    }

    func testKeyValueCompareAndSetRefusesAStaleRevision() async throws {
        let server = try startServer()
        let client = try await connect([server])
        let js = JetStream(client: client)
        try await waitForJetStream(js)
        var config = KeyValueConfiguration(bucket: "leases")
        config.history = 1
        let kv = try await js.createKeyValue(config)
        let bucketStream = try await js.streamInfo("KV_leases")
        XCTAssertEqual(bucketStream.config.subjects, ["$KV.leases.>"])

        let missing = try await kv.get("engine")
        XCTAssertNil(missing)
        let r1 = try await kv.create("engine", Array("replica-a until 10".utf8))
        do {
            try await kv.create("engine", Array("replica-b".utf8))
            XCTFail("create over an existing key succeeded")
        } catch let error as JetStreamError {
            XCTAssertEqual(error.errorCode, JetStreamError.wrongLastSequence)
        }
        let read = try await kv.get("engine")
        XCTAssertEqual(read?.key, "engine")
        XCTAssertEqual(read?.value, Array("replica-a until 10".utf8))
        XCTAssertEqual(read?.revision, r1)

        let r2 = try await kv.update("engine", Array("replica-a until 20".utf8), revision: r1)
        XCTAssertGreaterThan(r2, r1)
        // Replica b read revision r1 before a renewed: its takeover must fail.
        do {
            try await kv.update("engine", Array("replica-b until 20".utf8), revision: r1)
            XCTFail("compare-and-set with a stale revision succeeded")
        } catch let error as JetStreamError {
            XCTAssertEqual(error.errorCode, JetStreamError.wrongLastSequence)
            XCTAssertTrue(error.text.contains("wrong last sequence"), error.text)
        }
        let after = try await kv.get("engine")
        XCTAssertEqual(after?.revision, r2)
        XCTAssertEqual(after.map { String(decoding: $0.value, as: UTF8.self) }, "replica-a until 20")
        let direct = try await kv.getDirect("engine")
        XCTAssertEqual(direct, after)
        let put = try await kv.put("other", Array("x".utf8))
        XCTAssertGreaterThan(put, r2)
        do {
            _ = try await kv.get("bad key")
            XCTFail("a key with a space was sent")
        } catch NATSError.invalidName {}
    }
}
