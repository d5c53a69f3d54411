@testable import TapioCorrelation
import Foundation
import TapioWire
import XCTest

/// The engine's per-event shortcuts answer what the code they replaced did.
final class HotPathTests: XCTestCase {
    func testNthLargestIsTheSortedValue() {
        var seed: UInt64 = 42
        func next() -> UInt64 {
            seed = seed &* 6364136223846793005 &+ 1442695040888963407
            return seed >> 33
        }
        for n in [1, 2, 3, 7, 100, 1000] {
            for spread in [1, 5, 1_000_000] {
                let values = (0..<n).map { _ in Int64(next() % UInt64(spread)) - Int64(spread / 2) }
                let sorted = values.sorted(by: >)
                for k in Set([0, n / 4, n / 2, n * 3 / 4, n - 1]) {
                    XCTAssertEqual(nthLargest(values, k), sorted[k], "n \(n) spread \(spread) k \(k)")
                }
            }
        }
        XCTAssertEqual(nthLargest(Array(repeating: 7, count: 50), 30), 7)
        XCTAssertEqual(nthLargest(Array(0..<100).map(Int64.init), 0), 99)
    }

    func testNetfilterReasonAsFoundationReadsIt() {
        for reason in ["NETFILTER_DROP", "netfilter_drop", "SKB_DROP_REASON_NETFILTER_DROP", "NetFilter", "NETFILTE", "NO_SOCKET", "", "TCP_CSUM",
                       "x-netfilter-y", "NETFILTERS", "netfiltér", "ñetfilter_drop", "drop: NETFILTER"] {
            XCTAssertEqual(isNetfilterReason(reason), reason.uppercased().contains("NETFILTER"), reason)
        }
    }

    func testShortContainerIdAsBefore() {
        func before(_ id: String) -> String {
            guard id.contains(":"), let r = id.range(of: "://") else { return id }
            return String(id[r.upperBound...])
        }
        for id in ["containerd://abc123", "abc123", "docker://", "cri-o://x://y", ":/", "a:b", "://", "", "containerd://é1", "é://x", "x:/y"] {
            XCTAssertEqual(Topology.shortContainerId(id), before(id), id)
        }
    }

    /// Checkpoints keep the graph's shape of before: edges keyed
    /// `client U+0001 server`, and they read back to the same graph.
    func testGraphCheckpointShapeAndRoundTrip() throws {
        var c = SyntheticCluster()
        c.healthy(until: 20)
        c.connect(20, "api", "redis", .refused, count: 3)
        let g = c.engine().graph
        let data = try JSONEncoder().encode(g)
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
        let edges = try XCTUnwrap(object["edgeMap"] as? [String: Any])
        XCTAssertTrue(edges.keys.contains("api\u{1}redis"))
        XCTAssertEqual(edges.count, g.edgeCount)
        XCTAssertNotNil(object["names"])
        let back = try JSONDecoder().decode(DependencyGraph.self, from: data)
        XCTAssertEqual(back, g)
        XCTAssertEqual(back.edges.map(\.client), g.edges.map(\.client))
        XCTAssertEqual(back.dependencies(of: "api"), ["db", "redis"])
    }

    /// Remembered address texts are the addresses' own, and checkpoints
    /// hold the topology as before, without them.
    func testAddressTextsAreRememberedOutsideCheckpoints() throws {
        var t = Topology()
        for text in ["10.0.1.10", "0.0.0.0", "255.255.255.255", "fd00::1", "::ffff:10.0.0.1"] {
            let a = try XCTUnwrap(IPAddress(text))
            XCTAssertEqual(t.text(of: a), a.description)
            XCTAssertEqual(t.text(of: a), a.description)
        }
        for i in 0...(Topology.maxAddressTexts + 10) {
            let a = try XCTUnwrap(IPAddress("10.\((i >> 16) & 255).\((i >> 8) & 255).\(i & 255)"))
            XCTAssertEqual(t.text(of: a), a.description)
        }
        t.sawServer("redis", address: IPAddress("10.0.3.10"))
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: JSONEncoder().encode(t)) as? [String: Any])
        XCTAssertEqual(Set(object.keys), ["podsByNode", "byIP", "byContainer", "byNamespacedName", "byName", "nameByIP", "addressesByName",
                                          "entityNodes", "ownerByIP", "listenPorts", "serverPorts"])
        let back = try JSONDecoder().decode(Topology.self, from: JSONEncoder().encode(t))
        XCTAssertEqual(back.ownerByIP, ["10.0.3.10": "redis"])
    }

    /// An engine checkpointed halfway and restored goes on to the same
    /// incidents as one that never stopped (cause events, series and the
    /// graph through their coded forms).
    func testCheckpointHalfwayGivesTheSameIncidents() throws {
        let c = EngineTests.cascade()
        let events = c.events.sorted { $0.timeNs < $1.timeNs }
        let half = events.count / 2
        var whole = CorrelationEngine()
        var first = CorrelationEngine()
        for (node, pods) in c.inventory.sorted(by: { $0.key < $1.key }) {
            whole.updateInventory(node: node, pods: pods)
            first.updateInventory(node: node, pods: pods)
        }
        whole.ingest(Array(events[..<half]))
        first.ingest(Array(events[..<half]))
        let mid = events[half].timeNs
        whole.advance(toNs: mid)
        first.advance(toNs: mid)
        var restored = try CorrelationEngine(checkpoint: try first.checkpoint())
        XCTAssertEqual(try restored.checkpoint().count, try first.checkpoint().count)
        whole.ingest(Array(events[half...]))
        restored.ingest(Array(events[half...]))
        whole.finish()
        restored.finish()
        XCTAssertFalse(whole.incidents.isEmpty)
        XCTAssertEqual(whole.incidentsJSON().serialized(), restored.incidentsJSON().serialized())
        XCTAssertEqual(whole.graph, restored.graph)
    }
}
