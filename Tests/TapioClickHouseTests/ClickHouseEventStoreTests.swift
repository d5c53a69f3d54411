import Foundation
@testable import TapioClickHouse
import TapioQueryAPI
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The events table against Debian's real clickhouse-server, compared with
/// the project's own segment store holding the same batches.
final class ClickHouseEventStoreTests: XCTestCase {
    private var server: ClickHouseTestServer?
    private var clients: [ClickHouseClient] = []
    private var directories: [String] = []

    override func tearDown() async throws {
        for c in clients { try? await c.shutdown() }
        clients = []
        for d in directories { try? FileManager.default.removeItem(atPath: d) }
        directories = []
        server?.stop()
        server = nil
    }

    private func start() throws -> ClickHouseTestServer {
        let s = try ClickHouseTestServer()
        server = s
        return s
    }

    private func client(_ s: ClickHouseTestServer, _ configure: (inout ClickHouseConfiguration) -> Void = { _ in }) -> ClickHouseClient {
        var c = ClickHouseConfiguration(port: s.httpPort, requestTimeout: .seconds(30))
        configure(&c)
        let client = ClickHouseClient(configuration: c)
        clients.append(client)
        return client
    }

    /// 2026-12-07T00:00:00Z.
    static let day0: Int64 = 1_796_601_600_000_000_000
    static let hour: Int64 = 3_600_000_000_000

    /// Batches from three nodes over two days, every kind that carries a
    /// detail, pods in two namespaces; each event at its own time.
    static func batches() -> [ClickHouseEventStore.Batch] {
        let nodes = ["node1", "node2", "node3"]
        let pods = [("api-7f9c", "shop"), ("api-55aa", "shop"), ("redis-0", "shop"), ("web-1", "front"), ("", "")]
        let a = IPAddress("10.0.0.1")!, b = IPAddress("10.0.1.2")!
        let flow = Flow(source: a, destination: b, sourcePort: 40_000, destinationPort: 6379)
        let details: [(EventKind, TapioEvent.Detail)] = [
            (.processExec, .exec(filename: "/usr/bin/redis-server")),
            (.processExit, .exit(exitCode: 1, signal: 9, coreDumped: false)),
            (.oomKill, .oomKill(victimPid: 42, victimComm: "redis-server", victimUid: 999, totalVmKb: 1 << 20, anonRssKb: 95_000, fileRssKb: 12)),
            (.tcpConnect, .tcpConnect(flow: flow, outcome: .refused, latencyNs: 1234, error: 111, count: 3)),
            (.tcpListen, .tcpListen(address: b, port: 6379, open: false)),
            (.tcpReset, .tcpReset(flow: flow, sent: true, state: 1, count: 8)),
            (.tcpRetransmit, .tcpRetransmit(flow: flow, count: 5, intervalNs: 1_000_000_000)),
            (.tcpLatency, .tcpLatency(flow: flow, srttUs: 250, responses: 10, responseNsTotal: 5_000_000, responseNsMax: 900_000, intervalNs: 1_000_000_000)),
            (.packetDrop, .packetDrop(reason: "NETFILTER_DROP", count: 4, flow: flow, ipProtocol: 6, ifindex: 2, intervalNs: 1_000_000_000)),
            (.dns, .dns(name: "redis.shop.svc.cluster.local", qtype: 1, rcode: 3, latencyNs: 800_000, server: a, serverPort: 53, id: 77, answers: [b])),
            (.cpuThrottle, .cpuThrottle(periods: 100, throttledPeriods: 40, throttledNs: 2_000_000, intervalNs: 1_000_000_000, cgroup: "/kubepods/x",
                                        usage: CPUUsage(usageNs: 900_000_000, pressure: CPUPressure(someAvg10Permille: 125, someStallNs: 300),
                                                        node: NodeCPU(cpus: 2, runnable: 3, pressure: CPUPressure(someAvg10Permille: 7, someStallNs: 1))))),
            (.memoryPressure, .memoryPressure(source: "psi", count: 2, usageBytes: 1 << 30, limitBytes: 2 << 30, psiSomeAvg10Permille: 333, intervalNs: 1_000_000_000, cgroup: "/kubepods/y")),
            (.ioError, .ioError(error: 28, syscall: "write", count: 6, intervalNs: 1_000_000_000)),
        ]
        var out: [ClickHouseEventStore.Batch] = []
        var t = day0 - 20 * hour
        var n = 0
        for (ni, node) in nodes.enumerated() {
            for seq in 1...6 {
                var events: [TapioEvent] = []
                for _ in 0..<9 {
                    let (kind, detail) = details[n % details.count]
                    let (pod, ns) = pods[n % pods.count]
                    t += 17 * 60_000_000_000 + Int64(n)  // ~17 min apart: the events span two days
                    events.append(TapioEvent(kind: kind, timeNs: t, pid: UInt32(100 + n % 7), ppid: 1, uid: UInt32(n % 3), comm: "comm\(n % 4)",
                                             cgroupId: UInt64(5000 + n % 5), netns: 4_026_531_840, containerId: pod.isEmpty ? "" : "c-\(pod)",
                                             pod: pod, namespace: ns, detail: detail))
                    n += 1
                }
                let clock = ClockCorrection(offsetNs: Int64(ni) * 1_500_000 - 700_000, errorNs: 250_000 + Int64(ni))
                out.append(.init(EventBatch(node: node, epoch: 7, sequence: UInt64(seq), events: events), clock: clock))
            }
        }
        return out
    }

    /// The answer the single-process server gives from its own store.
    static func embeddedAnswer(_ store: SegmentEventStore, _ query: EventQuery) throws -> EventsAnswer {
        EventsAnswer(events: try store.events(query).map { e in
            guard case .object(let o) = e.json else { throw TestSupportError("not an object") }
            return try QueryEvent(fields: o)
        })
    }

    func embeddedStore(_ batches: [ClickHouseEventStore.Batch]) throws -> SegmentEventStore {
        let directory = try TestSupport.temporaryDirectory("tapio-clickhouse-segments")
        directories.append(directory)
        let store = try SegmentEventStore(directory: directory)
        for b in batches { XCTAssertTrue(try store.append(b.batch, clock: b.clock, receivedNs: b.batch.events[0].timeNs)) }
        return store
    }

    func testTheTableIsCreatedOnceAndHoldsEveryEventWritten() async throws {
        let s = try start()
        let events = try ClickHouseEventStore(client: client(s), table: "events_a")
        try await events.createIfMissing()
        try await events.createIfMissing()  // existing tables are left alone
        let batches = Self.batches()
        let written = try await events.write(Array(batches.prefix(10)))
        let v0 = try await events.write(Array(batches.dropFirst(10))) + written
        XCTAssertEqual(v0, 162)
        let all = try await events.events(EventQuery(limit: 100_000))
        XCTAssertEqual(all.count, 162)
        XCTAssertEqual(all.map(\.timeNs), all.map(\.timeNs).sorted(), "oldest first")
        let engine = try await events.client.rows(
            "SELECT engine, partition_key FROM system.tables WHERE database = currentDatabase() AND name = 'events_a' FORMAT TabSeparated", columns: 2)
        XCTAssertEqual(engine.first?[0], "ReplacingMergeTree")
        let partitions = try await events.client.rows(
            "SELECT DISTINCT partition FROM system.parts WHERE database = currentDatabase() AND table = 'events_a' AND active ORDER BY partition FORMAT TabSeparated",
            columns: 1)
        XCTAssertEqual(partitions.map { $0[0] }, ["20261206", "20261207", "20261208"], "one partition per UTC day")
    }

    func testARedeliveredBatchIsStoredOnce() async throws {
        let s = try start()
        let events = try ClickHouseEventStore(client: client(s), table: "events_b")
        try await events.createIfMissing()
        let batches = Self.batches()
        try await events.write(Array(batches.prefix(4)))
        // Again alone, and again inside a larger INSERT with a new batch.
        try await events.write([batches[1]])
        try await events.write([batches[2], batches[4], batches[2]])
        let all = try await events.events(EventQuery(limit: 100_000))
        XCTAssertEqual(all.count, 5 * 9)
        let keys = all.map { "\($0.node)/\($0.epoch)/\($0.sequence)/\($0.timeNs)" }
        XCTAssertEqual(Set(keys).count, keys.count, "no event twice")
        let counted = try await events.client.rows("SELECT count() FROM events_b FINAL FORMAT TabSeparated", columns: 1)
        XCTAssertEqual(counted, [["45"]])
        let raw = try await events.client.rows("SELECT count() FROM events_b FORMAT TabSeparated", columns: 1)
        XCTAssertGreaterThanOrEqual(Int(raw[0][0]) ?? 0, 45, "rows written again may wait for a merge; reads never see them")
    }

    func testEveryEventsFilterAnswersAsTheEmbeddedStoreDoes() async throws {
        let s = try start()
        let events = try ClickHouseEventStore(client: client(s), table: "events_c")
        try await events.createIfMissing()
        let batches = Self.batches()
        try await events.write(batches)
        let store = try embeddedStore(batches)
        let mid = Self.day0 + 2 * Self.hour
        let queries: [(String, EventQuery)] = [
            ("everything", EventQuery(limit: 100_000)),
            ("limit keeps the newest", EventQuery(limit: 7)),
            ("since", EventQuery(sinceNs: mid)),
            ("until", EventQuery(untilNs: mid)),
            ("since and until across midnight", EventQuery(sinceNs: Self.day0 - 3 * Self.hour, untilNs: Self.day0 + 3 * Self.hour)),
            ("node", EventQuery(node: "node2")),
            ("kind", EventQuery(kind: .tcpConnect)),
            ("pid", EventQuery(pid: 103)),
            ("pod", EventQuery(pod: "redis-0")),
            ("namespace", EventQuery(namespace: "front")),
            ("pods of a service", EventQuery(namespace: "shop", pods: ["api-55aa", "redis-0"])),
            ("pod prefix", EventQuery(podPrefix: "api-")),
            ("pod prefix with limit", EventQuery(podPrefix: "api-", limit: 3)),
            ("every filter at once", EventQuery(sinceNs: Self.day0 - 15 * Self.hour, node: "node3", kind: .tcpReset, namespace: "shop", podPrefix: "api")),
            ("node and kind and limit", EventQuery(node: "node1", kind: .dns, limit: 2)),
        ]
        var total = 0
        for (name, q) in queries {
            let expected = try Self.embeddedAnswer(store, q)
            let got = try await events.answer(q)
            XCTAssertEqual(got, expected, name)
            XCTAssertGreaterThan(expected.count, 0, "\(name): a filter that matches nothing proves little")
            total += expected.count
        }
        XCTAssertLessThan(try Self.embeddedAnswer(store, EventQuery(node: "node2")).count, 162, "filters select")
        for (name, q) in [("no pod of the service", EventQuery(pods: [])), ("no such node", EventQuery(node: "node9")),
                          ("a prefix nobody has", EventQuery(podPrefix: "zz"))] {
            let got = try await events.answer(q)
            XCTAssertEqual(got, try Self.embeddedAnswer(store, q), name)
            XCTAssertEqual(got.count, 0, name)
        }
        XCTAssertGreaterThan(total, 162)
    }

    func testHostileStringsComeBackAsTheyWent() async throws {
        let s = try start()
        let events = try ClickHouseEventStore(client: client(s), table: "events_d")
        try await events.createIfMissing()
        // Not NUL: agents read names from C strings, and the segment store's
        // protobuf-c payload ends a string at NUL (ClickHouse keeps it, below).
        let hostile = TabSeparatedTests.hostile.filter { !$0.isEmpty && !$0.contains("\u{0}") }
        var batches: [ClickHouseEventStore.Batch] = []
        for (i, name) in hostile.enumerated() {
            let e = TapioEvent(kind: .dns, timeNs: Self.day0 + Int64(i) * 1_000_000, pid: 9, comm: name, containerId: name, pod: name, namespace: name,
                               detail: .dns(name: name, qtype: 28, rcode: 0, latencyNs: 1, server: nil, serverPort: 0, id: 1, answers: []))
            let x = TapioEvent(kind: .processExec, timeNs: Self.day0 + Int64(i) * 1_000_000 + 1, pod: name, detail: .exec(filename: name))
            batches.append(.init(EventBatch(node: "n-" + name, epoch: 1, sequence: UInt64(i + 1), events: [e, x]), clock: .none))
        }
        try await events.write(batches)
        let store = try embeddedStore(batches)
        let all = try await events.answer(EventQuery(limit: 100_000))
        XCTAssertEqual(all, try Self.embeddedAnswer(store, EventQuery(limit: 100_000)))
        XCTAssertEqual(all.events.compactMap(\.name), hostile)
        XCTAssertEqual(all.events.compactMap(\.filename), hostile)
        for name in hostile {
            for q in [EventQuery(pod: name), EventQuery(node: "n-" + name), EventQuery(namespace: name, pods: [name]), EventQuery(podPrefix: name)] {
                let got = try await events.answer(q)
                XCTAssertEqual(got, try Self.embeddedAnswer(store, q), "filter by \(name.prefix(40).debugDescription)")
                XCTAssertGreaterThan(got.count, 0, "filter by \(name.prefix(40).debugDescription)")
            }
            let one = try await events.answer(EventQuery(node: "n-" + name))
            XCTAssertEqual(one.events.map(\.pod), [name, name])
            XCTAssertEqual(one.events.first?.comm, name)
        }
    }

    func testANULInANameIsKept() async throws {
        let s = try start()
        let events = try ClickHouseEventStore(client: client(s), table: "events_nul")
        try await events.createIfMissing()
        let name = "x\u{0}y\\0"
        try await events.write([.init(EventBatch(node: name, epoch: 1, sequence: 1, events: [TapioEvent(kind: .processExec, timeNs: Self.day0, pod: name)]),
                                      clock: .none)])
        let got = try await events.events(EventQuery(node: name, pod: name))
        XCTAssertEqual(got.map(\.pod), [name])
        XCTAssertEqual(got.map(\.node), [name])
        let none = try await events.events(EventQuery(node: "x"))
        XCTAssertEqual(none.count, 0)
    }

    func testAReadonlyUserReadsAndAStatementAboveClickHousesDefaultSizeStillRuns() async throws {
        let s = try start()
        let events = try ClickHouseEventStore(client: client(s), table: "events_ro")
        try await events.createIfMissing()
        // A name that makes the filter statement longer than 256 KiB.
        let huge = String(repeating: "p", count: 300_000)
        let batch = EventBatch(node: "n", epoch: 1, sequence: 1, events: [
            TapioEvent(kind: .processExec, timeNs: Self.day0, pod: huge), TapioEvent(kind: .processExec, timeNs: Self.day0 + 1, pod: "small"),
        ])
        try await events.write([.init(batch, clock: .none)])
        let got = try await events.events(EventQuery(pod: huge))
        XCTAssertEqual(got.map(\.pod), [huge])

        let reader = try ClickHouseEventStore(client: client(s) { $0.credentials = .headers(user: ClickHouseTestServer.reader, password: "") },
                                              table: "events_ro")
        let answer = try await reader.answer(EventQuery())
        XCTAssertEqual(answer.events.map(\.pod), [huge, "small"], "a readonly user runs every ordinary query")
        do {
            _ = try await reader.events(EventQuery(pod: huge))
            XCTFail("readonly may not raise max_query_size")
        } catch let ClickHouseError.server(_, code, message, _) {
            XCTAssertEqual(code, 164)
            XCTAssertTrue(message.contains("readonly"), message)
        }
        do {
            try await reader.write([.init(batch, clock: .none)])
            XCTFail("readonly may not write")
        } catch let ClickHouseError.server(_, code, _, _) {
            XCTAssertEqual(code, 164)
        }
    }

    func testDroppingOldDaysIsCountedAndTheAnswerSaysSo() async throws {
        let s = try start()
        let events = try ClickHouseEventStore(client: client(s), table: "events_e")
        try await events.createIfMissing()
        let day: Int64 = 24 * Self.hour
        func batch(_ seq: UInt64, _ times: [Int64]) -> ClickHouseEventStore.Batch {
            .init(EventBatch(node: "n", epoch: 1, sequence: seq, events: times.map { TapioEvent(kind: .ioError, timeNs: $0, pod: "p",
                                                                                                 detail: .ioError(error: 28, syscall: "write", count: 1, intervalNs: 1)) }),
                  clock: .none)
        }
        let old1 = Self.day0 - 10 * day + Self.hour, old2 = Self.day0 - 9 * day + 23 * Self.hour
        try await events.write([batch(1, [old1, old1 + 5]), batch(2, [old2]), batch(3, [Self.day0 - 2 * day, Self.day0 + Self.hour])])
        try await events.write([batch(2, [old2])])  // a duplicate is not counted twice
        let v1 = try await events.retainedFromNs()
        XCTAssertNil(v1)
        let v2 = try await events.answer(EventQuery()).retention
        XCTAssertNil(v2, "nothing dropped, nothing said")

        let now = Self.day0 + 2 * Self.hour
        let dropped = try await events.dropDays(olderThan: .seconds(3 * 86_400), nowNs: now)
        XCTAssertEqual(dropped, [
            .init(day: "2026-11-27", events: 2, newestEventNs: old1 + 5),
            .init(day: "2026-11-28", events: 1, newestEventNs: old2),
        ])
        let v3 = try await events.retainedFromNs()
        XCTAssertEqual(v3, old2)
        let answer = try await events.answer(EventQuery())
        XCTAssertEqual(answer.events.map(\.timeNs), [Self.day0 - 2 * day, Self.day0 + Self.hour])
        XCTAssertEqual(answer.retention?.deletedBeforeNs, old2)
        XCTAssertEqual(answer.retention?.deletedBefore, "2026-11-28T23:00:00.000000000Z")
        let v4 = try await events.answer(EventQuery(sinceNs: old1)).retention?.deletedBeforeNs
        XCTAssertEqual(v4, old2, "a window reaching the dropped days")
        let v5 = try await events.answer(EventQuery(sinceNs: old2 + 1)).retention
        XCTAssertNil(v5, "a window after them")
        let partitions = try await events.client.rows(
            "SELECT DISTINCT partition FROM system.parts WHERE database = currentDatabase() AND table = 'events_e' AND active ORDER BY partition FORMAT TabSeparated",
            columns: 1)
        XCTAssertEqual(partitions.map { $0[0] }, ["20261205", "20261207"])
        let v6 = try await events.dropDays(olderThan: .seconds(3 * 86_400), nowNs: now)
        XCTAssertEqual(v6, [], "nothing more is old enough")
        do {
            _ = try await events.dropDays(olderThan: .zero, nowNs: now)
            XCTFail("a retention of zero is refused")
        } catch let e as ClickHouseEventStore.InvalidArgument {
            XCTAssertTrue(e.description.contains("retention must be positive"), e.description)
        }
    }

    func testClickHouseErrorsComeBackInWords() async throws {
        let s = try start()
        let c = client(s)
        let events = try ClickHouseEventStore(client: c, table: "never_created")
        do {
            _ = try await events.events(EventQuery())
            XCTFail("a missing table is an error")
        } catch let ClickHouseError.server(status, code, message, statement) {
            XCTAssertEqual(code, 60)
            XCTAssertNotEqual(status, 200)
            XCTAssertTrue(message.contains("never_created") && message.contains("doesn't exist"), message)
            XCTAssertTrue(statement.contains("FROM never_created"))
            let text = "\(ClickHouseError.server(status: status, code: code, message: message, statement: statement))"
            XCTAssertTrue(text.hasPrefix("ClickHouse error 60: Table default.never_created doesn't exist."), text)
        }
        do {
            try await c.execute("SELEC 1")
            XCTFail("bad SQL is an error")
        } catch let ClickHouseError.server(_, code, message, _) {
            XCTAssertEqual(code, 62)
            XCTAssertTrue(message.contains("Syntax error"), message)
        }
        XCTAssertThrowsError(try ClickHouseEventStore(client: c, table: "events; DROP TABLE x")) { error in
            XCTAssertTrue("\(error)".contains("is not a plain identifier"), "\(error)")
        }
        let closed = ClickHouseClient(configuration: .init(port: TestSupport.freePort(), connectTimeout: .seconds(2)))
        clients.append(closed)
        do {
            try await closed.execute("SELECT 1")
            XCTFail("nothing listens there")
        } catch let ClickHouseError.connect(host, _, reason) {
            XCTAssertEqual(host, "127.0.0.1")
            XCTAssertFalse(reason.isEmpty)
        }
    }

    func testUsersAuthenticateByHeadersOrBasicAuthAndAWrongPasswordIsRefused() async throws {
        let s = try start()
        for credentials in [ClickHouseConfiguration.Credentials.headers(user: ClickHouseTestServer.user, password: ClickHouseTestServer.password),
                            .basic(user: ClickHouseTestServer.user, password: ClickHouseTestServer.password)] {
            let c = client(s) { $0.credentials = credentials }
            // 18.16 has no currentUser(): the statement finds itself among the running ones.
            let v7 = try await c.rows("SELECT user FROM system.processes WHERE query LIKE '%tapio-whoami%' FORMAT TabSeparated", columns: 1)
            XCTAssertEqual(v7, [[ClickHouseTestServer.user]])
        }
        for credentials in [ClickHouseConfiguration.Credentials.headers(user: ClickHouseTestServer.user, password: "wrong"),
                            .basic(user: ClickHouseTestServer.user, password: "wrong")] {
            let c = client(s) { $0.credentials = credentials }
            do {
                try await c.execute("SELECT 1")
                XCTFail("a wrong password is refused")
            } catch let ClickHouseError.server(_, code, message, _) {
                XCTAssertEqual(code, 193)
                XCTAssertTrue(message.lowercased().contains("password"), message)
            }
        }
    }

    func testConnectionsAreReusedAndAServerClosedOneIsReplaced() async throws {
        let s = try start()
        // Reused while young; ClickHouse here closes idle ones after 3 s.
        let c = client(s) { $0.idleTimeout = .seconds(60) }
        for i in 0..<20 {
            let v8 = try await c.rows("SELECT \(i) FORMAT TabSeparated", columns: 1)
            XCTAssertEqual(v8, [["\(i)"]])
        }
        XCTAssertEqual(c.connectionsOpened, 1, "one connection for twenty statements")
        try await Task.sleep(for: .seconds(4))
        let v9 = try await c.rows("SELECT 'after' FORMAT TabSeparated", columns: 1)
        XCTAssertEqual(v9, [["after"]])
        XCTAssertEqual(c.connectionsOpened, 2, "the closed one was replaced")
    }

    func testAnAnswerAboveTheLimitAndASlowStatementAreRefused() async throws {
        let s = try start()
        let small = client(s) { $0.maxResponseBytes = 10_000 }
        do {
            try await small.execute("SELECT number FROM system.numbers LIMIT 100000 FORMAT TabSeparated")
            XCTFail("too large")
        } catch let ClickHouseError.responseTooLarge(limit, _) {
            XCTAssertEqual(limit, 10_000)
        }
        let v10 = try await small.rows("SELECT 1 FORMAT TabSeparated", columns: 1)
        XCTAssertEqual(v10, [["1"]], "the client goes on")
        let impatient = client(s) { $0.requestTimeout = .milliseconds(500) }
        do {
            try await impatient.execute("SELECT sleep(3)")
            XCTFail("too slow")
        } catch let ClickHouseError.timedOut(after, statement) {
            XCTAssertEqual(after, .milliseconds(500))
            XCTAssertEqual(statement, "SELECT sleep(3)")
        }
        let tight = client(s) { $0.maxStatementBytes = 100 }
        do {
            try await tight.execute("SELECT '\(String(repeating: "x", count: 200))'")
            XCTFail("too long")
        } catch let ClickHouseError.statementTooLarge(bytes, limit, _) {
            XCTAssertEqual(limit, 100)
            XCTAssertEqual(bytes, 209)
        }
    }
}
