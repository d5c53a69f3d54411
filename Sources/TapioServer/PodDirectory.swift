import Synchronization
import TapioWire

/// The cluster-wide map from pod IP to pod, built from every agent's
/// inventory, so that a connection from node A to an address on node B is
/// attributed at both ends. An address claimed by pods of two nodes maps to
/// no pod (`PodClaims`): a node speaks only for its own pods.
public final class PodDirectory: Sendable {
    private struct State {
        var byNode: [String: [PodInfo]] = [:]
        var byIP = PodClaims([:], keys: { _ in [] })
    }

    private let state: Mutex<State>

    public init(restoring pods: [PodInfo]) {
        var s = State()
        for p in pods { s.byNode[p.node, default: []].append(p) }
        PodDirectory.reindex(&s)
        state = Mutex(s)
    }

    /// Replaces `node`'s pods; returns the addresses now claimed by more
    /// than one node (left unattributed).
    @discardableResult
    public func replace(node: String, pods: [PodInfo]) -> Set<String> {
        state.withLock { s in
            s.byNode[node] = pods
            PodDirectory.reindex(&s)
            return s.byIP.conflicts
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
        s.byIP = PodClaims(s.byNode, keys: \.ips)
    }
}
