import Synchronization
import TapioWire

/// The cluster-wide map from pod IP to pod, built from every agent's
/// inventory, so that a connection from node A to an address on node B is
/// attributed at both ends.
public final class PodDirectory: Sendable {
    private struct State {
        var byNode: [String: [PodInfo]] = [:]
        var byIP: [String: PodInfo] = [:]
    }

    private let state: Mutex<State>

    public init(restoring pods: [PodInfo]) {
        var s = State()
        for p in pods { s.byNode[p.node, default: []].append(p) }
        PodDirectory.reindex(&s)
        state = Mutex(s)
    }

    public func replace(node: String, pods: [PodInfo]) {
        state.withLock { s in
            s.byNode[node] = pods
            PodDirectory.reindex(&s)
        }
    }

    /// The pod that owns `ip`, nil for addresses outside the inventory (host
    /// networking, external peers).
    public func pod(ip: String) -> PodInfo? {
        state.withLock { $0.byIP[ip] }
    }

    public func all() -> [PodInfo] {
        state.withLock { s in s.byNode.values.flatMap { $0 }.sorted { ($0.namespace, $0.name) < ($1.namespace, $1.name) } }
    }

    private static func reindex(_ s: inout State) {
        s.byIP.removeAll(keepingCapacity: true)
        for node in s.byNode.keys.sorted() {
            for p in s.byNode[node]! { for ip in p.ips { s.byIP[ip] = p } }
        }
    }
}
