import Foundation
import NIOCore
import TapioNATS
import TapioTestSupport
import XCTest

/// A 3-node JetStream cluster on loopback: a stream with 3 replicas keeps
/// taking messages while the node the client uses is killed with SIGKILL.
final class ClusterTests: NATSTestCase {
    func testPublishingContinuesAfterTheConnectedNodeIsKilledAndNothingIsLostOrStoredTwice() async throws {
        let nodes = try startCluster()
        let client = try await connect(nodes) { $0.requestTimeout = .seconds(2) }
        var js = JetStream(client: client)
        js.timeout = .seconds(2)
        try await waitForJetStream(js)
        var config = StreamConfiguration(name: "INGEST", subjects: ["ingest.>"])
        config.replicas = 3
        config.duplicateWindow = .seconds(120)
        try await createWhenClusterIsReady(js, config)

        let total = 300
        let killAt = 100
        var killed: NATSTestServer?
        var retries = 0
        var duplicates = 0
        for i in 1...total {
            if i == killAt {
                // SIGKILL from another task a moment later, so it lands while publishes are in flight.
                let server = try XCTUnwrap(client.connectedServer)
                killed = try XCTUnwrap(nodes.first { $0.port == server.port })
                let pid = try XCTUnwrap(killed?.pid)
                Task.detached {
                    try? await Task.sleep(for: .milliseconds(20))
                    kill(pid, SIGKILL)
                }
            }
            // At-least-once on the publisher's side: resend with the same
            // message id until acknowledged; the stream stores it once.
            let deadline = ContinuousClock.now + .seconds(60)
            while true {
                do {
                    let ack = try await js.publish("ingest.n1", payload: Array("event \(i)".utf8), messageID: "n1-e1-\(i)")
                    if ack.duplicate { duplicates += 1 }
                    break
                } catch {
                    retries += 1
                    guard ContinuousClock.now < deadline else { throw TestSupportError("event \(i) not acknowledged within 60 s: \(error)") }
                    try await Task.sleep(for: .milliseconds(100))
                }
            }
        }
        let killedNode = try XCTUnwrap(killed)
        killedNode.kill9()  // reaps it
        XCTAssertFalse(killedNode.isRunning)
        XCTAssertGreaterThanOrEqual(client.reconnectCount, 1, "the client never left the killed node")
        XCTAssertNotEqual(client.connectedServer?.port, killedNode.port, "still connected to the killed node")
        // Publishes in flight at the kill either failed and were resent (retries)
        // or waited for the reconnect; both end in one stored copy.

        print("cluster failover: \(retries) publish retries, \(duplicates) duplicate acks, \(client.reconnectCount) reconnects")
        // Every event once, in order, by sequence.
        let state = try await js.streamInfo("INGEST").state
        XCTAssertEqual(state.messages, UInt64(total), "\(retries) retries, \(duplicates) duplicates reported")
        XCTAssertEqual(state.firstSequence, 1)
        XCTAssertEqual(state.lastSequence, UInt64(total))
        for sequence in 1...UInt64(total) {
            let stored = try await js.message(stream: "INGEST", sequence: sequence)
            XCTAssertEqual(String(decoding: stored.payload, as: UTF8.self), "event \(sequence)")
            XCTAssertEqual(stored.headers["Nats-Msg-Id"], "n1-e1-\(sequence)")
        }
    }

    func testAReplicatedDurableConsumerKeepsItsAcknowledgementsWhenItsLeaderIsKilled() async throws {
        let nodes = try startCluster()
        let client = try await connect(nodes) { $0.requestTimeout = .seconds(2) }
        var js = JetStream(client: client)
        js.timeout = .seconds(2)
        try await waitForJetStream(js)
        var config = StreamConfiguration(name: "FEED", subjects: ["feed.>"])
        config.replicas = 3
        try await createWhenClusterIsReady(js, config)
        for i in 1...20 {
            try await retrying { _ = try await js.publish("feed.n1", payload: Array("m\(i)".utf8), messageID: "m\(i)") }
        }
        var consumer = ConsumerConfiguration(durableName: "engine")
        consumer.ackWait = .seconds(3)
        let created = try await retrying { try await js.createConsumer(stream: "FEED", consumer) }
        let leaderName = try XCTUnwrap(created.cluster?.leader, "a consumer of a 3-replica stream has no leader")

        let first = try await js.fetch(stream: "FEED", consumer: "engine", batch: 10, expires: .seconds(2))
        XCTAssertEqual(first.map(\.streamSequence), Array(1...10))
        for m in first { try await js.ack(m) }

        let leader = try XCTUnwrap(nodes.first { $0.name == leaderName })
        leader.kill9()

        // The new leader knows what was acknowledged: 11…20 come, once each,
        // and nothing else, also after the ack wait has passed.
        var seen: [UInt64: UInt64] = [:]
        let deadline = ContinuousClock.now + .seconds(40)
        while ContinuousClock.now < deadline {
            let batch = (try? await js.fetch(stream: "FEED", consumer: "engine", batch: 10, expires: .seconds(1))) ?? []
            for m in batch {
                seen[m.streamSequence, default: 0] += 1
                try? await js.ack(m)
            }
            if Set(seen.keys).isSuperset(of: 11...20) { break }
            if batch.isEmpty { try await Task.sleep(for: .milliseconds(200)) }
        }
        let after = (try? await js.fetch(stream: "FEED", consumer: "engine", batch: 10, expires: .seconds(4))) ?? []
        for m in after { seen[m.streamSequence, default: 0] += 1 }
        XCTAssertEqual(Set(seen.keys), Set(11...20), "after the consumer leader \(leaderName) was killed: deliveries \(seen.sorted { $0.key < $1.key })")
        XCTAssertTrue(seen.values.allSatisfy { $0 == 1 }, "delivered more than once: \(seen.filter { $0.value > 1 })")
        let info = try await retrying { try await js.consumerInfo(stream: "FEED", consumer: "engine") }
        XCTAssertNotEqual(info.cluster?.leader, leaderName)
        XCTAssertEqual(info.ackFloor.streamSequence, 20)
    }

    /// Retries `body` for up to 30 s while the cluster elects leaders.
    private func retrying<T>(_ body: () async throws -> T) async throws -> T {
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            do {
                return try await body()
            } catch {
                guard ContinuousClock.now < deadline else { throw error }
                try await Task.sleep(for: .milliseconds(200))
            }
        }
    }

    /// Stream creation needs the meta leader and enough peers; retried while they are elected.
    private func createWhenClusterIsReady(_ js: JetStream, _ config: StreamConfiguration) async throws {
        let deadline = ContinuousClock.now + .seconds(30)
        while true {
            do {
                try await js.createOrUpdateStream(config)
                return
            } catch {
                guard ContinuousClock.now < deadline else { throw error }
                try await Task.sleep(for: .milliseconds(250))
            }
        }
    }
}
