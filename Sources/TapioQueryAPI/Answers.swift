/// The `events` answer: the most recent matching events, oldest first.
public struct EventsAnswer: Sendable, Equatable, Codable {
    public var count: Int
    public var events: [QueryEvent]
    /// Present when retention deleted events the query's window reaches back to.
    public var retention: RetentionNotice?

    public init(events: [QueryEvent], retention: RetentionNotice? = nil) {
        count = events.count
        self.events = events
        self.retention = retention
    }
}

/// Time retention has deleted is said, not answered with silently less.
public struct RetentionNotice: Sendable, Equatable, Codable {
    /// Events up to this time (RFC 3339; `deletedBeforeNs` in ns) are gone.
    public var deletedBefore: String
    public var deletedBeforeNs: Int64
    /// The sentence the CLI prints.
    public var note: String

    public init(deletedBefore: String, deletedBeforeNs: Int64, note: String) {
        (self.deletedBefore, self.deletedBeforeNs, self.note) = (deletedBefore, deletedBeforeNs, note)
    }

    enum CodingKeys: String, CodingKey {
        case note
        case deletedBefore = "deleted_before", deletedBeforeNs = "deleted_before_ns"
    }
}

/// The `nodes` answer.
public struct NodesAnswer: Sendable, Equatable, Codable {
    public var nodes: [QueryNode]
    public init(nodes: [QueryNode]) { self.nodes = nodes }
}

/// One agent as the server knows it, across connections and restarts.
public struct QueryNode: Sendable, Equatable, Codable {
    public var node: String
    public var connected: Bool
    public var agentVersion: String
    public var bootId: String
    /// BPF programs running, and those that could not load.
    public var capabilities: [String]
    public var degraded: [String]
    public var firstSeen: String
    public var lastSeen: String
    public var lastSeenAgeS: Double
    /// Agent clock − server clock, and its uncertainty, ns.
    public var clockOffsetNs: Int64
    public var clockErrorNs: Int64
    public var clockSamples: Int64
    public var eventsReceived: Int64
    public var batchesReceived: Int64
    public var duplicateBatches: Int64
    /// Events lost before the wire, by `kind/reason`; saturated, never wrapped.
    public var drops: [String: Int64]
    public var dropsTotal: Int64

    public init(node: String, connected: Bool, agentVersion: String, bootId: String, capabilities: [String], degraded: [String], firstSeen: String,
                lastSeen: String, lastSeenAgeS: Double, clockOffsetNs: Int64, clockErrorNs: Int64, clockSamples: Int64, eventsReceived: Int64,
                batchesReceived: Int64, duplicateBatches: Int64, drops: [String: Int64], dropsTotal: Int64) {
        (self.node, self.connected, self.agentVersion, self.bootId, self.capabilities, self.degraded) = (node, connected, agentVersion, bootId, capabilities, degraded)
        (self.firstSeen, self.lastSeen, self.lastSeenAgeS) = (firstSeen, lastSeen, lastSeenAgeS)
        (self.clockOffsetNs, self.clockErrorNs, self.clockSamples) = (clockOffsetNs, clockErrorNs, clockSamples)
        (self.eventsReceived, self.batchesReceived, self.duplicateBatches, self.drops, self.dropsTotal) = (eventsReceived, batchesReceived, duplicateBatches, drops, dropsTotal)
    }

    enum CodingKeys: String, CodingKey {
        case node, connected, capabilities, degraded, drops
        case agentVersion = "agent_version", bootId = "boot_id", firstSeen = "first_seen", lastSeen = "last_seen", lastSeenAgeS = "last_seen_age_s"
        case clockOffsetNs = "clock_offset_ns", clockErrorNs = "clock_error_ns", clockSamples = "clock_samples"
        case eventsReceived = "events_received", batchesReceived = "batches_received", duplicateBatches = "duplicate_batches", dropsTotal = "drops_total"
    }
}

/// The `pods` answer: every node's inventory.
public struct PodsAnswer: Sendable, Equatable, Codable {
    public var pods: [QueryPod]
    public init(pods: [QueryPod]) { self.pods = pods }
}

public struct QueryPod: Sendable, Equatable, Codable {
    public var uid: String
    public var name: String
    public var namespace: String
    public var node: String
    public var ips: [String]
    public var service: String
    public var ownerKind: String
    public var ownerName: String
    public var labels: [String: String]
    public var containerIds: [String]

    public init(uid: String, name: String, namespace: String, node: String, ips: [String], service: String, ownerKind: String, ownerName: String,
                labels: [String: String], containerIds: [String]) {
        (self.uid, self.name, self.namespace, self.node, self.ips) = (uid, name, namespace, node, ips)
        (self.service, self.ownerKind, self.ownerName, self.labels, self.containerIds) = (service, ownerKind, ownerName, labels, containerIds)
    }

    enum CodingKeys: String, CodingKey {
        case uid, name, namespace, node, ips, service, labels
        case ownerKind = "owner_kind", ownerName = "owner_name", containerIds = "container_ids"
    }
}

/// The `incidents` answer.
public struct IncidentsAnswer: Sendable, Equatable, Codable {
    public var incidents: [QueryIncident]
    public init(incidents: [QueryIncident]) { self.incidents = incidents }
}

/// The `services` answer: the dependency graph.
public struct ServicesAnswer: Sendable, Equatable, Codable {
    public var services: [ServiceEdge]
    /// DNS name → the service its answers pointed to.
    public var names: [String: String]
    public init(services: [ServiceEdge], names: [String: String]) {
        self.services = services
        self.names = names
    }
}

/// One client → server dependency.
public struct ServiceEdge: Sendable, Equatable, Codable {
    /// Count, mean and quantiles in ms.
    public struct Latency: Sendable, Equatable, Codable {
        public var count: Int64
        public var meanMs: Double
        public var p50Ms: Double
        public var p99Ms: Double
        public var maxMs: Double

        public init(count: Int64, meanMs: Double, p50Ms: Double, p99Ms: Double, maxMs: Double) {
            (self.count, self.meanMs, self.p50Ms, self.p99Ms, self.maxMs) = (count, meanMs, p50Ms, p99Ms, maxMs)
        }

        enum CodingKeys: String, CodingKey {
            case count
            case meanMs = "mean_ms", p50Ms = "p50_ms", p99Ms = "p99_ms", maxMs = "max_ms"
        }
    }

    public var client: String
    public var server: String
    /// Connection attempts, established and failed.
    public var connects: Int64
    public var failures: Int64
    public var failuresByOutcome: [String: Int64]
    public var failureRatio: Double
    public var ports: [Int64]
    public var connectLatency: Latency
    public var responseLatency: Latency
    /// The path's usual smoothed RTT, ms (0 before any was measured); absent
    /// from servers older than the `network_latency` cause.
    public var srttMs: Double?
    public var firstSeen: String
    public var lastSeen: String

    public init(client: String, server: String, connects: Int64, failures: Int64, failuresByOutcome: [String: Int64], failureRatio: Double, ports: [Int64],
                connectLatency: Latency, responseLatency: Latency, srttMs: Double? = nil, firstSeen: String, lastSeen: String) {
        (self.client, self.server, self.connects, self.failures, self.failuresByOutcome, self.failureRatio) = (client, server, connects, failures, failuresByOutcome, failureRatio)
        (self.ports, self.connectLatency, self.responseLatency, self.srttMs, self.firstSeen, self.lastSeen) = (ports, connectLatency, responseLatency, srttMs, firstSeen, lastSeen)
    }

    enum CodingKeys: String, CodingKey {
        case client, server, connects, failures, ports
        case failuresByOutcome = "failures_by_outcome", failureRatio = "failure_ratio", connectLatency = "connect_latency"
        case responseLatency = "response_latency", srttMs = "srtt_ms", firstSeen = "first_seen", lastSeen = "last_seen"
    }
}

/// One `query_response` of a `subscribe` query (docs/protocol.md,
/// "Subscriptions"): first a `snapshot` of the incidents the server holds,
/// then a `change` as each incident opens, updates or resolves, and a
/// `keepalive` whenever nothing else was sent for the keepalive interval.
public struct SubscriptionMessage: Sendable, Equatable, Codable {
    public enum Kind: String, Sendable, Codable {
        case snapshot, change, keepalive
    }

    public enum Change: String, Sendable, Codable {
        case opened, updated, resolved
    }

    public var type: Kind
    /// RFC 3339, the server's clock when it sent this.
    public var time: String
    /// `snapshot` only: every incident (as the `incidents` list has them).
    public var incidents: [QueryIncident]?
    /// `change` only.
    public var change: Change?
    public var incident: QueryIncident?

    public init(type: Kind, time: String, incidents: [QueryIncident]? = nil, change: Change? = nil, incident: QueryIncident? = nil) {
        (self.type, self.time, self.incidents, self.change, self.incident) = (type, time, incidents, change, incident)
    }
}
