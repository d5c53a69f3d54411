import Foundation
import TapioAgent
import TapioClient
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The engine inside the server: two agents report a Redis OOM kill and the
/// refused connections it causes; the server opens an incident naming it,
/// keeps it across a restart, and an offline replay of the log agrees.
final class CorrelationTests: XCTestCase {
    private func pod(_ name: String, _ service: String, node: String, ip: String) -> PodInfo {
        PodInfo(uid: "uid-\(name)", name: name, namespace: "shop", node: node, ips: [ip], service: service, ownerKind: "Deployment", ownerName: service)
    }

    func testOOMKillBehindRefusedConnectionsBecomesAnIncidentThatSurvivesARestart() throws {
        var harness: ServerHarness? = try ServerHarness(nodes: ["node-a", "node-b"])
        let h = harness!
        let (apiBox, apiSender) = try h.agent(node: "node-a")
        let (redisBox, redisSender) = try h.agent(node: "node-b")
        apiSender.setInventory(Inventory(pods: [pod("api-1", "api", node: "node-a", ip: "10.0.1.10")]))
        redisSender.setInventory(Inventory(pods: [pod("redis-0", "redis", node: "node-b", ip: "10.0.2.10")]))
        // Event times in the recent past, so the engine's watermark has passed them.
        let t0 = wallClockNs() - 90_000_000_000
        func at(_ s: Double) -> Int64 { t0 + Int64(s * 1e9) }
        let flow = Flow(source: IPAddress("10.0.1.10"), destination: IPAddress("10.0.2.10"), sourcePort: 0, destinationPort: 6379)
        func connect(_ s: Double, _ outcome: ConnectOutcome, _ count: UInt32) -> TapioEvent {
            TapioEvent(kind: .tcpConnect, timeNs: at(s), pid: 201, comm: "python3", pod: "api-1", namespace: "shop",
                       detail: .tcpConnect(flow: flow, outcome: outcome, latencyNs: 200_000, error: outcome == .refused ? ECONNREFUSED : 0, count: count))
        }
        for i in 0..<80 { apiBox.add(connect(Double(i) * 0.5, .established, 2)) }
        for i in 80..<100 { apiBox.add(connect(Double(i) * 0.5, .refused, 6)) }
        // The api hanging up on redis while all is well: client aborts, counted and no symptom.
        apiBox.add(TapioEvent(kind: .tcpReset, timeNs: at(5), pid: 201, comm: "python3", pod: "api-1", namespace: "shop",
                              detail: .tcpReset(flow: flow, sent: true, state: 1, count: 3)))
        redisBox.add(TapioEvent(kind: .oomKill, timeNs: at(39.9), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                                detail: .oomKill(victimPid: 301, victimComm: "redis-server", victimUid: 999, totalVmKb: 600_000, anonRssKb: 512_000, fileRssKb: 100)))
        redisBox.add(TapioEvent(kind: .processExit, timeNs: at(39.95), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                                detail: .exit(exitCode: 0, signal: 9, coreDumped: false)))
        redisBox.add(TapioEvent(kind: .tcpListen, timeNs: at(39.96), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                                detail: .tcpListen(address: IPAddress("0.0.0.0"), port: 6379, open: false)))
        for box in [apiBox, redisBox] { box.sealIfDue(nowNs: wallClockNs(), force: true) }
        XCTAssertTrue(eventually { apiBox.unacknowledged == 0 && redisBox.unacknowledged == 0 })

        var incidents: [JSONValue] = []
        XCTAssertTrue(try eventually(timeout: 20) {
            incidents = try h.operatorClient().json("incidents")["incidents"]?.arrayValue ?? []
            return !incidents.isEmpty
        }, "an incident opens")
        let incident = try XCTUnwrap(incidents.first)
        let top = try XCTUnwrap(incident["root_causes"]?.arrayValue?.first)
        XCTAssertEqual(top["entity"], .string("redis"))
        XCTAssertEqual(top["kind"], .string("oom_kill"))
        let id = try XCTUnwrap(incident["id"]?.stringValue)
        let timeline = try h.operatorClient().json("timeline", ["id": id])
        XCTAssertFalse(timeline["timeline"]?.arrayValue?.isEmpty ?? true)
        let explain = try h.operatorClient().json("explain", ["id": id])
        XCTAssertFalse(explain["links"]?.arrayValue?.isEmpty ?? true, "explain lists the causal links with their factors")
        let services = try h.operatorClient().json("services")["services"]?.arrayValue ?? []
        XCTAssertTrue(services.contains { $0["client"] == .string("api") && $0["server"] == .string("redis") }, "\(services)")
        // The engine's counters are on /metrics.
        let metrics = h.server.metricsText()
        let processed = metrics.split(separator: "\n").first { $0.hasPrefix("tapio_correlation_events_processed_total ") }
        XCTAssertGreaterThan(Int(processed?.split(separator: " ").last ?? "") ?? 0, 0, metrics)
        XCTAssertTrue(metrics.contains("tapio_correlation_late_events_total "), metrics)
        XCTAssertTrue(metrics.contains("\n# TYPE tapio_correlation_client_aborts_total counter\n"), metrics)
        XCTAssertTrue(metrics.contains("\ntapio_correlation_client_aborts_total 3\n"), metrics)

        apiSender.drainAndStop(graceSeconds: 1)
        redisSender.drainAndStop(graceSeconds: 1)
        // Restart on the same data directory: the incident is still answered.
        let dataDir = h.dir + "/data"
        let pki = h.pki
        harness = nil
        var config = ServerConfiguration(dataDirectory: dataDir, tls: TLSFiles(directory: pki + "/server"))
        config.ingestPort = 0
        config.queryPort = 0
        config.metricsHost = nil
        let restarted = try TapioServer(configuration: config, logger: .init(label: "restarted"))
        let addresses = try restarted.start()
        defer { restarted.shutdown() }
        let client = try QueryClient(host: "127.0.0.1", port: addresses.query.port!, ca: pki + "/operators/alice/ca.crt",
                                     certificate: pki + "/operators/alice/tls.crt", key: pki + "/operators/alice/tls.key")
        let after = try client.json("incidents")["incidents"]?.arrayValue ?? []
        XCTAssertEqual(after.first?["id"], .string(id))
        XCTAssertEqual(after.first?["root_causes"]?.arrayValue?.first?["kind"], .string("oom_kill"))

        // The same engine offline over the stored log finds the same incident.
        let replay = try TestSupport.run(try TestSupport.product("tapio-server"), ["replay", "--data-dir", dataDir])
        XCTAssertEqual(replay.status, 0, replay.stderr)
        let replayed = try JSONValue.parse(Array(replay.stdout.utf8))["incidents"]?.arrayValue ?? []
        XCTAssertEqual(replayed.first?["id"], .string(id))
        XCTAssertEqual(replayed.first?["root_causes"]?.arrayValue?.first?["entity"], .string("redis"))
    }
}
