import Foundation
import Logging
@testable import TapioAgent
import TapioClient
import TapioNATS
import Synchronization
import TapioQueryAPI
@testable import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// `tapio-server --role correlate` as operators run it: real nats-servers
/// (three routed into a JetStream cluster), an ingest replica and two
/// correlate replicas as processes of the built binary, agents speaking the
/// real protocol. What the replicas answer is asked over the query
/// protocol, as the CLI asks it.
final class CorrelateRoleTests: XCTestCase {
    private var directory = ""
    private var pki = ""
    private var nats: [NATSTestServer] = []
    private var processes: [ChildProcess] = []
    private let natsClients = NATSClientPool()

    override func setUpWithError() throws {
        _ = try NATSTestServer.binary()
        _ = try TestSupport.product("tapio-server")
        directory = try TestSupport.temporaryDirectory("tapio-correlate-role")
        pki = try TestSupport.makePKI(in: directory, nodes: ["node-a", "node-b", "node-c"])
    }

    override func tearDown() {
        for p in processes { _ = p.stop(signal: SIGKILL, timeout: 10) }
        natsClients.closeAll()
        for n in nats { n.stop() }
        if !directory.isEmpty { try? FileManager.default.removeItem(atPath: directory) }
    }

    // MARK: - Tests

    func testAfterKill9OfTheActiveEngineTheStandbyLeadsFromTheCheckpointAndServesTheIncidentWithin10Seconds() async throws {
        nats = try NATSTestServer.startCluster(directory: directory)
        let ingest = try IngestReplicaProcess(index: 0, directory: directory, pki: pki, nats: nats.map(\.url), streamReplicas: 3)
        processes.append(ingest.process)
        try ingest.waitUntilReady()

        // A starts first and takes the lease; B stands by. Both would notify a webhook.
        let receiver = try WebhookReceiver { _, _ in .ok }
        defer { receiver.close() }
        let webhook = ["--webhook", "http://127.0.0.1:\(receiver.port)/hook"]
        let a = try startCorrelate("a", extra: webhook)
        try a.waitUntilReady()
        XCTAssertTrue(eventually(timeout: 20) { a.metric("tapio_correlate_leader") == 1 }, "A leads\n\(a.process.log.suffix(3000))")
        let b = try startCorrelate("b", extra: webhook)
        try b.waitUntilReady()
        XCTAssertEqual(b.metric("tapio_correlate_leader"), 0, "B stands by")
        let standby = try b.http("/readyz").body
        XCTAssertTrue(standby.contains("standby"), standby)
        // An operator subscribed to the standby hears of incidents the leader opens.
        let heard = Collected()
        let stopListening = Flag()
        let listening = DispatchSemaphore(value: 0)
        let subscriberClient = try b.client()
        Thread {
            do {
                try subscriberClient.subscribe(keepaliveMs: 500) { m in
                    heard.append(m)
                    return !stopListening.isSet
                }
            } catch {
                heard.ended("\(error)")
            }
            listening.signal()
        }.start()
        defer {
            stopListening.set()
            _ = listening.wait(timeout: .now() + 10)
        }
        XCTAssertTrue(eventually { heard.all.first?.type == .snapshot }, "the standby's snapshot: \(heard.all)")

        // The feed that opens an incident: redis OOM-killed, api's connects
        // refused, and refused still (so it stays open across the takeovers).
        try QueryAPITests.feedOOMKillBehindRefusedConnects(agent: { try RoleTests.agent(node: $0, port: ingest.ingestPort, pki: self.pki) })
        let stopRefusing = RoleTests.keepRefusing(port: ingest.ingestPort, pki: pki)
        defer { stopRefusing() }
        // The incident the leader announces (an open one) is the one followed.
        var incidentID = ""
        XCTAssertTrue(eventually(timeout: 120) {
            guard let r = receiver.requests.first(where: { $0.event == "opened" }),
                  let id = (try? JSONValue.parse(r.body))?["incident"]?["id"]?.stringValue else { return false }
            incidentID = id
            return true
        }, "the leader notified the webhook of an open incident: \(receiver.requests.map { $0.event ?? "?" }); incidents: \((try? a.client().json("incidents").serialized()) ?? "no answer")\n\(a.process.log.suffix(3000))")
        func opened() -> Int {
            receiver.requests.filter { $0.event == "opened" && (try? JSONValue.parse($0.body))?["incident"]?["id"]?.stringValue == incidentID }.count
        }
        let before = try a.client().timeline(id: incidentID)
        XCTAssertEqual(before.rootCauses.first?.kind, "oom_kill", "\(before.rootCauses)")
        XCTAssertEqual(before.rootCauses.first?.entity, "redis", "the service of the OOM-killed pod: \(before.rootCauses)")
        // The standby answers it too, from the incident bucket, and told its subscriber.
        XCTAssertTrue(eventually(timeout: 20) { (try? b.client().incidents().incidents.map(\.id))?.contains(incidentID) == true },
                      "the standby serves the incident from the bucket")
        XCTAssertTrue(eventually(timeout: 10) { heard.all.contains { $0.type == .change && $0.change == .opened && $0.incident?.id == incidentID } },
                      "the standby's subscriber heard the incident open: \(heard.all.map { "\($0.type) \($0.change.map { "\($0)" } ?? "")" }) \(heard.end ?? "")")
        XCTAssertThrowsError(try b.client().services(), "a standby has no service map") { error in
            XCTAssertTrue("\(error)".contains("standby"), "\(error)")
        }
        XCTAssertThrowsError(try b.client().pods(), "nor the pods") { error in
            XCTAssertTrue("\(error)".contains("standby"), "\(error)")
        }
        XCTAssertEqual(Set(try a.client().pods().pods.map { "\($0.node)/\($0.name)" }), ["node-a/api-1", "node-b/redis-0"],
                       "the leader's pods, from the inventories in the stream")
        // A checkpoint covering every message A had taken when it announced the incident.
        let known = a.metric("tapio_correlate_stream_sequence") ?? 0
        XCTAssertGreaterThan(known, 0)
        XCTAssertTrue(eventually(timeout: 30) { (a.metric("tapio_correlate_checkpoint_sequence") ?? 0) >= known },
                      "A checkpointed what it took: \(a.metric("tapio_correlate_checkpoint_sequence") ?? -1) of \(known)")

        // kill -9 of the active engine: B leads and serves the incident within 10 s.
        let killed = Date()
        _ = a.process.stop(signal: SIGKILL)
        var served: QueryIncident?
        let tookOver = eventually(timeout: 10) {
            guard b.metric("tapio_correlate_leader") == 1, (try? b.http("/readyz").status) == 200 else { return false }
            served = try? b.client().timeline(id: incidentID)
            return served != nil
        }
        let elapsed = Date().timeIntervalSince(killed)
        print("after kill -9 of the active engine: the standby led and served incident \(incidentID) after \(String(format: "%.1f", elapsed)) s")
        XCTAssertTrue(tookOver, "within 10 s of the kill: leader \(b.metric("tapio_correlate_leader") ?? -1), /readyz \((try? b.http("/readyz").body) ?? "-")\n\(b.process.log.suffix(4000))")
        XCTAssertLessThanOrEqual(elapsed, 10.5)
        XCTAssertEqual(served?.rootCauses.first?.kind, "oom_kill")
        XCTAssertEqual(served?.rootCauses.first?.entity, before.rootCauses.first?.entity)
        XCTAssertFalse(served?.timeline?.isEmpty ?? true, "served with its timeline")
        // From the checkpoint, with the engine's state: the service map it had learned.
        XCTAssertTrue(b.process.log.contains("engine restored from the checkpoint in JetStream"), b.process.log.suffix(3000).description)
        XCTAssertGreaterThanOrEqual(b.metric("tapio_correlate_checkpoint_sequence") ?? 0, known, "B started after a checkpoint covering the incident")
        // The feed's 160 established connects reached only A: B has them from the checkpoint.
        let services = try b.client().services()
        XCTAssertTrue(services.services.contains { $0.client == "api" && $0.server == "redis" && $0.connects - $0.failures >= 160 && $0.failures > 0 },
                      "the restored engine knows api's connects to redis: \(services.services.map { "\($0.client)->\($0.server) \($0.connects)/\($0.failures)" })")

        // A malformed message in the stream is counted and skipped; events
        // sent after the kill reach the new leader.
        let js = try await natsClients.jetStream(nats)
        _ = try await js.publish(StreamedBatch.subject(node: "node-c"), payload: Array("not a batch".utf8))
        let epoch = UInt64(wallClockNs())
        let raw = try RawAgent(port: ingest.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-c"), node: "node-c", epoch: epoch)
        try raw.sendInventory(Inventory(pods: [PodInfo(uid: "c", name: "checkout-7", namespace: "shop", node: "", ips: ["10.0.3.10"], service: "checkout")]))
        let flow = Flow(source: IPAddress("10.0.3.10"), destination: IPAddress("10.0.2.10"), sourcePort: 0, destinationPort: 6379)
        let connects = (0..<20).map { i in
            TapioEvent(kind: .tcpConnect, timeNs: wallClockNs() - Int64(20 - i) * 100_000_000, pid: 700, comm: "checkout", pod: "checkout-7", namespace: "shop",
                       detail: .tcpConnect(flow: flow, outcome: .established, latencyNs: 300_000, error: 0, count: 1))
        }
        try raw.send(raw.batch(1, events: connects))
        XCTAssertEqual(try raw.acks(1, timeoutMs: 20_000).map(\.sequence), [1])
        raw.close()
        XCTAssertTrue(eventually(timeout: 30) {
            (try? b.client().services().services.contains { $0.client == "checkout" }) == true
        }, "the new leader took the events sent after the kill: \((try? b.client().services().services.map { "\($0.client)->\($0.server)" }) ?? [])\n\(b.process.log.suffix(3000))")
        XCTAssertEqual(b.metric("tapio_correlate_malformed_messages_total"), 1, "the malformed message counted once")
        XCTAssertTrue(try b.client().pods().pods.contains { $0.node == "node-c" && $0.name == "checkout-7" }, "node-c's inventory, sent after the kill")
        XCTAssertTrue(b.process.log.contains("a message of the stream cannot be read; skipped"))
        XCTAssertTrue(b.process.isRunning)

        // A stopped leader hands over at once: B is stopped with SIGTERM, A' (a new standby) leads.
        let c = try startCorrelate("c", extra: webhook)
        try c.waitUntilReady()
        XCTAssertEqual(c.metric("tapio_correlate_leader"), 0)
        XCTAssertEqual(b.process.stop(signal: SIGTERM, timeout: 20), 0, b.process.log.suffix(2000).description)
        XCTAssertTrue(b.process.log.contains("engine lease released"), b.process.log.suffix(2000).description)
        XCTAssertTrue(eventually(timeout: 10) { c.metric("tapio_correlate_leader") == 1 && (try? c.http("/readyz").status) == 200 },
                      "the standby leads after a graceful stop\n\(c.process.log.suffix(3000))")
        XCTAssertTrue(eventually(timeout: 10) { (try? c.client().services().services.contains { $0.client == "checkout" }) == true },
                      "from B's last checkpoint, written at its stop")
        XCTAssertNotNil(try? c.client().timeline(id: incidentID))
        // The refusals stop, the incident resolves on C, and C says so:
        // after two takeovers the incident was announced once, and its end
        // is announced (each new leader takes what is open as announced).
        stopRefusing()
        XCTAssertTrue(eventually(timeout: 120) {
            receiver.requests.contains { $0.event == "resolved" && (try? JSONValue.parse($0.body))?["incident"]?["id"]?.stringValue == incidentID }
        }, "the leader after two takeovers announced the incident's end: \(receiver.requests.map { $0.event ?? "?" })\n\(c.process.log.suffix(3000))")
        XCTAssertEqual(opened(), 1, "\(receiver.requests.map { $0.event ?? "?" })")
    }

    func testTheEngineGoesOnWhenTheNATSNodeItsLeaderUsesIsKilled() async throws {
        nats = try NATSTestServer.startCluster(directory: directory)
        let ingest = try IngestReplicaProcess(index: 0, directory: directory, pki: pki, nats: nats.map(\.url), streamReplicas: 3)
        processes.append(ingest.process)
        try ingest.waitUntilReady()
        let a = try startCorrelate("a")
        try a.waitUntilReady()
        XCTAssertTrue(eventually(timeout: 20) { a.metric("tapio_correlate_leader") == 1 }, "A leads\n\(a.process.log.suffix(3000))")
        let b = try startCorrelate("b")
        try b.waitUntilReady()

        let (outbox, sender) = try RoleTests.agent(node: "node-c", port: ingest.ingestPort, pki: pki)
        defer { sender.drainAndStop(graceSeconds: 0) }
        func connects(from service: String, ip: String) {
            sender.setInventory(Inventory(pods: [PodInfo(uid: service, name: service + "-1", namespace: "shop", node: "node-c", ips: [ip], service: service)]))
            let flow = Flow(source: IPAddress(ip), destination: IPAddress("10.0.2.10"), sourcePort: 0, destinationPort: 6379)
            for i in 0..<20 {
                outbox.add(TapioEvent(kind: .tcpConnect, timeNs: wallClockNs() - Int64(20 - i) * 100_000_000, pid: 800, comm: service, pod: service + "-1",
                                      namespace: "shop", detail: .tcpConnect(flow: flow, outcome: .established, latencyNs: 300_000, error: 0, count: 1)))
            }
            outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        }
        func leaderServes(_ service: String) -> CorrelateReplicaProcess? {
            [a, b].first { r in
                r.process.isRunning && r.metric("tapio_correlate_leader") == 1
                    && (try? r.client().services().services.contains { $0.client == service }) == true
            }
        }
        connects(from: "cart", ip: "10.0.3.20")
        XCTAssertTrue(eventually(timeout: 30) { leaderServes("cart") === a }, "A took the first events")

        // The NATS node A is connected to (named on its /healthz) dies.
        let health = try a.http("/healthz").body
        let used = try XCTUnwrap(nats.first { health.contains("127.0.0.1:\($0.port)") }, "no NATS server named in /healthz: \(health)")
        used.kill9()
        connects(from: "billing", ip: "10.0.3.21")
        XCTAssertTrue(eventually(timeout: 60) { outbox.unacknowledged == 0 }, "the ingest replica stored the batch after the NATS node died")
        var leader: CorrelateReplicaProcess?
        XCTAssertTrue(eventually(timeout: 60) {
            leader = leaderServes("billing")
            return leader != nil
        }, "an engine took the events sent after NATS node \(used.name) died\nA: \(a.process.log.suffix(3000))\nB: \(b.process.log.suffix(2000))")
        let leaders = [a, b].filter { $0.process.isRunning && $0.metric("tapio_correlate_leader") == 1 }
        XCTAssertEqual(leaders.count, 1, "one engine leads")
        print("after NATS node \(used.name) was killed: \(leader === a ? "A still leads" : "B leads")\(a.process.isRunning ? "" : " (A exited)"),",
              "consumers made again: \(leader?.metric("tapio_correlate_consumer_restarts_total") ?? -1)")
        XCTAssertTrue(eventually(timeout: 20) { (try? (leader ?? a).http("/readyz").status) == 200 }, "the leader is ready")
    }

    func testCorrelateFlagsThatCannotWorkAreRefusedInWordsAndHelpNamesTheRole() throws {
        let binary = try TestSupport.product("tapio-server")
        let tls = ["--tls-dir", pki + "/server"]
        let cases: [([String], String)] = [
            (["--role", "correlate"] + tls, "--role correlate needs at least one --nats URL"),
            (["--role", "correlate", "--nats", "nats://127.0.0.1:4222", "--data-dir", directory + "/d"] + tls, "--data-dir is not used in role correlate"),
            (["--role", "correlate", "--nats", "nats://127.0.0.1:4222", "--lease-timeout", "0.1"] + tls, "--lease-timeout must be between 1 and 3600"),
            (["--role", "bogus", "--nats", "nats://127.0.0.1:4222"] + tls, "'bogus' is invalid for '--role <all|ingest|correlate|query>'"),
        ]
        for (arguments, expected) in cases {
            let r = try TestSupport.run(binary, arguments, timeout: 20)
            XCTAssertNotEqual(r.status, 0, "\(arguments) started")
            XCTAssertTrue(r.stderr.contains(expected), "\(arguments): expected '\(expected)' in: \(r.stderr)")
        }
        let overview = try TestSupport.run(binary, ["--help"], timeout: 20).stdout
        XCTAssertTrue(overview.contains("correlate  the engine on that stream"), overview)
        let help = try TestSupport.run(binary, ["serve", "--help"], timeout: 20).stdout
        for flag in ["--role <all|ingest|correlate|query>", "--lease-timeout", "--checkpoint-interval", "--query-listen"] {
            XCTAssertTrue(help.contains(flag), "--help lacks \(flag)")
        }
    }

    /// The replica's /metrics passes promtool, every family has its own help,
    /// and the correlate role's families are the table of docs/operations.md
    /// ("Metrics of the correlate role"); the others it shares are in the
    /// tables of "Metrics and health".
    func testTheCorrelateReplicasMetricsAreDocumentedAndPassPromtool() throws {
        let server = try NATSTestServer(name: "n1", directory: directory)
        nats.append(server)
        try server.start()
        let replica = try startCorrelate("m", servers: [server], streamReplicas: 1)
        try replica.waitUntilReady()
        XCTAssertTrue(eventually(timeout: 20) { replica.metric("tapio_correlate_leader") == 1 })
        let text = try replica.metrics()
        XCTAssertFalse(text.contains(MetricsCatalog.unknownHelp), text)
        try RoleTests.checkMetricsDocumented(text, role: "correlate", scratchFile: directory + "/correlate.prom")
        XCTAssertTrue(try replica.http("/readyz").body.contains("role: correlate, leader"))
    }

    // MARK: - Harness

    private func startCorrelate(_ name: String, servers: [NATSTestServer]? = nil, streamReplicas: Int = 3, extra: [String] = []) throws -> CorrelateReplicaProcess {
        let replica = try CorrelateReplicaProcess(name: name, directory: directory, pki: pki, nats: (servers ?? nats).map(\.url), replicas: streamReplicas,
                                                  extra: extra)
        processes.append(replica.process)
        return replica
    }
}

/// The correlate role's pieces that need no server: the set of batches taken,
/// the incident board, the checkpoint checksum.
final class CorrelateRolePartsTests: XCTestCase {
    func testABatchIsTakenOncePerNodeEpochAndSequenceInAnyOrder() {
        var seen = SeenBatches()
        XCTAssertTrue(seen.insert(node: "a", epoch: 1, sequence: 2))
        XCTAssertTrue(seen.insert(node: "a", epoch: 1, sequence: 1))
        XCTAssertFalse(seen.insert(node: "a", epoch: 1, sequence: 2), "below the contiguous prefix")
        XCTAssertFalse(seen.insert(node: "a", epoch: 1, sequence: 1))
        XCTAssertTrue(seen.insert(node: "a", epoch: 1, sequence: 5))
        XCTAssertFalse(seen.insert(node: "a", epoch: 1, sequence: 5), "above a gap")
        XCTAssertTrue(seen.insert(node: "a", epoch: 1, sequence: 3))
        XCTAssertTrue(seen.insert(node: "a", epoch: 2, sequence: 1), "another epoch")
        XCTAssertTrue(seen.insert(node: "b", epoch: 1, sequence: 1), "another node")
    }

    func testTheBoardKeepsTheNewestVersionOfEachIncidentAndSaysWhatChanged() throws {
        let board = IncidentBoard()
        let v1 = StoredIncident(id: "inc-1", status: "open", openedNs: 10, updatedNs: 20, json: #"{"id":"inc-1","title":"x"}"#)
        var v2 = v1
        v2.updatedNs = 30
        v2.status = "resolved"
        XCTAssertTrue(board.mirror(v2) == (true, true))
        XCTAssertTrue(board.mirror(v1) == (false, false), "an older version arriving late changes nothing")
        XCTAssertTrue(board.mirror(v2) == (false, false), "nor the same one again")
        XCTAssertEqual(try board.incidents(), [v2])
        let saved = Mutex<[String]>([])
        board.publishSaves { i in saved.withLock { $0.append(i.id) } }
        try board.saveIncident(StoredIncident(id: "inc-0", status: "open", openedNs: 5, updatedNs: 6, json: "{}"))
        XCTAssertEqual(saved.withLock { $0 }, ["inc-0"], "the engine's saves are handed to the publisher")
        XCTAssertEqual(try board.incidents().map(\.id), ["inc-0", "inc-1"], "oldest first")

        // The bucket's value reads back as it was written; anything else is refused in words.
        XCTAssertEqual(try IncidentBoard.decode(IncidentBoard.encode(v2)).updatedNs, 30)
        XCTAssertEqual(try JSONValue.parse(Array(IncidentBoard.decode(IncidentBoard.encode(v2)).json.utf8)), try JSONValue.parse(Array(v2.json.utf8)))
        XCTAssertThrowsError(try IncidentBoard.decode(Array(#"{"id":"x"}"#.utf8))) { XCTAssertTrue("\($0)".contains("without id, status"), "\($0)") }
        XCTAssertThrowsError(try IncidentBoard.decode(Array("not json".utf8)))
    }

    func testTheCheckpointChecksumChangesWithAnyByte() {
        let bytes = (0..<1000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        var other = bytes
        other[500] ^= 1
        XCTAssertEqual(CorrelateReplica.checksum(bytes), CorrelateReplica.checksum(bytes))
        XCTAssertNotEqual(CorrelateReplica.checksum(bytes), CorrelateReplica.checksum(other))
        XCTAssertNotEqual(CorrelateReplica.checksum(bytes), CorrelateReplica.checksum(Array(bytes.dropLast())))
    }
}
