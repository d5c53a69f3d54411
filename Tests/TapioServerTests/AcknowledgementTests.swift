import Foundation
@testable import TapioAgent
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// An agent that speaks the protocol frame by frame, so a test can send what
/// a real agent never would: gaps, old epochs, huge values, odd sequences.
final class RawAgent {
    /// Closed by `close()` or when the agent is released.
    private(set) var connection: TLSConnection!
    let node: String
    let epoch: UInt64
    private(set) var helloAck: HelloAck?

    /// To any ingest listener (a server's, an ingest replica's) with the node's certificate.
    init(port: Int, tls: AgentTLSFiles, node: String, epoch: UInt64, hello: Bool = true) throws {
        self.node = node
        self.epoch = epoch
        connection = try TLSConnection(endpoint: .init(host: "127.0.0.1", port: UInt16(port), serverName: "localhost", tls: tls),
                                       timeoutMs: 5000)
        if hello {
            try connection.send(.hello, Hello(node: node, agentVersion: "raw", bootId: "raw", capabilities: [], streamEpoch: epoch).encoded())
            guard let f = try next(where: { $0.type == .helloAck || $0.type == .error }) else { throw ConnectionError("no hello-ack") }
            guard f.type == .helloAck else { throw ConnectionError("refused: \((try? WireError.decode(f.payload).message) ?? "?")") }
            helloAck = try HelloAck.decode(f.payload)
        }
    }

    convenience init(harness: ServerHarness, node: String, epoch: UInt64, hello: Bool = true) throws {
        try self.init(port: harness.ingestPort, tls: harness.nodeTLS(node), node: node, epoch: epoch, hello: hello)
    }

    func close() { connection = nil }

    func sendInventory(_ inventory: Inventory) throws { try connection.send(.inventory, inventory.encoded()) }

    /// The next frame matching `condition`, answering time syncs on the way;
    /// nil after `timeoutMs` without one.
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

    func send(_ batch: EventBatch) throws {
        try connection.send(.eventBatch, batch.encoded())
    }

    /// Acks received until `count` have arrived or the timeout passes.
    func acks(_ count: Int, timeoutMs: Int64 = 5000) throws -> [Ack] {
        var out: [Ack] = []
        while out.count < count, let f = try next(timeoutMs: timeoutMs, where: { $0.type == .ack || $0.type == .error }) {
            guard f.type == .ack else { throw ConnectionError("error frame: \((try? WireError.decode(f.payload).message) ?? "?")") }
            out.append(try Ack.decode(f.payload))
        }
        return out
    }

    /// The error frame the server closes with, if any.
    func error(timeoutMs: Int64 = 5000) throws -> WireError? {
        do {
            guard let f = try next(timeoutMs: timeoutMs, where: { $0.type == .error }) else { return nil }
            return try WireError.decode(f.payload)
        } catch is ConnectionError {
            return nil
        }
    }

    func batch(epoch: UInt64? = nil, _ sequence: UInt64, events: [TapioEvent]? = nil, drops: [DropCount] = []) -> EventBatch {
        EventBatch(node: node, epoch: epoch ?? self.epoch, sequence: sequence,
                   events: events ?? [event(UInt32(truncatingIfNeeded: sequence), comm: "raw-\(sequence)")], drops: drops)
    }
}

/// Issue 14's acknowledgement defects: an ack means exactly "this batch is
/// durable", the hello-ack the contiguous durable prefix, and nothing a node
/// sends crashes the server.
final class AcknowledgementTests: XCTestCase {
    private var harness: ServerHarness!

    override func setUpWithError() throws {
        harness = try ServerHarness()
    }

    override func tearDown() {
        harness = nil
    }

    private func storedSequences(_ node: String, epoch: UInt64) throws -> Set<UInt64> {
        Set(try harness.server.store.events(EventQuery(node: node, limit: 10_000)).filter { $0.epoch == epoch }.map(\.sequence))
    }

    // Defect 5: one missing sequence used to stop every later ack.
    func testEveryStoredBatchIsAcknowledgedAcrossAGap() throws {
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 7)
        for seq: UInt64 in [1, 3, 4] { try agent.send(agent.batch(seq)) }
        XCTAssertEqual(try agent.acks(3).map(\.sequence), [1, 3, 4])
        // The hello-ack claims only the prefix: 2 is missing.
        let again = try RawAgent(harness: harness, node: "node-a", epoch: 7)
        XCTAssertEqual(again.helloAck?.ackedSequence, 1)
        try again.send(again.batch(2))
        XCTAssertEqual(try again.acks(1).map(\.sequence), [2])
        XCTAssertEqual(try RawAgent(harness: harness, node: "node-a", epoch: 7).helloAck?.ackedSequence, 4)
    }

    // Defect 4: batches of an earlier epoch that do not start at sequence 1
    // (what a restarted agent resends from its spool) used to wait forever.
    func testBatchesOfAnEarlierEpochAreAcknowledgedOneByOne() throws {
        let old = try RawAgent(harness: harness, node: "node-a", epoch: 100)
        for seq: UInt64 in 1...3 { try old.send(old.batch(seq)) }
        XCTAssertEqual(try old.acks(3).count, 3)
        // A new process (epoch 200) resends epoch 100's batches 4...6 it had spooled.
        let restarted = try RawAgent(harness: harness, node: "node-a", epoch: 200)
        XCTAssertEqual(restarted.helloAck?.ackedSequence, 0)
        for seq: UInt64 in 4...6 { try restarted.send(restarted.batch(epoch: 100, seq)) }
        try restarted.send(restarted.batch(1))
        let acks = try restarted.acks(4)
        XCTAssertEqual(acks.map { "\($0.epoch)/\($0.sequence)" }, ["100/4", "100/5", "100/6", "200/1"])
        XCTAssertEqual(try storedSequences("node-a", epoch: 100), [1, 2, 3, 4, 5, 6])
        // A resend is acknowledged again and stored once.
        try restarted.send(restarted.batch(epoch: 100, 5))
        XCTAssertEqual(try restarted.acks(1).map(\.sequence), [5])
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-a", limit: 100)).count, 7)
    }

    // Defect 6: a batch whose store failed is never covered by an ack or the
    // hello-ack, even though a later batch was stored.
    func testAStoreErrorIsNeverAcknowledgedByALaterBatch() throws {
        let store = try XCTUnwrap(harness.server.store as? SegmentEventStore)
        func sql(_ statement: String) throws {
            let r = try TestSupport.run("/usr/bin/python3", ["-c", "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=30); c.execute(sys.argv[2]); c.commit()",
                                                              store.path, statement])
            XCTAssertEqual(r.status, 0, r.stderr)
        }
        // The disk is "full" for batch 2 only: its transaction fails as a real write error would.
        try sql("CREATE TRIGGER fail_two BEFORE INSERT ON log_batches WHEN NEW.seq = 2 BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 9)
        try agent.send(agent.batch(1))
        XCTAssertEqual(try agent.acks(1).map(\.sequence), [1])
        try agent.send(agent.batch(2))
        try agent.send(agent.batch(3))
        XCTAssertEqual(try agent.error()?.code, WireErrorCode.storageFailed.rawValue)
        XCTAssertEqual(harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"storage\"}"), 1)
        _ = eventually { (try? self.storedSequences("node-a", epoch: 9)) == [1, 3] }

        try sql("DROP TRIGGER fail_two")
        let again = try RawAgent(harness: harness, node: "node-a", epoch: 9)
        XCTAssertEqual(again.helloAck?.ackedSequence, 1, "batch 2 failed: the prefix ends before it whatever came after")
        try again.send(again.batch(2))
        try again.send(again.batch(3))
        XCTAssertEqual(try again.acks(2).map(\.sequence), [2, 3])
        XCTAssertEqual(try storedSequences("node-a", epoch: 9), [1, 2, 3])
        XCTAssertEqual(try RawAgent(harness: harness, node: "node-a", epoch: 9).helloAck?.ackedSequence, 3)
    }

    // Defect 2: sequence 2^64 − 1 then a reconnect trapped on mark + 1.
    func testSequencesBeyondTheStoreAreRefusedAndTheServerStaysUp() throws {
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 3)
        try agent.send(agent.batch(UInt64.max))
        let refusal = try XCTUnwrap(try agent.error())
        XCTAssertTrue(refusal.message.contains("outside 1..."), refusal.message)
        // The largest accepted sequence, and a reconnect after it.
        let edge = try RawAgent(harness: harness, node: "node-a", epoch: 3)
        try edge.send(edge.batch(1))
        try edge.send(edge.batch(UInt64(Int64.max) - 1))
        XCTAssertEqual(try edge.acks(2).map(\.sequence), [1, UInt64(Int64.max) - 1])
        XCTAssertEqual(try RawAgent(harness: harness, node: "node-a", epoch: 3).helloAck?.ackedSequence, 1)
    }

    // Defect 1: any UInt64 field above 2^63 trapped while storing.
    func testUInt64FieldsAboveInt64MaxAreStoredNotTrapped() throws {
        let big = UInt64.max
        let flow = Flow(source: IPAddress("10.0.0.1"), destination: IPAddress("10.0.0.2"), sourcePort: 1, destinationPort: 2)
        let now = wallClockNs()
        let events: [TapioEvent] = [
            TapioEvent(kind: .oomKill, timeNs: now, cgroupId: big, detail: .oomKill(victimPid: 1, victimComm: "x", victimUid: 0, totalVmKb: big, anonRssKb: big, fileRssKb: big)),
            TapioEvent(kind: .tcpConnect, timeNs: now, detail: .tcpConnect(flow: flow, outcome: .timeout, latencyNs: big, error: 0, count: 1)),
            TapioEvent(kind: .tcpRetransmit, timeNs: now, detail: .tcpRetransmit(flow: flow, count: 1, intervalNs: big)),
            TapioEvent(kind: .tcpLatency, timeNs: now, detail: .tcpLatency(flow: flow, srttUs: 1, responses: 1, responseNsTotal: big, responseNsMax: big, intervalNs: big)),
            TapioEvent(kind: .packetDrop, timeNs: now, detail: .packetDrop(reason: "X", count: 1, flow: flow, ipProtocol: 6, ifindex: 1, intervalNs: big)),
            TapioEvent(kind: .dns, timeNs: now, detail: .dns(name: "a", qtype: 1, rcode: 0, latencyNs: big, server: nil, serverPort: 0, id: 1, answers: [])),
            TapioEvent(kind: .cpuThrottle, timeNs: now, detail: .cpuThrottle(periods: big, throttledPeriods: big, throttledNs: big, intervalNs: big, cgroup: "c")),
            TapioEvent(kind: .memoryPressure, timeNs: now, detail: .memoryPressure(source: "psi", count: big, usageBytes: big, limitBytes: big, psiSomeAvg10Permille: 1, intervalNs: big, cgroup: "c")),
            TapioEvent(kind: .ioError, timeNs: now, detail: .ioError(error: 28, syscall: "write", count: 1, intervalNs: big)),
        ]
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 1)
        try agent.send(agent.batch(1, events: events, drops: [DropCount(kind: .dns, reason: "ringbuf_full", count: big)]))
        XCTAssertEqual(try agent.acks(1).map(\.sequence), [1])
        let stored = try harness.server.store.events(EventQuery(node: "node-a"))
        XCTAssertEqual(stored.count, events.count)
        let oom = try XCTUnwrap(stored.first { $0.kind == .oomKill })
        XCTAssertEqual(oom.json["total_vm_kb"], .int(.max), "saturated, not wrapped")
        XCTAssertEqual(oom.cgroupId, big)

        // Defect 3: the node's drop counters past Int64.max still answer `nodes`.
        let other = try RawAgent(harness: harness, node: "node-a", epoch: 2)
        try other.send(other.batch(1, drops: [DropCount(kind: .dns, reason: "ringbuf_full", count: big)]))
        XCTAssertEqual(try other.acks(1).count, 1)
        let nodes = try harness.operatorClient().json("nodes")
        guard case .array(let list)? = nodes["nodes"], let node = list.first else { return XCTFail("\(nodes)") }
        XCTAssertEqual(node["drops_total"], .int(.max))
    }

    // Defect 14: a batch of more events than the limit is refused from its
    // encoding, before protobuf-c allocates one structure per event.
    func testABatchOverTheEventLimitIsRefusedBeforeDecoding() throws {
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 1)
        XCTAssertEqual(agent.helloAck?.maxBatchEvents, 8192, "the limit is announced")
        // 4 MiB of empty events: 2,097,151 of them behind a 5-byte header.
        var payload: [UInt8] = [0x18, 0x01]  // sequence = 1
        let n = (Int(FrameHeader.defaultMaximumPayload) - 2) / 2
        payload.reserveCapacity(payload.count + 2 * n)
        for _ in 0..<n { payload += [0x32, 0x00] }
        XCTAssertEqual(try EventBatch.eventCount(encoded: payload), n)
        try agent.connection.send(.eventBatch, payload)
        let refusal = try XCTUnwrap(try agent.error())
        XCTAssertTrue(refusal.message.contains("exceeds the limit of 8192"), refusal.message)
        // Another node is served meanwhile.
        let other = try RawAgent(harness: harness, node: "node-b", epoch: 1)
        try other.send(other.batch(1))
        XCTAssertEqual(try other.acks(1).count, 1)
    }

    // Defect 15: events dated far ahead are stored, but do not wait in the
    // engine (costing CPU forever); they are counted per node.
    func testEventsDatedFarAheadAreCountedNotCorrelated() throws {
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 1)
        let fiftyYears: Int64 = 50 * 365 * 86_400 * 1_000_000_000
        let future = (0..<200).map { i in event(UInt32(i + 1), comm: "future", time: wallClockNs() + fiftyYears) }
        try agent.send(agent.batch(1, events: future + [event(999, comm: "now")]))
        XCTAssertEqual(try agent.acks(1).count, 1)
        XCTAssertEqual(try harness.server.store.events(EventQuery(node: "node-a", limit: 1000)).count, 201, "stored and queryable")
        XCTAssertEqual(try harness.server.store.drops(node: "node-a"), [DropCount(kind: .unspecified, reason: "future_time", count: 200)])
        XCTAssertEqual(harness.server.metrics.value("tapio_server_events_future_total"), 200)
        XCTAssertTrue(eventually(timeout: 10) { self.harness.server.correlation.statistics.pending == 0 },
                      "nothing waits in the engine: \(harness.server.correlation.statistics.pending) pending")
    }

    // Defect 17: a node stayed "connected" after a goodbye or a rejection.
    func testANodeIsDisconnectedAfterGoodbyeAndAfterARejection() throws {
        func connected() -> Bool { harness.server.registry.snapshot().first { $0.record.node == "node-a" }?.connected ?? false }
        do {
            let agent = try RawAgent(harness: harness, node: "node-a", epoch: 1)
            XCTAssertTrue(connected())
            try agent.connection.send(.goodbye, Goodbye(reason: "test", lastSequence: 0).encoded())
            _ = try? agent.next(timeoutMs: 2000) { $0.type == .goodbye }
        }
        XCTAssertTrue(eventually(timeout: 10) { !connected() }, "disconnected after goodbye")
        do {
            let agent = try RawAgent(harness: harness, node: "node-a", epoch: 1)
            XCTAssertTrue(connected())
            try agent.connection.send(.eventBatch, [0xff, 0xff, 0xff])
            XCTAssertNotNil(try agent.error())
        }
        XCTAssertTrue(eventually(timeout: 10) { !connected() }, "disconnected after a rejection")
    }

    // Defect 16: a node may speak only for its own pods.
    func testANodeCannotClaimAnotherNodesPodAddress() throws {
        let a = try RawAgent(harness: harness, node: "node-a", epoch: 1)
        let real = PodInfo(uid: "u1", name: "db-0", namespace: "prod", node: "node-a", ips: ["10.1.0.5"], service: "db")
        try a.connection.send(.inventory, Inventory(pods: [real]).encoded())
        XCTAssertTrue(eventually { self.harness.server.pods.pod(ip: "10.1.0.5")?.name == "db-0" })
        let b = try RawAgent(harness: harness, node: "node-b", epoch: 1)
        let evil = PodInfo(uid: "u2", name: "evil", namespace: "prod", node: "node-a", ips: ["10.1.0.5", "10.2.0.9"], service: "evil")
        try b.connection.send(.inventory, Inventory(pods: [evil]).encoded())
        XCTAssertTrue(eventually { self.harness.server.pods.pod(ip: "10.2.0.9")?.name == "evil" })
        XCTAssertNil(harness.server.pods.pod(ip: "10.1.0.5"), "a contested address names no pod, never the claimant's")
        XCTAssertEqual(harness.server.pods.all().first { $0.name == "evil" }?.node, "node-b", "the pod is the reporting node's")
        XCTAssertEqual(harness.server.metrics.value("tapio_server_pod_address_conflicts"), 1)
        // When node-b withdraws the claim, node-a's pod has its address back.
        try b.connection.send(.inventory, Inventory(pods: []).encoded())
        XCTAssertTrue(eventually { self.harness.server.pods.pod(ip: "10.1.0.5")?.name == "db-0" })
    }

    // Protocol 1 acknowledged cumulatively; such an agent is told to upgrade.
    func testAnAgentOfProtocolOneIsRefusedWithAReason() throws {
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 1, hello: false)
        try agent.connection.send(.hello, Hello(node: "node-a", agentVersion: "old", bootId: "b", capabilities: [], streamEpoch: 1, protocolVersion: 1).encoded())
        let refusal = try XCTUnwrap(try agent.error())
        XCTAssertTrue(refusal.message.contains("upgrade the agent"), refusal.message)
    }
}

/// One valid certificate cannot take a listener: connections per certificate
/// name are capped (the rest of issue 14's defect 18: a node holding
/// thousands of partial frames).
final class PeerConnectionLimitTests: XCTestCase {
    func testOneNodeCannotOpenMoreThanItsShareOfConnections() throws {
        let harness = try ServerHarness { $0.limits.maxConnectionsPerPeer = 3 }
        var held = try (0..<3).map { _ in try RawAgent(harness: harness, node: "node-a", epoch: 1) }
        // The fourth of node-a is refused at the handshake with a reason.
        let fourth = try RawAgent(harness: harness, node: "node-a", epoch: 1, hello: false)
        let refusal = try XCTUnwrap(try fourth.error())
        XCTAssertTrue(refusal.message.contains("already has 3 connections"), refusal.message)
        XCTAssertEqual(harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"peer_limit\"}"), 1)
        // Another node is served meanwhile.
        let other = try RawAgent(harness: harness, node: "node-b", epoch: 1)
        try other.send(other.batch(1))
        XCTAssertEqual(try other.acks(1).count, 1)
        // A closed connection frees its place.
        held.removeLast()
        XCTAssertTrue(eventually { (try? RawAgent(harness: harness, node: "node-a", epoch: 1)) != nil }, "node-a gets a connection once one closed")
        _ = held
    }
}

/// Time-sync exchanges on an ingest connection (docs/protocol.md).
final class TimeSyncTests: XCTestCase {
    private var harness: ServerHarness!

    override func tearDown() {
        harness = nil
    }

    /// An agent whose replies wait behind a backlog answers time syncs the
    /// server has since given up on: the session goes on (it was closed as
    /// malformed, which made the agent reconnect in the middle of a drain).
    /// A reply to a sync never sent still closes the connection.
    func testALateTimeSyncReplyKeepsTheSessionAndAnInventedOneClosesIt() throws {
        harness = try ServerHarness { $0.timeSyncInterval = .milliseconds(10) }
        let agent = try RawAgent(harness: harness, node: "node-a", epoch: 7)
        // Hold every sync unanswered until the server has sent far more than it keeps.
        var held: [TimeSync] = []
        let deadline = monotonicNs() + 10_000_000_000
        while held.count < 40, monotonicNs() < deadline {
            guard let f = try agent.connection.receive(timeoutMs: 100) else { continue }
            if f.type == .timeSync { held.append(try TimeSync.decode(f.payload)) }
        }
        XCTAssertEqual(held.count, 40, "the server sends a time sync every 10 ms")
        for var sync in held {
            sync.t2 = wallClockNs()
            sync.t3 = wallClockNs()
            try agent.connection.send(.timeSync, sync.encoded())
        }
        try agent.send(agent.batch(1))
        XCTAssertEqual(try agent.acks(1).map(\.sequence), [1], "the session survives replies the server gave up on")

        var invented = TimeSync(id: 1_000_000, t1: wallClockNs())
        invented.t2 = invented.t1
        invented.t3 = invented.t1
        try agent.connection.send(.timeSync, invented.encoded())
        let closing: WireError? = try agent.error()
        XCTAssertTrue(closing?.message.contains("not asked for") ?? false, "a reply to a sync never sent closes the connection: \(String(describing: closing))")
    }
}
