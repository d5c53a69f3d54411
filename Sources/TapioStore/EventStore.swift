import Foundation
import Synchronization
import TapioWire

/// An event as stored: the agent's observation plus where and when the server
/// placed it on the cluster clock.
public struct StoredEvent: Sendable, Equatable {
    public var node: String
    public var kind: EventKind
    /// Server-corrected wall time, ns since the Unix epoch.
    public var timeNs: Int64
    /// The agent's own wall time for the event, before correction.
    public var agentTimeNs: Int64
    /// Half the round-trip delay of the clock sample used: the true time lies
    /// within timeNs ± timeErrorNs.
    public var timeErrorNs: Int64
    public var pid: UInt32
    public var ppid: UInt32
    public var uid: UInt32
    public var comm: String
    public var cgroupId: UInt64
    public var netns: UInt32
    public var containerId: String
    public var pod: String
    public var namespace: String
    public var detail: [String: JSONValue]
    public var epoch: UInt64
    public var sequence: UInt64

    /// The JSON object of the `events` query (docs/events.md).
    public var json: JSONValue {
        var o = detail
        o["kind"] = .string(kind.name)
        o["time"] = .string(rfc3339(ns: timeNs))
        o["time_ns"] = .int(timeNs)
        o["time_error_ns"] = .int(timeErrorNs)
        o["agent_time"] = .string(rfc3339(ns: agentTimeNs))
        o["node"] = .string(node)
        if pid != 0 { o["pid"] = .int(Int64(pid)) }
        if ppid != 0 { o["ppid"] = .int(Int64(ppid)) }
        if kind == .processExec || kind == .processExit || uid != 0 { o["uid"] = .int(Int64(uid)) }
        if !comm.isEmpty { o["comm"] = .string(comm) }
        if cgroupId != 0 { o["cgroup_id"] = .int(Int64(bitPattern: cgroupId)) }
        if netns != 0 { o["netns"] = .int(Int64(netns)) }
        if !containerId.isEmpty { o["container_id"] = .string(containerId) }
        if !pod.isEmpty { o["pod"] = .string(pod) }
        if !namespace.isEmpty { o["namespace"] = .string(namespace) }
        return .object(o)
    }
}

/// What the server remembers about an agent across connections and restarts.
public struct NodeRecord: Sendable, Equatable {
    public var node: String
    public var agentVersion: String
    public var bootId: String
    public var capabilities: [String]
    public var degraded: [String]
    public var firstSeenNs: Int64
    public var lastSeenNs: Int64
    public var clockOffsetNs: Int64
    public var clockErrorNs: Int64
    public var eventsReceived: Int64
    public var batchesReceived: Int64
    public var duplicateBatches: Int64

    public init(node: String, agentVersion: String = "", bootId: String = "", capabilities: [String] = [], degraded: [String] = [], firstSeenNs: Int64 = 0, lastSeenNs: Int64 = 0, clockOffsetNs: Int64 = 0, clockErrorNs: Int64 = 0, eventsReceived: Int64 = 0, batchesReceived: Int64 = 0, duplicateBatches: Int64 = 0) {
        self.node = node
        self.agentVersion = agentVersion
        self.bootId = bootId
        self.capabilities = capabilities
        self.degraded = degraded
        self.firstSeenNs = firstSeenNs
        self.lastSeenNs = lastSeenNs
        self.clockOffsetNs = clockOffsetNs
        self.clockErrorNs = clockErrorNs
        self.eventsReceived = eventsReceived
        self.batchesReceived = batchesReceived
        self.duplicateBatches = duplicateBatches
    }
}

/// The clock placement the server applies to one batch.
public struct ClockCorrection: Sendable, Equatable {
    /// Agent clock minus server clock, ns.
    public var offsetNs: Int64
    /// Uncertainty of the offset, ns (half the best sample's round-trip delay).
    public var errorNs: Int64

    public init(offsetNs: Int64, errorNs: Int64) {
        self.offsetNs = offsetNs
        self.errorNs = errorNs
    }

    public static let none = ClockCorrection(offsetNs: 0, errorNs: 0)
}

/// The durable event log behind a narrow interface, so that moving raw events
/// to a store built for volume is an adapter, not a rewrite.
public protocol EventStore: Sendable {
    /// Stores a batch durably (the call returns after the data is on disk).
    /// `payload` is the batch as it arrived, kept for replay. `serverDrops`
    /// are events of this batch the server itself set aside (e.g. dated too
    /// far ahead), added to the node's drop counters in the same transaction.
    /// The node's received counters are updated in that transaction too, so
    /// they never lag what was acknowledged. Returns false when (node, epoch,
    /// sequence) was stored before: nothing is written twice.
    func append(_ batch: EventBatch, payload: [UInt8], clock: ClockCorrection, receivedNs: Int64, serverDrops: [DropCount]) throws -> Bool
    /// Appends several batches in one transaction (one fsync, group
    /// commit): when it returns every one is durable, when it throws none
    /// is. Per batch, as `append`: stored, or false for a duplicate.
    func appendAll(_ batches: [BatchAppend]) throws -> [Bool]
    /// `appendAll` telling each stored batch's log position (its id:
    /// increasing in commit order, without gaps) and nil for a duplicate.
    func appendLogged(_ batches: [BatchAppend]) throws -> [Int64?]
    /// The durable log in commit order: batches after log position `afterId`.
    func batches(afterId: Int64, limit: Int) throws -> [RecordedBatch]
    /// The contiguous durable prefix of (node, epoch): the largest n such that
    /// every sequence 1...n is stored, 0 when sequence 1 is not. A gap (a
    /// batch whose store failed while a later one succeeded) ends the prefix.
    func durablePrefix(node: String, epoch: UInt64) throws -> UInt64
    func events(_ query: EventQuery) throws -> [StoredEvent]
    func saveNode(_ record: NodeRecord) throws
    func nodes() throws -> [NodeRecord]
    /// Drop counters per node, summed over stream epochs: (kind, reason) → count.
    func drops(node: String) throws -> [DropCount]
    /// Replaces the pods a node reported.
    func savePods(node: String, pods: [PodInfo]) throws
    /// Every pod any node reported, for the cluster-wide IP → pod map.
    func pods() throws -> [PodInfo]
    /// The durable log in arrival order: batches received at or after
    /// `sinceNs`, as stored, with the clock placement applied at the time.
    func batches(sinceNs: Int64, limit: Int) throws -> [RecordedBatch]
    /// Upserts an incident as the engine last described it.
    func saveIncident(_ incident: StoredIncident) throws
    /// Every stored incident, oldest first.
    func incidents() throws -> [StoredIncident]
    /// Deletes whole segments past the retention limits, oldest first, and
    /// says what it deleted (docs/storage.md).
    func enforceRetention(nowNs: Int64) throws -> [RetentionDeletion]
    /// Events dated before this may have been deleted by retention; nil
    /// while retention has deleted nothing.
    func retainedFromNs() throws -> Int64?
    /// Sizes and counters of the store, for /metrics.
    func statistics() -> StoreStatistics
}

/// One segment deleted by retention.
public struct RetentionDeletion: Sendable, Equatable {
    public enum Reason: String, Sendable, CaseIterable {
        /// Its newest batch arrived longer ago than `--retention`.
        case retention
        /// The store was over `--max-disk`.
        case maxDisk = "max_disk"
    }
    public var segment: Int64
    public var reason: Reason
    public var bytes: Int64
    public var batches: Int64
    public var events: Int64
    /// The newest event time the segment held (ns, server clock).
    public var newestEventNs: Int64
}

/// What /metrics shows of the store.
public struct StoreStatistics: Sendable, Equatable {
    public var segments = 0
    /// Segment files, bytes.
    public var segmentBytes: Int64 = 0
    /// The index database with its WAL, bytes.
    public var indexBytes: Int64 = 0
    /// Batches' bytes as received and as written (compressed, with record headers).
    public var payloadBytesAppended: Int64 = 0
    public var recordBytesAppended: Int64 = 0
    public var batchesAppended: Int64 = 0
    public var eventsAppended: Int64 = 0
    /// Deleted by retention, by reason.
    public var deletedSegments: [RetentionDeletion.Reason: Int64] = [:]
    public var deletedBytes: [RetentionDeletion.Reason: Int64] = [:]
    public var deletedEvents: [RetentionDeletion.Reason: Int64] = [:]
    public init() {}
}

/// An incident as persisted: its identity and lifecycle times, and its full
/// JSON (with timeline and explanation) as the engine produced it.
public struct StoredIncident: Sendable, Equatable {
    public var id: String
    public var status: String
    public var openedNs: Int64
    public var updatedNs: Int64
    public var json: String

    public init(id: String, status: String, openedNs: Int64, updatedNs: Int64, json: String) {
        self.id = id
        self.status = status
        self.openedNs = openedNs
        self.updatedNs = updatedNs
        self.json = json
    }
}

/// One batch for `appendAll`, with what `append` takes.
public struct BatchAppend: Sendable {
    public var batch: EventBatch
    /// The batch as received (kept in the log for replay).
    public var payload: [UInt8]
    public var clock: ClockCorrection
    public var receivedNs: Int64
    public var serverDrops: [DropCount]

    public init(batch: EventBatch, payload: [UInt8], clock: ClockCorrection, receivedNs: Int64, serverDrops: [DropCount] = []) {
        self.batch = batch
        self.payload = payload
        self.clock = clock
        self.receivedNs = receivedNs
        self.serverDrops = serverDrops
    }
}

extension EventStore {
    /// Stores a batch built in this process (encodes it for the log).
    public func append(_ batch: EventBatch, clock: ClockCorrection, receivedNs: Int64) throws -> Bool {
        try append(batch, payload: batch.encoded(), clock: clock, receivedNs: receivedNs, serverDrops: [])
    }

    public func append(_ batch: EventBatch, payload: [UInt8], clock: ClockCorrection, receivedNs: Int64) throws -> Bool {
        try append(batch, payload: payload, clock: clock, receivedNs: receivedNs, serverDrops: [])
    }
}

/// One batch as the log holds it, for replay.
public struct RecordedBatch: Sendable, Equatable {
    /// Its log position (0 where the store does not say).
    public var id: Int64 = 0
    public var receivedNs: Int64
    public var clock: ClockCorrection
    public var batch: EventBatch
}
