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

/// `tapio-server --role query` as operators run it: a real nats-server and a
/// real clickhouse-server, an ingest replica, a correlate replica and two
/// query replicas as processes of the built binary, agents speaking the
/// real protocol, and the `tapio` CLI and the query protocol asking.
final class QueryRoleTests: XCTestCase {
    private var directory = ""
    private var pki = ""
    private var nats: [NATSTestServer] = []
    private var clickhouse: ClickHouseTestServer?
    private var processes: [ChildProcess] = []
    private let natsClients = NATSClientPool()

    override func setUpWithError() throws {
        _ = try NATSTestServer.binary()
        _ = try ClickHouseTestServer.binary()
        _ = try TestSupport.product("tapio-server")
        directory = try TestSupport.temporaryDirectory("tapio-query-role")
        pki = try TestSupport.makePKI(in: directory, nodes: ["node-a", "node-b", "node-c"])
    }

    override func tearDown() {
        for p in processes { _ = p.stop(signal: SIGKILL, timeout: 10) }
        natsClients.closeAll()
        for n in nats { n.stop() }
        clickhouse?.stop()
        if !directory.isEmpty { try? FileManager.default.removeItem(atPath: directory) }
    }

    func testEitherQueryReplicaAnswersEveryEventOnceFromClickHouseAndTheLeadersIncidentFromTheBucket() async throws {
        let started = Date()
        let server = try NATSTestServer(name: "n0", directory: directory)
        try server.start()
        nats = [server]
        let clickhouse = try ClickHouseTestServer()
        self.clickhouse = clickhouse
        let ingest = try IngestReplicaProcess(index: 0, directory: directory, pki: pki, nats: [server.url], streamReplicas: 1)
        processes.append(ingest.process)
        try ingest.waitUntilReady()
        let leader = try CorrelateReplicaProcess(name: "a", directory: directory, pki: pki, nats: [server.url], replicas: 1)
        processes.append(leader.process)
        let q1 = try startQuery("q1", clickhouse: clickhouse)
        let q2 = try startQuery("q2", clickhouse: clickhouse)
        try leader.waitUntilReady()
        try q1.waitUntilReady()
        try q2.waitUntilReady()
        XCTAssertTrue(try q1.http("/readyz").body.contains("role: query"))

        // The feed that opens an incident (redis OOM-killed behind api's refused
        // connects), through real agent senders, and api's connects refused
        // from then on, so it stays open.
        try QueryAPITests.feedOOMKillBehindRefusedConnects(agent: { try RoleTests.agent(node: $0, port: ingest.ingestPort, pki: self.pki) })
        let stopRefusing = RoleTests.keepRefusing(port: ingest.ingestPort, pki: pki)
        defer { stopRefusing() }

        // node-c: 40 batches of 10 events, each event its own pid, through the raw protocol.
        let epoch = UInt64(wallClockNs())
        let raw = try RawAgent(port: ingest.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-c"), node: "node-c", epoch: epoch)
        try raw.sendInventory(Inventory(pods: [PodInfo(uid: "c", name: "worker-0", namespace: "jobs", node: "", ips: ["10.0.3.10"], service: "worker")]))
        let t0 = wallClockNs() - 30_000_000_000
        func events(_ sequence: UInt64) -> [TapioEvent] {
            (0..<10).map { (i: Int) -> TapioEvent in
                let time: Int64 = t0 + Int64(sequence) * 100_000_000 + Int64(i)
                let pid: UInt32 = UInt32(sequence) * 100 + UInt32(i)
                return TapioEvent(kind: .processExec, timeNs: time, pid: pid, comm: "job", pod: "worker-0", namespace: "jobs",
                                  detail: .exec(filename: "/bin/job-\(sequence)-\(i)"))
            }
        }
        for sequence in UInt64(1)...40 { try raw.send(raw.batch(sequence, events: events(sequence))) }
        try ackedThrough(raw, 40)

        // The stream holds some batches twice (republished under another
        // message id, as after the duplicate window) and one message that is
        // no batch: each event is still stored once, the message counted.
        let js = try await natsClients.jetStream([server])
        let last = try await js.streamInfo("TAPIO_EVENTS").state.lastSequence
        var republished = 0
        for streamSequence in UInt64(1)...max(1, last) {
            let stored = try await js.message(stream: "TAPIO_EVENTS", sequence: streamSequence)
            guard stored.subject == StreamedBatch.subject(node: "node-c"), let s = stored.headers["Tapio-Sequence"], ["3", "17", "40"].contains(s) else { continue }
            let ack = try await js.publish(stored.subject, payload: stored.payload, messageID: "again-\(s)", headers: stored.headers)
            XCTAssertFalse(ack.duplicate)
            republished += 1
        }
        XCTAssertEqual(republished, 3, "batches 3, 17 and 40 of node-c are in the stream twice")
        _ = try await js.publish(StreamedBatch.subject(node: "node-c"), payload: Array("not a batch".utf8))

        let cli = try TapioCLI()
        func ndjson(_ q: QueryReplicaProcess, _ args: [String]) throws -> [JSONValue] {
            let r = try cli.run(["events", "-o", "ndjson"] + args, env: ["TAPIO_SERVER": "127.0.0.1:\(q.queryPort)", "TAPIO_TLS_DIR": pki + "/operators/alice"])
            guard r.status == 0 else { throw TestSupportError("tapio events through query replica: \(r.stderr)") }
            return try r.stdout.split(separator: "\n").map { try JSONValue.parse(Array($0.utf8)) }
        }
        let filter = ["--node", "node-c", "--limit", "1000"]
        XCTAssertTrue(eventually(timeout: 30) { ((try? ndjson(q2, filter))?.count ?? 0) >= 400 },
                      "node-c's 400 events reached ClickHouse: \((try? ndjson(q2, filter).count) ?? -1)\n\(q1.process.log.suffix(2000))\n\(q2.process.log.suffix(2000))")
        let through1 = try ndjson(q1, filter)
        let through2 = try ndjson(q2, filter)
        XCTAssertEqual(through1, through2, "both query replicas answer the same")
        var byPid: [Int64: Int] = [:]
        for e in through1 { byPid[e["pid"]?.intValue ?? -1, default: 0] += 1 }
        let expected = Set((UInt64(1)...40).flatMap { s in (0..<10).map { Int64(s * 100) + Int64($0) } })
        XCTAssertEqual(Set(byPid.keys), expected, "every event of every batch")
        XCTAssertEqual(byPid.values.filter { $0 != 1 }.count, 0, "each stored once: \(byPid.filter { $0.value != 1 })")
        XCTAssertEqual(through1.first?["filename"]?.stringValue, "/bin/job-1-0", "oldest first, with the event's fields")
        XCTAssertEqual(through1.first?["kind"]?.stringValue, "process_exec")
        // The same filters as role all, typed: kind, pod, pid, limit.
        let typed = try q1.client().events(["node": "node-c", "kind": "process_exec", "pid": "1705", "pod": "worker-0"])
        XCTAssertEqual(typed.events.map(\.pid), [1705])
        XCTAssertEqual(try q2.client().events(["node": "node-c", "limit": "5"]).events.compactMap(\.pid), [4005, 4006, 4007, 4008, 4009],
                       "the most recent 5, oldest first")
        XCTAssertEqual(try q1.client().events(["service": "worker", "limit": "1000"]).events.count, 400, "a service is its pods in the inventories")
        // The feed's events too (node-a's connects, node-b's OOM kill).
        XCTAssertEqual(try q2.client().events(["kind": "oom_kill"]).events.map(\.node), ["node-b"])

        // The incident the correlate leader opened, through both query replicas.
        var incidentID = ""
        XCTAssertTrue(eventually(timeout: 60) {
            guard let id = (try? leader.client().incidents().incidents)?.first(where: { $0.status == "open" })?.id else { return false }
            incidentID = id
            return true
        }, "the leader opened an incident\n\(leader.process.log.suffix(3000))")
        for q in [q1, q2] {
            XCTAssertTrue(eventually(timeout: 10) { (try? q.client().incidents().incidents.map(\.id))?.contains(incidentID) == true },
                          "query replica answers the leader's incident from the bucket")
            let timeline = try q.client().timeline(id: incidentID)
            XCTAssertEqual(timeline.rootCauses.first?.kind, "oom_kill")
            XCTAssertFalse(timeline.timeline?.isEmpty ?? true)
        }
        // What a query replica does not hold is refused in words.
        XCTAssertThrowsError(try q1.client().services()) { XCTAssertTrue("\($0)".contains("role query"), "\($0)") }
        XCTAssertThrowsError(try q1.client().json("nodes")) { XCTAssertTrue("\($0)".contains("role query"), "\($0)") }

        // Between them, the two replicas wrote every batch and read the bad message once.
        let written = (q1.metric("tapio_query_batches_written_total") ?? 0) + (q2.metric("tapio_query_batches_written_total") ?? 0)
        XCTAssertGreaterThanOrEqual(written, 40)
        XCTAssertEqual((q1.metric("tapio_query_malformed_messages_total") ?? 0) + (q2.metric("tapio_query_malformed_messages_total") ?? 0), 1)
        XCTAssertTrue(q1.process.isRunning && q2.process.isRunning)

        // kill -9 of one query replica: batches sent afterwards are written by the other.
        _ = q1.process.stop(signal: SIGKILL)
        for sequence in UInt64(41)...50 { try raw.send(raw.batch(sequence, events: events(sequence))) }
        try ackedThrough(raw, 50)
        raw.close()
        XCTAssertTrue(eventually(timeout: 30) { ((try? ndjson(q2, filter))?.count ?? 0) >= 500 },
                      "the other replica wrote what came after the kill\n\(q2.process.log.suffix(2000))")
        let after = try ndjson(q2, filter).compactMap { $0["pid"]?.intValue }
        XCTAssertEqual(after.count, Set(after).count, "still each event once")
        XCTAssertEqual(after.count, 500)

        // Its /metrics: promtool, and the tapio_query_* families are the documented table.
        try checkMetrics(q2)
        print("query role test took \(String(format: "%.1f", Date().timeIntervalSince(started))) s")
    }

    func testWhileClickHouseIsDownNothingIsAcknowledgedAndEveryBatchIsWrittenOnceWhenItIsBack() async throws {
        let server = try NATSTestServer(name: "n0", directory: directory)
        try server.start()
        nats = [server]
        let clickhouse = try ClickHouseTestServer()
        self.clickhouse = clickhouse
        let ingest = try IngestReplicaProcess(index: 0, directory: directory, pki: pki, nats: [server.url], streamReplicas: 1)
        processes.append(ingest.process)
        try ingest.waitUntilReady()
        // No correlate replica: the query replica makes the incident bucket itself and serves an empty list.
        let q = try startQuery("q", clickhouse: clickhouse)
        try q.waitUntilReady()
        XCTAssertEqual(try q.client().incidents().incidents.count, 0)

        let raw = try RawAgent(port: ingest.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-c"), node: "node-c", epoch: UInt64(wallClockNs()))
        defer { raw.close() }
        let t0 = wallClockNs() - 10_000_000_000
        func send(_ sequences: ClosedRange<UInt64>) throws {
            for sequence in sequences {
                let events = (0..<5).map { (i: Int) -> TapioEvent in
                    TapioEvent(kind: .processExit, timeNs: t0 + Int64(sequence) * 1_000_000 + Int64(i), pid: UInt32(sequence) * 10 + UInt32(i),
                               comm: "job", pod: "worker-0", namespace: "jobs", detail: .exit(exitCode: 0, signal: 0, coreDumped: false))
                }
                try raw.send(raw.batch(sequence, events: events))
            }
            try ackedThrough(raw, sequences.upperBound)
        }
        func pids() -> [Int64]? { try? q.client().events(["node": "node-c", "limit": "1000"]).events.compactMap(\.pid) }
        try send(1...10)
        XCTAssertTrue(eventually(timeout: 20) { pids()?.count == 50 }, "\(pids()?.count ?? -1)\n\(q.process.log.suffix(2000))")

        // ClickHouse goes: the stream keeps the batches, the replica acknowledges none of them.
        clickhouse.kill()
        try send(11...20)
        XCTAssertTrue(eventually(timeout: 20) { (q.metric("tapio_query_insert_failures_total") ?? 0) >= 1 }, q.process.log.suffix(2000).description)
        XCTAssertThrowsError(try q.client().events(["node": "node-c"])) { XCTAssertTrue("\($0)".contains("events from ClickHouse"), "\($0)") }
        XCTAssertTrue(try q.http("/healthz").body.contains("clickhouse: the last insert failed"))
        XCTAssertEqual(try q.client().incidents().incidents.count, 0, "incidents still answer")
        let js = try await natsClients.jetStream([server])
        let info = try await js.consumerInfo(stream: "TAPIO_EVENTS", consumer: "TAPIO_QUERY_WRITER")
        let lastSequence = try await js.streamInfo("TAPIO_EVENTS").state.lastSequence
        XCTAssertLessThan(info.ackFloor.streamSequence, lastSequence,
                          "batches ClickHouse did not take are not acknowledged")
        XCTAssertTrue(q.process.log.contains("ClickHouse did not accept an insert"), q.process.log.suffix(2000).description)

        // Back: every batch written, each event once.
        try clickhouse.restart()
        XCTAssertTrue(eventually(timeout: 30) { pids()?.count == 100 }, "\(pids()?.count ?? -1)\n\(q.process.log.suffix(2000))")
        let all = pids() ?? []
        XCTAssertEqual(Set(all), Set((UInt64(1)...20).flatMap { s in (0..<5).map { Int64(s * 10) + Int64($0) } }))
        XCTAssertEqual(all.count, Set(all).count, "each event once")
        XCTAssertTrue(q.process.isRunning)
    }

    /// `--clickhouse https://…` with `--clickhouse-tls-dir`: the replica
    /// writes and answers over HTTPS, verifying ClickHouse's certificate;
    /// one that trusts another CA writes nothing and says why.
    func testAQueryReplicaWritesAndAnswersOverHTTPSAndRefusesAnUntrustedClickHouse() async throws {
        let server = try NATSTestServer(name: "n0", directory: directory)
        try server.start()
        nats = [server]
        let clickhouse = try ClickHouseTestServer(tlsDirectory: pki + "/server")
        self.clickhouse = clickhouse
        let httpsPort = try XCTUnwrap(clickhouse.httpsPort)
        // Only the CA, as an operator's secret for a ClickHouse that does not verify clients.
        let trust = directory + "/clickhouse-ca"
        try FileManager.default.createDirectory(atPath: trust, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: pki + "/server/ca.crt", toPath: trust + "/ca.crt")
        let ingest = try IngestReplicaProcess(index: 0, directory: directory, pki: pki, nats: [server.url], streamReplicas: 1)
        processes.append(ingest.process)
        try ingest.waitUntilReady()
        let q = try QueryReplicaProcess(name: "tls", directory: directory, pki: pki, nats: [server.url], clickhousePort: httpsPort,
                                        clickhouseURL: "https://127.0.0.1:\(httpsPort)", extra: ["--clickhouse-tls-dir", trust])
        processes.append(q.process)
        try q.waitUntilReady()
        XCTAssertTrue(try q.http("/readyz").body.contains("clickhouse https://127.0.0.1:\(httpsPort)"))

        let raw = try RawAgent(port: ingest.ingestPort, tls: AgentTLSFiles(directory: pki + "/nodes/node-c"), node: "node-c", epoch: UInt64(wallClockNs()))
        let t0 = wallClockNs() - 10_000_000_000
        for sequence in UInt64(1)...5 {
            try raw.send(raw.batch(sequence, events: (0..<4).map { i in
                TapioEvent(kind: .processExec, timeNs: t0 + Int64(sequence) * 1_000_000 + Int64(i), pid: UInt32(sequence) * 10 + UInt32(i),
                           comm: "job", detail: .exec(filename: "/bin/job"))
            }))
        }
        try ackedThrough(raw, 5)
        raw.close()
        XCTAssertTrue(eventually(timeout: 30) { ((try? q.client().events(["node": "node-c", "limit": "100"]).events.count) ?? 0) == 20 },
                      "the 20 events were written to and read from ClickHouse over HTTPS\n\(q.process.log.suffix(2000))")
        XCTAssertEqual((q.metric("tapio_query_insert_failures_total") ?? 0), 0)

        // A replica that trusts another CA: nothing is written, and it says why.
        let otherPKI = try TestSupport.makePKI(in: directory + "/other", nodes: ["n1"])
        let wary = try QueryReplicaProcess(name: "wary", directory: directory, pki: pki, nats: [server.url], clickhousePort: httpsPort,
                                           clickhouseURL: "https://127.0.0.1:\(httpsPort)", extra: ["--clickhouse-tls-dir", otherPKI + "/server"])
        processes.append(wary.process)
        XCTAssertTrue(eventually(timeout: 30) { wary.process.log.contains("TLS") && wary.process.log.uppercased().contains("CERTIFICATE") },
                      "the refused handshake is logged in words\n\(wary.process.log.suffix(2000))")
        XCTAssertTrue(wary.process.isRunning, "a ClickHouse it cannot trust is a problem to report, not a crash")
    }

    func testFlagsThatCannotWorkAreRefusedInWords() throws {
        let binary = try TestSupport.product("tapio-server")
        let base = ["--role", "query", "--tls-dir", pki + "/server"]
        for (args, words) in [
            (base + ["--clickhouse", "http://127.0.0.1:8123"], "needs at least one --nats"),
            (base + ["--nats", "nats://127.0.0.1:4222"], "needs --clickhouse"),
            (base + ["--nats", "nats://127.0.0.1:4222", "--clickhouse", "ftp://ch:21"], "neither http://HOST:PORT nor https://HOST:PORT"),
            (base + ["--nats", "nats://127.0.0.1:4222", "--clickhouse", "http://ch:8123", "--clickhouse-tls-dir", pki + "/server"],
             "--clickhouse-tls-dir needs an https:// --clickhouse"),
            (base + ["--nats", "nats://127.0.0.1:4222", "--clickhouse", "https://ch:8443", "--clickhouse-tls-dir", directory + "/none"],
             "--clickhouse-tls-dir: cannot read \(directory)/none/ca.crt"),
            (base + ["--nats", "nats://127.0.0.1:4222", "--clickhouse", "https://ch/x"], "give https://HOST:PORT only"),
            (base + ["--nats", "nats://127.0.0.1:4222", "--clickhouse", "http://ch:8123", "--clickhouse-table", "x; DROP"], "not a plain identifier"),
            (base + ["--nats", "nats://127.0.0.1:4222", "--clickhouse", "http://ch:8123", "--data-dir", directory], "not used in role query"),
            (base + ["--nats", "nats://127.0.0.1:4222", "--clickhouse", "http://ch:8123", "--webhook", "http://x/"], "no engine runs here"),
            (["--role", "correlate", "--tls-dir", pki + "/server", "--nats", "nats://127.0.0.1:4222", "--clickhouse", "http://ch:8123"], "for --role query only"),
        ] {
            let r = try TestSupport.run(binary, args)
            XCTAssertNotEqual(r.status, 0, args.joined(separator: " "))
            XCTAssertTrue((r.stderr + r.stdout).contains(words), "\(args.joined(separator: " ")): \(r.stderr)")
        }
        let help = try TestSupport.run(binary, ["serve", "--help"])
        XCTAssertTrue(help.stdout.contains("query"), help.stdout)
    }

    // MARK: - Harness

    /// Reads acknowledgements (cumulative) until one covers `sequence`.
    private func ackedThrough(_ raw: RawAgent, _ sequence: UInt64) throws {
        let deadline = Date(timeIntervalSinceNow: 20)
        while Date() < deadline {
            if let ack = try raw.acks(1, timeoutMs: 1000).last, ack.sequence >= sequence { return }
        }
        XCTFail("no acknowledgement of batch \(sequence) within 20 s")
    }

    private func startQuery(_ name: String, clickhouse: ClickHouseTestServer) throws -> QueryReplicaProcess {
        let q = try QueryReplicaProcess(name: name, directory: directory, pki: pki, nats: nats.map(\.url), clickhousePort: clickhouse.httpPort)
        processes.append(q.process)
        return q
    }

    private func checkMetrics(_ replica: QueryReplicaProcess) throws {
        try RoleTests.checkMetricsDocumented(try replica.metrics(), role: "query", scratchFile: directory + "/query-metrics.txt")
    }
}
