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
    private var clients: [NATSClient] = []
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
        let clients = self.clients
        let done = DispatchSemaphore(value: 0)
        Task {
            for c in clients { await c.close() }
            done.signal()
        }
        _ = done.wait(timeout: .now() + 10)
        for n in nats { n.stop() }
        if !directory.isEmpty { try? FileManager.default.removeItem(atPath: directory) }
    }

    // MARK: - Tests

    func testEveryAcknowledgedBatchIsInTheStreamOnceAndAResendAfterALostAckIsADuplicate() async throws {
        let server = try startNATS()
        let replica = try startReplica(nats: [server])
        try replica.waitUntilReady()

        let epoch = UInt64(wallClockNs())
        let agent = try ProtocolAgent(port: replica.ingestPort, pki: pki, node: "node-a", epoch: epoch)
        XCTAssertEqual(agent.helloAck?.ackedSequence, 0, "an ingest replica claims no prefix (docs/scaling.md)")
        // Batch 30 holds an event an hour ahead: set aside by the server, counted in the message.
        let batches = (1...30).map { agent.batch(UInt64($0), future: $0 == 30) }
        for b in batches { try agent.send(b) }
        let acks = try agent.acks(30, timeoutMs: 20_000)
        XCTAssertEqual(Set(acks.map(\.sequence)), Set(1...30), "acks for every batch, exactly those")

        // The acks of 21…30 are "lost": the agent reconnects (here to the same
        // replica) and resends them; each is acknowledged again, none stored again.
        agent.close()
        let again = try ProtocolAgent(port: replica.ingestPort, pki: pki, node: "node-a", epoch: epoch)
        for b in batches[20...] { try again.send(b) }
        let reacks = try again.acks(10, timeoutMs: 20_000)
        XCTAssertEqual(Set(reacks.map(\.sequence)), Set(21...30))
        again.close()

        let js = try await jetStream([server])
        let stored = try await streamedBatches(js)
        XCTAssertEqual(stored.count, 30, "messages in the stream")
        assertExactlyOnce(stored, node: "node-a", epoch: epoch, sequences: 1...30)
        for s in stored {
            let batch = try EventBatch.decode(s.payload)
            XCTAssertEqual(batch.events.first?.comm, "raw-\(s.sequence)", "the payload is the batch as sent")
            XCTAssertGreaterThan(s.receivedNs, Int64(epoch))
            XCTAssertEqual(s.serverDrops, s.sequence == 30 ? [DropCount(kind: .unspecified, reason: CorrelationService.futureDropReason, count: 1)] : [])
        }
        let metrics = try replica.metrics()
        XCTAssertTrue(metrics.contains("tapio_server_batches_total 30\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_duplicate_batches_total 10\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_events_future_total 1\n"), metrics)
        XCTAssertTrue(metrics.contains("tapio_server_nats_connected 1\n"), metrics)
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
        let agent = try ProtocolAgent(port: replica.ingestPort, pki: pki, node: "node-b", epoch: epoch)
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
        let retry = try ProtocolAgent(port: replica.ingestPort, pki: pki, node: "node-b", epoch: epoch)
        try retry.send(retry.batch(1))
        XCTAssertEqual(try retry.acks(1, timeoutMs: 20_000).map(\.sequence), [1])
        retry.close()
        let stored = try await streamedBatches(try await jetStream([server]))
        assertExactlyOnce(stored, node: "node-b", epoch: epoch, sequences: 1...1)
    }

    // MARK: - Harness

    private func startNATS() throws -> NATSTestServer {
        let server = try NATSTestServer(name: "n1", directory: directory)
        nats.append(server)
        try server.start()
        return server
    }

    private func startReplica(nats servers: [NATSTestServer], replicas streamReplicas: Int = 1) throws -> IngestReplicaProcess {
        let replica = try IngestReplicaProcess(index: replicas.count, directory: directory, pki: pki,
                                               nats: servers.map(\.url), streamReplicas: streamReplicas)
        replicas.append(replica)
        return replica
    }

    private func jetStream(_ servers: [NATSTestServer]) async throws -> JetStream {
        var config = NATSClient.Configuration(servers: servers.map { NATSServerAddress(host: "127.0.0.1", port: $0.port) })
        config.connectTimeout = .seconds(3)
        config.reconnectWait = .milliseconds(100)
        var logger = Logger(label: "tapio.ingest-role.test")
        logger.logLevel = .warning
        let client = try await NATSClient.connect(config, logger: logger)
        clients.append(client)
        return JetStream(client: client, timeout: .seconds(5))
    }

    /// Every batch message of the stream, in stream order, decoded as a consumer would.
    private func streamedBatches(_ js: JetStream, stream: String = "TAPIO_EVENTS") async throws -> [StreamedBatch] {
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

    private func assertExactlyOnce(_ stored: [StreamedBatch], node: String, epoch: UInt64, sequences: ClosedRange<UInt64>,
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
}

/// One `tapio-server --role ingest` process on free loopback ports.
final class IngestReplicaProcess {
    let process: ChildProcess
    let ingestPort: Int
    let metricsPort: Int

    init(index: Int, directory: String, pki: String, nats: [String], streamReplicas: Int) throws {
        ingestPort = TestSupport.freePort()
        metricsPort = TestSupport.freePort()
        var arguments = ["--role", "ingest", "--tls-dir", pki + "/server",
                         "--listen", "127.0.0.1:\(ingestPort)", "--metrics-listen", "127.0.0.1:\(metricsPort)",
                         "--nats-replicas", "\(streamReplicas)", "--nats-publish-timeout", "3", "--log-level", "info"]
        for url in nats { arguments += ["--nats", url] }
        process = try ChildProcess(try TestSupport.product("tapio-server"), arguments, logPath: directory + "/replica-\(index).log")
    }

    func http(_ path: String) throws -> (status: Int, body: String) { try TestSupport.httpGet(port: metricsPort, path: path) }

    func metrics() throws -> String {
        let r = try http("/metrics")
        guard r.status == 200 else { throw TestSupportError("/metrics answered \(r.status)") }
        return r.body
    }

    /// /readyz 200: listening, NATS connected, the stream created.
    func waitUntilReady(timeout: TimeInterval = 40) throws {
        let ready = eventually(timeout: timeout) { (try? http("/readyz").status) == 200 || !process.isRunning }
        guard ready, process.isRunning else {
            throw TestSupportError("ingest replica not ready within \(Int(timeout)) s: \((try? http("/readyz").body) ?? "no answer")\n\(process.log.suffix(3000))")
        }
    }
}

/// An agent speaking the protocol frame by frame, so a test decides what is resent when.
final class ProtocolAgent {
    /// Closed when released.
    private var connection: TLSConnection!
    let node: String
    let epoch: UInt64
    private(set) var helloAck: HelloAck?

    init(port: Int, pki: String, node: String, epoch: UInt64) throws {
        self.node = node
        self.epoch = epoch
        connection = try TLSConnection(endpoint: .init(host: "127.0.0.1", port: UInt16(port), serverName: "localhost", tls: AgentTLSFiles(directory: pki + "/nodes/" + node)),
                                       timeoutMs: 5000)
        try connection.send(.hello, Hello(node: node, agentVersion: "test", bootId: "test", capabilities: [], streamEpoch: epoch).encoded())
        guard let f = try next(where: { $0.type == .helloAck || $0.type == .error }) else { throw ConnectionError("no hello-ack") }
        guard f.type == .helloAck else { throw ConnectionError("refused: \((try? WireError.decode(f.payload).message) ?? "?")") }
        helloAck = try HelloAck.decode(f.payload)
    }

    func close() { connection = nil }

    func next(timeoutMs: Int64 = 5000, where condition: (Frame) -> Bool) throws -> Frame? {
        let deadline = monotonicNs() + timeoutMs * 1_000_000
        while monotonicNs() < deadline {
            guard let f = try connection.receive(timeoutMs: 50) else { continue }
            if f.type == .timeSync {
                var sync = try TimeSync.decode(f.payload)
                sync.t2 = wallClockNs()
                sync.t3 = wallClockNs()
                try connection.send(.timeSync, sync.encoded())
                continue
            }
            if condition(f) { return f }
        }
        return nil
    }

    func send(_ batch: EventBatch) throws { try connection.send(.eventBatch, batch.encoded()) }

    func acks(_ count: Int, timeoutMs: Int64) throws -> [Ack] {
        var out: [Ack] = []
        while out.count < count, let f = try next(timeoutMs: timeoutMs, where: { $0.type == .ack || $0.type == .error }) {
            guard f.type == .ack else { throw ConnectionError("error frame: \((try? WireError.decode(f.payload).message) ?? "?")") }
            out.append(try Ack.decode(f.payload))
        }
        return out
    }

    func error(timeoutMs: Int64) throws -> WireError? {
        do {
            guard let f = try next(timeoutMs: timeoutMs, where: { $0.type == .error || $0.type == .ack }) else { return nil }
            guard f.type == .error else { throw ConnectionError("acknowledged: \((try? Ack.decode(f.payload)).map { "\($0.sequence)" } ?? "?")") }
            return try WireError.decode(f.payload)
        } catch let e as ConnectionError where !e.description.hasPrefix("acknowledged") {
            return nil
        }
    }

    func batch(_ sequence: UInt64, future: Bool = false) -> EventBatch {
        let time = future ? wallClockNs() + 3600 * 1_000_000_000 : wallClockNs()
        return EventBatch(node: node, epoch: epoch, sequence: sequence,
                          events: [event(UInt32(truncatingIfNeeded: sequence), comm: "raw-\(sequence)", time: time)])
    }
}
