import Foundation
import Logging
@testable import TapioAgent
import TapioNATS
@testable import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// `tapio-server --role ingest` as operators run it: real nats-servers (one,
/// or three routed into a JetStream cluster), ingest replicas as processes
/// of the built binary, agents speaking the real protocol over mutual TLS.
/// What is in the stream is read back with the NATS client and counted by
/// (node, epoch, sequence).
final class IngestRoleTests: XCTestCase {
    private var directory = ""
    private var pki = ""
    private var nats: [NATSTestServer] = []
    private var replicas: [IngestReplicaProcess] = []
    private let natsClients = NATSClientPool()
    private var senders: [Sender] = []

    override func setUpWithError() throws {
        _ = try NATSTestServer.binary()
        _ = try TestSupport.product("tapio-server")
        directory = try TestSupport.temporaryDirectory("tapio-ingest-role")
        pki = try TestSupport.makePKI(in: directory, nodes: ["node-a", "node-b"])
    }

    override func tearDown() {
        for s in senders { s.drainAndStop(graceSeconds: 0) }
        for r in replicas { r.process.stop(signal: SIGTERM, timeout: 10) }
        natsClients.closeAll()
        for n in nats { n.stop() }
        if !directory.isEmpty { try? FileManager.default.removeItem(atPath: directory) }
    }

    // MARK: - Tests

    func testEveryAcknowledgedBatchIsInTheStreamOnceAndAResendAfterALostAckIsADuplicate() async throws {
        let server = try startNATS()
        let replica = try startReplica(nats: [server])
        let other = try startReplica(nats: [server])
        try replica.waitUntilReady()
        try other.waitUntilReady()

        let epoch = UInt64(wallClockNs())
        let agent = try RawAgent(port: replica.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-a"), node: "node-a", epoch: epoch)
        XCTAssertEqual(agent.helloAck?.ackedSequence, 0, "an ingest replica claims no prefix (docs/scaling.md)")
        // Batch 30 holds an event an hour ahead: set aside by the server, counted in the message.
        try agent.sendInventory(Inventory(pods: [PodInfo(uid: "u1", name: "web-1", namespace: "shop", node: "", ips: ["10.1.0.7"])]))
        let anHourAhead = wallClockNs() + 3600 * 1_000_000_000
        // Batches 10 and 25 carry the agent's drop counters (cumulative in its run).
        let drops: [Int: [DropCount]] = [10: [DropCount(kind: .dns, reason: "ringbuf_full", count: 7)],
                                         25: [DropCount(kind: .dns, reason: "ringbuf_full", count: 12), DropCount(kind: .processExec, reason: "queue_full", count: 3)]]
        let batches = (1...30).map { agent.batch(UInt64($0), events: $0 == 30 ? [event(30, comm: "raw-30", time: anHourAhead)] : nil, drops: drops[$0] ?? []) }
        for b in batches { try agent.send(b) }
        let acks = try agent.acks(30, timeoutMs: 20_000)
        XCTAssertEqual(Set(acks.map(\.sequence)), Set(1...30), "acks for every batch, exactly those")

        // The acks of 21…30 are "lost": the agent reconnects, to the other
        // replica, and resends them; each is acknowledged again, none stored again.
        agent.close()
        let again = try RawAgent(port: other.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-a"), node: "node-a", epoch: epoch)
        XCTAssertEqual(again.helloAck?.ackedSequence, 0)
        for b in batches[20...] { try again.send(b) }
        let reacks = try again.acks(10, timeoutMs: 20_000)
        XCTAssertEqual(Set(reacks.map(\.sequence)), Set(21...30))
        again.close()

        let js = try await jetStream([server])
        let stored = try await RoleTests.streamedBatches(js)
        XCTAssertEqual(stored.count, 30, "messages in the stream")
        RoleTests.assertExactlyOnce(stored, node: "node-a", epoch: epoch, sequences: 1...30)
        for s in stored {
            let batch = try EventBatch.decode(s.payload)
            XCTAssertEqual(batch.events.first?.comm, "raw-\(s.sequence)", "the payload is the batch as sent")
            XCTAssertGreaterThan(s.receivedNs, Int64(epoch))
            XCTAssertEqual(s.serverDrops, s.sequence == 30 ? [DropCount(kind: .unspecified, reason: CorrelationService.futureDropReason, count: 1)] : [])
        }
        // The pods the agent reported, for the stream's consumers, under the node's name.
        let lastInventory = try await js.lastMessage(stream: "TAPIO_EVENTS", subject: StreamedBatch.inventoryPrefix + ".node-a")
        let inventory = try XCTUnwrap(lastInventory, "no inventory in the stream")
        XCTAssertEqual(try Inventory.decode(inventory.payload).pods.map { "\($0.node)/\($0.namespace)/\($0.name)" }, ["node-a/shop/web-1"])

        let metrics = try replica.metrics()
        XCTAssertTrue(metrics.contains("tapio_server_batches_total 30\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_duplicate_batches_total 0\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_events_future_total 1\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_nats_connected 1\n"), metrics)
        // The agent's drops, visible where its batches arrived: the highest of each counter.
        XCTAssertTrue(metrics.contains("tapio_node_dropped_events_total{node=\"node-a\",kind=\"dns\",reason=\"ringbuf_full\"} 12\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_node_dropped_events_total{node=\"node-a\",kind=\"process_exec\",reason=\"queue_full\"} 3\n"), metrics)
        let otherMetrics = try other.metrics()
        XCTAssertTrue(otherMetrics.contains("tapio_server_batches_total 0\n"), otherMetrics)
        XCTAssertTrue(otherMetrics.contains("tapio_server_duplicate_batches_total 10\n"), otherMetrics)
        XCTAssertTrue(otherMetrics.contains("tapio_node_dropped_events_total{node=\"node-a\",kind=\"dns\",reason=\"ringbuf_full\"} 12\n"),
                      "the resent batch 25 reports the same counters: \(otherMetrics)")
        // SIGTERM: a graceful stop.
        XCTAssertEqual(replica.process.stop(signal: SIGTERM, timeout: 15), 0, replica.process.log.suffix(2000).description)
        XCTAssertTrue(replica.process.log.contains("tapio-server ingest replica stopped"))
    }

    func testBatchesAKilledReplicaPublishedAreDuplicatesOnTheOtherReplica() async throws {
        let server = try startNATS()
        let a = try startReplica(nats: [server])
        let b = try startReplica(nats: [server])
        try a.waitUntilReady()
        try b.waitUntilReady()
        let js = try await jetStream([server])

        // Replica A publishes 20 batches; the agent reads none of its acks
        // before A is killed, so for the agent all 20 are unacknowledged.
        let epoch = UInt64(wallClockNs())
        let agent = try RawAgent(port: a.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-a"), node: "node-a", epoch: epoch)
        let batches = (1...20).map { agent.batch(UInt64($0)) }
        for batch in batches { try agent.send(batch) }
        var published: UInt64 = 0
        let deadline = Date(timeIntervalSinceNow: 20)
        while published < 20, Date() < deadline {
            published = try await js.streamInfo("TAPIO_EVENTS").state.messages
            try await Task.sleep(for: .milliseconds(20))
        }
        XCTAssertEqual(published, 20, "replica A published the batches")
        a.process.stop(signal: SIGKILL)
        agent.close()

        let moved = try RawAgent(port: b.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-a"), node: "node-a", epoch: epoch)
        XCTAssertEqual(moved.helloAck?.ackedSequence, 0)
        for batch in batches { try moved.send(batch) }
        XCTAssertEqual(Set(try moved.acks(20, timeoutMs: 20_000).map(\.sequence)), Set(1...20))
        moved.close()
        let metrics = try b.metrics()
        XCTAssertTrue(metrics.contains("tapio_server_duplicate_batches_total 20\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_batches_total 0\n"), metrics)
        RoleTests.assertExactlyOnce(try await RoleTests.streamedBatches(js), node: "node-a", epoch: epoch, sequences: 1...20)
    }

    func testAStreamDeletedUnderARunningReplicaIsCreatedAgain() async throws {
        let server = try startNATS()
        let replica = try startReplica(nats: [server])
        try replica.waitUntilReady()
        let js = try await jetStream([server])
        let deleted = try await js.client.request("$JS.API.STREAM.DELETE.TAPIO_EVENTS", payload: [UInt8](), timeout: .seconds(5))
        XCTAssertTrue(String(decoding: deleted.payload.readableBytesView, as: UTF8.self).contains("\"success\":true"))

        let epoch = UInt64(wallClockNs())
        let agent = try RawAgent(port: replica.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-a"), node: "node-a", epoch: epoch)
        try agent.send(agent.batch(1))
        XCTAssertEqual(try agent.error(timeoutMs: 10_000)?.code, WireErrorCode.storageFailed.rawValue, "no stream: not acknowledged")
        agent.close()
        XCTAssertTrue(replica.process.log.contains("creating or updating it again"), replica.process.log)
        try replica.waitUntilReady(timeout: 20)

        let again = try RawAgent(port: replica.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-a"), node: "node-a", epoch: epoch)
        try again.send(again.batch(1))
        XCTAssertEqual(try again.acks(1, timeoutMs: 20_000).map(\.sequence), [1])
        again.close()
        RoleTests.assertExactlyOnce(try await RoleTests.streamedBatches(js), node: "node-a", epoch: epoch, sequences: 1...1)
        XCTAssertTrue(try replica.metrics().contains("tapio_server_nats_publish_failures_total{reason=\"no_responders\"} 1\n"))
    }

    func testWithoutNATSTheReplicaIsNotReadyAndAcknowledgesNothingThenServesOnceNATSIsUp() async throws {
        // Configured, its port chosen, not started yet.
        let server = try NATSTestServer(name: "late", directory: directory)
        nats.append(server)
        let replica = try startReplica(nats: [server])
        XCTAssertTrue(eventually(timeout: 20) { (try? replica.http("/healthz").status) == 200 }, replica.process.log)
        let ready = try replica.http("/readyz")
        XCTAssertEqual(ready.status, 503)
        XCTAssertTrue(ready.body.contains("nats:"), "readyz says why: \(ready.body)")

        let epoch = UInt64(wallClockNs())
        let agent = try RawAgent(port: replica.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-b"), node: "node-b", epoch: epoch)
        try agent.send(agent.batch(1))
        let refusal = try agent.error(timeoutMs: 10_000)
        XCTAssertEqual(refusal?.code, WireErrorCode.storageFailed.rawValue, "the batch is refused, not acknowledged")
        agent.close()
        let metrics = try replica.metrics()
        XCTAssertTrue(metrics.contains("tapio_server_nats_publish_failures_total{reason=\"not_connected\"} 1\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_batches_total 0\n"), metrics)
        XCTAssertTrue(replica.process.log.contains("batch not published: NATS is not ready"), replica.process.log)

        try server.start()
        try replica.waitUntilReady()
        let retry = try RawAgent(port: replica.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-b"), node: "node-b", epoch: epoch)
        try retry.send(retry.batch(1))
        XCTAssertEqual(try retry.acks(1, timeoutMs: 20_000).map(\.sequence), [1])
        retry.close()
        let stored = try await RoleTests.streamedBatches(try await jetStream([server]))
        RoleTests.assertExactlyOnce(stored, node: "node-b", epoch: epoch, sequences: 1...1)
    }

    func testAgentsMoveToTheOtherReplicaAfterKill9AndTheStreamHoldsEveryBatchOnce() async throws {
        let cluster = try startCluster()
        let a = try startReplica(nats: cluster, replicas: 3)
        let b = try startReplica(nats: cluster, replicas: 3)
        try a.waitUntilReady()
        try b.waitUntilReady()

        let agents = try ["node-a", "node-b"].map { try TestAgent(node: $0, pki: pki) }
        for agent in agents { senders.append(agent.connect(port: a.ingestPort)) }
        // Batches go out without waiting for acks, so some are in flight (published
        // or not, acknowledged or not) when the replica dies.
        for _ in 0..<20 { for agent in agents { agent.addBatch() } }
        XCTAssertTrue(eventually(timeout: 20) { agents.allSatisfy { $0.outbox.stats.ackedBatches >= 5 } }, "replica A acknowledged batches before the kill")
        // Killed while batches are being sealed, sent and published.
        var ackedBefore: [UInt64] = []
        for i in 0..<20 {
            for agent in agents { agent.addBatch() }
            if i == 5 {
                a.process.stop(signal: SIGKILL)
                ackedBefore = agents.map { $0.outbox.stats.ackedBatches }
            }
        }

        // The Service sends the agents to the replica that is left: same outbox, new connection.
        for s in senders { s.drainAndStop(graceSeconds: 0) }
        senders.removeAll()
        for agent in agents { senders.append(agent.connect(port: b.ingestPort)) }
        for _ in 0..<10 { for agent in agents { agent.addBatch() } }
        XCTAssertTrue(eventually(timeout: 60) { agents.allSatisfy { $0.outbox.unacknowledged == 0 && $0.outbox.pendingEvents == 0 } },
                      "every batch acknowledged by replica B: \(agents.map { "\($0.outbox.unacknowledged) left" })\n\(b.process.log.suffix(2000))")

        let stored = try await RoleTests.streamedBatches(try await jetStream(cluster))
        for (agent, before) in zip(agents, ackedBefore) {
            XCTAssertLessThan(before, agent.outbox.lastSequence, "\(agent.node): replica A was killed before it had acknowledged everything")
            RoleTests.assertExactlyOnce(stored, node: agent.node, epoch: agent.outbox.epoch, sequences: 1...agent.outbox.lastSequence)
            let pids = stored.filter { $0.node == agent.node }.flatMap { (try? EventBatch.decode($0.payload).events.map(\.pid)) ?? [] }
            XCTAssertEqual(pids.count, agent.eventsAdded, "\(agent.node): events in the stream")
            XCTAssertEqual(Set(pids), Set((1...agent.eventsAdded).map(UInt32.init)), "\(agent.node): every event, once")
        }
        let duplicates = try b.metrics().split(separator: "\n").first { $0.hasPrefix("tapio_server_duplicate_batches_total ") }
        print("after the kill of replica A: replica B reports \(duplicates ?? "?") (resends of batches A had published)")
    }

    func testIngestContinuesWhenTheNATSNodeTheReplicaUsesIsKilled() async throws {
        let cluster = try startCluster()
        let replica = try startReplica(nats: cluster, replicas: 3)
        try replica.waitUntilReady()
        let agent = try TestAgent(node: "node-a", pki: pki)
        senders.append(agent.connect(port: replica.ingestPort))
        for _ in 0..<10 { agent.addBatch() }
        XCTAssertTrue(eventually(timeout: 20) { agent.outbox.unacknowledged == 0 })

        // The replica names its NATS server on /healthz.
        let health = try replica.http("/healthz").body
        let used = try XCTUnwrap(cluster.first { health.contains("127.0.0.1:\($0.port)") }, "no NATS server named in /healthz: \(health)")
        used.kill9()
        for _ in 0..<20 { agent.addBatch() }
        XCTAssertTrue(eventually(timeout: 60) { agent.outbox.unacknowledged == 0 && agent.outbox.pendingEvents == 0 },
                      "\(agent.outbox.unacknowledged) batches unacknowledged after NATS node \(used.name) was killed\n\(replica.process.log.suffix(3000))")
        XCTAssertTrue(eventually(timeout: 20) { (try? replica.http("/readyz").status) == 200 }, "ready again on another NATS node")
        let metrics = try replica.metrics()
        XCTAssertFalse(metrics.contains("tapio_server_nats_reconnects_total 0\n"), "the replica moved to another NATS node: \(metrics)")

        let alive = cluster.filter { $0 !== used }
        let stored = try await RoleTests.streamedBatches(try await jetStream(alive))
        RoleTests.assertExactlyOnce(stored, node: "node-a", epoch: agent.outbox.epoch, sequences: 1...agent.outbox.lastSequence)
        XCTAssertEqual(stored.reduce(0) { $0 + ((try? EventBatch.decode($1.payload).events.count) ?? 0) }, agent.eventsAdded)
    }

    func testRoleFlagsThatCannotWorkAreRefusedInWords() throws {
        let binary = try TestSupport.product("tapio-server")
        let tls = ["--tls-dir", pki + "/server"]
        let cases: [([String], String)] = [
            (["--role", "ingest"] + tls, "--role ingest needs at least one --nats URL"),
            (["--role", "ingest", "--nats", "nats://127.0.0.1:4222", "--data-dir", directory + "/d"] + tls, "--data-dir is not used in role ingest"),
            (["--data-dir", directory + "/d", "--nats", "nats://127.0.0.1:4222"] + tls, "--nats: for --role ingest, correlate or query only"),
            (["--role", "ingest", "--nats", "http://127.0.0.1:4222"] + tls, "neither nats:// nor tls://"),
            (["--role", "ingest", "--nats", "nats://127.0.0.1:4222", "--nats-replicas", "7"] + tls, "--nats-replicas must be 1 to 5"),
            (["--role", "ingest", "--nats", "nats://127.0.0.1:4222", "--nats-max-age", "1m"] + tls, "must not be shorter than --nats-duplicate-window"),
            (["--role", "ingest", "--nats", "nats://127.0.0.1:4222", "--nats-tls-dir", directory + "/none"] + tls, "--nats-tls-dir: "),
            (["--role", "ingest", "--nats", "nats://127.0.0.1:4222", "--nats-user", "u"] + tls, "give --nats-user with --nats-password-file"),
            (["--role", "ingest", "--nats", "nats://127.0.0.1:4222", "--webhook", "http://127.0.0.1:1/"] + tls, "--webhook: incidents are not made in role ingest"),
            (["--role", "query"] + tls, "--role query needs at least one --nats URL"),
        ]
        for (arguments, expected) in cases {
            let r = try TestSupport.run(binary, arguments, timeout: 20)
            XCTAssertNotEqual(r.status, 0, "\(arguments) started")
            XCTAssertTrue(r.stderr.contains(expected), "\(arguments): expected '\(expected)' in: \(r.stderr)")
        }
        let help = try TestSupport.run(binary, ["serve", "--help"], timeout: 20).stdout
        for flag in ["--role <all|ingest|correlate|query>", "--nats <url>", "--nats-stream", "--nats-replicas", "--nats-duplicate-window", "--nats-tls-dir", "--nats-token-file"] {
            XCTAssertTrue(help.contains(flag), "--help lacks \(flag)")
        }
    }

    func testAStreamedBatchReadBackSaysWhatIsWrongWithIt() throws {
        let batch = EventBatch(node: "ip-10-0-0-1.ec2.internal", epoch: 7, sequence: 3, events: [event(1, comm: "x")])
        let append = BatchAppend(batch: batch, payload: batch.encoded(), clock: ClockCorrection(offsetNs: -5, errorNs: 9), receivedNs: 42,
                                 serverDrops: [DropCount(kind: .unspecified, reason: "future time", count: 2)])
        let message = StreamedBatch(append)
        XCTAssertEqual(message.subject, "tapio.events.ip-10-0-0-1%2Eec2%2Einternal", "one subject token per node")
        XCTAssertEqual(message.messageID, "ip-10-0-0-1%2Eec2%2Einternal:7:3")
        XCTAssertEqual(try StreamedBatch(headers: message.headers, payload: message.payload), message)

        var noEpoch = message.headers
        noEpoch["Tapio-Epoch"] = nil
        XCTAssertThrowsError(try StreamedBatch(headers: noEpoch, payload: message.payload)) {
            XCTAssertTrue("\($0)".contains("Tapio-Epoch"), "\($0)")
        }
        var otherSequence = message.headers
        otherSequence["Tapio-Sequence"] = "4"
        XCTAssertThrowsError(try StreamedBatch(headers: otherSequence, payload: message.payload)) {
            XCTAssertTrue("\($0)".contains("7/4"), "\($0)")
        }
        var badDrops = message.headers
        badDrops["Tapio-Server-Drops"] = "0/x"
        XCTAssertThrowsError(try StreamedBatch(headers: badDrops, payload: message.payload)) {
            XCTAssertTrue("\($0)".contains("Tapio-Server-Drops"), "\($0)")
        }
    }

    // MARK: - Harness

    private func startNATS() throws -> NATSTestServer {
        let server = try NATSTestServer(name: "n1", directory: directory)
        nats.append(server)
        try server.start()
        return server
    }

    private func startCluster() throws -> [NATSTestServer] {
        let cluster = try NATSTestServer.startCluster(directory: directory)
        nats += cluster
        return cluster
    }

    private func startReplica(nats servers: [NATSTestServer], replicas streamReplicas: Int = 1) throws -> IngestReplicaProcess {
        let replica = try IngestReplicaProcess(index: replicas.count, directory: directory, pki: pki,
                                               nats: servers.map(\.url), streamReplicas: streamReplicas)
        replicas.append(replica)
        return replica
    }

    private func jetStream(_ servers: [NATSTestServer]) async throws -> JetStream {
        try await natsClients.jetStream(servers, reconnectWait: .milliseconds(100))
    }
}
