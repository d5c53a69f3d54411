import Foundation
import Synchronization
import TapioWire

/// The event log as segment files of compressed batches with an SQLite
/// index (docs/storage.md). A batch is appended whole, as the agent sent it,
/// to the newest segment (one zstd frame) and fdatasync'ed; then one SQLite
/// transaction (WAL, `synchronous=FULL`) adds its index row — node, epoch,
/// sequence, where its record is, the time range, kinds and pods it holds —
/// and the node's counters. A batch is acknowledged after that commit, so
/// acknowledged means durable; a record the index does not name (the
/// process died between the two) is cut off at the next open. Queries read
/// the index first and decompress only the batches that can match.
/// Retention deletes whole sealed segments, oldest first. Nodes, drops,
/// pods and incidents stay SQLite tables in the same database.
public final class SegmentEventStore: EventStore {
    public struct Configuration: Sendable {
        /// A segment is sealed at this size…
        public var segmentBytes: Int64 = 64 << 20
        /// …or when its first record is this old, so that time retention
        /// can delete at that granularity.
        public var segmentAgeNs: Int64 = 600_000_000_000
        /// Segments whose newest batch arrived longer ago are deleted; nil: kept.
        public var retentionNs: Int64? = 7 * 86_400_000_000_000
        /// The store (segments and index) is kept under this many bytes by
        /// deleting the oldest segments; nil: no limit.
        public var maxDiskBytes: Int64?
        /// zstd level of the records (1: fastest).
        public var compressionLevel: Int32 = 1
        public init() {}
    }

    private final class Writer: @unchecked Sendable {
        let db: SQLiteDatabase
        let files: SegmentFiles
        let exists: SQLiteStatement
        let insertBatch: SQLiteStatement
        let upsertDrop: SQLiteStatement
        let addServerDrop: SQLiteStatement
        let countBatch: SQLiteStatement
        var statistics = StoreStatistics()

        init(db: SQLiteDatabase, files: SegmentFiles) throws {
            self.db = db
            self.files = files
            // Stored, or deleted by retention (a resend of a deleted batch is
            // a duplicate, not a new batch).
            exists = try db.prepare("""
                SELECT 1 FROM log_batches WHERE node = ?1 AND epoch = ?2 AND seq = ?3
                UNION ALL SELECT 1 FROM retired_batches WHERE node = ?1 AND epoch = ?2 AND max_seq >= ?3
                """)
            insertBatch = try db.prepare("""
                INSERT INTO log_batches(node, epoch, seq, received_ns, events, clock_offset_ns, clock_error_ns,
                                        segment, offset, length, raw_length, min_time_ns, max_time_ns, kinds, pods)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
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

        func isStored(_ b: EventBatch) throws -> Bool {
            exists.reset()
            exists.bind(1, b.node)
            exists.bind(2, Int64(bitPattern: b.epoch))
            exists.bind(3, Int64(bitPattern: b.sequence))
            return try exists.step()
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

    private final class ReadConnection: @unchecked Sendable {
        let db: SQLiteDatabase
        init(db: SQLiteDatabase) { self.db = db }
    }

    private let writer: Mutex<Writer>
    private let reader: Mutex<ReadConnection>
    public let configuration: Configuration
    /// The index database (`events.sqlite`).
    public let path: String
    /// The segment files' directory (`segments/`).
    public let segmentDirectory: String

    /// Opens (creating if needed) the store in `directory`: `events.sqlite`
    /// and `segments/`. A store of the earlier layout (one row per event) is
    /// converted on open: its batches are written to segments, its event
    /// rows dropped.
    ///
    /// `readOnly`: for reading a store another process (a running server)
    /// may be writing — `tapio-server replay`, `bench-engine --data-dir`.
    /// Nothing is created, converted, cut or deleted; appends and retention
    /// fail. A store of the row-per-event layout cannot be read this way.
    public init(directory: String, configuration: Configuration = Configuration(), readOnly: Bool = false) throws {
        self.configuration = configuration
        if !readOnly { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) }
        path = (directory as NSString).appendingPathComponent("events.sqlite")
        segmentDirectory = (directory as NSString).appendingPathComponent("segments")
        guard !readOnly || FileManager.default.fileExists(atPath: path) else {
            throw SegmentError("\(directory) holds no event store (no events.sqlite)")
        }
        let database = try SQLiteDatabase(path: path)
        if readOnly {
            let layout = try database.prepare("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('log_batches', 'batches')")
            let legacy = try database.prepare("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'batches'")
            guard try layout.step(), layout.int64(0) > 0 else { throw SegmentError("\(path) is not a Tapio event store") }
            if try legacy.step(), legacy.int64(0) > 0 {
                throw SegmentError("\(directory) is a store of the row-per-event layout: start a server of this version on it once to convert it")
            }
            let files = try SegmentFiles(directory: segmentDirectory, level: configuration.compressionLevel, readOnly: true) { _ in nil }
            writer = Mutex(try Writer(db: database, files: files))
            reader = Mutex(ReadConnection(db: try SQLiteDatabase(path: path)))
            return
        }
        try database.execute("PRAGMA journal_mode=WAL")
        try database.execute("PRAGMA synchronous=FULL")
        try database.execute("""
            CREATE TABLE IF NOT EXISTS log_batches(
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                node TEXT NOT NULL, epoch INTEGER NOT NULL, seq INTEGER NOT NULL,
                received_ns INTEGER NOT NULL, events INTEGER NOT NULL,
                clock_offset_ns INTEGER NOT NULL, clock_error_ns INTEGER NOT NULL,
                segment INTEGER NOT NULL, offset INTEGER NOT NULL, length INTEGER NOT NULL, raw_length INTEGER NOT NULL,
                min_time_ns INTEGER NOT NULL, max_time_ns INTEGER NOT NULL,
                kinds INTEGER NOT NULL, pods INTEGER NOT NULL);
            CREATE UNIQUE INDEX IF NOT EXISTS log_batches_key ON log_batches(node, epoch, seq);
            CREATE INDEX IF NOT EXISTS log_batches_max_time ON log_batches(max_time_ns);
            CREATE INDEX IF NOT EXISTS log_batches_received ON log_batches(received_ns);
            CREATE INDEX IF NOT EXISTS log_batches_segment ON log_batches(segment);
            CREATE TABLE IF NOT EXISTS store_meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS retired_batches(
                node TEXT NOT NULL, epoch INTEGER NOT NULL, max_seq INTEGER NOT NULL, PRIMARY KEY(node, epoch)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS pods(
                node TEXT NOT NULL, uid TEXT NOT NULL, name TEXT NOT NULL, namespace TEXT NOT NULL,
                ips TEXT NOT NULL, service TEXT NOT NULL, owner_kind TEXT NOT NULL, owner_name TEXT NOT NULL,
                labels TEXT NOT NULL, container_ids TEXT NOT NULL, PRIMARY KEY(node, uid));
            CREATE TABLE IF NOT EXISTS incidents(
                id TEXT PRIMARY KEY, status TEXT NOT NULL, opened_ns INTEGER NOT NULL,
                updated_ns INTEGER NOT NULL, json TEXT NOT NULL);
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
        let endOf = try database.prepare("SELECT max(offset + length) FROM log_batches WHERE segment = ?")
        let files = try SegmentFiles(directory: segmentDirectory, level: configuration.compressionLevel) { id in
            endOf.reset()
            endOf.bind(1, id)
            guard try endOf.step() else { return nil }
            let end = endOf.int64(0)
            return end > 0 ? end : nil
        }
        let w = try Writer(db: database, files: files)
        writer = Mutex(w)
        reader = Mutex(ReadConnection(db: try SQLiteDatabase(path: path)))
        try convertRowPerEventLayout()
    }

    // MARK: appending

    public func append(_ batch: EventBatch, payload: [UInt8], clock: ClockCorrection, receivedNs: Int64, serverDrops: [DropCount]) throws -> Bool {
        try appendAll([BatchAppend(batch: batch, payload: payload, clock: clock, receivedNs: receivedNs, serverDrops: serverDrops)])[0]
    }

    private struct Key: Hashable {
        var node: String
        var epoch: UInt64
        var sequence: UInt64
    }

    public func appendAll(_ batches: [BatchAppend]) throws -> [Bool] {
        try appendLogged(batches).map { $0 != nil }
    }

    public func appendLogged(_ batches: [BatchAppend]) throws -> [Int64?] {
        let configuration = self.configuration
        return try writer.withLock { w in
            var fresh = [Bool](repeating: false, count: batches.count)
            var seen = Set<Key>()
            var payloads: [[UInt8]] = []
            for (i, a) in batches.enumerated() {
                let key = Key(node: a.batch.node, epoch: a.batch.epoch, sequence: a.batch.sequence)
                guard !seen.contains(key), try !w.isStored(a.batch) else { continue }
                seen.insert(key)
                fresh[i] = true
                payloads.append(a.payload)
            }
            let before = w.files.activeSize
            let written = try w.files.append(payloads, nowNs: wallClockNs())
            var ids = [Int64?](repeating: nil, count: batches.count)
            do {
                try w.db.transaction {
                    var next = 0
                    for (i, a) in batches.enumerated() {
                        guard fresh[i] else {
                            try w.count(node: a.batch.node, events: a.batch.events.count, duplicate: true, nowNs: a.receivedNs)
                            continue
                        }
                        let (location, rawLength) = written[next]
                        next += 1
                        try Self.index(a, at: location, rawLength: rawLength, into: w)
                        ids[i] = w.db.lastInsertRowId
                    }
                }
            } catch {
                w.files.truncateActive(to: before)
                throw error
            }
            for (i, a) in batches.enumerated() where fresh[i] {
                w.statistics.batchesAppended += 1
                w.statistics.eventsAppended += Int64(a.batch.events.count)
                w.statistics.payloadBytesAppended += Int64(a.payload.count)
            }
            w.statistics.recordBytesAppended += written.reduce(0) { $0 + $1.0.length }
            try w.files.rotateIfNeeded(maxBytes: configuration.segmentBytes, maxAgeNs: configuration.segmentAgeNs, nowNs: wallClockNs())
            return ids
        }
    }

    /// One batch's index row, counters and drops, inside the caller's transaction.
    private static func index(_ a: BatchAppend, at location: RecordLocation, rawLength: Int, into w: Writer, counting: Bool = true) throws {
        let batch = a.batch
        var minTime = Int64.max
        var maxTime = Int64.min
        var kinds: Int64 = 0
        var pods: Int64 = 0
        for e in batch.events {
            let t = e.timeNs &- a.clock.offsetNs
            minTime = min(minTime, t)
            maxTime = max(maxTime, t)
            kinds |= kindBit(e.kind)
            if !e.pod.isEmpty { pods |= podBit(e.pod) }
            if !e.namespace.isEmpty { pods |= namespaceBit(e.namespace) }
        }
        if batch.events.isEmpty { (minTime, maxTime) = (a.receivedNs, a.receivedNs) }
        let b = w.insertBatch
        b.reset()
        b.bind(1, batch.node)
        b.bind(2, Int64(bitPattern: batch.epoch))
        b.bind(3, Int64(bitPattern: batch.sequence))
        b.bind(4, a.receivedNs)
        b.bind(5, Int64(batch.events.count))
        b.bind(6, a.clock.offsetNs)
        b.bind(7, a.clock.errorNs)
        b.bind(8, location.segment)
        b.bind(9, location.offset)
        b.bind(10, location.length)
        b.bind(11, Int64(rawLength))
        b.bind(12, minTime)
        b.bind(13, maxTime)
        b.bind(14, kinds)
        b.bind(15, pods)
        try b.step()
        guard counting else { return }
        try w.count(node: batch.node, events: batch.events.count, duplicate: false, nowNs: a.receivedNs)
        // The agent's counters are cumulative (the larger wins); the
        // server's own add up.
        for (statement, drops) in [(w.upsertDrop, batch.drops), (w.addServerDrop, a.serverDrops.filter { $0.count > 0 })] {
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
    }

    /// The kinds mask of the index: one bit per kind (kinds past 62 share the top bit).
    static func kindBit(_ kind: EventKind) -> Int64 { Int64(1) << Int64(min(kind.rawValue, 62)) }

    /// The pods mask of the index: pod names and namespaces hashed into 64
    /// bits (a one-hash Bloom filter), so that a query for one pod skips
    /// most batches that do not hold it.
    static func podBit(_ pod: String) -> Int64 { Int64(1) << Int64(fnv1a(pod, seed: 0x70) % 63) }
    static func namespaceBit(_ namespace: String) -> Int64 { Int64(1) << Int64(fnv1a(namespace, seed: 0x6E) % 63) }

    private static func fnv1a(_ s: String, seed: UInt8) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        h = (h ^ UInt64(seed)) &* 0x100_0000_01b3
        for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }

    // MARK: reading

    public func durablePrefix(node: String, epoch: UInt64) throws -> UInt64 {
        // Sequences are 1...Int64.max (the server refuses larger ones), so
        // seq + 1 never overflows. Retention may have deleted a first part
        // of the epoch (its sequences up to `floor` count as stored); from
        // there, the first stored sequence whose successor is missing ends
        // the prefix, provided floor + 1 is stored at all.
        try reader.withLock { c in
            let f = try c.db.prepare("SELECT max_seq FROM retired_batches WHERE node = ? AND epoch = ?")
            f.bind(1, node)
            f.bind(2, Int64(bitPattern: epoch))
            let floor = try f.step() ? f.int64(0) : 0
            let s = try c.db.prepare("""
                SELECT CASE WHEN NOT EXISTS(SELECT 1 FROM log_batches WHERE node = ?1 AND epoch = ?2 AND seq = ?3 + 1) THEN ?3
                    ELSE (SELECT min(b.seq) FROM log_batches b WHERE b.node = ?1 AND b.epoch = ?2 AND b.seq > ?3
                          AND NOT EXISTS(SELECT 1 FROM log_batches n WHERE n.node = ?1 AND n.epoch = ?2 AND n.seq = b.seq + 1))
                    END
                """)
            s.bind(1, node)
            s.bind(2, Int64(bitPattern: epoch))
            s.bind(3, floor)
            guard try s.step() else { return 0 }
            return UInt64(clamping: s.int64(0))
        }
    }

    /// The most recent `limit` matches, oldest first. Batches are visited
    /// newest first by their newest event; the scan stops once the next
    /// batch's newest event is older than the `limit`-th match so far, so a
    /// query near the present reads a few batches however long the log.
    public func events(_ query: EventQuery) throws -> [StoredEvent] {
        var clauses: [String] = []
        var binds: [Any] = []
        func bind(_ value: Any) -> String {
            binds.append(value)
            return "?\(binds.count)"
        }
        if let since = query.sinceNs { clauses.append("max_time_ns >= \(bind(since))") }
        if let until = query.untilNs { clauses.append("min_time_ns < \(bind(until))") }
        if let node = query.node { clauses.append("node = \(bind(node))") }
        if let kind = query.kind { clauses.append("(kinds & \(bind(Self.kindBit(kind)))) != 0") }
        var podMask: Int64 = 0
        if let pod = query.pod { podMask |= Self.podBit(pod) }
        if let namespace = query.namespace { podMask |= Self.namespaceBit(namespace) }
        if podMask != 0 {
            let m = bind(podMask)
            clauses.append("(pods & \(m)) = \(m)")
        }
        if let pods = query.pods, !pods.isEmpty {
            // Any one of them: the batch must have one of their bits.
            clauses.append("(pods & \(bind(pods.reduce(Int64(0)) { $0 | Self.podBit($1) }))) != 0")
        }
        let whereSQL = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
        let limit = max(1, min(query.limit, EventQuery.maximumLimit))
        let sql = """
            SELECT id, node, epoch, seq, clock_offset_ns, clock_error_ns, segment, offset, length, raw_length, max_time_ns
            FROM log_batches \(whereSQL) ORDER BY max_time_ns DESC, id DESC
            """
        struct Match { var timeNs: Int64; var batch: Int64; var index: Int; var event: StoredEvent }
        var matches: [Match] = []
        var cutoff = Int64.min  // the limit-th newest match's time once there are `limit`
        let files = SegmentReader(path: pathOfSegment)
        try reader.withLock { c in
            let s = try c.db.prepare(sql)
            for (i, value) in binds.enumerated() {
                if let v = value as? Int64 { s.bind(Int32(i + 1), v) } else if let v = value as? String { s.bind(Int32(i + 1), v) }
            }
            while try s.step() {
                let newest = s.int64(10)
                if matches.count >= limit && newest < cutoff { break }
                let location = RecordLocation(segment: s.int64(6), offset: s.int64(7), length: s.int64(8))
                guard let payload = try files.read(location, rawLength: Int(s.int64(9))) else { continue }
                let batch = try EventBatch.decode(payload)
                let clock = ClockCorrection(offsetNs: s.int64(4), errorNs: s.int64(5))
                let id = s.int64(0)
                for (i, e) in batch.events.enumerated() {
                    var stored = StoredEvent(batch: batch, event: e, clock: clock, detail: [:])
                    guard query.matches(stored) else { continue }
                    if matches.count >= limit && stored.timeNs < cutoff { continue }
                    stored.detail = e.detailFields
                    matches.append(Match(timeNs: stored.timeNs, batch: id, index: i, event: stored))
                }
                if matches.count >= 2 * limit { trim() }
                if matches.count >= limit { cutoff = cutoffTime() }
            }
        }
        func order(_ a: Match, _ b: Match) -> Bool {
            a.timeNs != b.timeNs ? a.timeNs > b.timeNs : (a.batch != b.batch ? a.batch > b.batch : a.index > b.index)
        }
        func trim() {
            matches.sort(by: order)
            matches.removeLast(matches.count - limit)
        }
        func cutoffTime() -> Int64 {
            if matches.count > limit { trim() }
            return matches.map(\.timeNs).min() ?? .min
        }
        matches.sort(by: order)
        return matches.prefix(limit).reversed().map(\.event)
    }

    private func pathOfSegment(_ id: Int64) -> String { SegmentFiles.path(directory: segmentDirectory, id) }

    public func batches(afterId: Int64, limit: Int) throws -> [RecordedBatch] {
        try recordedBatches(where: "id > ?", orderBy: "id", after: afterId, limit: limit)
    }

    public func batches(sinceNs: Int64, limit: Int) throws -> [RecordedBatch] {
        try recordedBatches(where: "received_ns >= ?", orderBy: "received_ns, id", after: sinceNs, limit: limit)
    }

    /// Index rows matching `condition` (one parameter, `value`) in `order`,
    /// read from their segments and decoded; a batch whose segment
    /// retention deleted meanwhile is left out.
    private func recordedBatches(where condition: String, orderBy order: String, after value: Int64, limit: Int) throws -> [RecordedBatch] {
        let files = SegmentReader(path: pathOfSegment)
        return try reader.withLock { c in
            let s = try c.db.prepare("""
                SELECT id, received_ns, clock_offset_ns, clock_error_ns, segment, offset, length, raw_length FROM log_batches
                WHERE \(condition) ORDER BY \(order) LIMIT ?
                """)
            s.bind(1, value)
            s.bind(2, Int64(max(1, limit)))
            var out: [RecordedBatch] = []
            while try s.step() {
                let location = RecordLocation(segment: s.int64(4), offset: s.int64(5), length: s.int64(6))
                guard let payload = try files.read(location, rawLength: Int(s.int64(7))) else { continue }
                out.append(RecordedBatch(id: s.int64(0), receivedNs: s.int64(1), clock: ClockCorrection(offsetNs: s.int64(2), errorNs: s.int64(3)),
                                         batch: try EventBatch.decode(payload)))
            }
            return out
        }
    }

    // MARK: nodes, drops, pods, incidents

    public func saveNode(_ r: NodeRecord) throws {
        try writer.withLock { c in
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
        try writer.withLock { c in
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

    public func saveIncident(_ i: StoredIncident) throws {
        try writer.withLock { c in
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

    // MARK: retention

    public func enforceRetention(nowNs: Int64) throws -> [RetentionDeletion] {
        let configuration = self.configuration
        return try writer.withLock { w in
            var out: [RetentionDeletion] = []
            // Time retention needs sealed segments: an old active one is sealed.
            try w.files.rotateIfNeeded(maxBytes: configuration.segmentBytes, maxAgeNs: configuration.segmentAgeNs, nowNs: nowNs)
            let summary = try w.db.prepare("""
                SELECT count(*), coalesce(sum(events), 0), coalesce(max(received_ns), 0), coalesce(max(max_time_ns), 0)
                FROM log_batches WHERE segment = ?
                """)
            for id in w.files.sealed.keys.sorted() {
                summary.reset()
                summary.bind(1, id)
                _ = try summary.step()
                let (batches, events, newestReceived, newestEvent) = (summary.int64(0), summary.int64(1), summary.int64(2), summary.int64(3))
                let reason: RetentionDeletion.Reason
                if batches == 0 {
                    reason = .retention  // nothing indexed: left by a deletion cut short
                } else if let keep = configuration.retentionNs, newestReceived < nowNs - keep {
                    reason = .retention
                } else if let max = configuration.maxDiskBytes, w.files.totalBytes + indexBytes() > max {
                    reason = .maxDisk
                } else {
                    break
                }
                let bytes = w.files.sealed[id] ?? 0
                // The index first: a crash between the two leaves a file
                // that no query reads, deleted at the next pass.
                try w.db.transaction {
                    // Each (node, epoch) remembers the last sequence deleted,
                    // so its acknowledged prefix and its duplicates stay known.
                    let r = try w.db.prepare("""
                        INSERT INTO retired_batches(node, epoch, max_seq)
                        SELECT node, epoch, max(seq) FROM log_batches WHERE segment = ? GROUP BY node, epoch
                        ON CONFLICT(node, epoch) DO UPDATE SET max_seq = max(max_seq, excluded.max_seq)
                        """)
                    r.bind(1, id)
                    try r.step()
                    let d = try w.db.prepare("DELETE FROM log_batches WHERE segment = ?")
                    d.bind(1, id)
                    try d.step()
                    if batches > 0 {
                        let m = try w.db.prepare("""
                            INSERT INTO store_meta(key, value) VALUES ('retained_from_ns', ?)
                            ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)
                            """)
                        m.bind(1, newestEvent)
                        try m.step()
                    }
                }
                try w.files.delete(id)
                if batches > 0 {
                    w.statistics.deletedSegments[reason, default: 0] += 1
                    w.statistics.deletedBytes[reason, default: 0] += bytes
                    w.statistics.deletedEvents[reason, default: 0] += events
                    out.append(RetentionDeletion(segment: id, reason: reason, bytes: bytes, batches: batches, events: events, newestEventNs: newestEvent))
                }
            }
            return out
        }
    }

    public func retainedFromNs() throws -> Int64? {
        try reader.withLock { c in
            let s = try c.db.prepare("SELECT value FROM store_meta WHERE key = 'retained_from_ns'")
            return try s.step() ? s.int64(0) : nil
        }
    }

    public func statistics() -> StoreStatistics {
        writer.withLock { w in
            var s = w.statistics
            s.segments = w.files.segmentCount
            s.segmentBytes = w.files.totalBytes
            s.indexBytes = indexBytes()
            return s
        }
    }

    /// The index database with its WAL.
    private func indexBytes() -> Int64 {
        ((try? SegmentFiles.size(of: path)) ?? 0) + ((try? SegmentFiles.size(of: path + "-wal")) ?? 0)
    }


    // MARK: the earlier layout

    /// Converts a store of the row-per-event layout (tables `batches` with
    /// each batch's payload, and `events`): every batch goes to the segments
    /// with its index row, in arrival order, then both tables are dropped.
    /// Node counters, drops, pods and incidents are the same tables and stay.
    private func convertRowPerEventLayout() throws {
        let legacy = try writer.withLock { w in
            let s = try w.db.prepare("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'batches'")
            return try s.step() && s.int64(0) > 0
        }
        guard legacy else { return }
        try writer.withLock { w in
            let s = try w.db.prepare("""
                SELECT received_ns, clock_offset_ns, clock_error_ns, payload FROM batches ORDER BY received_ns, rowid
                """)
            var pending: [(BatchAppend, [UInt8])] = []
            func flush() throws {
                guard !pending.isEmpty else { return }
                let written = try w.files.append(pending.map(\.1), nowNs: wallClockNs())
                for ((a, _), (location, rawLength)) in zip(pending, written) {
                    // The index row alone: its counters and drops are in their tables already.
                    try Self.index(a, at: location, rawLength: rawLength, into: w, counting: false)
                }
                pending.removeAll()
            }
            try w.db.transaction {
                while try s.step() {
                    let payload = s.blob(3)
                    let batch = try EventBatch.decode(payload)
                    pending.append((BatchAppend(batch: batch, payload: [], clock: ClockCorrection(offsetNs: s.int64(1), errorNs: s.int64(2)),
                                                receivedNs: s.int64(0)), payload))
                    if pending.count >= 256 { try flush() }
                }
                try flush()
                try w.db.execute("DROP TABLE IF EXISTS events; DROP TABLE batches;")
            }
            try? w.db.execute("VACUUM")
        }
    }
}

extension StoredEvent {
    /// An event of a stored batch, placed on the server's clock as it was
    /// when the batch arrived.
    public init(batch: EventBatch, event e: TapioEvent, clock: ClockCorrection, detail: [String: JSONValue]) {
        self.init(node: batch.node, kind: e.kind, timeNs: e.timeNs &- clock.offsetNs, agentTimeNs: e.timeNs, timeErrorNs: clock.errorNs,
                  pid: e.pid, ppid: e.ppid, uid: e.uid, comm: e.comm, cgroupId: e.cgroupId, netns: e.netns,
                  containerId: e.containerId, pod: e.pod, namespace: e.namespace, detail: detail,
                  epoch: batch.epoch, sequence: batch.sequence)
    }
}
