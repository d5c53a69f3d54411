import Foundation
import TapioAttribution
import Synchronization
import TapioWire

/// Batches events and keeps every batch until the server acknowledges it;
/// every event it cannot keep is counted as dropped.
///
/// Events accumulate until `maxEvents`, until the oldest is `maxDelayNs` old,
/// or until a critical event (an OOM kill) arrives; then they are sealed into
/// numbered, encoded batches of at most `maxEvents` events and `maxBatchBytes`
/// bytes (tightened to the limits the server announces in its hello-ack).
///
/// With a spool directory, each batch is appended to it as a checksummed
/// record (`SpoolRecord`) in a segment file (`SpoolSegments`: a group with
/// one write and one fdatasync) as soon as it is sealed, and settled there
/// when the server acknowledges exactly that batch; a crash loses only what
/// the kernel had not handed over yet. An
/// in-memory copy is kept for sending up to `maxMemoryBytes`. A batch that
/// does not fit the spool (`maxSpoolBytes`) stays in memory; when memory is
/// full too, the oldest such batch is dropped and its events counted
/// (`spool_full`, or `queue_full` without a spool directory).
///
/// With a spooler thread (`startSpooler`, as the agent runs it), the
/// ring-buffer reader only appends: the spooler seals (encoding outside the
/// lock), appends a group of records with one sync, and keeps only the newest
/// `memoryWindowBytes` of spooled batches in memory (older ones are read back
/// to be sent). With a state directory, `CrashCounters` account for every
/// event read, so that the next start reports what a crash lost.
///
/// At start, the records a previous process left are loaded and sent again
/// with their own epoch (the server deduplicates by node, epoch, sequence). A
/// record that cannot be read (torn, damaged) is copied to `quarantine/` and
/// its events are counted (`spool_corrupt`). A batch larger than the server accepts never
/// blocks the rest: if this process never sent it, its events are sealed
/// again within the limits; otherwise the server may hold it already, and it
/// is dropped and its events counted (`batch_too_large`).
/// Every batch carries the cumulative drop counters; when they changed and no
/// event waits to carry them, a batch of counts only is sealed. Counts that no
/// durable batch carries when the process stops are kept in the spool's
/// `carried-drops` file and added to the next process's counters.
public final class Outbox: Sendable {
    public struct Limits: Sendable {
        public var maxEvents = 512
        /// Encoded bytes of one batch at most: well under the server's
        /// default frame limit of 4 MiB.
        public var maxBatchBytes = 1 << 20
        public var maxDelayNs: Int64 = 200_000_000
        /// Batches held only in memory (no spool, or the spool full) at most.
        public var maxMemoryBytes = 64 << 20
        /// With a spool: in-memory copies of batches that are safe in the
        /// spool are kept up to this much (the newest; older ones are read
        /// back from the spool to be sent), so a backlog lives on disk.
        public var memoryWindowBytes = 4 << 20
        /// With a spooler thread: sealed batches waiting for it at most;
        /// while it is behind, later batches wait in memory (within
        /// `maxMemoryBytes`) unreserved.
        public var maxSpoolQueueBytes = 8 << 20
        public var maxSpoolBytes = 256 << 20
        /// A spool segment is appended to up to this size (at most a quarter
        /// of `maxSpoolBytes`), then the next one starts; a segment goes when
        /// every batch in it is settled.
        public var segmentBytes = 8 << 20

        public init() {}
    }

    struct Entry {
        var epoch: UInt64
        var sequence: UInt64
        var events: Int
        /// Bytes of the encoded batch (the frame payload).
        var payloadBytes: Int
        /// The encoded batch, while memory allows.
        var memory: [UInt8]?
        /// Its spool record, once written and synced.
        var spooled: SpoolLocation?
        /// Spool bytes reserved or used by its record.
        var fileBytes = 0
        /// A spool write is under way (outside the lock).
        var writing = false
        /// Sent on the current connection.
        var sent = false
        /// Ever sent by this process: until then it cannot have been stored.
        var everSent = false
        /// The drop counters the batch carries (batches of this process only).
        var drops: [DropKey: UInt64]?
        /// Its events per kind (batches of this process only), and whether
        /// they are accounted for in the crash counters (durable or dropped).
        var kinds: KindCounts?
        var accounted = false
    }

    struct State {
        var pending = PendingEvents()
        var entries: [Entry] = []
        var nextSequence: UInt64 = 1
        var memoryBytes = 0
        var spoolBytes = 0
        /// The kernel's cumulative counts (replaced on every update).
        var kernelDrops: [DropKey: UInt64] = [:]
        /// Events lost in the agent itself, and counts carried over from an earlier process (added up).
        var localDrops: [DropKey: UInt64] = [:]
        /// The counters of the newest acknowledged batch of this epoch.
        var ackedDrops: [DropKey: UInt64] = [:]
        var ackedSequence: UInt64 = 0
        /// The carried-drops file holds counts no durable batch carries yet.
        var carriedFilePresent = false
        /// The last spool write failed (disk full?): retry one batch per seal, not all.
        var spoolFailing = false
        /// The counters the newest sealed batch carries, and when the last
        /// batch of counts only was sealed (agent clock).
        var sealedDrops: [DropKey: UInt64] = [:]
        var lastCountsOnlyNs: Int64?
        /// Limits the server announced (0: none).
        var serverMaxEvents = 0
        var serverMaxPayloadBytes = 0
        var sealedBatches: UInt64 = 0
        var ackedBatches: UInt64 = 0
        /// The newest batch of this epoch that is durable (spooled or acknowledged).
        var durableSequence: UInt64 = 0
        /// Written by the spooler thread, when one runs (`startSpooler`).
        var background = false
        var queued: [SpoolWrite] = []
        var queuedBytes = 0
        /// With a spooler: the reader asked it to seal the pending events;
        /// it is sealing (encoding outside the lock) this many events.
        var sealRequested = false
        /// A seal of every pending event was asked for (due, forced, a
        /// critical event); otherwise only whole batches are sealed.
        var sealAllRequested = false
        var sealingEvents = 0
        var sealing: Bool { sealingEvents > 0 }
        /// Some batch older than the newest was left unspooled (spool full,
        /// queue full, a failed write): the next reservation looks at all.
        var unspooledBehind = false
        /// Memory went over the window since the heap was last trimmed.
        var peakSinceTrim = false
        var lastTrimNs: Int64 = 0
        /// This process's crash counters (with a state directory).
        var counters: CrashCounters?
        var countersProblem: String?

        var drops: [DropKey: UInt64] { kernelDrops.merging(localDrops, uniquingKeysWith: saturatingAdd).filter { $0.value > 0 } }

        /// Counts events lost in the agent (saturating: a count read from disk may be anything).
        mutating func count(_ n: Int, _ reason: String, kind: EventKind = .unspecified) {
            count(UInt64(max(0, n)), reason, kind: kind)
        }

        mutating func count(_ n: UInt64, _ reason: String, kind: EventKind = .unspecified) {
            let key = DropKey(kind: kind, reason: reason)
            localDrops[key] = saturatingAdd(localDrops[key, default: 0], n)
            counters?.setDrop(key, total: saturatingAdd(localDrops[key, default: 0], kernelDrops[key, default: 0]))
        }

        /// A batch of this process that is gone (acknowledged or dropped and
        /// counted): its events are accounted for, unless they were already.
        func settle(_ e: Entry) {
            if !e.accounted, let kinds = e.kinds { counters?.account(kinds) }
        }

        /// A batch of this process is durable: its events are accounted for,
        /// and the drop counters it carries will reach the server.
        mutating func madeDurable(_ i: Int) {
            settle(entries[i])
            entries[i].accounted = true
            if entries[i].sequence > durableSequence, let drops = entries[i].drops {
                durableSequence = entries[i].sequence
                counters?.setDurable(drops)
            }
        }
    }

    typealias DropKey = CrashCounters.Key

    /// A sealed batch to be written to the spool outside the lock.
    struct SpoolWrite {
        var epoch: UInt64
        var sequence: UInt64
        var events: Int
        var payload: [UInt8]

        var recordBytes: Int { SpoolRecord.headerSize + payload.count }
    }

    public let node: String
    public let epoch: UInt64
    public let limits: Limits
    public let spoolDirectory: String?
    /// The spool's files, with a spool directory.
    private let spool: SpoolSegments?
    /// Where the crash counters (and, without a spool, the carried drops) live.
    public let stateDirectory: String?
    /// What the crash counters of a previous process said, when it did not stop cleanly.
    public let recovered: CrashCounters.Snapshot?
    private let state = Mutex(State())
    /// The crash counters, for `countRead` (set once, before any reader runs).
    private let readTally = ReadTally()
    private let changed = NSCondition()
    private let spoolerWake = DispatchSemaphore(value: 0)
    private let spoolerDone = DispatchSemaphore(value: 0)

    /// `stateDirectory` (the agent's data directory) turns on the crash
    /// counters: a previous process's leftover counters are turned into
    /// carried drops first, then this process's are created.
    public init(node: String, epoch: UInt64, limits: Limits = Limits(), spoolDirectory: String?, stateDirectory: String? = nil) throws {
        self.node = node
        self.epoch = epoch
        self.limits = limits
        self.spoolDirectory = spoolDirectory
        spool = spoolDirectory.map { SpoolSegments(directory: $0, segmentBytes: min(limits.segmentBytes, limits.maxSpoolBytes / 4)) }
        self.stateDirectory = stateDirectory
        var recovered: CrashCounters.Snapshot?
        if let state = stateDirectory {
            try FileManager.default.createDirectory(atPath: state, withIntermediateDirectories: true)
            let path = state + "/counters"
            if let left = CrashCounters.load(path: path), left.epoch != epoch {
                recovered = left
            }
        }
        self.recovered = recovered
        if let dir = spoolDirectory {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        }
        if let spool {
            try loadSpool(spool)
        } else if stateDirectory != nil {
            let carried = readCarriedDrops()
            state.withLock { s in
                s.localDrops = carried
                s.carriedFilePresent = carriedPath.map { FileManager.default.fileExists(atPath: $0) } ?? false
            }
        }
        // What the previous process never reported becomes this one's to
        // report, and is in this process's counters file (as drops no
        // durable batch carries yet) from the moment that file replaces the
        // old one: never in neither. The carried-drops file may hold part of
        // the same counts (the previous process took them over from it), so
        // the larger of the two counts, not their sum.
        if let left = recovered {
            state.withLock { s in
                for (key, n) in left.unreported where n > s.localDrops[key, default: 0] { s.localDrops[key] = n }
            }
        }
        if let dir = stateDirectory {
            do {
                let counters = try state.withLock { s in try CrashCounters(path: dir + "/counters", epoch: epoch, drops: s.drops) }
                state.withLock { $0.counters = counters }
                readTally.counters = counters
            } catch {
                // The agent still runs; what a crash loses is then not counted.
                state.withLock { $0.countersProblem = "\(error)" }
            }
        }
    }

    /// Why the crash counters could not be created (then a crash's losses go uncounted).
    public var countersProblem: String? { state.withLock { $0.countersProblem } }

    private var carriedPath: String? { (spoolDirectory ?? stateDirectory).map { $0 + "/carried-drops" } }

    /// Batches a previous run left in the spool go first, in (epoch, sequence)
    /// order. Unreadable records are quarantined and counted, and the count is
    /// saved before they are moved, so that a crash now counts them twice at
    /// worst, never not at all.
    private func loadSpool(_ spool: SpoolSegments) throws {
        let loaded = try spool.load()
        let found = loaded.batches.map { b in
            Entry(epoch: b.epoch, sequence: b.sequence, events: b.events, payloadBytes: b.payloadBytes,
                  memory: nil, spooled: b.location, fileBytes: b.recordBytes)
        }
        let corruptEvents = loaded.damage.reduce(UInt64(0)) { saturatingAdd($0, $1.events) }
        let carried = readCarriedDrops()
        state.withLock { s in
            s.entries = found
            s.spoolBytes = found.reduce(0) { $0 + $1.fileBytes }
            s.localDrops = carried
            if corruptEvents > 0 {
                s.count(corruptEvents, "spool_corrupt")
                // If this fails the count is still in memory, and in this run's batches.
                try? writeCarriedDrops(s.localDrops)
            }
            s.carriedFilePresent = carriedPath.map { FileManager.default.fileExists(atPath: $0) } ?? false
        }
        spool.quarantine(loaded.damage)
    }

    // MARK: - Producer side

    /// Called by the ring-buffer reader: with a spooler running
    /// (`startSpooler`) it only appends to memory, never writes or syncs.
    public func add(_ event: TapioEvent) {
        let writes = state.withLock { s -> [SpoolWrite]? in
            s.pending.append(event)
            s.counters?.read(event.kind)
            return added(critical: event.isCritical, &s)
        }
        if let writes { finishSeal(writes) }
    }

    /// Counts one event as read in the crash counters, without the lock: the
    /// ring-buffer reader counts each event as it converts it, before the
    /// ring buffer lets go of its record, and hands them over with
    /// `add(contentsOf:)` a group at a time.
    public func countRead(_ kind: EventKind) {
        readTally.counters?.read(kind)
    }

    /// Adds a group of events already counted with `countRead`, with one
    /// lock for the group, and leaves `events` empty. The group is kept as
    /// it is (no copy of its events): one of `eventsPerBatch` events is
    /// sealed as a batch of its own.
    /// `critical`: whether one of them is (`TapioEvent.isCritical`): the
    /// caller knows, having made them, and asking each event again here
    /// would copy it.
    public func add(contentsOf events: inout [TapioEvent], critical: Bool) {
        guard !events.isEmpty else { return }
        let writes = state.withLock { s -> [SpoolWrite]? in
            s.pending.append(group: &events)
            return added(critical: critical, &s)
        }
        if let writes { finishSeal(writes) }
    }

    /// Events per batch now (the server may announce fewer): the size of
    /// the groups the ring-buffer reader hands over.
    public var eventsPerBatch: Int { state.withLock { maxEvents($0) } }

    /// After events were added: a full batch or a critical event seals.
    private func added(critical: Bool, _ s: inout State) -> [SpoolWrite]? {
        guard s.pending.count >= maxEvents(s) || critical else { return nil }
        // With a spooler the reader only asks it to seal, unless it falls
        // far behind (then the reader seals, which slows it, as before).
        if s.background, s.sealing || s.pending.count < 8 * maxEvents(s) {
            if critical { s.sealAllRequested = true }
            requestSeal(&s)
            return nil
        }
        return handOff(seal(&s, all: critical), &s)
    }

    private func requestSeal(_ s: inout State) {
        guard !s.sealRequested else { return }
        s.sealRequested = true
        spoolerWake.signal()
    }

    /// On the spooler thread: seals the pending events when asked (or when
    /// stopping), encoding them outside the lock so that the reader goes on
    /// appending meanwhile; nothing else seals while it does (counts-only
    /// batches and re-seals wait), so the sequences it encodes are the next
    /// ones. Returns whether it sealed anything.
    private func sealInBackground() -> Bool {
        let job = state.withLock { s -> (batches: [[TapioEvent]], sequence: UInt64, drops: [DropKey: UInt64], maxBytes: Int)? in
            guard !s.pending.isEmpty, s.sealRequested || !s.background, !s.sealing else { return nil }
            let all = s.sealAllRequested || !s.background
            s.sealRequested = false
            s.sealAllRequested = false
            // Whole batches only, unless all was asked for: the rest waits for
            // its batch to fill or its delay to pass.
            let batches = s.pending.takeBatches(perBatch: maxEvents(s), all: all)
            guard !batches.isEmpty else { return nil }
            s.sealingEvents = batches.reduce(0) { $0 + $1.count }
            return (batches, s.nextSequence, s.drops, maxPayloadBytes(s))
        }
        guard let job else { return false }
        let counts = job.drops.map { DropCount(kind: $0.key.kind, reason: $0.key.reason, count: $0.value) }
            .sorted { ($0.kind.rawValue, $0.reason) < ($1.kind.rawValue, $1.reason) }
        var built: [(events: [TapioEvent], bytes: [UInt8])] = []
        var tooLarge: [EventKind] = []
        func encode(_ events: [TapioEvent]) {
            let bytes = EventBatch(node: node, epoch: epoch, sequence: job.sequence + UInt64(built.count), events: events, drops: counts).encoded()
            if bytes.count > job.maxBytes {
                if events.count == 1 {
                    tooLarge.append(events[0].kind)
                    return
                }
                let middle = events.count / 2
                encode(Array(events[..<middle]))
                encode(Array(events[middle...]))
                return
            }
            built.append((events, bytes))
        }
        for batch in job.batches { encode(batch) }
        let writes = state.withLock { s -> [SpoolWrite] in
            s.sealingEvents = 0
            if s.nextSequence != job.sequence {
                // Cannot happen (nothing else seals meanwhile); if it did, seal again under the lock.
                for batch in job.batches { sealEvents(batch, &s) }
            } else {
                for kind in tooLarge {
                    s.count(1, "batch_too_large", kind: kind)
                    s.counters?.account(kind, 1)
                }
                for b in built {
                    s.entries.append(Entry(epoch: epoch, sequence: s.nextSequence, events: b.events.count, payloadBytes: b.bytes.count,
                                           memory: b.bytes, drops: job.drops, kinds: KindCounts(b.events[...])))
                    s.memoryBytes += b.bytes.count
                    s.nextSequence += 1
                    s.sealedBatches += 1
                }
                if !built.isEmpty { s.sealedDrops = job.drops }
            }
            let writes = reserveSpoolWrites(&s)
            enforceMemoryLimit(&s)
            return writes
        }
        finishSeal(writes)
        return true
    }

    /// Spool writes go to the spooler thread when one runs (then none is
    /// left for the caller), else to the caller.
    private func handOff(_ writes: [SpoolWrite], _ s: inout State) -> [SpoolWrite]? {
        guard !writes.isEmpty else { return nil }
        guard s.background else { return writes }
        s.queued += writes
        s.queuedBytes += writes.reduce(0) { $0 + $1.recordBytes }
        spoolerWake.signal()
        return nil
    }

    /// Moves spool writes (and the crash counters' write-back) off the
    /// callers' threads, the ring-buffer reader's above all, onto a thread of
    /// its own, until `stopSpooler`.
    public func startSpooler() {
        let start = state.withLock { s -> Bool in
            guard !s.background, spoolDirectory != nil || s.counters != nil else { return false }
            s.background = true
            return true
        }
        guard start else { return }
        let thread = Thread { [self] in
            var lastSyncNs: Int64 = 0
            while true {
                let sealed = sealInBackground()
                let (writes, stop, counters) = state.withLock { s in
                    // Batches left unreserved while the queue was full.
                    // (Not while writes fail: then one batch per seal is tried. Not
                    // when stopping: spoolRemaining takes what is left.)
                    if s.queued.isEmpty, s.unspooledBehind, !s.spoolFailing, s.background { s.queued = reserveSpoolWrites(&s) }
                    defer {
                        s.queued = []
                        s.queuedBytes = 0
                    }
                    return (s.queued, !s.background, s.counters)
                }
                if !writes.isEmpty { finishSeal(writes) }
                trimHeapIfDrained()
                if !writes.isEmpty || monotonicNs() - lastSyncNs >= 1_000_000_000 {
                    counters?.sync()
                    lastSyncNs = monotonicNs()
                }
                if stop, !sealed { break }
                if writes.isEmpty, !sealed { _ = spoolerWake.wait(timeout: .now() + 1) }
            }
            spoolerDone.signal()
        }
        thread.name = "tapio-spooler"
        thread.start()
    }

    /// Writes what is queued and stops the spooler thread; later writes are
    /// made by their callers again.
    public func stopSpooler() {
        let running = state.withLock { s -> Bool in
            defer { s.background = false }
            return s.background
        }
        guard running else { return }
        spoolerWake.signal()
        spoolerDone.wait()
        // Whatever the reader appended after the spooler's last pass.
        let writes = state.withLock { s -> [SpoolWrite]? in s.pending.isEmpty ? nil : seal(&s) }
        if let writes { finishSeal(writes) }
    }

    /// Seals the pending events if the oldest has waited `maxDelayNs` (or
    /// `force`). Without pending events, drop counts no batch carries yet
    /// (carried over, found in the spool, of a batch dropped since) do not
    /// wait for the next event: they go out in a batch of counts only, at most
    /// one per `maxDelayNs`.
    public func sealIfDue(nowNs: Int64, force: Bool = false) {
        let writes = state.withLock { s -> [SpoolWrite]? in
            if let firstNs = s.pending.firstTimeNs {
                let (waited, overflow) = nowNs.subtractingReportingOverflow(firstNs)
                guard force || overflow || waited >= limits.maxDelayNs else { return nil }
                if s.background {
                    s.sealAllRequested = true
                    requestSeal(&s)
                    return nil
                }
                return handOff(seal(&s), &s)
            }
            // A seal under way carries the counts, and owns the next sequence.
            guard s.drops != s.sealedDrops, !s.sealing else { return nil }
            if !force, let last = s.lastCountsOnlyNs {
                let (since, overflow) = nowNs.subtractingReportingOverflow(last)
                guard overflow || since >= limits.maxDelayNs || since < 0 else { return nil }
            }
            s.lastCountsOnlyNs = nowNs
            var sealed: [Entry] = []
            var reuse: UInt64?
            sealChunk([], &s, into: &sealed, reusing: &reuse)
            s.entries += sealed
            let writes = reserveSpoolWrites(&s)
            enforceMemoryLimit(&s)
            return handOff(writes, &s)
        }
        if let writes { finishSeal(writes) }
    }

    /// The kernel's cumulative drop counters (they replace the previous values).
    public func setKernelDrops(_ drops: [DropCount]) {
        state.withLock { s in
            for d in drops {
                let key = DropKey(kind: d.kind, reason: d.reason)
                guard s.kernelDrops[key] != d.count else { continue }
                s.kernelDrops[key] = d.count
                s.counters?.setDrop(key, total: saturatingAdd(d.count, s.localDrops[key, default: 0]))
            }
        }
    }

    /// Counts an event lost in the agent itself.
    public func countDrop(kind: EventKind, reason: String, count: UInt64 = 1) {
        state.withLock { s in s.count(count, reason, kind: kind) }
    }

    /// The limits the server announced in its hello-ack (0: not announced).
    /// Later batches are sealed within them; a batch sealed earlier that
    /// exceeds them is dropped and counted when its turn to be sent comes.
    public func applyServerLimits(maxBatchEvents: Int, maxFrameBytes: Int) {
        state.withLock { s in
            s.serverMaxEvents = max(0, maxBatchEvents)
            s.serverMaxPayloadBytes = max(0, maxFrameBytes)
        }
    }

    private func maxEvents(_ s: State) -> Int {
        let own = max(1, limits.maxEvents)
        return s.serverMaxEvents > 0 ? min(own, s.serverMaxEvents) : own
    }

    private func maxPayloadBytes(_ s: State) -> Int {
        let own = max(1, limits.maxBatchBytes)
        return s.serverMaxPayloadBytes > 0 ? min(own, s.serverMaxPayloadBytes) : own
    }

    private func exceedsServerLimits(_ e: Entry, _ s: State) -> Bool {
        (s.serverMaxEvents > 0 && e.events > s.serverMaxEvents) || (s.serverMaxPayloadBytes > 0 && e.payloadBytes > s.serverMaxPayloadBytes)
    }

    /// Seals the pending events (whole batches only unless `all`) into as
    /// many batches as the limits need and returns the spool writes to do
    /// outside the lock.
    private func seal(_ s: inout State, all: Bool = true) -> [SpoolWrite] {
        for batch in s.pending.takeBatches(perBatch: maxEvents(s), all: all) { sealEvents(batch, &s) }
        // Reserved writes first: a batch about to reach the spool is not dropped for lack of memory.
        let writes = reserveSpoolWrites(&s)
        enforceMemoryLimit(&s)
        return writes
    }

    /// Seals events into batches within the limits, appended to the outbox;
    /// or, re-sealing a batch that was never sent, in its place, the first
    /// taking over its sequence.
    private func sealEvents(_ events: [TapioEvent], _ s: inout State, replacing: (index: Int, sequence: UInt64)? = nil) {
        guard !events.isEmpty else { return }
        var sealed: [Entry] = []
        var reuse = replacing?.sequence
        let perBatch = maxEvents(s)
        if events.count <= perBatch {
            sealChunk(events, &s, into: &sealed, reusing: &reuse)
        } else {
            var start = 0
            while start < events.count {
                let end = min(start + perBatch, events.count)
                sealChunk(Array(events[start..<end]), &s, into: &sealed, reusing: &reuse)
                start = end
            }
        }
        s.entries.insert(contentsOf: sealed, at: replacing?.index ?? s.entries.count)
        // Not at the end: the next reservation must look further back.
        if replacing != nil { s.unspooledBehind = true }
    }

    /// One batch, halved until it fits the byte budget. A single event larger
    /// than the budget on its own is dropped and counted. Without events, a
    /// batch of the drop counts only.
    private func sealChunk(_ events: [TapioEvent], _ s: inout State, into sealed: inout [Entry], reusing: inout UInt64?) {
        let sequence = reusing ?? s.nextSequence
        let drops = s.drops
        let counts = drops.map { DropCount(kind: $0.key.kind, reason: $0.key.reason, count: $0.value) }
            .sorted { ($0.kind.rawValue, $0.reason) < ($1.kind.rawValue, $1.reason) }
        let bytes = EventBatch(node: node, epoch: epoch, sequence: sequence, events: events, drops: counts).encoded()
        if bytes.count > maxPayloadBytes(s), !events.isEmpty {
            if events.count == 1 {
                s.count(1, "batch_too_large", kind: events.first!.kind)
                s.counters?.account(events.first!.kind, 1)
                return
            }
            let middle = events.count / 2
            sealChunk(Array(events[..<middle]), &s, into: &sealed, reusing: &reusing)
            sealChunk(Array(events[middle...]), &s, into: &sealed, reusing: &reusing)
            return
        }
        sealed.append(Entry(epoch: epoch, sequence: sequence, events: events.count, payloadBytes: bytes.count, memory: bytes, drops: drops,
                            kinds: events.isEmpty ? nil : KindCounts(events[...])))
        s.memoryBytes += bytes.count
        s.sealedDrops = drops
        if reusing != nil {
            reusing = nil
        } else {
            s.nextSequence += 1
            s.sealedBatches += 1
        }
    }

    /// Releases in-memory copies of batches that are safe in the spool, oldest
    /// first, down to the memory window; when batches held only in memory
    /// exceed `maxMemoryBytes`, drops the oldest of them and counts its events.
    private func enforceMemoryLimit(_ s: inout State) {
        let window = min(limits.memoryWindowBytes, limits.maxMemoryBytes)
        if s.memoryBytes > 2 * window { s.peakSinceTrim = true }
        var i = 0
        while s.memoryBytes > window, i < s.entries.count {
            if s.entries[i].memory != nil, s.entries[i].spooled != nil {
                s.memoryBytes -= s.entries[i].payloadBytes
                s.entries[i].memory = nil
            }
            i += 1
        }
        while s.memoryBytes > limits.maxMemoryBytes {
            guard let i = s.entries.firstIndex(where: { $0.memory != nil && $0.spooled == nil && !$0.writing && !$0.sent }) else { return }
            let e = s.entries.remove(at: i)
            s.memoryBytes -= e.payloadBytes
            s.count(e.events, spoolDirectory == nil ? "queue_full" : "spool_full")
            s.settle(e)
        }
    }

    /// Picks the batches held only in memory that fit the spool, oldest first,
    /// and reserves their room. While writes fail, only the newest is tried.
    private func reserveSpoolWrites(_ s: inout State, all: Bool = false) -> [SpoolWrite] {
        guard let spool else { return [] }
        // Settled records not yet given back (their segment holds others) take room too.
        let dead = spool.deadBytes
        var writes: [SpoolWrite] = []
        var queued = s.queuedBytes
        var skipped = false
        let scanAll = all || s.unspooledBehind
        for i in s.entries.indices.reversed() {
            if s.entries[i].spooled != nil || s.entries[i].writing {
                // Without a batch left behind, everything older is spooled too.
                if scanAll { continue } else { break }
            }
            guard let bytes = s.entries[i].memory else { continue }
            let size = SpoolRecord.headerSize + bytes.count
            guard s.spoolBytes + dead + size <= limits.maxSpoolBytes, all || !s.background || queued + size <= limits.maxSpoolQueueBytes || writes.isEmpty && queued == 0 else {
                skipped = true
                continue
            }
            s.spoolBytes += size
            queued += size
            s.entries[i].writing = true
            s.entries[i].fileBytes = size
            let e = s.entries[i]
            writes.append(SpoolWrite(epoch: e.epoch, sequence: e.sequence, events: e.events, payload: bytes))
            if s.spoolFailing, !all {
                skipped = true
                break
            }
        }
        if scanAll || skipped { s.unspooledBehind = skipped }
        return writes.reversed()
    }

    /// Appends the records (one write, one sync) and records which batches
    /// are now safe on disk.
    private func finishSeal(_ writes: [SpoolWrite]) {
        if let spool, !writes.isEmpty {
            let locations = spool.append(writes.map { SpoolSegments.Record(epoch: $0.epoch, sequence: $0.sequence, events: $0.events, payload: $0.payload) })
            var orphans: [SpoolLocation] = []
            state.withLock { s in
                for (w, location) in zip(writes, locations) {
                    guard let i = s.entries.lastIndex(where: { $0.epoch == w.epoch && $0.sequence == w.sequence }) else {
                        // Acknowledged or dropped while it was being written.
                        s.spoolBytes -= w.recordBytes
                        if let location { orphans.append(location) }
                        continue
                    }
                    s.entries[i].writing = false
                    s.spoolFailing = location == nil
                    if let location {
                        s.entries[i].spooled = location
                        s.madeDurable(i)
                    } else {
                        s.unspooledBehind = true
                        s.spoolBytes -= s.entries[i].fileBytes
                        s.entries[i].fileBytes = 0
                    }
                }
                // Counts carried over from an earlier process are now in a batch on disk.
                if s.carriedFilePresent, zip(writes, locations).contains(where: { $0.1 != nil && $0.0.epoch == epoch }) {
                    if let path = carriedPath { unlink(path) }
                    s.carriedFilePresent = false
                }
                enforceMemoryLimit(&s)
            }
            spool.release(orphans)
        }
        signal()
    }

    // MARK: - Sender side

    /// The oldest batch not yet sent on the current connection, as frame
    /// payload, if fewer than `window` are in flight. Batches that cannot be
    /// sent (too large for the server, unreadable or vanished from the spool)
    /// are dropped, counted, and skipped.
    public func nextToSend(window: Int) -> (epoch: UInt64, sequence: UInt64, payload: [UInt8])? {
        var doomed: [SpoolLocation] = []
        var quarantined: [SpoolLocation] = []
        var writes: [SpoolWrite] = []
        // A record is read outside the lock (the ring-buffer reader takes it
        // for every event), then the choice is made again with what was read.
        var prefetched: (epoch: UInt64, sequence: UInt64, result: Result<[UInt8], DropReason>)?
        var next: (epoch: UInt64, sequence: UInt64, payload: [UInt8])?
        while true {
            var toRead: (location: SpoolLocation, entry: Entry)?
            next = state.withLock { s -> (epoch: UInt64, sequence: UInt64, payload: [UInt8])? in
                var inFlight = 0
                var i = 0
                while i < s.entries.count {
                    if s.entries[i].sent { inFlight += 1; i += 1; continue }
                    guard inFlight < window else { return nil }
                    let e = s.entries[i]
                    var reason: String?
                    var payload = e.memory
                    if payload == nil, let location = e.spooled {
                        guard let p = prefetched, p.epoch == e.epoch, p.sequence == e.sequence else {
                            toRead = (location, e)
                            return nil
                        }
                        switch p.result {
                        case .success(let bytes): payload = bytes
                        case .failure(let why): reason = why.reason
                        }
                    }
                    if reason == nil, exceedsServerLimits(e, s) {
                        // Never sent, so never stored: its events are sealed again within
                        // the limits. Otherwise the server may hold it already, and its
                        // events under new sequences would be stored twice: dropped, counted.
                        if e.epoch == epoch, !e.everSent, let payload, let events = try? EventBatch.decode(payload).events, !events.isEmpty {
                            guard !e.writing, !s.sealing else { return nil }
                            s.entries.remove(at: i)
                            release(e, &s)
                            // Its record (if any) must not come back after a restart beside its parts.
                            if let location = e.spooled { doomed.append(location) }
                            // Its events are accounted for again as the new batches are.
                            if e.accounted, let kinds = e.kinds { s.counters?.account(kinds, negate: true) }
                            sealEvents(events, &s, replacing: (i, e.sequence))
                            writes += handOff(reserveSpoolWrites(&s), &s) ?? []
                            enforceMemoryLimit(&s)
                            continue
                        }
                        reason = "batch_too_large"
                    }
                    guard let payload, reason == nil else {
                        let reason = reason ?? "spool_lost"
                        s.entries.remove(at: i)
                        release(e, &s)
                        if let location = e.spooled {
                            if reason == "spool_corrupt" { quarantined.append(location) } else { doomed.append(location) }
                        }
                        s.count(e.events, reason)
                        s.settle(e)
                        continue
                    }
                    s.entries[i].sent = true
                    s.entries[i].everSent = true
                    return (e.epoch, e.sequence, payload)
                }
                return nil
            }
            guard let (location, entry) = toRead else { break }
            prefetched = (entry.epoch, entry.sequence, spool.map { $0.read(location).mapError { DropReason($0.reason) } } ?? .failure(DropReason("spool_lost")))
        }
        if !writes.isEmpty { finishSeal(writes) }
        // After the parts of a batch sealed again are on disk, when they are written here.
        spool?.release(doomed)
        for location in quarantined { spool?.quarantine(location) }
        return next
    }

    private struct DropReason: Error {
        var reason: String
        init(_ reason: String) { self.reason = reason }
    }

    private func release(_ e: Entry, _ s: inout State) {
        if e.memory != nil { s.memoryBytes -= e.payloadBytes }
        if e.spooled != nil { s.spoolBytes -= e.fileBytes }
    }

    /// The server holds exactly the batch (epoch, sequence) durably.
    public func acknowledge(epoch: UInt64, sequence: UInt64) {
        remove { $0.epoch == epoch && $0.sequence == sequence }
    }

    /// The server holds every batch of `epoch` from 1 through `sequence`
    /// durably (the hello-ack). Meaningful only for this process's epoch:
    /// batches of earlier epochs are resent and acknowledged one by one.
    public func acknowledgePrefix(epoch: UInt64, through sequence: UInt64) {
        guard sequence > 0 else { return }
        remove { $0.epoch == epoch && $0.sequence <= sequence }
    }

    private func remove(where match: (Entry) -> Bool) {
        let (removed, settled) = state.withLock { s -> (Int, [SpoolLocation]) in
            var removed = 0
            var settled: [SpoolLocation] = []
            var i = 0
            while i < s.entries.count {
                guard match(s.entries[i]) else { i += 1; continue }
                let e = s.entries.remove(at: i)
                release(e, &s)
                removed += 1
                if let location = e.spooled { settled.append(location) }
                s.ackedBatches += 1
                s.settle(e)
                if e.sequence > s.durableSequence, let drops = e.drops {
                    s.durableSequence = e.sequence
                    s.counters?.setDurable(drops)
                }
                if e.epoch == epoch, e.sequence > s.ackedSequence, let drops = e.drops {
                    s.ackedSequence = e.sequence
                    s.ackedDrops = drops
                    if s.carriedFilePresent, let path = carriedPath {
                        unlink(path)
                        s.carriedFilePresent = false
                    }
                }
            }
            return (removed, settled)
        }
        spool?.release(settled)
        if removed > 0 { signal() }
    }

    /// A new connection resends everything not yet acknowledged.
    public func markAllUnsent() {
        state.withLock { s in
            for i in s.entries.indices { s.entries[i].sent = false }
        }
    }

    /// Sealed, unacknowledged batches.
    public var unacknowledged: Int { state.withLock { $0.entries.count } }
    /// Events read and not yet in a sealed batch (being sealed included).
    public var pendingEvents: Int { state.withLock { $0.pending.count + $0.sealingEvents } }
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
                  memoryBytes: s.memoryBytes, spoolBytes: s.spoolBytes + (spool?.deadBytes ?? 0),
                  drops: s.drops.map { DropCount(kind: $0.key.kind, reason: $0.key.reason, count: $0.value) }
                      .sorted { ($0.kind.rawValue, $0.reason) < ($1.kind.rawValue, $1.reason) })
        }
    }

    /// At shutdown: writes every unacknowledged batch still held only in
    /// memory to the spool; the batches that do not fit are dropped and their
    /// events counted (`spool_full`). Counts that no batch on disk or
    /// acknowledged carries are saved in the spool's `carried-drops` file for
    /// the next start. Returns how many events were lost (without a spool
    /// directory: every unacknowledged one, its count saved in the state
    /// directory's `carried-drops` when there is one).
    @discardableResult
    public func spoolRemaining() -> Int {
        guard spoolDirectory != nil else {
            return state.withLock { s in
                let lost = s.entries.reduce(0) { $0 + $1.events }
                if lost > 0 { s.count(lost, "queue_full") }
                guard stateDirectory != nil else { return lost }
                for e in s.entries { s.settle(e) }
                s.entries.removeAll()
                s.memoryBytes = 0
                let unreported = unreportedDrops(s)
                if unreported.isEmpty {
                    if s.carriedFilePresent, let path = carriedPath { unlink(path) }
                    s.carriedFilePresent = false
                } else if (try? writeCarriedDrops(unreported)) != nil {
                    s.carriedFilePresent = true
                }
                return lost
            }
        }
        finishSeal(state.withLock { reserveSpoolWrites(&$0, all: true) })
        return state.withLock { s in
            let unsaved = s.entries.filter { $0.spooled == nil }
            s.entries.removeAll { $0.spooled == nil }
            for e in unsaved {
                release(e, &s)
                s.settle(e)
            }
            var lost = unsaved.reduce(0) { $0 + $1.events }
            if lost > 0 { s.count(lost, "spool_full") }
            while true {
                let unreported = unreportedDrops(s)
                if unreported.isEmpty {
                    if s.carriedFilePresent, let path = carriedPath { unlink(path) }
                    s.carriedFilePresent = false
                    break
                }
                do {
                    try writeCarriedDrops(unreported)
                    s.carriedFilePresent = true
                    break
                } catch let error as SpoolError where error.errno == ENOSPC || error.errno == EDQUOT {
                    // A spool too full for even the count: the newest spooled batch
                    // makes room, and its events are counted with the rest.
                } catch {
                    break
                }
                guard let i = s.entries.lastIndex(where: { $0.spooled != nil }) else { break }
                let e = s.entries.remove(at: i)
                release(e, &s)
                if let location = e.spooled { spool?.releaseFreeing(location) }
                lost += e.events
                s.count(e.events, "spool_full")
            }
            return lost
        }
    }

    /// At a clean stop, after `spoolRemaining`: everything read is on disk or
    /// counted, so the crash counters are removed (the next start has
    /// nothing to recover). Returns the events read and not accounted for,
    /// per kind: none, unless the accounting has a gap (worth a warning).
    @discardableResult
    public func closeCrashCounters() -> [EventKind: UInt64] {
        state.withLock { s in
            guard let counters = s.counters else { return [:] }
            counters.sync()
            let killed = CrashCounters.load(path: counters.path)?.killed ?? [:]
            counters.remove()
            s.counters = nil
            return killed
        }
    }

    /// Counts no batch carries that is acknowledged or on disk (and so will
    /// reach the server): the counters now, less those of the newest such batch.
    private func unreportedDrops(_ s: State) -> [DropKey: UInt64] {
        var reported = s.ackedDrops
        if let newest = s.entries.last(where: { $0.epoch == epoch && $0.spooled != nil && $0.drops != nil }), newest.sequence > s.ackedSequence {
            reported = newest.drops!
        }
        var unreported: [DropKey: UInt64] = [:]
        for (key, count) in s.drops where count > reported[key, default: 0] { unreported[key] = count - reported[key, default: 0] }
        return unreported
    }

    /// The encoded batches held now, oldest first (for tests and diagnostics).
    public func sealedPayloadsForTesting() -> [[UInt8]] {
        state.withLock { s in
            s.entries.compactMap { e in
                if let b = e.memory { return b }
                guard let location = e.spooled else { return nil }
                return try? spool?.read(location).get()
            }
        }
    }

    /// Acknowledges exactly one batch as a server would (for tests that read batches themselves).
    public func acknowledgeForTesting(epoch: UInt64, sequence: UInt64) {
        acknowledge(epoch: epoch, sequence: sequence)
    }

    // MARK: - Files

    /// Counts carried over from an earlier process: one `kind reason count` line each.
    private func readCarriedDrops() -> [DropKey: UInt64] {
        guard let path = carriedPath, let text = ProcFile.text(path) else { return [:] }
        var drops: [DropKey: UInt64] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            guard parts.count == 3, let raw = UInt32(parts[0]), let kind = EventKind(rawValue: raw), let count = UInt64(parts[2]) else { continue }
            let key = DropKey(kind: kind, reason: String(parts[1]))
            drops[key] = saturatingAdd(drops[key, default: 0], count)
        }
        return drops
    }

    private func writeCarriedDrops(_ drops: [DropKey: UInt64]) throws {
        guard let path = carriedPath else { return }
        let text = drops.sorted { ($0.key.kind.rawValue, $0.key.reason) < ($1.key.kind.rawValue, $1.key.reason) }
            .map { "\($0.key.kind.rawValue) \($0.key.reason) \($0.value)\n" }.joined()
        try writeFileDurably(path, Array(text.utf8))
    }

    /// After a backlog has drained, hands the heap's free memory back to the
    /// system (glibc keeps it otherwise, and the RSS stays at its peak).
    private func trimHeapIfDrained() {
        let (trim, now) = state.withLock { s -> (Bool, Int64) in
            let now = monotonicNs()
            let idle = s.memoryBytes <= min(limits.memoryWindowBytes, limits.maxMemoryBytes) && s.queued.isEmpty
            return (idle && s.peakSinceTrim && now - s.lastTrimNs >= 5_000_000_000, now)
        }
        guard trim else { return }
        _ = heapTrim(0)
        state.withLock { s in
            s.peakSinceTrim = false
            s.lastTrimNs = now
        }
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

/// Events read and not sealed yet, oldest first, in the groups they came
/// in: a group the ring-buffer reader hands over (`Outbox.add(contentsOf:)`,
/// a batch's worth) is kept as it is, and one that makes a whole batch is
/// sealed as it is, without a copy of each event. Single events
/// (`Outbox.add`) go into a group of their own kind.
struct PendingEvents {
    private var groups: [[TapioEvent]] = []
    /// The last group takes single events (it is not a handed-over group).
    private var lastOpen = false
    private(set) var count = 0

    var isEmpty: Bool { count == 0 }
    /// The oldest pending event's time (no group is ever empty).
    var firstTimeNs: Int64? { groups.first?.first?.timeNs }

    mutating func append(_ event: TapioEvent) {
        if !lastOpen || groups.isEmpty {
            groups.append([])
            lastOpen = true
        }
        groups[groups.count - 1].append(event)
        count += 1
    }

    /// Takes the group over (`group` is left empty).
    mutating func append(group: inout [TapioEvent]) {
        guard !group.isEmpty else { return }
        count += group.count
        groups.append(group)
        group = []
        lastOpen = false
    }

    /// Takes the oldest events as batches of `perBatch` events: whole
    /// batches only, unless `all` (then the last batch may hold fewer). A
    /// group that is a batch on its own, where a batch starts, is taken as
    /// it is; other events are copied into their batch. The rest stays.
    mutating func takeBatches(perBatch: Int, all: Bool) -> [[TapioEvent]] {
        let per = max(1, perBatch)
        var left = all ? count : count - count % per
        guard left > 0 else { return [] }
        count -= left
        var batches: [[TapioEvent]] = []
        var current: [TapioEvent] = []
        var taken = 0
        var rest: [TapioEvent] = []
        while taken < groups.count, left > 0 {
            let group = groups[taken]
            taken += 1
            if current.isEmpty, group.count <= left, group.count == per || group.count == left && group.count < per {
                batches.append(group)
                left -= group.count
                continue
            }
            var i = 0
            while i < group.count, left > 0 {
                if current.isEmpty { current.reserveCapacity(min(per, left)) }
                current.append(group[i])
                i += 1
                left -= 1
                if current.count == per {
                    batches.append(current)
                    current = []
                }
            }
            if i < group.count { rest = Array(group[i...]) }
        }
        if !current.isEmpty { batches.append(current) }
        groups.removeFirst(taken)
        if !rest.isEmpty {
            groups.insert(rest, at: 0)
            if groups.count == 1 { lastOpen = false }
        }
        if groups.isEmpty { lastOpen = false }
        return batches
    }
}

/// The crash counters as `Outbox.countRead` reaches them without the
/// outbox's lock: set once in the outbox's init, before any reader runs,
/// never changed after (counting is an atomic add into the mapped file).
private final class ReadTally: @unchecked Sendable {
    var counters: CrashCounters?
}

/// glibc's malloc_trim (in <malloc.h>, which the Glibc module leaves out).
@_silgen_name("malloc_trim")
private func heapTrim(_ pad: Int) -> Int32

private func saturatingAdd(_ a: UInt64, _ b: UInt64) -> UInt64 {
    let (sum, overflow) = a.addingReportingOverflow(b)
    return overflow ? .max : sum
}
