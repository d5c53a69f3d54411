import Foundation
import TapioAgent
import TapioClient
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

final class IngestTests: XCTestCase {
    func testAgentBatchesAreStoredThenAcknowledged() throws {
        let h = try ServerHarness()
        let (outbox, sender) = try h.agent(node: "node-a")
        for pid in 1...1200 { outbox.add(event(UInt32(pid), comm: "worker")) }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 }, "every batch acknowledged")
        sender.drainAndStop(graceSeconds: 2)
        let stored = try h.server.store.events(EventQuery(node: "node-a", limit: 5000))
        XCTAssertEqual(stored.count, 1200)
        XCTAssertEqual(Set(stored.map(\.pid)).count, 1200)
        XCTAssertGreaterThanOrEqual(outbox.stats.ackedBatches, 3, "512 events per batch at most")
    }

    func testNodesQueryShowsTheAgentAndItsClock() throws {
        let h = try ServerHarness()
        let (outbox, sender) = try h.agent(node: "node-a")
        outbox.add(event(1, comm: "x"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        XCTAssertTrue(eventually { (h.server.registry.snapshot().first?.clockSamples ?? 0) >= 1 })
        let doc = try h.operatorClient().json("nodes")
        let node = try XCTUnwrap(doc["nodes"]?.arrayValue?.first)
        XCTAssertEqual(node["node"], .string("node-a"))
        XCTAssertEqual(node["connected"], .bool(true))
        XCTAssertEqual(node["events_received"]?.intValue, 1)
        XCTAssertEqual(node["capabilities"], .array([.string("process_exec")]))
        // Same machine, same clock: the estimate is within its own error bound of zero.
        let offset = try XCTUnwrap(node["clock_offset_ns"]?.intValue)
        let error = try XCTUnwrap(node["clock_error_ns"]?.intValue)
        XCTAssertLessThanOrEqual(abs(offset), error + 1_000_000)
        sender.drainAndStop(graceSeconds: 2)
    }

    func testPythonEncodedBatchIsDecodedStoredAndDeduplicated() throws {
        let h = try ServerHarness()
        let pb = try TestSupport.pythonProtobufModules()
        let node = h.pki + "/nodes/node-b"
        let args = ["send-batch", pb, "127.0.0.1", String(h.ingestPort), node + "/ca.crt", node + "/tls.crt", node + "/tls.key", "node-b", "1"]
        let first = try h.python(args)
        XCTAssertEqual(first.status, 0, first.stderr)
        XCTAssertEqual(try JSONValue.parse(Array(first.stdout.utf8))["acked"]?.intValue, 1)
        // The same (node, epoch, sequence) again: acknowledged, not stored twice.
        let again = try h.python(args)
        XCTAssertEqual(again.status, 0, again.stderr)
        let events = try h.operatorClient().json("events", ["node": "node-b"])["events"]?.arrayValue ?? []
        XCTAssertEqual(events.count, 2)
        XCTAssertEqual(events.map { $0["kind"] }, [.string("process_exec"), .string("process_exit")])
        XCTAssertEqual(events[0]["filename"], .string("/usr/bin/py-interop"))
        XCTAssertEqual(events[1]["exit_code"]?.intValue, 42)
        XCTAssertEqual(events[1]["comm"], .string("py-interop"))
        XCTAssertEqual(try h.server.store.drops(node: "node-b"), [DropCount(kind: .processExec, reason: "ringbuf_full", count: 3)])
        XCTAssertEqual(h.server.metrics.value("tapio_server_duplicate_batches_total"), 1)
    }

    func testOperatorRoleIsRequiredToQuery() throws {
        let h = try ServerHarness()
        let asNode = try QueryClient(host: "127.0.0.1", port: h.queryPort, ca: h.pki + "/nodes/node-a/ca.crt",
                                     certificate: h.pki + "/nodes/node-a/tls.crt", key: h.pki + "/nodes/node-a/tls.key")
        XCTAssertThrowsError(try asNode.json("nodes")) { error in
            XCTAssertTrue("\(error)".contains("tapio-operator"), "\(error)")
        }
        XCTAssertNoThrow(try h.operatorClient().json("nodes"))
        XCTAssertThrowsError(try h.operatorClient().json("no-such-method"))
        XCTAssertThrowsError(try h.operatorClient().json("events", ["kind": "bogus"]))
    }

    func testBatchesSentWhileTheServerWasAwayArriveAfterItReturns() throws {
        // The agent keeps unacknowledged batches and resends on reconnect.
        let dir = try TestSupport.temporaryDirectory()
        let pki = try TestSupport.makePKI(in: dir, nodes: ["node-a"])
        let port = TestSupport.freePort()
        func start() throws -> TapioServer {
            var config = ServerConfiguration(dataDirectory: dir + "/data", tls: TLSFiles(directory: pki + "/server"))
            config.ingestPort = port
            config.queryPort = 0
            config.metricsHost = nil
            let s = try TapioServer(configuration: config, logger: .init(label: "t"))
            _ = try s.start()
            return s
        }
        var server = try start()
        let outbox = try Outbox(node: "node-a", epoch: 77, spoolDirectory: nil)
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(port), serverName: "localhost", tls: AgentTLSFiles(directory: pki + "/nodes/node-a"),
                                          node: "node-a", bootId: "b", capabilities: [], degraded: [])
        config.maximumBackoffMs = 200
        let sender = Sender(configuration: config, outbox: outbox, logger: .init(label: "t"))
        sender.start()
        for pid in 1...100 { outbox.add(event(UInt32(pid), comm: "before")) }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        server.shutdown()
        for pid in 101...200 { outbox.add(event(UInt32(pid), comm: "during")) }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertEqual(outbox.unacknowledged, 1)
        server = try start()
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        let pids = try server.store.events(EventQuery(node: "node-a", limit: 1000)).map(\.pid)
        XCTAssertEqual(pids.sorted(), Array(1...200).map(UInt32.init))
        sender.drainAndStop(graceSeconds: 1)
        server.shutdown()
    }
}

final class QueryClientTests: XCTestCase {
    /// A server that is not there is an error, not a crash.
    func testConnectingToNothingThrows() throws {
        let dir = try TestSupport.temporaryDirectory()
        let pki = try TestSupport.makePKI(in: dir, nodes: [])
        let client = try QueryClient(host: "127.0.0.1", port: TestSupport.freePort(), ca: pki + "/operators/alice/ca.crt",
                                     certificate: pki + "/operators/alice/tls.crt", key: pki + "/operators/alice/tls.key")
        XCTAssertThrowsError(try client.json("nodes")) { XCTAssertTrue("\($0)".contains("cannot connect"), "\($0)") }
    }
}
