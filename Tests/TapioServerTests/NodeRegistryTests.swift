@testable import TapioServer
import TapioWire
import XCTest

/// The drop counters a node's batches carry, as the registry sums them.
final class NodeRegistryDropTests: XCTestCase {
    private func registry(_ node: String) -> NodeRegistry {
        let r = NodeRegistry(restoring: [])
        _ = r.connected(hello: Hello(node: node, agentVersion: "t", bootId: "b", capabilities: [], streamEpoch: 1), nowNs: 1)
        return r
    }

    private func drops(_ r: NodeRegistry) -> [String: UInt64] {
        Dictionary(uniqueKeysWithValues: (r.snapshot().first?.drops ?? []).map { ("\($0.kind.name)/\($0.reason)", $0.count) })
    }

    func testTheHighestOfEachCounterPerRunIsSummedOverRuns() {
        let r = registry("n")
        let ring = { (c: UInt64) in [DropCount(kind: .dns, reason: "ringbuf_full", count: c)] }
        _ = r.received(node: "n", events: 1, duplicate: false, epoch: 100, drops: ring(5), nowNs: 2)
        _ = r.received(node: "n", events: 1, duplicate: false, epoch: 100, drops: ring(9), nowNs: 3)
        // A late (or resent) batch of the same run carries a lower count: no change.
        _ = r.received(node: "n", events: 1, duplicate: true, epoch: 100, drops: ring(6), nowNs: 4)
        XCTAssertEqual(drops(r), ["dns/ringbuf_full": 9])
        // The agent restarted: its counters start again; both runs count.
        _ = r.received(node: "n", events: 1, duplicate: false, epoch: 200, drops: ring(4) + [DropCount(kind: .unspecified, reason: "agent_killed", count: 2)], nowNs: 5)
        XCTAssertEqual(drops(r), ["dns/ringbuf_full": 13, "unspecified/agent_killed": 2])
        // A batch without counters changes nothing.
        _ = r.received(node: "n", events: 1, duplicate: false, epoch: 200, drops: [], nowNs: 6)
        XCTAssertEqual(drops(r), ["dns/ringbuf_full": 13, "unspecified/agent_killed": 2])
    }

    func testRunsBeyondTheKeptOnesAreFoldedNotForgotten() {
        let r = registry("n")
        let runs = NodeRegistry.DropTally.keptEpochs + 5
        for e in 1...runs {
            _ = r.received(node: "n", events: 1, duplicate: false, epoch: UInt64(e), drops: [DropCount(kind: .dns, reason: "ringbuf_full", count: 10)], nowNs: Int64(e))
        }
        XCTAssertEqual(drops(r), ["dns/ringbuf_full": UInt64(10 * runs)])
    }
}
