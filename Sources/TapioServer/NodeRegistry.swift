import Foundation
import Synchronization
import TapioStore
import TapioWire

/// Live state of every agent the server has heard from: connection count,
/// clock estimate, counters. Persisted to the store on hello, on disconnect
/// and periodically, so `tapio nodes` survives a restart.
public final class NodeRegistry: Sendable {
    struct Entry {
        var record: NodeRecord
        var connections: Int
        var clock: ClockEstimator
        var drops = DropTally()
    }

    /// The drop counters the node's batches carried: per agent run (epoch)
    /// the highest of each cumulative counter, summed over runs. The last
    /// `keptEpochs` runs are kept apart (a late batch of one still counts
    /// once); older ones are folded into `retired`.
    struct DropTally {
        static let keptEpochs = 8
        struct Key: Hashable { var kind: EventKind; var reason: String }
        var byEpoch: [(epoch: UInt64, counts: [Key: UInt64])] = []
        var retired: [Key: UInt64] = [:]

        mutating func add(epoch: UInt64, _ drops: [DropCount]) {
            guard !drops.isEmpty else { return }
            let i: Int
            if let found = byEpoch.firstIndex(where: { $0.epoch == epoch }) {
                i = found
            } else {
                byEpoch.append((epoch, [:]))
                byEpoch.sort { $0.epoch < $1.epoch }
                while byEpoch.count > Self.keptEpochs {
                    for (k, v) in byEpoch.removeFirst().counts { retired[k, default: 0] &+= v }
                }
                guard let added = byEpoch.firstIndex(where: { $0.epoch == epoch }) else { return }  // older than every kept run
                i = added
            }
            for d in drops {
                let key = Key(kind: d.kind, reason: d.reason)
                byEpoch[i].counts[key] = max(byEpoch[i].counts[key] ?? 0, d.count)
            }
        }

        var total: [DropCount] {
            var sum = retired
            for run in byEpoch { for (k, v) in run.counts { sum[k, default: 0] &+= v } }
            return sum.map { DropCount(kind: $0.key.kind, reason: $0.key.reason, count: $0.value) }
                .sorted { ($0.kind.rawValue, $0.reason) < ($1.kind.rawValue, $1.reason) }
        }
    }

    private let entries: Mutex<[String: Entry]>

    public init(restoring records: [NodeRecord]) {
        var initial: [String: Entry] = [:]
        for r in records {
            initial[r.node] = Entry(record: r, connections: 0, clock: ClockEstimator())
        }
        entries = Mutex(initial)
    }

    /// Registers a connection after a valid hello. The clock estimate starts
    /// afresh: the agent may have restarted or its clock may have been stepped.
    public func connected(hello: Hello, nowNs: Int64) -> NodeRecord {
        entries.withLock { e in
            var entry = e[hello.node] ?? Entry(record: NodeRecord(node: hello.node, firstSeenNs: nowNs), connections: 0, clock: ClockEstimator())
            entry.connections += 1
            entry.clock = ClockEstimator()
            entry.record.agentVersion = hello.agentVersion
            entry.record.bootId = hello.bootId
            entry.record.capabilities = hello.capabilities
            entry.record.degraded = hello.degraded
            entry.record.lastSeenNs = nowNs
            e[hello.node] = entry
            return entry.record
        }
    }

    public func disconnected(node: String, nowNs: Int64) -> NodeRecord? {
        entries.withLock { e in
            guard var entry = e[node] else { return nil }
            entry.connections = max(0, entry.connections - 1)
            entry.record.lastSeenNs = nowNs
            e[node] = entry
            return entry.record
        }
    }

    /// Adds a time-sync sample; returns the node's current correction.
    @discardableResult
    public func addClockSample(node: String, t1: Int64, t2: Int64, t3: Int64, t4: Int64) -> ClockCorrection? {
        entries.withLock { e in
            guard var entry = e[node] else { return nil }
            entry.clock.add(t1: t1, t2: t2, t3: t3, t4: t4)
            if let c = entry.clock.correction {
                entry.record.clockOffsetNs = c.offsetNs
                entry.record.clockErrorNs = c.errorNs
            }
            e[node] = entry
            return entry.clock.correction
        }
    }

    public func correction(node: String) -> ClockCorrection? {
        entries.withLock { $0[node]?.clock.correction }
    }

    /// Counts a stored (or duplicate) batch and the drop counters it
    /// carried (cumulative per agent run); returns the record to persist.
    public func received(node: String, events: Int, duplicate: Bool, epoch: UInt64 = 0, drops: [DropCount] = [], nowNs: Int64) -> NodeRecord? {
        entries.withLock { e in
            guard var entry = e[node] else { return nil }
            entry.drops.add(epoch: epoch, drops)
            if duplicate {
                entry.record.duplicateBatches += 1
            } else {
                entry.record.batchesReceived += 1
                entry.record.eventsReceived += Int64(events)
            }
            entry.record.lastSeenNs = nowNs
            e[node] = entry
            return entry.record
        }
    }

    public struct Snapshot: Sendable {
        public var record: NodeRecord
        public var connected: Bool
        public var clockSamples: Int
        /// The drops the node's batches carried since this process started, summed over the agent's runs.
        public var drops: [DropCount]
    }

    public func snapshot() -> [Snapshot] {
        entries.withLock { e in
            e.values.map { Snapshot(record: $0.record, connected: $0.connections > 0, clockSamples: $0.clock.samples.count, drops: $0.drops.total) }
                .sorted { $0.record.node < $1.record.node }
        }
    }
}

/// Counters exposed on /metrics (Prometheus text format).
public final class ServerMetrics: Sendable {
    private let counters = Mutex<[String: Int64]>([:])
    /// Ingest lag, commit and query times (MetricsCatalog.swift).
    public let histograms = ServerHistograms()

    public init() {}

    /// `name` may carry labels: `tapio_server_frames_rejected_total{reason="too_large"}`.
    public func add(_ name: String, _ value: Int64 = 1) {
        counters.withLock { $0[name, default: 0] += value }
    }

    public func set(_ name: String, _ value: Int64) {
        counters.withLock { $0[name] = value }
    }

    public func value(_ name: String) -> Int64 {
        counters.withLock { $0[name] ?? 0 }
    }

    public func all() -> [String: Int64] {
        counters.withLock { $0 }
    }
}

/// Prometheus label value escaping.
func labelValue(_ s: String) -> String {
    s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
}
