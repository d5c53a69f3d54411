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
    public var receivedNs: Int64
    public var clock: ClockCorrection
    public var batch: EventBatch
}

/// SQLite in WAL mode with `synchronous=FULL`: a committed transaction has
/// been fsynced, so acknowledging after commit acknowledges durable data.
public final class SQLiteEventStore: EventStore {
    /// Appends go through the writer; queries use their own connection, which
    /// WAL lets read committed data while a write is under way.
    private let db: Mutex<Connection>
    private let reader: Mutex<ReadConnection>

    private final class ReadConnection: @unchecked Sendable {
        let db: SQLiteDatabase
        init(db: SQLiteDatabase) { self.db = db }
    }

    private final class Connection: @unchecked Sendable {
        let db: SQLiteDatabase
        let insertBatch: SQLiteStatement
        let insertEvent: SQLiteStatement
        let upsertDrop: SQLiteStatement
        let addServerDrop: SQLiteStatement
        let countBatch: SQLiteStatement

        init(db: SQLiteDatabase) throws {
            self.db = db
            insertBatch = try db.prepare("""
                INSERT OR IGNORE INTO batches(node, epoch, seq, received_ns, events, clock_offset_ns, clock_error_ns, payload)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                """)
            insertEvent = try db.prepare("""
                INSERT INTO events(time_ns, agent_time_ns, time_err_ns, node, kind, pid, ppid, uid, comm, cgroup_id, detail, epoch, seq,
                                   netns, container_id, pod, namespace)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """)
            upsertDrop = try db.prepare("""
                INSERT INTO drops(node, epoch, kind, reason, count) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT(node, epoch, kind, reason) DO UPDATE SET count = max(count, excluded.count)
                """)
            // Server-side drops are not cumulative counters of the agent's: they add up.
            addServerDrop = try db.prepare("""
                INSERT INTO drops(node, epoch, kind, reason, count) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT(node, epoch, kind, reason) DO UPDATE SET count = min(count + excluded.count, 9223372036854775807)
                """)
            countBatch = try db.prepare("""
                INSERT INTO nodes(node, agent_version, boot_id, capabilities, degraded, first_seen_ns, last_seen_ns,
                                  clock_offset_ns, clock_error_ns, events_received, batches_received, duplicate_batches)
                VALUES (?, '', '', '', '', ?, ?, 0, 0, ?, ?, ?)
                ON CONFLICT(node) DO UPDATE SET
                    events_received = min(events_received + excluded.events_received, 9223372036854775807),
                    batches_received = batches_received + excluded.batches_received,
                    duplicate_batches = duplicate_batches + excluded.duplicate_batches,
                    last_seen_ns = max(last_seen_ns, excluded.last_seen_ns)
                """)
        }

        /// Counts a stored or duplicate batch in the node's row.
        func count(node: String, events: Int, duplicate: Bool, nowNs: Int64) throws {
            let s = countBatch
            s.reset()
            s.bind(1, node)
            s.bind(2, nowNs)
            s.bind(3, nowNs)
            s.bind(4, duplicate ? 0 : Int64(events))
            s.bind(5, duplicate ? 0 : 1)
            s.bind(6, duplicate ? 1 : 0)
            try s.step()
        }
    }

    public let path: String

    /// Opens (creating if needed) `directory/events.sqlite`.
    public init(directory: String) throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        path = (directory as NSString).appendingPathComponent("events.sqlite")
        let database = try SQLiteDatabase(path: path)
        try database.execute("PRAGMA journal_mode=WAL")
        try database.execute("PRAGMA synchronous=FULL")
        try database.execute("""
            CREATE TABLE IF NOT EXISTS batches(
                node TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
                received_ns INTEGER NOT NULL, events INTEGER NOT NULL,
                clock_offset_ns INTEGER NOT NULL, clock_error_ns INTEGER NOT NULL, payload BLOB NOT NULL,
                PRIMARY KEY(node, epoch, seq));
            CREATE INDEX IF NOT EXISTS batches_received ON batches(received_ns);
            CREATE TABLE IF NOT EXISTS events(
                id INTEGER PRIMARY KEY,
                time_ns INTEGER NOT NULL, agent_time_ns INTEGER NOT NULL, time_err_ns INTEGER NOT NULL,
                node TEXT NOT NULL, kind INTEGER NOT NULL,
                pid INTEGER NOT NULL, ppid INTEGER NOT NULL, uid INTEGER NOT NULL,
                comm TEXT NOT NULL, cgroup_id INTEGER NOT NULL, detail TEXT NOT NULL,
                epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
                netns INTEGER NOT NULL, container_id TEXT NOT NULL, pod TEXT NOT NULL, namespace TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS events_time ON events(time_ns);
            CREATE INDEX IF NOT EXISTS events_pod_time ON events(pod, time_ns);
            CREATE TABLE IF NOT EXISTS pods(
                node TEXT NOT NULL, uid TEXT NOT NULL, name TEXT NOT NULL, namespace TEXT NOT NULL,
                ips TEXT NOT NULL, service TEXT NOT NULL, owner_kind TEXT NOT NULL, owner_name TEXT NOT NULL,
                labels TEXT NOT NULL, container_ids TEXT NOT NULL, PRIMARY KEY(node, uid));
            CREATE TABLE IF NOT EXISTS incidents(
                id TEXT PRIMARY KEY, status TEXT NOT NULL, opened_ns INTEGER NOT NULL,
                updated_ns INTEGER NOT NULL, json TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS events_node_time ON events(node, time_ns);
            CREATE INDEX IF NOT EXISTS events_kind_time ON events(kind, time_ns);
            CREATE TABLE IF NOT EXISTS drops(
                node TEXT NOT NULL, epoch INTEGER NOT NULL, kind INTEGER NOT NULL, reason TEXT NOT NULL,
                count INTEGER NOT NULL, PRIMARY KEY(node, epoch, kind, reason)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS nodes(
                node TEXT PRIMARY KEY, agent_version TEXT NOT NULL, boot_id TEXT NOT NULL,
                capabilities TEXT NOT NULL, degraded TEXT NOT NULL,
                first_seen_ns INTEGER NOT NULL, last_seen_ns INTEGER NOT NULL,
                clock_offset_ns INTEGER NOT NULL, clock_error_ns INTEGER NOT NULL,
                events_received INTEGER NOT NULL, batches_received INTEGER NOT NULL,
                duplicate_batches INTEGER NOT NULL);
            """)
        db = Mutex(try Connection(db: database))
        reader = Mutex(ReadConnection(db: try SQLiteDatabase(path: path)))
    }

    public func append(_ batch: EventBatch, payload: [UInt8], clock: ClockCorrection, receivedNs: Int64, serverDrops: [DropCount]) throws -> Bool {
        try appendAll([BatchAppend(batch: batch, payload: payload, clock: clock, receivedNs: receivedNs, serverDrops: serverDrops)])[0]
    }

    public func appendAll(_ batches: [BatchAppend]) throws -> [Bool] {
        try db.withLock { c in
            try c.db.transaction {
                try batches.map { try Self.insert($0, into: c) }
            }
        }
    }

    /// One batch's rows, inside the caller's transaction; false for a duplicate.
    private static func insert(_ a: BatchAppend, into c: Connection) throws -> Bool {
        let (batch, clock, receivedNs) = (a.batch, a.clock, a.receivedNs)
        let b = c.insertBatch
        b.reset()
        b.bind(1, batch.node)
        b.bind(2, Int64(bitPattern: batch.epoch))
        b.bind(3, Int64(bitPattern: batch.sequence))
        b.bind(4, receivedNs)
        b.bind(5, Int64(batch.events.count))
        b.bind(6, clock.offsetNs)
        b.bind(7, clock.errorNs)
        b.bind(8, a.payload)
        try b.step()
        if c.db.changes == 0 {
            try c.count(node: batch.node, events: batch.events.count, duplicate: true, nowNs: receivedNs)
            return false
        }
        try c.count(node: batch.node, events: batch.events.count, duplicate: false, nowNs: receivedNs)

        let e = c.insertEvent
        for event in batch.events {
            e.reset()
            e.bind(1, event.timeNs &- clock.offsetNs)
            e.bind(2, event.timeNs)
            e.bind(3, clock.errorNs)
            e.bind(4, batch.node)
            e.bind(5, Int64(event.kind.rawValue))
            e.bind(6, Int64(event.pid))
            e.bind(7, Int64(event.ppid))
            e.bind(8, Int64(event.uid))
            e.bind(9, event.comm)
            e.bind(10, Int64(bitPattern: event.cgroupId))
            e.bind(11, JSONValue.object(event.detailFields).serialized())
            e.bind(12, Int64(bitPattern: batch.epoch))
            e.bind(13, Int64(bitPattern: batch.sequence))
            e.bind(14, Int64(event.netns))
            e.bind(15, event.containerId)
            e.bind(16, event.pod)
            e.bind(17, event.namespace)
            try e.step()
        }
        // The agent's counters are cumulative (the larger wins); the
        // server's own add up.
        for (statement, drops) in [(c.upsertDrop, batch.drops), (c.addServerDrop, a.serverDrops.filter { $0.count > 0 })] {
            for drop in drops {
                statement.reset()
                statement.bind(1, batch.node)
                statement.bind(2, Int64(bitPattern: batch.epoch))
                statement.bind(3, Int64(drop.kind.rawValue))
                statement.bind(4, drop.reason)
                statement.bind(5, Int64(clamping: drop.count))
                try statement.step()
            }
        }
        return true
    }

    public func durablePrefix(node: String, epoch: UInt64) throws -> UInt64 {
        // Sequences are 1...Int64.max (the server refuses larger ones), so
        // seq + 1 never overflows. The first stored sequence whose successor
        // is missing ends the prefix, provided sequence 1 is stored at all.
        try reader.withLock { c in
            let s = try c.db.prepare("""
                SELECT CASE WHEN EXISTS(SELECT 1 FROM batches WHERE node = ?1 AND epoch = ?2 AND seq = 1)
                    THEN (SELECT min(b.seq) FROM batches b WHERE b.node = ?1 AND b.epoch = ?2 AND b.seq >= 1
                          AND NOT EXISTS(SELECT 1 FROM batches n WHERE n.node = ?1 AND n.epoch = ?2 AND n.seq = b.seq + 1))
                    ELSE 0 END
                """)
            s.bind(1, node)
            s.bind(2, Int64(bitPattern: epoch))
            guard try s.step() else { return 0 }
            return UInt64(clamping: s.int64(0))
        }
    }

    public func events(_ query: EventQuery) throws -> [StoredEvent] {
        var clauses: [String] = []
        var binds: [(Int32, Any)] = []
        if let since = query.sinceNs { clauses.append("time_ns >= ?"); binds.append((Int32(binds.count + 1), since)) }
        if let until = query.untilNs { clauses.append("time_ns < ?"); binds.append((Int32(binds.count + 1), until)) }
        if let node = query.node { clauses.append("node = ?"); binds.append((Int32(binds.count + 1), node)) }
        if let kind = query.kind { clauses.append("kind = ?"); binds.append((Int32(binds.count + 1), Int64(kind.rawValue))) }
        if let pid = query.pid { clauses.append("pid = ?"); binds.append((Int32(binds.count + 1), Int64(pid))) }
        if let pod = query.pod { clauses.append("pod = ?"); binds.append((Int32(binds.count + 1), pod)) }
        if let namespace = query.namespace { clauses.append("namespace = ?"); binds.append((Int32(binds.count + 1), namespace)) }
        let whereSQL = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
        let limit = max(1, min(query.limit, EventQuery.maximumLimit))
        let sql = """
            SELECT time_ns, agent_time_ns, time_err_ns, node, kind, pid, ppid, uid, comm, cgroup_id, detail, epoch, seq,
                   netns, container_id, pod, namespace
            FROM events \(whereSQL) ORDER BY time_ns DESC, id DESC LIMIT \(limit)
            """
        return try reader.withLock { c in
            let s = try c.db.prepare(sql)
            for (index, value) in binds {
                if let v = value as? Int64 { s.bind(index, v) } else if let v = value as? String { s.bind(index, v) }
            }
            var out: [StoredEvent] = []
            while try s.step() {
                let detailText = s.string(10)
                var detail: [String: JSONValue] = [:]
                if case .object(let o)? = try? JSONValue.parse(Array(detailText.utf8)) { detail = o }
                out.append(StoredEvent(
                    node: s.string(3), kind: EventKind(rawValue: UInt32(s.int64(4))) ?? .unspecified,
                    timeNs: s.int64(0), agentTimeNs: s.int64(1), timeErrorNs: s.int64(2),
                    pid: UInt32(truncatingIfNeeded: s.int64(5)), ppid: UInt32(truncatingIfNeeded: s.int64(6)), uid: UInt32(truncatingIfNeeded: s.int64(7)),
                    comm: s.string(8), cgroupId: UInt64(bitPattern: s.int64(9)),
                    netns: UInt32(truncatingIfNeeded: s.int64(13)), containerId: s.string(14), pod: s.string(15), namespace: s.string(16), detail: detail,
                    epoch: UInt64(bitPattern: s.int64(11)), sequence: UInt64(bitPattern: s.int64(12))))
            }
            return out.reversed()
        }
    }

    public func saveNode(_ r: NodeRecord) throws {
        try db.withLock { c in
            let s = try c.db.prepare("""
                INSERT INTO nodes(node, agent_version, boot_id, capabilities, degraded, first_seen_ns, last_seen_ns,
                                  clock_offset_ns, clock_error_ns, events_received, batches_received, duplicate_batches)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(node) DO UPDATE SET agent_version = excluded.agent_version, boot_id = excluded.boot_id,
                    capabilities = excluded.capabilities, degraded = excluded.degraded,
                    last_seen_ns = max(last_seen_ns, excluded.last_seen_ns),
                    clock_offset_ns = excluded.clock_offset_ns, clock_error_ns = excluded.clock_error_ns
                """)
            s.bind(1, r.node)
            s.bind(2, r.agentVersion)
            s.bind(3, r.bootId)
            s.bind(4, r.capabilities.joined(separator: ","))
            s.bind(5, r.degraded.joined(separator: ","))
            s.bind(6, r.firstSeenNs)
            s.bind(7, r.lastSeenNs)
            s.bind(8, r.clockOffsetNs)
            s.bind(9, r.clockErrorNs)
            s.bind(10, r.eventsReceived)
            s.bind(11, r.batchesReceived)
            s.bind(12, r.duplicateBatches)
            try s.step()
        }
    }

    public func nodes() throws -> [NodeRecord] {
        try reader.withLock { c in
            let s = try c.db.prepare("""
                SELECT node, agent_version, boot_id, capabilities, degraded, first_seen_ns, last_seen_ns,
                       clock_offset_ns, clock_error_ns, events_received, batches_received, duplicate_batches
                FROM nodes ORDER BY node
                """)
            var out: [NodeRecord] = []
            while try s.step() {
                func list(_ text: String) -> [String] { text.isEmpty ? [] : text.split(separator: ",").map(String.init) }
                out.append(NodeRecord(
                    node: s.string(0), agentVersion: s.string(1), bootId: s.string(2),
                    capabilities: list(s.string(3)), degraded: list(s.string(4)),
                    firstSeenNs: s.int64(5), lastSeenNs: s.int64(6), clockOffsetNs: s.int64(7), clockErrorNs: s.int64(8),
                    eventsReceived: s.int64(9), batchesReceived: s.int64(10), duplicateBatches: s.int64(11)))
            }
            return out
        }
    }

    public func drops(node: String) throws -> [DropCount] {
        try reader.withLock { c in
            // Summed here, saturating: SQLite's sum() fails for good once the
            // epochs of one node add up past Int64.max.
            let s = try c.db.prepare("SELECT kind, reason, count FROM drops WHERE node = ? ORDER BY kind, reason")
            s.bind(1, node)
            var out: [DropCount] = []
            while try s.step() {
                let kind = EventKind(rawValue: UInt32(truncatingIfNeeded: s.int64(0))) ?? .unspecified
                let reason = s.string(1)
                let count = UInt64(clamping: s.int64(2))
                if let last = out.last, last.kind == kind, last.reason == reason {
                    let (sum, overflow) = last.count.addingReportingOverflow(count)
                    out[out.count - 1].count = overflow ? .max : sum
                } else {
                    out.append(DropCount(kind: kind, reason: reason, count: count))
                }
            }
            return out
        }
    }

    public func savePods(node: String, pods: [PodInfo]) throws {
        try db.withLock { c in
            try c.db.transaction {
                let del = try c.db.prepare("DELETE FROM pods WHERE node = ?")
                del.bind(1, node)
                try del.step()
                let ins = try c.db.prepare("""
                    INSERT OR REPLACE INTO pods(node, uid, name, namespace, ips, service, owner_kind, owner_name, labels, container_ids)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    """)
                for p in pods {
                    ins.reset()
                    ins.bind(1, node)
                    ins.bind(2, p.uid)
                    ins.bind(3, p.name)
                    ins.bind(4, p.namespace)
                    ins.bind(5, p.ips.joined(separator: ","))
                    ins.bind(6, p.service)
                    ins.bind(7, p.ownerKind)
                    ins.bind(8, p.ownerName)
                    ins.bind(9, JSONValue.object(p.labels.mapValues { .string($0) }).serialized())
                    ins.bind(10, p.containerIds.joined(separator: ","))
                    try ins.step()
                }
            }
        }
    }

    public func pods() throws -> [PodInfo] {
        try reader.withLock { c in
            let s = try c.db.prepare("""
                SELECT node, uid, name, namespace, ips, service, owner_kind, owner_name, labels, container_ids FROM pods ORDER BY namespace, name
                """)
            var out: [PodInfo] = []
            while try s.step() {
                func list(_ text: String) -> [String] { text.isEmpty ? [] : text.split(separator: ",").map(String.init) }
                var labels: [String: String] = [:]
                if case .object(let o)? = try? JSONValue.parse(Array(s.string(8).utf8)) {
                    for (k, v) in o { if let v = v.stringValue { labels[k] = v } }
                }
                out.append(PodInfo(uid: s.string(1), name: s.string(2), namespace: s.string(3), node: s.string(0), ips: list(s.string(4)),
                                   service: s.string(5), ownerKind: s.string(6), ownerName: s.string(7), labels: labels, containerIds: list(s.string(9))))
            }
            return out
        }
    }

    public func batches(sinceNs: Int64, limit: Int) throws -> [RecordedBatch] {
        try reader.withLock { c in
            let s = try c.db.prepare("""
                SELECT received_ns, clock_offset_ns, clock_error_ns, payload FROM batches
                WHERE received_ns >= ? ORDER BY received_ns, rowid LIMIT ?
                """)
            s.bind(1, sinceNs)
            s.bind(2, Int64(max(1, limit)))
            var out: [RecordedBatch] = []
            while try s.step() {
                out.append(RecordedBatch(receivedNs: s.int64(0), clock: ClockCorrection(offsetNs: s.int64(1), errorNs: s.int64(2)),
                                         batch: try EventBatch.decode(s.blob(3))))
            }
            return out
        }
    }

    public func saveIncident(_ i: StoredIncident) throws {
        try db.withLock { c in
            let s = try c.db.prepare("""
                INSERT INTO incidents(id, status, opened_ns, updated_ns, json) VALUES (?, ?, ?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET status = excluded.status, updated_ns = excluded.updated_ns, json = excluded.json
                """)
            s.bind(1, i.id)
            s.bind(2, i.status)
            s.bind(3, i.openedNs)
            s.bind(4, i.updatedNs)
            s.bind(5, i.json)
            try s.step()
        }
    }

    public func incidents() throws -> [StoredIncident] {
        try reader.withLock { c in
            let s = try c.db.prepare("SELECT id, status, opened_ns, updated_ns, json FROM incidents ORDER BY opened_ns, id")
            var out: [StoredIncident] = []
            while try s.step() {
                out.append(StoredIncident(id: s.string(0), status: s.string(1), openedNs: s.int64(2), updatedNs: s.int64(3), json: s.string(4)))
            }
            return out
        }
    }
}
