// Events for queries in ClickHouse: one row per event in a MergeTree table
// partitioned by day and ordered for the `events` query's filters, written
// a whole batch per INSERT, read back into the same typed answer the
// single-process server gives, and aged out by dropping whole days
// (docs/clickhouse.md).
import Foundation
import TapioQueryAPI
import TapioStore
import TapioWire

/// The events table and its retention record in one ClickHouse database.
public final class ClickHouseEventStore: Sendable {
    public let client: ClickHouseClient
    /// The events table; `<table>_retention` records the days dropped.
    public let table: String
    private var retentionTable: String { table + "_retention" }

    /// A batch as it is written: the agent's events and the clock placement
    /// the server gave them (`StoredEvent`'s, so both stores place alike).
    public struct Batch: Sendable {
        public var batch: EventBatch
        public var clock: ClockCorrection
        public init(_ batch: EventBatch, clock: ClockCorrection) {
            (self.batch, self.clock) = (batch, clock)
        }
    }

    /// One day partition retention dropped.
    public struct DroppedDay: Sendable, Equatable {
        /// `YYYY-MM-DD`, UTC.
        public var day: String
        /// Events it held (each once, duplicates collapsed).
        public var events: Int64
        /// Its newest event time, ns on the server's clock.
        public var newestEventNs: Int64
    }

    public struct InvalidArgument: Error, CustomStringConvertible {
        public var description: String
    }

    /// `table` is a plain identifier (letters, digits, `_`; not starting with a digit).
    public init(client: ClickHouseClient, table: String = "tapio_events") throws {
        guard Self.isIdentifier(table) else {
            throw InvalidArgument(description: "table name \(table.debugDescription) is not a plain identifier (letters, digits and _, not starting with a digit)")
        }
        self.client = client
        self.table = table
    }

    static func isIdentifier(_ s: String) -> Bool {
        guard let first = s.utf8.first, s.utf8.count <= 128, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first) else { return false }
        return s.utf8.allSatisfy { b in
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: "_")
        }
    }

    /// Creates both tables if they are missing (existing ones are left as they are).
    ///
    /// The sorting key leads with the `events` filters (kind, namespace,
    /// pod, node, then time) and ends in an event's identity (node, epoch,
    /// sequence, idx), on which ReplacingMergeTree collapses a batch
    /// written twice.
    public func createIfMissing() async throws {
        try await client.execute("""
            CREATE TABLE IF NOT EXISTS \(table) (
                day Date,
                time_ns Int64,
                agent_time_ns Int64,
                time_error_ns Int64,
                clock_offset_ns Int64,
                node String,
                kind UInt8,
                pid UInt32,
                namespace String,
                pod String,
                epoch UInt64,
                sequence UInt64,
                idx UInt32,
                event String
            ) ENGINE = ReplacingMergeTree
            PARTITION BY toYYYYMMDD(day)
            ORDER BY (kind, namespace, pod, node, time_ns, epoch, sequence, idx)
            """)
        try await client.execute("""
            CREATE TABLE IF NOT EXISTS \(retentionTable) (
                day Date,
                dropped_ns Int64,
                events UInt64,
                newest_ns Int64
            ) ENGINE = MergeTree
            ORDER BY (day, dropped_ns)
            """)
    }

    /// Writes batches with one INSERT, each batch whole. Writing a batch
    /// again (a re-delivery) stores nothing new: its rows are the same
    /// rows, collapsed by the table's engine and by `FINAL` on reading
    /// until a merge does it for good. Returns the events written.
    @discardableResult
    public func write(_ batches: [Batch]) async throws -> Int {
        var data: [UInt8] = []
        var rows = 0
        let encoder = JSONEncoder()
        for b in batches {
            for (i, e) in b.batch.events.enumerated() {
                let s = StoredEvent(batch: b.batch, event: e, clock: b.clock, detail: [:])
                let json = String(decoding: try encoder.encode(e), as: UTF8.self)
                TabSeparated.appendRow([
                    Self.dateText(days: Self.day(ns: s.timeNs)), String(s.timeNs), String(s.agentTimeNs), String(s.timeErrorNs),
                    String(b.clock.offsetNs), s.node, String(s.kind.rawValue), String(s.pid), s.namespace, s.pod,
                    String(s.epoch), String(s.sequence), String(i), json,
                ], to: &data)
                rows += 1
            }
        }
        guard rows > 0 else { return 0 }
        try await client.execute("""
            INSERT INTO \(table) (day, time_ns, agent_time_ns, time_error_ns, clock_offset_ns, node, kind, pid, namespace, pod, epoch, sequence, idx, event) \
            FORMAT TabSeparated
            """, data: data)
        return rows
    }

    /// The most recent events matching `query`, oldest first, as the
    /// segment store answers them (`EventQuery.matches` says which match).
    /// Events at the same time are ordered by node, epoch, sequence and
    /// position in the batch.
    public func events(_ query: EventQuery) async throws -> [StoredEvent] {
        if query.pods?.isEmpty == true { return [] }
        var clauses: [String] = []
        if let since = query.sinceNs {
            clauses.append("time_ns >= \(since)")
            clauses.append("day >= \(sqlString(Self.dateText(days: Self.day(ns: since))))")
        }
        if let until = query.untilNs {
            clauses.append("time_ns < \(until)")
            clauses.append("day <= \(sqlString(Self.dateText(days: Self.day(ns: until))))")
        }
        if let node = query.node { clauses.append("node = \(sqlString(node))") }
        if let kind = query.kind { clauses.append("kind = \(kind.rawValue)") }
        if let pid = query.pid { clauses.append("pid = \(pid)") }
        if let pod = query.pod { clauses.append("pod = \(sqlString(pod))") }
        if let namespace = query.namespace { clauses.append("namespace = \(sqlString(namespace))") }
        if let pods = query.pods { clauses.append("pod IN (\(pods.map(sqlString).joined(separator: ", ")))") }
        if let prefix = query.podPrefix {
            // `pod >= prefix` lets the sorting key skip granules; startsWith decides.
            clauses.append("pod >= \(sqlString(prefix)) AND startsWith(pod, \(sqlString(prefix)))")
        }
        let limit = max(1, min(query.limit, EventQuery.maximumLimit))
        let whereSQL = clauses.isEmpty ? "" : "WHERE " + clauses.joined(separator: " AND ")
        let rows = try await client.rows("""
            SELECT node, epoch, sequence, clock_offset_ns, time_error_ns, event FROM \(table) FINAL
            \(whereSQL)
            ORDER BY time_ns DESC, node DESC, epoch DESC, sequence DESC, idx DESC
            LIMIT \(limit)
            FORMAT TabSeparated
            """, columns: 6)
        let decoder = JSONDecoder()
        var out: [StoredEvent] = []
        out.reserveCapacity(rows.count)
        for r in rows.reversed() {
            guard let epoch = UInt64(r[1]), let sequence = UInt64(r[2]), let offset = Int64(r[3]), let error = Int64(r[4]) else {
                throw ClickHouseError.malformedAnswer("an event row of \(table) has a non-numeric epoch, sequence or clock: \(r[0...4])")
            }
            let event: TapioEvent
            do {
                event = try decoder.decode(TapioEvent.self, from: Data(r[5].utf8))
            } catch {
                throw ClickHouseError.malformedAnswer("an event of node \(r[0]) epoch \(epoch) sequence \(sequence) in \(table) cannot be decoded: \(error)")
            }
            let batch = EventBatch(node: r[0], epoch: epoch, sequence: sequence, events: [])
            out.append(StoredEvent(batch: batch, event: event, clock: ClockCorrection(offsetNs: offset, errorNs: error), detail: event.detailFields))
        }
        return out
    }

    /// The `events` answer, as the single-process server builds it from
    /// its store: each event's JSON object (`StoredEvent.json`), with the
    /// peers `attribute` adds (the server's pod inventory), read into
    /// `QueryEvent`; and the retention notice when the window reaches days
    /// retention dropped.
    public func answer(_ query: EventQuery,
                       attribute: ([String: JSONValue]) -> [String: JSONValue] = { $0 }) async throws -> EventsAnswer {
        let events = try await self.events(query)
        var answer = EventsAnswer(events: try events.map { e in
            guard case .object(let o) = e.json else {
                throw ClickHouseError.malformedAnswer("an event of node \(e.node) did not become a JSON object")
            }
            return try QueryEvent(fields: attribute(o))
        })
        if let horizon = try await retainedFromNs(), (query.sinceNs ?? .min) <= horizon {
            answer.retention = RetentionNotice(deletedBefore: rfc3339(ns: horizon), deletedBeforeNs: horizon,
                                               note: "events up to \(rfc3339(ns: horizon)) were deleted by retention (day partitions dropped from ClickHouse)")
        }
        return answer
    }

    /// The newest event time retention dropped; nil while it dropped nothing.
    public func retainedFromNs() async throws -> Int64? {
        let rows = try await client.rows("SELECT count(), max(newest_ns) FROM \(retentionTable) FORMAT TabSeparated", columns: 2)
        guard let row = rows.first, let count = Int64(row[0]), let newest = Int64(row[1]) else {
            throw ClickHouseError.malformedAnswer("the retention record \(retentionTable) answered \(rows)")
        }
        return count == 0 ? nil : newest
    }

    /// Drops every day partition whose whole day (UTC) is older than
    /// `retention` at `nowNs`, oldest first, and says what it dropped. Each
    /// day is recorded before it is dropped, so queries are told of it even
    /// when the drop is cut short (the next pass drops it then).
    public func dropDays(olderThan retention: Duration, nowNs: Int64) async throws -> [DroppedDay] {
        let (seconds, atto) = retention.components
        let retentionNs = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        guard retention > .zero, !retentionNs.overflow else {
            throw InvalidArgument(description: "retention must be positive and below 292 years, got \(retention)")
        }
        let cutoffNs = nowNs &- (retentionNs.partialValue &+ atto / 1_000_000_000)
        // Every event of a day before the cutoff's day is older than the cutoff.
        let firstKept = Self.dateText(days: Self.day(ns: cutoffNs))
        let rows = try await client.rows("""
            SELECT toString(day), toYYYYMMDD(day), count(), max(time_ns) FROM \(table) FINAL
            WHERE day < \(sqlString(firstKept))
            GROUP BY day ORDER BY day
            FORMAT TabSeparated
            """, columns: 4)
        var dropped: [DroppedDay] = []
        for r in rows {
            guard let partition = UInt32(r[1]), let count = Int64(r[2]), let newest = Int64(r[3]) else {
                throw ClickHouseError.malformedAnswer("a partition of \(table) reads as \(r)")
            }
            try await client.execute("""
                INSERT INTO \(retentionTable) (day, dropped_ns, events, newest_ns) FORMAT TabSeparated
                """, data: Array("\(r[0])\t\(nowNs)\t\(count)\t\(newest)\n".utf8))
            try await client.execute("ALTER TABLE \(table) DROP PARTITION \(partition)")
            dropped.append(DroppedDay(day: r[0], events: count, newestEventNs: newest))
        }
        return dropped
    }

    /// Days since 1970-01-01 (UTC) of a time, within what a ClickHouse
    /// `Date` keeps in order (1970-01-01 to 2105-12-31; 18.16 wraps
    /// later days): an event dated outside it
    /// is kept in the first or last day.
    static func day(ns: Int64) -> Int {
        let perDay: Int64 = 86_400_000_000_000
        let d = ns >= 0 ? ns / perDay : (ns + 1) / perDay - 1
        return Int(min(max(d, 0), 49_672))
    }

    /// `YYYY-MM-DD` of a day number (civil-from-days, proleptic Gregorian).
    static func dateText(days: Int) -> String {
        let z = days + 719_468
        let era = z / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
        func two(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }
        return "\(y)-\(two(m))-\(two(d))"
    }
}
