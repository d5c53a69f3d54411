import Foundation
import Synchronization
import TapioWire

/// Batches events and keeps every batch until the server acknowledges it.
///
/// Events accumulate until `maxEvents`, until the oldest is `maxDelayNs` old,
/// or until a critical event (an OOM kill) arrives; then they are sealed into
/// a numbered, encoded batch. Sealed batches stay in memory up to
/// `maxMemoryBytes`; beyond that the oldest go to the spool directory (up to
/// `maxSpoolBytes`), and beyond that the oldest are dropped and counted
/// (`spool_full`). Unacknowledged batches left at shutdown are spooled so the
/// next start sends them; the server deduplicates by (node, epoch, sequence).
public final class Outbox: Sendable {
    public struct Limits: Sendable {
        public var maxEvents = 512
        public var maxDelayNs: Int64 = 200_000_000
        public var maxMemoryBytes = 64 << 20
        public var maxSpoolBytes = 256 << 20

        public init() {}
    }

    struct Entry {
        enum Payload {
            case memory([UInt8])
            case disk(path: String, bytes: Int)
        }

        var epoch: UInt64
        var sequence: UInt64
        var events: Int
        var payload: Payload
        var sent = false

        var byteCount: Int {
            switch payload {
            case .memory(let b): return b.count
            case .disk(_, let n): return n
            }
        }
    }

    struct State {
        var pending: [TapioEvent] = []
        var entries: [Entry] = []
        var nextSequence: UInt64 = 1
        var memoryBytes = 0
        var spoolBytes = 0
        /// Cumulative drops by (kind, reason); the kernel's counts are set, local ones added.
        var drops: [DropKey: UInt64] = [:]
        var sealedBatches: UInt64 = 0
        var ackedBatches: UInt64 = 0
    }

    struct DropKey: Hashable {
        var kind: EventKind
        var reason: String
    }

    public let node: String
    public let epoch: UInt64
    public let limits: Limits
    public let spoolDirectory: String?
    private let state = Mutex(State())
    private let changed = NSCondition()

    public init(node: String, epoch: UInt64, limits: Limits = Limits(), spoolDirectory: String?) throws {
        self.node = node
        self.epoch = epoch
        self.limits = limits
        self.spoolDirectory = spoolDirectory
        if let dir = spoolDirectory {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            try loadSpool(dir)
        }
    }

    /// Batches a previous run left in the spool go first, in (epoch, sequence) order.
    private func loadSpool(_ dir: String) throws {
        var found: [Entry] = []
        for name in try FileManager.default.contentsOfDirectory(atPath: dir) where name.hasSuffix(".batch") {
            let parts = name.dropLast(6).split(separator: "-")
            guard parts.count == 2, let e = UInt64(parts[0]), let s = UInt64(parts[1]) else { continue }
            let path = dir + "/" + name
            let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
            found.append(Entry(epoch: e, sequence: s, events: 0, payload: .disk(path: path, bytes: size)))
        }
        found.sort { ($0.epoch, $0.sequence) < ($1.epoch, $1.sequence) }
        state.withLock { s in
            s.entries = found
            s.spoolBytes = found.reduce(0) { $0 + $1.byteCount }
        }
    }

    // MARK: - Producer side

    public func add(_ event: TapioEvent) {
        let sealed = state.withLock { s -> Bool in
            s.pending.append(event)
            if s.pending.count >= limits.maxEvents || event.isCritical {
                seal(&s)
                return true
            }
            return false
        }
        if sealed { signal() }
    }

    /// Seals the pending events if the oldest has waited `maxDelayNs` (or `force`).
    public func sealIfDue(nowNs: Int64, force: Bool = false) {
        let sealed = state.withLock { s -> Bool in
            guard let first = s.pending.first else { return false }
            guard force || nowNs - first.timeNs >= limits.maxDelayNs else { return false }
            seal(&s)
            return true
        }
        if sealed { signal() }
    }

    /// The kernel's cumulative drop counters (they replace the previous values).
    public func setKernelDrops(_ drops: [DropCount]) {
        state.withLock { s in
            for d in drops { s.drops[DropKey(kind: d.kind, reason: d.reason)] = d.count }
        }
    }

    /// Counts an event lost in the agent itself.
    public func countDrop(kind: EventKind, reason: String, count: UInt64 = 1) {
        state.withLock { s in s.drops[DropKey(kind: kind, reason: reason), default: 0] += count }
    }

    private func seal(_ s: inout State) {
        let drops = s.drops.map { DropCount(kind: $0.key.kind, reason: $0.key.reason, count: $0.value) }
            .sorted { ($0.kind.rawValue, $0.reason) < ($1.kind.rawValue, $1.reason) }
        let batch = EventBatch(node: node, epoch: epoch, sequence: s.nextSequence, events: s.pending, drops: drops)
        let bytes = batch.encoded()
        s.entries.append(Entry(epoch: epoch, sequence: s.nextSequence, events: s.pending.count, payload: .memory(bytes)))
        s.memoryBytes += bytes.count
        s.nextSequence += 1
        s.sealedBatches += 1
        s.pending.removeAll(keepingCapacity: true)
        enforceMemoryLimit(&s)
    }

    /// Moves the oldest unsent in-memory batches to the spool, or drops them
    /// (counted) when there is no room.
    private func enforceMemoryLimit(_ s: inout State) {
        var index = 0
        while s.memoryBytes > limits.maxMemoryBytes, index < s.entries.count {
            let entry = s.entries[index]
            guard case .memory(let bytes) = entry.payload, !entry.sent else { index += 1; continue }
            s.memoryBytes -= bytes.count
            if let dir = spoolDirectory, s.spoolBytes + bytes.count <= limits.maxSpoolBytes,
               let path = try? writeSpool(dir: dir, epoch: entry.epoch, sequence: entry.sequence, bytes: bytes) {
                s.entries[index].payload = .disk(path: path, bytes: bytes.count)
                s.spoolBytes += bytes.count
                index += 1
            } else {
                s.entries.remove(at: index)
                s.drops[DropKey(kind: .unspecified, reason: spoolDirectory == nil ? "queue_full" : "spool_full"), default: 0] += UInt64(entry.events)
            }
        }
    }

    private func writeSpool(dir: String, epoch: UInt64, sequence: UInt64, bytes: [UInt8]) throws -> String {
        let path = "\(dir)/\(epoch)-\(sequence).batch"
        let tmp = path + ".tmp"
        try Data(bytes).write(to: URL(fileURLWithPath: tmp), options: .atomic)
        try FileManager.default.moveItem(atPath: tmp, toPath: path)
        return path
    }

    // MARK: - Sender side

    /// The oldest batch not yet sent on the current connection, as frame
    /// payload, if fewer than `window` are in flight.
    func nextToSend(window: Int) -> (epoch: UInt64, sequence: UInt64, payload: [UInt8])? {
        state.withLock { s in
            var inFlight = 0
            for i in s.entries.indices {
                if s.entries[i].sent { inFlight += 1; continue }
                guard inFlight < window else { return nil }
                let e = s.entries[i]
                let payload: [UInt8]
                switch e.payload {
                case .memory(let b): payload = b
                case .disk(let path, _):
                    guard let data = FileManager.default.contents(atPath: path) else {
                        // The spool file vanished: count it and go on.
                        s.entries.remove(at: i)
                        s.drops[DropKey(kind: .unspecified, reason: "spool_lost"), default: 0] += 1
                        return nil
                    }
                    payload = [UInt8](data)
                }
                s.entries[i].sent = true
                return (e.epoch, e.sequence, payload)
            }
            return nil
        }
    }

    /// Everything of `epoch` up to `sequence` is durable on the server.
    func acknowledge(epoch: UInt64, sequence: UInt64) {
        let removed = state.withLock { s -> [Entry] in
            var removed: [Entry] = []
            s.entries.removeAll { e in
                guard e.epoch == epoch, e.sequence <= sequence else { return false }
                removed.append(e)
                return true
            }
            for e in removed {
                switch e.payload {
                case .memory(let b): s.memoryBytes -= b.count
                case .disk(_, let n): s.spoolBytes -= n
                }
            }
            s.ackedBatches += UInt64(removed.count)
            return removed
        }
        for case .disk(let path, _) in removed.map(\.payload) { try? FileManager.default.removeItem(atPath: path) }
        if !removed.isEmpty { signal() }
    }

    /// A new connection resends everything not yet acknowledged.
    func markAllUnsent() {
        state.withLock { s in
            for i in s.entries.indices { s.entries[i].sent = false }
        }
    }

    /// Sealed, unacknowledged batches.
    public var unacknowledged: Int { state.withLock { $0.entries.count } }
    public var pendingEvents: Int { state.withLock { $0.pending.count } }
    public var lastSequence: UInt64 { state.withLock { $0.nextSequence - 1 } }

    public struct Stats: Sendable {
        public var sealedBatches: UInt64
        public var ackedBatches: UInt64
        public var unacknowledged: Int
        public var memoryBytes: Int
        public var spoolBytes: Int
        public var drops: [DropCount]
    }

    public var stats: Stats {
        state.withLock { s in
            Stats(sealedBatches: s.sealedBatches, ackedBatches: s.ackedBatches, unacknowledged: s.entries.count,
                  memoryBytes: s.memoryBytes, spoolBytes: s.spoolBytes,
                  drops: s.drops.map { DropCount(kind: $0.key.kind, reason: $0.key.reason, count: $0.value) })
        }
    }

    /// Writes every unacknowledged in-memory batch to the spool (at shutdown).
    /// Returns how many batches were left unsaved (no spool directory or no room).
    @discardableResult
    public func spoolRemaining() -> Int {
        guard let dir = spoolDirectory else { return unacknowledged }
        return state.withLock { s in
            var unsaved = 0
            for i in s.entries.indices {
                guard case .memory(let bytes) = s.entries[i].payload else { continue }
                if s.spoolBytes + bytes.count <= limits.maxSpoolBytes,
                   let path = try? writeSpool(dir: dir, epoch: s.entries[i].epoch, sequence: s.entries[i].sequence, bytes: bytes) {
                    s.entries[i].payload = .disk(path: path, bytes: bytes.count)
                    s.spoolBytes += bytes.count
                    s.memoryBytes -= bytes.count
                } else {
                    unsaved += 1
                }
            }
            return unsaved
        }
    }

    /// The encoded batches held now, oldest first (for tests and diagnostics).
    public func sealedPayloadsForTesting() -> [[UInt8]] {
        state.withLock { s in
            s.entries.compactMap { e in
                switch e.payload {
                case .memory(let b): return b
                case .disk(let path, _): return FileManager.default.contents(atPath: path).map { [UInt8]($0) }
                }
            }
        }
    }

    /// Acknowledges as a server would (for tests that read batches themselves).
    public func acknowledgeForTesting(epoch: UInt64, sequence: UInt64) {
        acknowledge(epoch: epoch, sequence: sequence)
    }

    // MARK: - Waiting

    private func signal() {
        changed.lock()
        changed.broadcast()
        changed.unlock()
    }

    /// Waits until something changes (a batch sealed or acknowledged) or the timeout passes.
    func wait(timeoutSeconds: Double) {
        changed.lock()
        _ = changed.wait(until: Date(timeIntervalSinceNow: timeoutSeconds))
        changed.unlock()
    }
}
