import Foundation
import TapioAgent
import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

/// The server's /metrics says what happened: an OOM kill behind refused
/// connections shows as one open incident of kind oom_kill, the age of the
/// events stored is in the ingest-lag histogram (on the server's clock), and
/// every query answered is in the query histogram.
final class ServerMetricsTests: XCTestCase {
    private func pod(_ name: String, _ service: String, node: String, ip: String) -> PodInfo {
        PodInfo(uid: "uid-\(name)", name: name, namespace: "shop", node: node, ips: [ip], service: service, ownerKind: "Deployment", ownerName: service)
    }

    private static func value(_ series: String, in text: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ").last!) }
    }

    func testAnIncidentItsEventsAgeAndTheQueriesShowOnMetrics() throws {
        let h = try ServerHarness(nodes: ["node-a", "node-b"])
        let (apiBox, apiSender) = try h.agent(node: "node-a")
        let (redisBox, redisSender) = try h.agent(node: "node-b")
        defer {
            apiSender.drainAndStop(graceSeconds: 1)
            redisSender.drainAndStop(graceSeconds: 1)
        }
        apiSender.setInventory(Inventory(pods: [pod("api-1", "api", node: "node-a", ip: "10.0.1.10")]))
        redisSender.setInventory(Inventory(pods: [pod("redis-0", "redis", node: "node-b", ip: "10.0.2.10")]))
        let before = h.server.metricsText()
        XCTAssertEqual(Self.value("tapio_server_incidents_open{root_cause_kind=\"oom_kill\"}", in: before), 0, before)
        XCTAssertEqual(Self.value("tapio_server_ingest_lag_seconds_count", in: before), 0, before)

        // Events 55 s to 5 s old when they are sent: the refusals have just
        // stopped, so the incident stays open for the engine's quiet period (30 s).
        let t0 = wallClockNs() - 55_000_000_000
        func at(_ s: Double) -> Int64 { t0 + Int64(s * 1e9) }
        let flow = Flow(source: IPAddress("10.0.1.10"), destination: IPAddress("10.0.2.10"), sourcePort: 0, destinationPort: 6379)
        func connect(_ s: Double, _ outcome: ConnectOutcome, _ count: UInt32) -> TapioEvent {
            TapioEvent(kind: .tcpConnect, timeNs: at(s), pid: 201, comm: "python3", pod: "api-1", namespace: "shop",
                       detail: .tcpConnect(flow: flow, outcome: outcome, latencyNs: 200_000, error: outcome == .refused ? ECONNREFUSED : 0, count: count))
        }
        for i in 0..<80 { apiBox.add(connect(Double(i) * 0.5, .established, 2)) }
        for i in 80..<100 { apiBox.add(connect(Double(i) * 0.5, .refused, 6)) }
        redisBox.add(TapioEvent(kind: .oomKill, timeNs: at(39.9), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                                detail: .oomKill(victimPid: 301, victimComm: "redis-server", victimUid: 999, totalVmKb: 600_000, anonRssKb: 512_000, fileRssKb: 100)))
        redisBox.add(TapioEvent(kind: .processExit, timeNs: at(39.95), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                                detail: .exit(exitCode: 0, signal: 9, coreDumped: false)))
        redisBox.add(TapioEvent(kind: .tcpListen, timeNs: at(39.96), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                                detail: .tcpListen(address: IPAddress("0.0.0.0"), port: 6379, open: false)))
        for box in [apiBox, redisBox] { box.sealIfDue(nowNs: wallClockNs(), force: true) }
        XCTAssertTrue(eventually { apiBox.unacknowledged == 0 && redisBox.unacknowledged == 0 })

        var queries = 0
        XCTAssertTrue(try eventually(timeout: 20) {
            queries += 1
            let open = try h.operatorClient().json("incidents", ["status": "open"])["incidents"]?.arrayValue ?? []
            return open.contains { $0["root_causes"]?.arrayValue?.first?["kind"] == .string("oom_kill") }
        }, "an incident opens")

        var text = ""
        // The gauge follows the engine's pass after the incident opened.
        XCTAssertTrue(eventually(timeout: 5) {
            text = h.server.metricsText()
            return Self.value("tapio_server_incidents_open{root_cause_kind=\"oom_kill\"}", in: text) == 1
        }, text)
        XCTAssertEqual(Self.value("tapio_server_incidents_open{root_cause_kind=\"unknown\"}", in: text), 0, text)

        // The oldest event of every batch was 15 s old or more (the OOM kill
        // leads the youngest batch): none in the buckets up to 10 s, all by
        // 300 s; the sum is at least 15 s per batch.
        let batches = try XCTUnwrap(Self.value("tapio_server_ingest_lag_seconds_count", in: text))
        XCTAssertGreaterThanOrEqual(batches, 2, text)
        XCTAssertEqual(Self.value("tapio_server_ingest_lag_seconds_bucket{le=\"10\"}", in: text), 0, text)
        XCTAssertEqual(Self.value("tapio_server_ingest_lag_seconds_bucket{le=\"300\"}", in: text), batches, text)
        XCTAssertGreaterThanOrEqual(Self.value("tapio_server_ingest_lag_seconds_sum", in: text) ?? 0, 15 * batches, text)
        XCTAssertGreaterThanOrEqual(Self.value("tapio_server_batch_commit_seconds_count", in: text) ?? 0, 1, text)

        XCTAssertEqual(Self.value("tapio_server_query_seconds_count", in: text).map(Int.init), queries, text)
        XCTAssertEqual(Self.value("tapio_server_queries_total{method=\"incidents\"}", in: text).map(Int.init), queries, text)
    }
}
