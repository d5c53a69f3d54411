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
    /// The most recent `limit` matching events are returned, oldest first.
    public var limit: Int

    public static let maximumLimit = 100_000

    public init(sinceNs: Int64? = nil, untilNs: Int64? = nil, node: String? = nil, kind: EventKind? = nil, pid: UInt32? = nil,
                pod: String? = nil, namespace: String? = nil, limit: Int = 1000) {
        self.sinceNs = sinceNs
        self.untilNs = untilNs
        self.node = node
        self.kind = kind
        self.pid = pid
        self.pod = pod
        self.namespace = namespace
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
        return true
    }
}
