import TapioWire

/// The filters of the `events` query (docs/events.md): every given filter
/// must match; `limit` keeps the most recent matches.
public struct EventQuery: Sendable, Equatable {
    public var sinceNs: Int64?
    public var untilNs: Int64?
    public var node: String?
    public var kind: EventKind?
    public var pid: UInt32?
    public var pod: String?
    public var namespace: String?
    /// Only events of one of these pods (by name; with `namespace` for one
    /// namespace). The server fills it from the pod inventory to answer
    /// `service`: the pods whose service it is. An empty list matches nothing.
    public var pods: [String]?
    /// Only events whose pod name starts with this (`--pod 'api-*'`).
    public var podPrefix: String?
    /// The most recent `limit` matching events are returned, oldest first.
    public var limit: Int

    public static let maximumLimit = 100_000

    public init(sinceNs: Int64? = nil, untilNs: Int64? = nil, node: String? = nil, kind: EventKind? = nil, pid: UInt32? = nil,
                pod: String? = nil, namespace: String? = nil, pods: [String]? = nil, podPrefix: String? = nil, limit: Int = 1000) {
        self.sinceNs = sinceNs
        self.untilNs = untilNs
        self.node = node
        self.kind = kind
        self.pid = pid
        self.pod = pod
        self.namespace = namespace
        self.pods = pods
        self.podPrefix = podPrefix
        self.limit = limit
    }

    /// Whether a stored event passes every filter of the query (the limit
    /// aside). Stores that cannot filter in their own query language filter
    /// with this, so every store answers the same.
    public func matches(_ e: StoredEvent) -> Bool {
        if let since = sinceNs, e.timeNs < since { return false }
        if let until = untilNs, e.timeNs >= until { return false }
        if let node, e.node != node { return false }
        if let kind, e.kind != kind { return false }
        if let pid, e.pid != pid { return false }
        if let pod, e.pod != pod { return false }
        if let namespace, e.namespace != namespace { return false }
        if let pods, !pods.contains(e.pod) { return false }
        if let podPrefix, !e.pod.hasPrefix(podPrefix) { return false }
        return true
    }
}
