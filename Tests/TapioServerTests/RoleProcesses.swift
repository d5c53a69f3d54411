import Foundation
import Logging
@testable import TapioAgent
import TapioClient
import TapioNATS
@testable import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

// What the tests of the distributed mode share (IngestRoleTests,
// CorrelateRoleTests, QueryRoleTests, DistributedModeTests): the replicas as
// processes of the built `tapio-server`, agents without the kernel part, a
// NATS client to read the stream back, and the checks on what it holds.

/// One `tapio-server --role …` process on free loopback ports: its metrics
/// endpoint (/healthz, /readyz, /metrics) and its log.
class RoleProcess {
    let process: ChildProcess
    let metricsPort: Int
    let pki: String
    /// "ingest", "correlate" or "query", for messages.
    let role: String

    fileprivate init(role: String, arguments: [String], pki: String, metricsPort: Int, logPath: String) throws {
        self.role = role
        self.pki = pki
        self.metricsPort = metricsPort
        process = try ChildProcess(try TestSupport.product("tapio-server"), arguments, logPath: logPath)
    }

    func http(_ path: String) throws -> (status: Int, body: String) { try TestSupport.httpGet(port: metricsPort, path: path) }

    func metrics() throws -> String {
        let r = try http("/metrics")
        guard r.status == 200 else { throw TestSupportError("/metrics answered \(r.status)") }
        return r.body
    }

    /// The value of one series (an unlabelled name, or a name with its
    /// labels as written), nil when it cannot be read.
    func metric(_ series: String) -> Double? {
        guard let text = try? metrics() else { return nil }
        return RoleTests.value(text, series)
    }

    /// /readyz 200 (ingest: listening, NATS connected, the stream created;
    /// correlate: leading or standing by; query: table, consumer and incident
    /// bucket in place).
    func waitUntilReady(timeout: TimeInterval = 40) throws {
        let ready = eventually(timeout: timeout) { (try? http("/readyz").status) == 200 || !process.isRunning }
        guard ready, process.isRunning else {
            throw TestSupportError("\(role) replica not ready within \(Int(timeout)) s: \((try? http("/readyz").body) ?? "no answer")\n\(process.log.suffix(3000))")
        }
    }
}

/// A replica with a query listener (roles correlate and query).
class QueryingRoleProcess: RoleProcess {
    let queryPort: Int

    fileprivate init(role: String, arguments: [String], pki: String, metricsPort: Int, queryPort: Int, logPath: String) throws {
        self.queryPort = queryPort
        try super.init(role: role, arguments: arguments, pki: pki, metricsPort: metricsPort, logPath: logPath)
    }

    /// An operator (alice) asking over the query protocol, as the CLI does.
    func client() throws -> QueryClient {
        try QueryClient(host: "127.0.0.1", port: queryPort, ca: pki + "/operators/alice/ca.crt",
                        certificate: pki + "/operators/alice/tls.crt", key: pki + "/operators/alice/tls.key")
    }
}

/// One `tapio-server --role ingest` process, its publishes waiting 3 s for a PubAck.
final class IngestReplicaProcess: RoleProcess {
    let ingestPort: Int

    init(index: Int, directory: String, pki: String, nats: [String], streamReplicas: Int) throws {
        ingestPort = TestSupport.freePort()
        let metricsPort = TestSupport.freePort()
        var arguments = ["--role", "ingest", "--tls-dir", pki + "/server",
                         "--listen", "127.0.0.1:\(ingestPort)", "--metrics-listen", "127.0.0.1:\(metricsPort)",
                         "--nats-replicas", "\(streamReplicas)", "--nats-publish-timeout", "3", "--log-level", "info"]
        for url in nats { arguments += ["--nats", url] }
        try super.init(role: "ingest", arguments: arguments, pki: pki, metricsPort: metricsPort, logPath: directory + "/replica-\(index).log")
    }
}

/// One `tapio-server --role correlate` process, checkpointing every 2 s
/// (the default lease timeout, 5 s).
final class CorrelateReplicaProcess: QueryingRoleProcess {
    init(name: String, directory: String, pki: String, nats: [String], replicas: Int, extra: [String] = []) throws {
        let queryPort = TestSupport.freePort()
        let metricsPort = TestSupport.freePort()
        var arguments = ["--role", "correlate", "--tls-dir", pki + "/server",
                         "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "127.0.0.1:\(metricsPort)",
                         "--nats-replicas", "\(replicas)", "--checkpoint-interval", "2", "--log-level", "info"]
        for url in nats { arguments += ["--nats", url] }
        try super.init(role: "correlate", arguments: arguments + extra, pki: pki, metricsPort: metricsPort, queryPort: queryPort,
                       logPath: directory + "/correlate-\(name).log")
    }
}

/// One `tapio-server --role query` process, its unacknowledged batches
/// delivered again after 5 s.
final class QueryReplicaProcess: QueryingRoleProcess {
    /// `clickhouseURL`: instead of `http://127.0.0.1:<clickhousePort>` (an https:// one, say).
    init(name: String, directory: String, pki: String, nats: [String], clickhousePort: Int, clickhouseURL: String? = nil, extra: [String] = []) throws {
        let queryPort = TestSupport.freePort()
        let metricsPort = TestSupport.freePort()
        var arguments = ["--role", "query", "--tls-dir", pki + "/server",
                         "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "127.0.0.1:\(metricsPort)",
                         "--clickhouse", clickhouseURL ?? "http://127.0.0.1:\(clickhousePort)", "--query-ack-wait", "5", "--log-level", "info"]
        for url in nats { arguments += ["--nats", url] }
        try super.init(role: "query", arguments: arguments + extra, pki: pki, metricsPort: metricsPort, queryPort: queryPort,
                       logPath: directory + "/query-\(name).log")
    }
}

/// A real agent without the kernel part: an outbox fed by the test
/// (`eventsPerBatch` planned process exits a batch, comm "worker", pids
/// counting up from `firstPid`) and the agent's sender. `addBatch` may be
/// called from another thread than the test's.
final class TestAgent: @unchecked Sendable {
    static let comm = "worker"
    let node: String
    let outbox: Outbox
    let pki: String
    let firstPid: UInt32
    let eventsPerBatch: Int
    private let lock = NSLock()
    private var added = 0

    init(node: String, pki: String, eventsPerBatch: Int = 50, firstPid: UInt32 = 1) throws {
        self.node = node
        self.pki = pki
        self.firstPid = firstPid
        self.eventsPerBatch = eventsPerBatch
        var limits = Outbox.Limits()
        limits.maxEvents = 50
        outbox = try Outbox(node: node, epoch: UInt64(wallClockNs()), limits: limits, spoolDirectory: nil)
    }

    var eventsAdded: Int { lock.withLock { added } }

    /// The pids of every event added so far.
    var pids: Set<UInt32> { Set((0..<eventsAdded).map { firstPid + UInt32($0) }) }

    /// A sender on this outbox to the replica (or Service) at `port`, started;
    /// it reports `inventory` when given.
    func connect(port: Int, inventory: Inventory? = nil) -> Sender {
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(port), serverName: "localhost", tls: AgentTLSFiles(directory: pki + "/nodes/" + node),
                                          node: node, bootId: "test", capabilities: ["process_exit"], degraded: [])
        config.maximumBackoffMs = 200
        config.refusalInitialBackoffMs = 100
        config.refusalMaximumBackoffMs = 500
        var logger = Logger(label: "tapio-agent-test")
        logger.logLevel = .critical
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        if let inventory { sender.setInventory(inventory) }
        sender.start()
        return sender
    }

    /// `eventsPerBatch` exits and `extra`, sealed into one batch.
    func addBatch(_ extra: [TapioEvent] = []) {
        lock.withLock {
            for _ in 0..<eventsPerBatch {
                outbox.add(event(firstPid + UInt32(added), comm: Self.comm))
                added += 1
            }
            for e in extra { outbox.add(e) }
            outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        }
    }
}

/// NATS clients a test opened, closed together at its end.
final class NATSClientPool {
    private var clients: [NATSClient] = []

    /// JetStream through a client of `servers` (tried in order).
    func jetStream(_ servers: [NATSTestServer], reconnectWait: Duration? = nil) async throws -> JetStream {
        var config = NATSClient.Configuration(servers: servers.map { NATSServerAddress(host: "127.0.0.1", port: $0.port) })
        config.connectTimeout = .seconds(3)
        if let reconnectWait { config.reconnectWait = reconnectWait }
        var logger = Logger(label: "tapio.role-test")
        logger.logLevel = .warning
        let client = try await NATSClient.connect(config, logger: logger)
        clients.append(client)
        return JetStream(client: client, timeout: .seconds(5))
    }

    /// Closes every client, waiting up to 10 s.
    func closeAll() {
        let clients = self.clients
        self.clients = []
        let done = DispatchSemaphore(value: 0)
        Task {
            for c in clients { await c.close() }
            done.signal()
        }
        _ = done.wait(timeout: .now() + 10)
    }
}

/// Helpers of the role tests that hold no state.
enum RoleTests {
    /// A real agent's outbox and sender towards the ingest replica (or Service) at `port`.
    static func agent(node: String, port: Int, pki: String) throws -> (Outbox, Sender) {
        let outbox = try Outbox(node: node, epoch: UInt64(wallClockNs()), limits: Outbox.Limits(), spoolDirectory: nil)
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(port), serverName: "localhost", tls: AgentTLSFiles(directory: pki + "/nodes/" + node),
                                          node: node, bootId: "test", capabilities: ["process_exec"], degraded: [])
        config.maximumBackoffMs = 200
        var logger = Logger(label: "tapio-agent-test")
        logger.logLevel = .critical
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        sender.start()
        return (outbox, sender)
    }

    /// api-1's (node-a) connects to redis refused: six of them, dated now,
    /// the event both the raw sender below and the agents of
    /// DistributedModeTests send to keep the OOM-kill feed's incident open.
    static func refusedConnect() -> TapioEvent {
        let flow = Flow(source: IPAddress("10.0.1.10"), destination: IPAddress("10.0.2.10"), sourcePort: 0, destinationPort: 6379)
        return TapioEvent(kind: .tcpConnect, timeNs: wallClockNs(), pid: 201, comm: "python3", pod: "api-1", namespace: "shop",
                          detail: .tcpConnect(flow: flow, outcome: .refused, latencyNs: 200_000, error: ECONNREFUSED, count: 6))
    }

    /// api-1 (node-a) keeps having its connects to redis refused, six every
    /// half second, dated now, until the returned function is called; sent
    /// through the raw protocol to `port`.
    static func keepRefusing(port: Int, pki: String) -> () -> Void {
        let tls = AgentTLSFiles(directory: pki + "/nodes/node-a")
        let stop = Flag()
        let done = DispatchSemaphore(value: 0)
        Thread {
            defer { done.signal() }
            guard let raw = try? RawAgent(port: port, tls: tls, node: "node-a", epoch: UInt64(wallClockNs())) else { return }
            var sequence: UInt64 = 0
            while !stop.isSet {
                sequence += 1
                do {
                    try raw.send(raw.batch(sequence, events: [refusedConnect()]))
                    _ = try raw.acks(1, timeoutMs: 10_000)
                } catch {
                    break
                }
                Thread.sleep(forTimeInterval: 0.5)
            }
            raw.close()
        }.start()
        return {
            guard !stop.isSet else { return }
            stop.set()
            _ = done.wait(timeout: .now() + 15)
        }
    }

    /// Every batch message of the stream, in stream order, decoded as a
    /// consumer would, its subject and message id checked.
    static func streamedBatches(_ js: JetStream, stream: String = "TAPIO_EVENTS") async throws -> [StreamedBatch] {
        let state = try await js.streamInfo(stream).state
        var out: [StreamedBatch] = []
        guard state.lastSequence >= state.firstSequence, state.messages > 0 else { return out }
        for sequence in state.firstSequence...state.lastSequence {
            let m = try await js.message(stream: stream, sequence: sequence)
            guard m.subject.hasPrefix(StreamedBatch.subjectPrefix + ".") else { continue }
            let batch = try StreamedBatch(headers: m.headers, payload: m.payload)
            XCTAssertEqual(m.subject, StreamedBatch.subject(node: batch.node))
            XCTAssertEqual(m.headers["Nats-Msg-Id"], batch.messageID)
            out.append(batch)
        }
        return out
    }

    /// The batches of `node` in `epoch` are exactly `sequences`, each once.
    static func assertExactlyOnce(_ stored: [StreamedBatch], node: String, epoch: UInt64, sequences: ClosedRange<UInt64>,
                                  file: StaticString = #filePath, line: UInt = #line) {
        var count: [UInt64: Int] = [:]
        for s in stored where s.node == node && s.epoch == epoch { count[s.sequence, default: 0] += 1 }
        let missing = sequences.filter { count[$0] == nil }
        let twice = count.filter { $0.value > 1 }.keys.sorted()
        let extra = count.keys.filter { !sequences.contains($0) }.sorted()
        XCTAssertEqual(missing, [], "\(node): acknowledged batches missing from the stream", file: file, line: line)
        XCTAssertEqual(twice, [], "\(node): batches stored more than once", file: file, line: line)
        XCTAssertEqual(extra, [], "\(node): batches in the stream that were never sent", file: file, line: line)
    }

    /// The value of one series (name with its labels as written) in a /metrics text.
    static func value(_ text: String, _ series: String) -> Double? {
        text.split(separator: "\n").first { $0.hasPrefix(series + " ") }.flatMap { Double($0.split(separator: " ")[1]) }
    }

    /// A replica's /metrics passes promtool (required with
    /// TAPIO_REQUIRE_BPF=1), its `tapio_<role>_` families are exactly the
    /// table "Metrics of the <role> role" in docs/operations.md, and
    /// everything else it exposes is in that table or in "Metrics and health".
    static func checkMetricsDocumented(_ text: String, role: String, scratchFile: String,
                                       file: StaticString = #filePath, line: UInt = #line) throws {
        let heading = "Metrics of the \(role) role", prefix = "tapio_\(role)_"
        if let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) {
            try text.write(toFile: scratchFile, atomically: true, encoding: .utf8)
            let check = try TestSupport.run("/bin/sh", ["-c", "\(promtool) check metrics < \(scratchFile)"])
            XCTAssertEqual(check.status, 0, "promtool:\n\(check.stdout)\(check.stderr)", file: file, line: line)
        } else if TestSupport.bpfRequired {
            XCTFail("promtool is not installed (Debian package prometheus)", file: file, line: line)
        }
        let exposed = Set(text.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.map { String($0.split(separator: " ")[2]) })
        let docs = try String(contentsOfFile: TestSupport.packageRoot + "/docs/operations.md", encoding: .utf8)
        func table(_ heading: String) -> Set<String> {
            guard let start = docs.range(of: "\n## \(heading)\n") else { return [] }
            let section = String(docs[start.upperBound...]).components(separatedBy: "\n## ").first ?? ""
            return Set(section.split(separator: "\n").filter { $0.hasPrefix("| `") }.map { String($0.dropFirst(3).prefix { $0 != "`" && $0 != "{" }) })
        }
        let own = table(heading)
        let shared = table("Metrics and health")
        XCTAssertFalse(own.isEmpty, "docs/operations.md has no \"\(heading)\" table", file: file, line: line)
        XCTAssertEqual(exposed.filter { $0.hasPrefix(prefix) }.sorted(), own.filter { $0.hasPrefix(prefix) }.sorted(), file: file, line: line)
        XCTAssertEqual(exposed.subtracting(own).subtracting(shared).sorted(), [], "exposed by the \(role) replica, documented nowhere", file: file, line: line)
    }
}
