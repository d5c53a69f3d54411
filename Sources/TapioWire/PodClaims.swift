/// Which pod an address, container id or name belongs to, built from every
/// node's inventory under one rule: a node speaks only for the pods on it.
///
/// A key (a pod IP, a container id, `namespace/name`) claimed by pods of two
/// or more nodes is ambiguous and maps to no pod: one node cannot take over
/// another node's pod by listing its address, and a pod IP that moved to
/// another node is briefly unattributed until the old node's next inventory
/// drops it — a gap, never a wrong name. Within one node the last pod listed
/// wins, as the kubelet's own view would.
public struct PodClaims: Sendable {
    public private(set) var index: [String: PodInfo] = [:]
    /// Keys claimed by more than one node, left out of `index`.
    public private(set) var conflicts: Set<String> = []

    public init(_ podsByNode: [String: [PodInfo]], keys: (PodInfo) -> [String]) {
        var owner: [String: String] = [:]
        for node in podsByNode.keys.sorted() {
            for p in podsByNode[node]! {
                for key in keys(p) where !key.isEmpty {
                    if let other = owner[key], other != node {
                        conflicts.insert(key)
                        continue
                    }
                    owner[key] = node
                    index[key] = p
                }
            }
        }
        for key in conflicts { index.removeValue(forKey: key) }
    }

    public subscript(key: String) -> PodInfo? { index[key] }
}
