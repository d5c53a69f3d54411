import Foundation
import TapioAgent
import TapioClient
import TapioQueryAPI
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The typed query API against real servers: every answer of a server
/// holding a recorded lab run decodes into its type and encodes back to the
/// same document (no field the types do not know, none they invent), and
/// the server's typed answers are the documents the engine itself describes
/// (so the wire stayed what docs/protocol.md says). A subscription gets its
/// snapshot, then each change as the engine makes it, and keepalives.
final class QueryAPITests: XCTestCase {
    /// Scenarios whose events cover every field family: connects and resets
    /// with peers (cascade), DNS with its server's pod (dns-nxdomain),
    /// netfilter drops (firewall-drop), CPU throttling, I/O errors (disk-full).
    static let scenarios = ["cascade", "dns-nxdomain", "firewall-drop", "cpu-throttle", "disk-full"]

    func testEveryAnswerOfARecordedRunDecodesIntoItsTypeWithNothingLeftOver() throws {
        var kinds = Set<String>()
        for scenario in Self.scenarios {
            let fixture = try RecordedServer(scenario: scenario)
            let client = try fixture.harness.operatorClient()
            func raw(_ method: QueryMethod, _ params: [String: String] = [:]) throws -> [UInt8] {
                let response = try client.query(QueryRequest(method: method.rawValue, params: params))
                XCTAssertEqual(response.status, 0, "\(scenario) \(method): \(response.error)")
                return response.json
            }

            let eventsBytes = try raw(.events, ["since_ns": "0", "limit": "100000"])
            let events = try strict(EventsAnswer.self, eventsBytes, "\(scenario) events")
            XCTAssertGreaterThan(events.events.count, 500, "\(scenario): the recording's events are answered")
            XCTAssertEqual(events.count, events.events.count)
            for e in events.events {
                XCTAssertEqual(e.extra, [:], "\(scenario): an event field the types do not know: \(e.extra.keys.sorted()) in a \(e.kind)")
                XCTAssertNotNil(e.eventKind, "\(scenario): unknown kind \(e.kind)")
                kinds.insert(e.kind)
            }
            XCTAssertEqual(try client.events(["since_ns": "0", "limit": "100000"]), events, "the typed method answers the same")
            // Each event is the store's own document of it (docs/events.md),
            // plus only the peers' pods the server adds at query time.
            var query = EventQuery()
            query.sinceNs = 0
            query.limit = 100_000
            let stored = try fixture.harness.server.store.events(query)
            XCTAssertEqual(stored.count, events.events.count, scenario)
            let peerKeys = Set(["dst", "src", "server"].flatMap { p in ["pod", "namespace", "service", "node"].map { "\(p)_\($0)" } })
            var attributed = 0
            for (e, s) in zip(events.events, stored) {
                guard case .object(var answered) = try JSONValue.parse(QueryCoding.encode(e)), case .object(let own) = s.json else { continue }
                for key in peerKeys where answered.removeValue(forKey: key) != nil { attributed += 1 }
                if !(JSONValue.object(answered) ~= .object(own)) {
                    XCTFail("\(scenario): an event differs from the stored one: \(difference(.object(own), .object(answered)) ?? "")")
                    break
                }
            }
            if scenario == "cascade" { XCTAssertGreaterThan(attributed, 0, "peers are attributed") }
            if scenario == "cpu-throttle" {
                XCTAssertTrue(events.events.contains { $0.usageNs != nil }, "the recording's agents report CPU usage, and it is read")
            }

            let nodes = try strict(NodesAnswer.self, try raw(.nodes), "\(scenario) nodes")
            XCTAssertGreaterThanOrEqual(nodes.nodes.count, 2, "\(scenario): the run's nodes")
            let pods = try strict(PodsAnswer.self, try raw(.pods), "\(scenario) pods")
            XCTAssertEqual(try client.pods(), pods)
            let services = try strict(ServicesAnswer.self, try raw(.services), "\(scenario) services")
            XCTAssertFalse(services.services.isEmpty, "\(scenario): the dependency graph")
            let typedServices = try JSONValue.parse(QueryCoding.encode(services)), ownServices = fixture.harness.server.correlation.servicesJSON()
            XCTAssertEqual(typedServices ~= ownServices, true,
                           "\(scenario): services is the graph's own document: \(difference(ownServices, typedServices) ?? "")")

            let incidents = try strict(IncidentsAnswer.self, try raw(.incidents, ["status": "all"]), "\(scenario) incidents")
            XCTAssertFalse(incidents.incidents.isEmpty, "\(scenario): the replayed fault opened an incident")
            let engineList = try fixture.harness.server.correlation.incidentsJSON(status: nil, sinceNs: nil)["incidents"]?.arrayValue ?? []
            XCTAssertEqual(JSONValue.array(try incidents.incidents.map { try JSONValue.parse(QueryCoding.encode($0)) }) ~= .array(engineList), true,
                           "\(scenario): the incidents list is the engine's own document")
            for i in incidents.incidents {
                XCTAssertNil(i.timeline, "the list leaves the timeline out")
                let timeline = try strict(QueryIncident.self, try raw(.timeline, ["id": i.id]), "\(scenario) timeline \(i.id)")
                XCTAssertFalse(timeline.timeline?.isEmpty ?? true, "\(scenario) \(i.id): a timeline")
                XCTAssertNil(timeline.links)
                let explain = try strict(QueryIncident.self, try raw(.explain, ["id": i.id]), "\(scenario) explain \(i.id)")
                XCTAssertFalse(explain.links?.isEmpty ?? true, "\(scenario) \(i.id): links")
                XCTAssertNotNil(explain.weights?["bias"])
                XCTAssertEqual(explain.summary, i, "explain is the list's entry plus its explanation")
                for (answer, isExplain) in [(timeline, false), (explain, true)] {
                    let engine = try XCTUnwrap(try fixture.harness.server.correlation.incidentJSON(id: i.id, explain: isExplain))
                    XCTAssertEqual(try JSONValue.parse(QueryCoding.encode(answer)) ~= engine, true,
                                   "\(scenario) \(i.id): \(isExplain ? "explain" : "timeline") is the engine's own document")
                }
                XCTAssertEqual(try client.explain(id: i.id), explain)
            }

            // A subscription's first message is the same list.
            var snapshot: SubscriptionMessage?
            try client.subscribe(keepaliveMs: 1000) { message in
                snapshot = message
                return false
            }
            XCTAssertEqual(snapshot?.type, .snapshot)
            XCTAssertEqual(snapshot?.incidents, incidents.incidents, "\(scenario): the snapshot holds every incident")
        }
        for kind in ["tcp_connect", "dns", "packet_drop", "cpu_throttle", "io_error", "process_exit"] {
            XCTAssertTrue(kinds.contains(kind), "the recordings cover \(kind): \(kinds.sorted())")
        }
    }

    func testASubscriberGetsTheSnapshotThenEachChangeAsItHappensAndKeepalives() throws {
        let harness = try ServerHarness(nodes: ["node-a", "node-b"])
        let client = try harness.operatorClient()
        let messages = Collected()
        let done = DispatchSemaphore(value: 0)
        let stop = Flag()
        let subscriber = Thread {
            do {
                try client.subscribe(keepaliveMs: 200) { m in
                    messages.append(m)
                    return !stop.isSet
                }
                messages.ended("returned")
            } catch {
                messages.ended("\(error)")
            }
            done.signal()
        }
        subscriber.start()
        defer {
            stop.set()
            _ = done.wait(timeout: .now() + 10)
        }
        XCTAssertTrue(eventually { messages.all.first?.type == .snapshot }, "the snapshot comes first: \(messages.all)")
        XCTAssertEqual(messages.all.first?.incidents, [], "an empty server has no incident")

        try Self.feedOOMKillBehindRefusedConnects(harness)
        XCTAssertTrue(eventually(timeout: 30) { messages.all.contains { $0.type == .change } }, "a change is pushed: \(messages.all.map(\.type))")
        let first = try XCTUnwrap(messages.all.first { $0.type == .change })
        XCTAssertEqual(first.change, .opened, "a new incident opens (the events are 90 s old, so it may resolve at once: then a resolved change follows)")
        if first.incident?.isResolved == true {
            XCTAssertTrue(eventually { messages.all.contains { $0.change == .resolved && $0.incident?.id == first.incident?.id } }, "\(messages.all)")
        }
        // Each node's agent sends on its own: when the engine took the
        // symptoms' batch a pass before the cause's, the incident opens first
        // and a change naming the cause follows.
        XCTAssertTrue(eventually(timeout: 30) {
            messages.all.contains { $0.incident?.id == first.incident?.id && $0.incident?.topCause?.kind == "oom_kill" && $0.incident?.topCause?.entity == "redis" }
        }, "the cause is pushed: \(messages.all.map { "\($0.change.map(\.rawValue) ?? "-") \($0.incident?.topCause.map { "\($0.kind) \($0.entity)" } ?? "-")" })")
        XCTAssertNil(first.incident?.timeline, "a change carries the incident as the list has it")
        XCTAssertTrue(eventually { messages.all.filter { $0.type == .keepalive }.count >= 2 }, "keepalives while nothing changes")
        XCTAssertEqual(harness.server.metrics.value("tapio_server_queries_total{method=\"incidents\"}"), 0, "pushed, never polled")
        XCTAssertEqual(harness.server.metrics.value("tapio_server_queries_total{method=\"subscribe\"}"), 1)

        // The server going away ends the subscription with a failure a restart explains.
        harness.server.shutdown()
        XCTAssertEqual(done.wait(timeout: .now() + 10), .success, "the subscription ends with the server")
        let ended = try XCTUnwrap(messages.end)
        XCTAssertTrue(ended.contains("shutting down") || ended.contains("closed"), ended)
    }

    func testASubscriptionRefusesParametersItDoesNotTake() throws {
        let harness = try ServerHarness(nodes: ["node-a"])
        let client = try harness.operatorClient()
        for (ms, words) in [(Int64(5), "keepalive_ms must be an integer from 100 to 60000, got 5"), (120_000, "got 120000")] {
            XCTAssertThrowsError(try client.subscribe(keepaliveMs: ms) { _ in false }) { error in
                XCTAssertEqual((error as? QueryError)?.kind, .refused)
                XCTAssertTrue("\(error)".contains(words), "\(error)")
            }
        }
        let other = try client.query(QueryRequest(method: "subscribe", params: ["status": "open"]))
        XCTAssertEqual(other.status, WireErrorCode.badRequest.rawValue)
        XCTAssertTrue(other.error.contains("subscribe takes keepalive_ms only, not status"), other.error)
        let unknown = try client.query(QueryRequest(method: "incident"))
        XCTAssertTrue(unknown.error.contains("unknown query method incident; one of: events, nodes"), unknown.error)
    }

    // MARK: - Helpers

    /// Decodes `bytes` as `T` and checks that encoding it again gives the
    /// same document: a field `T` does not know would be lost, a field it
    /// lacks would be invented with a default.
    func strict<T: Codable>(_ type: T.Type, _ bytes: [UInt8], _ what: String, file: StaticString = #filePath, line: UInt = #line) throws -> T {
        let value = try QueryCoding.decode(type, from: bytes)
        let original = try JSONValue.parse(bytes)
        let again = try JSONValue.parse(QueryCoding.encode(value))
        if !(original ~= again) {
            XCTFail("\(what): \(difference(original, again) ?? "differs")", file: file, line: line)
        }
        return value
    }

    /// Where two documents first differ, nil when they do not.
    func difference(_ a: JSONValue, _ b: JSONValue, at path: String = "") -> String? {
        switch (a, b) {
        case (.object(let x), .object(let y)):
            for key in Set(x.keys).union(y.keys).sorted() {
                guard let xv = x[key] else { return "\(path).\(key) invented" }
                guard let yv = y[key] else { return "\(path).\(key) lost" }
                if let d = difference(xv, yv, at: path + "." + key) { return d }
            }
            return nil
        case (.array(let x), .array(let y)):
            guard x.count == y.count else { return "\(path): \(x.count) elements, then \(y.count)" }
            for (i, (xv, yv)) in zip(x, y).enumerated() { if let d = difference(xv, yv, at: "\(path)[\(i)]") { return d } }
            return nil
        default:
            return a ~= b ? nil : "\(path): \(a.serialized()) became \(b.serialized())"
        }
    }

    /// Refused connects from api to redis after redis was OOM-killed (as CorrelationTests).
    static func feedOOMKillBehindRefusedConnects(_ harness: ServerHarness) throws {
        try feedOOMKillBehindRefusedConnects(agent: { try harness.agent(node: $0) })
    }

    /// The same, through agents of any server a test runs (`agent(node)`).
    static func feedOOMKillBehindRefusedConnects(agent: (String) throws -> (Outbox, Sender)) throws {
        let (api, apiSender) = try agent("node-a")
        let (redis, redisSender) = try agent("node-b")
        apiSender.setInventory(Inventory(pods: [PodInfo(uid: "a", name: "api-1", namespace: "shop", node: "node-a", ips: ["10.0.1.10"], service: "api")]))
        redisSender.setInventory(Inventory(pods: [PodInfo(uid: "r", name: "redis-0", namespace: "shop", node: "node-b", ips: ["10.0.2.10"], service: "redis")]))
        let t0 = wallClockNs() - 90_000_000_000
        func at(_ s: Double) -> Int64 { t0 + Int64(s * 1e9) }
        let flow = Flow(source: IPAddress("10.0.1.10"), destination: IPAddress("10.0.2.10"), sourcePort: 0, destinationPort: 6379)
        func connect(_ s: Double, _ outcome: ConnectOutcome, _ count: UInt32) -> TapioEvent {
            TapioEvent(kind: .tcpConnect, timeNs: at(s), pid: 201, comm: "python3", pod: "api-1", namespace: "shop",
                       detail: .tcpConnect(flow: flow, outcome: outcome, latencyNs: 200_000, error: outcome == .refused ? ECONNREFUSED : 0, count: count))
        }
        for i in 0..<80 { api.add(connect(Double(i) * 0.5, .established, 2)) }
        for i in 80..<100 { api.add(connect(Double(i) * 0.5, .refused, 6)) }
        redis.add(TapioEvent(kind: .oomKill, timeNs: at(39.9), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                             detail: .oomKill(victimPid: 301, victimComm: "redis-server", victimUid: 999, totalVmKb: 600_000, anonRssKb: 512_000, fileRssKb: 100)))
        redis.add(TapioEvent(kind: .processExit, timeNs: at(39.95), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                             detail: .exit(exitCode: 0, signal: 9, coreDumped: false)))
        redis.add(TapioEvent(kind: .tcpListen, timeNs: at(39.96), pid: 301, comm: "redis-server", pod: "redis-0", namespace: "shop",
                             detail: .tcpListen(address: IPAddress("0.0.0.0"), port: 6379, open: false)))
        for box in [api, redis] { box.sealIfDue(nowNs: wallClockNs(), force: true) }
        XCTAssertTrue(eventually { api.unacknowledged == 0 && redis.unacknowledged == 0 })
        apiSender.drainAndStop(graceSeconds: 1)
        redisSender.drainAndStop(graceSeconds: 1)
    }
}

/// Messages a subscriber thread collected, and how its subscription ended.
final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var messages: [SubscriptionMessage] = []
    private var ending: String?
    func append(_ m: SubscriptionMessage) { lock.withLock { messages.append(m) } }
    func ended(_ why: String) { lock.withLock { ending = why } }
    var all: [SubscriptionMessage] { lock.withLock { messages } }
    var end: String? { lock.withLock { ending } }
}

final class Flag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

/// Equal documents, numbers compared by value (`1` and `1.0` are one number:
/// encoders differ in how they write a whole double).
func ~= (a: JSONValue, b: JSONValue) -> Bool {
    switch (a, b) {
    case (.int(let x), .double(let y)), (.double(let y), .int(let x)): return Double(x) == y
    case (.object(let x), .object(let y)): return x.count == y.count && x.allSatisfy { k, v in y[k].map { v ~= $0 } ?? false }
    case (.array(let x), .array(let y)): return x.count == y.count && zip(x, y).allSatisfy { $0 ~= $1 }
    default: return a == b
    }
}
