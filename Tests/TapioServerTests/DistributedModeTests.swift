import Foundation
import Logging
@testable import TapioAgent
import TapioClient
import TapioNATS
import TapioQueryAPI
@testable import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

/// The distributed mode whole, as issue 10's "done when" names it: three
/// routed nats-servers (JetStream, stream replicas 3), a clickhouse-server,
/// two ingest, two correlate and two query replicas (processes of the built
/// `tapio-server`), and three agents (the real agent's outbox and sender)
/// behind one address standing in for the agents' Service. In one run:
/// kill -9 of the ingest replica the agents use, of the active engine, and
/// of a NATS node; what was acknowledged is counted in the stream by
/// sequence and in ClickHouse by event, and the `tapio` CLI asks both query
/// replicas.
final class DistributedModeTests: XCTestCase {
    private var directory = ""
    private var pki = ""
    private var nats: [NATSTestServer] = []
    private var clickhouse: ClickHouseTestServer?
    private var processes: [ChildProcess] = []
    private let natsClients = NATSClientPool()
    private var senders: [Sender] = []
    private var service: ServiceProxy?
    private var stopLoad: (() -> Void)?

    override func setUpWithError() throws {
        _ = try NATSTestServer.binary()
        _ = try ClickHouseTestServer.binary()
        _ = try TestSupport.product("tapio-server")
        _ = try TestSupport.product("tapio")
        directory = try TestSupport.temporaryDirectory("tapio-distributed")
        pki = try TestSupport.makePKI(in: directory, nodes: ["node-a", "node-b", "node-c"])
    }

    override func tearDown() {
        stopLoad?()
        for s in senders { s.drainAndStop(graceSeconds: 0) }
        service?.stop()
        for p in processes { _ = p.stop(signal: SIGKILL, timeout: 10) }
        natsClients.closeAll()
        for n in nats { n.stop() }
        clickhouse?.stop()
        if !directory.isEmpty { try? FileManager.default.removeItem(atPath: directory) }
    }

    func testKill9OfAnIngestReplicaTheActiveEngineAndANATSNodeLosesNothingAndBothQueryReplicasAnswerTheSame() async throws {
        let started = Date()
        func phase(_ what: String) { print(String(format: "distributed mode [%5.1f s] ", Date().timeIntervalSince(started)) + what) }

        // The servers, then every replica; engine A starts first and leads.
        nats = try NATSTestServer.startCluster(directory: directory)
        let clickhouse = try ClickHouseTestServer()
        self.clickhouse = clickhouse
        let urls = nats.map(\.url)
        let ingestA = try IngestReplicaProcess(index: 0, directory: directory, pki: pki, nats: urls, streamReplicas: 3)
        let ingestB = try IngestReplicaProcess(index: 1, directory: directory, pki: pki, nats: urls, streamReplicas: 3)
        processes += [ingestA.process, ingestB.process]
        let engineA = try CorrelateReplicaProcess(name: "a", directory: directory, pki: pki, nats: urls, replicas: 3)
        processes.append(engineA.process)
        try ingestA.waitUntilReady()
        try ingestB.waitUntilReady()
        try engineA.waitUntilReady()
        XCTAssertTrue(eventually(timeout: 20) { engineA.metric("tapio_correlate_leader") == 1 }, "engine A leads\n\(engineA.process.log.suffix(3000))")
        let engineB = try CorrelateReplicaProcess(name: "b", directory: directory, pki: pki, nats: urls, replicas: 3)
        let q1 = try QueryReplicaProcess(name: "q1", directory: directory, pki: pki, nats: urls, clickhousePort: clickhouse.httpPort)
        let q2 = try QueryReplicaProcess(name: "q2", directory: directory, pki: pki, nats: urls, clickhousePort: clickhouse.httpPort)
        processes += [engineB.process, q1.process, q2.process]
        try engineB.waitUntilReady()
        try q1.waitUntilReady()
        try q2.waitUntilReady()
        XCTAssertEqual(engineB.metric("tapio_correlate_leader"), 0, "engine B stands by")
        phase("3 NATS nodes, ClickHouse, 2 ingest, 2 correlate, 2 query replicas ready")

        // The agents' Service: every connection to ingest A while it accepts them, then to B.
        let service = try ServiceProxy(backends: [ingestA.ingestPort, ingestB.ingestPort])
        self.service = service

        // The feed that opens an incident (redis OOM-killed, api's connects
        // refused), then three agents sending steadily, api's (node-a) with
        // its connects to redis still refused, so the incident stays open.
        try QueryAPITests.feedOOMKillBehindRefusedConnects(agent: { try RoleTests.agent(node: $0, port: service.port, pki: self.pki) })
        let agents = try ["node-a", "node-b", "node-c"].map { try TestAgent(node: $0, pki: pki, eventsPerBatch: 20, firstPid: 100_001) }
        let pods = ["node-a": PodInfo(uid: "a", name: "api-1", namespace: "shop", node: "node-a", ips: ["10.0.1.10"], service: "api"),
                    "node-b": PodInfo(uid: "r", name: "redis-0", namespace: "shop", node: "node-b", ips: ["10.0.2.10"], service: "redis"),
                    "node-c": PodInfo(uid: "w", name: "worker-0", namespace: "jobs", node: "node-c", ips: ["10.0.3.10"], service: "worker")]
        for agent in agents { senders.append(agent.connect(port: service.port, inventory: Inventory(pods: [pods[agent.node]!]))) }
        stopLoad = Self.load(agents)
        func acked() -> [UInt64] { agents.map { $0.outbox.stats.ackedBatches } }
        func progressed(beyond before: [UInt64], by batches: UInt64) -> Bool { zip(acked(), before).allSatisfy { $0 >= $1 + batches } }

        // The incident, opened by engine A, and answered by every replica that serves incidents.
        var incidentID = ""
        XCTAssertTrue(eventually(timeout: 90) {
            guard let id = (try? engineA.client().incidents().incidents)?.first(where: { $0.status == "open" })?.id else { return false }
            incidentID = id
            return true
        }, "engine A opened an incident\n\(engineA.process.log.suffix(3000))")
        let before = try engineA.client().timeline(id: incidentID)
        XCTAssertEqual(before.rootCauses.first?.kind, "oom_kill", "\(before.rootCauses)")
        XCTAssertEqual(before.rootCauses.first?.entity, "redis", "\(before.rootCauses)")
        for (name, client) in [("engine B", engineB.client), ("query replica 1", q1.client), ("query replica 2", q2.client)] {
            XCTAssertTrue(eventually(timeout: 20) { (try? client().incidents().incidents.map(\.id))?.contains(incidentID) == true },
                          "\(name) answers incident \(incidentID) from the bucket")
        }
        let known = engineA.metric("tapio_correlate_stream_sequence") ?? 0
        XCTAssertTrue(eventually(timeout: 30) { (engineA.metric("tapio_correlate_checkpoint_sequence") ?? 0) >= known },
                      "engine A checkpointed what it had taken when the incident opened")
        phase("incident \(incidentID) opened by engine A (root cause \(before.rootCauses.first?.kind ?? "?") of \(before.rootCauses.first?.entity ?? "?"))")

        // 1. kill -9 of the ingest replica the agents use: they go on through the other.
        XCTAssertTrue(eventually(timeout: 20) { progressed(beyond: [0, 0, 0], by: 5) }, "the agents sent through ingest A: \(acked())")
        XCTAssertGreaterThanOrEqual(service.connections(to: ingestA.ingestPort), 3, "the agents are connected to ingest A")
        XCTAssertEqual(service.connections(to: ingestB.ingestPort), 0, "no agent used ingest B yet")
        XCTAssertEqual(ingestB.metric("tapio_server_batches_total"), 0)
        // A burst of batches, so some are in flight (published or not,
        // acknowledged or not) when the replica dies.
        let beforeIngestKill = acked()
        for _ in 0..<10 { for agent in agents { agent.addBatch() } }
        ingestA.process.stop(signal: SIGKILL)
        XCTAssertTrue(eventually(timeout: 30) { progressed(beyond: beforeIngestKill, by: 20) },
                      "every agent continued through ingest B: acked \(beforeIngestKill) → \(acked())\n\(ingestB.process.log.suffix(3000))")
        let throughB = try ingestB.metrics()
        for agent in agents {
            XCTAssertEqual(RoleTests.value(throughB, "tapio_node_connected{node=\"\(agent.node)\"}"), 1, "\(agent.node) is connected to ingest B")
            // The clock estimate it places the agent's batches with (loopback: within a second).
            let offset = RoleTests.value(throughB, "tapio_node_clock_offset_seconds{node=\"\(agent.node)\"}")
            XCTAssertNotNil(offset, "ingest B exports \(agent.node)'s clock offset")
            XCTAssertLessThan(abs(offset ?? 99), 1)
            XCTAssertNotNil(RoleTests.value(throughB, "tapio_node_clock_error_seconds{node=\"\(agent.node)\"}"))
        }
        XCTAssertGreaterThan(RoleTests.value(throughB, "tapio_server_batches_total") ?? 0, 0)
        phase("ingest A killed: the agents went on through ingest B (acked batches \(beforeIngestKill) → \(acked()), "
              + "ingest B counted \(Int(RoleTests.value(throughB, "tapio_server_duplicate_batches_total") ?? -1)) resends as duplicates)")

        // 2. kill -9 of the active engine: B leads and answers the incident within 10 s, through the CLI.
        let cli = try TapioCLI()
        func ask(_ port: Int, _ arguments: [String]) throws -> String {
            let r = try cli.run(arguments, env: ["TAPIO_SERVER": "127.0.0.1:\(port)", "TAPIO_TLS_DIR": pki + "/operators/alice"])
            guard r.status == 0 else { throw TestSupportError("tapio \(arguments.joined(separator: " ")) on 127.0.0.1:\(port): \(r.stderr)") }
            return r.stdout
        }
        let killedEngine = Date()
        engineA.process.stop(signal: SIGKILL)
        var served: JSONValue?
        let tookOver = eventually(timeout: 10) {
            guard engineB.metric("tapio_correlate_leader") == 1, (try? engineB.http("/readyz").status) == 200,
                  let listed = try? ask(engineB.queryPort, ["incidents", "-o", "json"]), listed.contains(incidentID),
                  let timeline = try? ask(engineB.queryPort, ["timeline", incidentID, "-o", "json"]) else { return false }
            served = try? JSONValue.parse(Array(timeline.utf8))
            return served != nil
        }
        let failover = Date().timeIntervalSince(killedEngine)
        phase(String(format: "engine A killed: engine B led and `tapio incidents`/`tapio timeline` answered incident %@ after %.1f s", incidentID, failover))
        XCTAssertTrue(tookOver, "within 10 s of the kill: leader \(engineB.metric("tapio_correlate_leader") ?? -1), "
                      + "/readyz \((try? engineB.http("/readyz").body) ?? "-")\n\(engineB.process.log.suffix(4000))")
        XCTAssertLessThanOrEqual(failover, 10.5)
        XCTAssertEqual(served?["id"]?.stringValue, incidentID)
        XCTAssertTrue(served?.serialized().contains("oom_kill") == true, "the incident's root cause survives: \(served?.serialized() ?? "-")")
        XCTAssertTrue(engineB.process.log.contains("engine restored from the checkpoint in JetStream"), engineB.process.log.suffix(3000).description)

        // 3. kill -9 of the NATS node ingest B uses: ingest goes on.
        let health = try ingestB.http("/healthz").body
        let used = try XCTUnwrap(nats.first { health.contains("127.0.0.1:\($0.port)") }, "no NATS server named in ingest B's /healthz: \(health)")
        let beforeNATSKill = acked()
        for _ in 0..<10 { for agent in agents { agent.addBatch() } }
        used.kill9()
        XCTAssertTrue(eventually(timeout: 60) { progressed(beyond: beforeNATSKill, by: 20) },
                      "ingest went on after NATS node \(used.name) was killed: acked \(beforeNATSKill) → \(acked())\n\(ingestB.process.log.suffix(3000))")
        XCTAssertTrue(eventually(timeout: 20) { (try? ingestB.http("/readyz").status) == 200 }, "ingest B is ready on another NATS node")
        XCTAssertTrue(eventually(timeout: 20) { engineB.metric("tapio_correlate_leader") == 1 && (try? engineB.http("/readyz").status) == 200 },
                      "engine B still leads and is ready\n\(engineB.process.log.suffix(3000))")
        phase("NATS node \(used.name) killed: ingest went on (acked batches \(beforeNATSKill) → \(acked()))")

        // Every batch the agents sealed is acknowledged.
        stopLoad?()
        XCTAssertTrue(eventually(timeout: 60) { agents.allSatisfy { $0.outbox.unacknowledged == 0 && $0.outbox.pendingEvents == 0 } },
                      "every batch acknowledged: \(agents.map { "\($0.node) \($0.outbox.unacknowledged) left" })")

        // The stream: every batch of every agent once, by (node, epoch, sequence), every event once.
        let alive = nats.filter { $0 !== used }
        let stored = try await RoleTests.streamedBatches(try await natsClients.jetStream(alive))
        for agent in agents {
            XCTAssertGreaterThan(agent.outbox.lastSequence, 30, "\(agent.node) sent through all three kills")
            RoleTests.assertExactlyOnce(stored, node: agent.node, epoch: agent.outbox.epoch, sequences: 1...agent.outbox.lastSequence)
            let pids = stored.filter { $0.node == agent.node && $0.epoch == agent.outbox.epoch }
                .flatMap { (try? EventBatch.decode($0.payload).events.filter { $0.comm == TestAgent.comm }.map(\.pid)) ?? [] }
            XCTAssertEqual(pids.count, agent.eventsAdded, "\(agent.node): events in the stream")
            XCTAssertEqual(Set(pids), agent.pids, "\(agent.node): every event, once")
        }
        phase("the stream holds every acknowledged batch once: \(agents.map { "\($0.node) 1…\($0.outbox.lastSequence)" }.joined(separator: ", "))")

        // ClickHouse, through the CLI on either query replica: every event once.
        func workerPids(_ q: QueryReplicaProcess, _ node: String) -> [Int64]? {
            guard let out = try? ask(q.queryPort, ["events", "-o", "ndjson", "--node", node, "--kind", "process_exit", "--limit", "100000"]),
                  let events = try? out.split(separator: "\n").map({ try JSONValue.parse(Array($0.utf8)) }) else { return nil }
            return events.filter { $0["comm"]?.stringValue == TestAgent.comm }.compactMap { $0["pid"]?.intValue }
        }
        XCTAssertTrue(eventually(timeout: 60) { agents.allSatisfy { workerPids(q2, $0.node)?.count ?? 0 >= $0.eventsAdded } },
                      "every event reached ClickHouse: \(agents.map { "\($0.node) \(workerPids(q2, $0.node)?.count ?? -1) of \($0.eventsAdded)" })"
                      + "\n\(q1.process.log.suffix(2000))\n\(q2.process.log.suffix(2000))")
        for q in [q1, q2] {
            for agent in agents {
                let pids = workerPids(q, agent.node) ?? []
                XCTAssertEqual(pids.count, agent.eventsAdded, "\(agent.node) through query replica \(q.queryPort): each event once")
                XCTAssertEqual(Set(pids.map { UInt32($0) }), agent.pids, "\(agent.node): every event")
            }
        }
        phase("ClickHouse holds every event once: \(agents.map { "\($0.node) \($0.eventsAdded)" }.joined(separator: ", "))")

        // `tapio events` and `tapio incidents` answer the same through either query replica.
        let everything = ["events", "-o", "ndjson", "--limit", "100000"]
        let events1 = try ask(q1.queryPort, everything)
        XCTAssertEqual(events1, try ask(q2.queryPort, everything), "tapio events: the same through either query replica")
        var answers: [String] = []
        XCTAssertTrue(eventually(timeout: 20) {
            answers = [q1, q2].map { (try? ask($0.queryPort, ["incidents", "-o", "json"])) ?? "" }
            return !answers[0].isEmpty && answers[0] == answers[1]
        }, "tapio incidents: the same through either query replica:\n\(answers.joined(separator: "\n"))")
        XCTAssertTrue(answers[0].contains(incidentID), "the incident opened before the kills is still there: \(answers[0])")
        var timelines: [String] = []
        XCTAssertTrue(eventually(timeout: 20) {
            timelines = [q1, q2].map { (try? ask($0.queryPort, ["timeline", incidentID, "-o", "json"])) ?? "" }
            return !timelines[0].isEmpty && timelines[0] == timelines[1]
        }, "tapio timeline: the same through either query replica:\n\(timelines.joined(separator: "\n"))")
        XCTAssertTrue([ingestB.process, engineB.process, q1.process, q2.process].allSatisfy(\.isRunning), "the replicas left are running")
        phase("tapio events (\(events1.split(separator: "\n").count) events) and tapio incidents answer the same through both query replicas")
    }

    // MARK: - Harness

    /// Every agent seals a batch of 20 events every 250 ms; api's (node-a)
    /// batches carry six refused connects to redis every 500 ms. Returns the
    /// function that stops it (waiting for the last batch to be sealed).
    private static func load(_ agents: [TestAgent]) -> () -> Void {
        let stop = Flag()
        let done = DispatchSemaphore(value: 0)
        Thread {
            var tick = 0
            while !stop.isSet {
                tick += 1
                for agent in agents {
                    agent.addBatch(agent.node == "node-a" && tick % 2 == 0 ? [RoleTests.refusedConnect()] : [])
                }
                Thread.sleep(forTimeInterval: 0.25)
            }
            done.signal()
        }.start()
        return {
            guard !stop.isSet else { return }
            stop.set()
            _ = done.wait(timeout: .now() + 10)
        }
    }
}
