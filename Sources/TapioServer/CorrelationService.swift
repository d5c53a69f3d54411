import Foundation
import Logging
import NIOPosix
import Synchronization
import TapioCorrelation
import TapioStore
import TapioWire

/// Where the engine's incidents are kept as documents beside it: the event
/// store's table in role `all`, the replica's incident board (mirrored to a
/// JetStream KV bucket) in role `correlate`. Queries read incidents the
/// engine no longer holds from here.
public protocol IncidentArchive: Sendable {
    /// Upserts an incident as the engine last described it.
    func saveIncident(_ incident: StoredIncident) throws
    /// Every incident kept, oldest first.
    func incidents() throws -> [StoredIncident]
}

/// The event store's incident table as the archive (role `all`).
struct StoreIncidentArchive: IncidentArchive {
    let store: any EventStore
    func saveIncident(_ incident: StoredIncident) throws { try store.saveIncident(incident) }
    func incidents() throws -> [StoredIncident] { try store.incidents() }
}

/// The correlation engine inside the server, on its own thread
/// (`tapio-engine`). Ingest hands it every durable batch (events placed
/// on the server's clock, with the clock correction they were stored with)
/// and every inventory through a bounded queue and never waits for it: the
/// thread takes from the queue, and every 250 ms processes events up to the
/// watermark and persists the incidents that changed. When the queue holds
/// `queueEvents` events, `submit` says so and the connection that fed it
/// stops reading (backpressure: its agent keeps the batches, in memory and
/// then in its spool) until the engine has taken the queue below half.
/// The engine takes nothing while `maxPendingEvents` events wait in it for
/// the watermark, so the queue's bound holds for what the engine holds too.
/// Nothing is dropped. At start the engine replays the recent log, so a
/// restart loses no incident state that the log can rebuild; older incidents
/// come back from the store.
public final class CorrelationService: Sendable {
    public struct Configuration: Sendable {
        public var engine = CorrelationConfiguration()
        /// How much of the stored log is replayed at start.
        public var replayWindowNs: Int64 = 3_600_000_000_000
        /// Events queued for the engine (acknowledged, not yet taken by its
        /// thread) at which connections stop reading. About 60 MiB at the
        /// default; each connection may add at most its window on top.
        public var queueEvents = 262_144
        /// Events the engine holds waiting for its watermark (the last
        /// allowed lateness of every node's events) at which its thread
        /// stops taking from the queue until a pass has processed some: the
        /// queue then fills and connections stop reading. Without it a burst
        /// the store takes faster than the engine processes (a backlog
        /// draining, a start under load) waits in the engine unbounded: 1.7
        /// million events and 720 MiB measured. It caps the engine at about
        /// this many events per allowed lateness (786 432 / 1.5 s ≈ 520 000
        /// events/s), above what it processes today.
        public var maxPendingEvents = 786_432
        /// How often the engine processes events up to its watermark.
        public var tickIntervalNs: Int64 = 250_000_000
        /// Where the engine's checkpoint is kept (nil: none; the server
        /// uses `<data-dir>/engine.checkpoint`), and how often it is taken:
        /// every `checkpointIntervalNs`, and sooner once the engine has
        /// taken `checkpointEveryEvents` events since the last one. A start
        /// after a crash replays what came after the checkpoint, so the
        /// count bounds that replay whatever the rate.
        public var checkpointPath: String?
        public var checkpointIntervalNs: Int64 = 10_000_000_000
        public var checkpointEveryEvents = 1_000_000
        public init() {}
    }

    /// Held by the engine's thread while it takes a batch or makes a pass,
    /// and by queries; never by ingest.
    private let engine: Mutex<CorrelationEngine>
    private let feed: EngineFeed
    /// The engine's statistics as of its last batch or pass, for /metrics
    /// without waiting for a pass.
    private let published = Mutex(CorrelationEngine.Statistics())
    private let persisted = Mutex<[String: Int64]>([:])  // id → updatedNs stored
    /// Open incidents by the kind of their leading root cause ("unknown":
    /// none yet), as of the last pass, for /metrics.
    private let openByCause = Mutex<[String: Int]>([:])
    private let thread = Mutex<(started: Bool, done: DispatchSemaphore?)>((false, nil))
    /// Told the incidents that changed after every pass (their JSON as
    /// stored), on the engine's thread: it must hand them on, not wait.
    private let observer = Mutex<(@Sendable ([JSONValue]) -> Void)?>(nil)
    /// Told the incidents that changed after every pass, as the model, with
    /// whether each is new (never persisted before): the query
    /// subscriptions. On the engine's thread; they must not wait.
    private let changeObservers = Mutex<[@Sendable ([IncidentChange]) -> Void]>([])
    /// The local log the engine is restored from (role `all`); nil in role
    /// `correlate`, where the stream is the log and `adopt` restores.
    private let store: (any EventStore)?
    private let archive: any IncidentArchive
    private let logger: Logger
    public let configuration: Configuration
    /// The log position (store batch id) of the last batch the engine took:
    /// batches reach the engine in log order (`submit` from the storage
    /// thread), so everything up to it is in the engine's state.
    private let position = Mutex<Int64>(0)
    /// Batches taken whose events may still wait in the engine for the
    /// watermark; a checkpoint leaves those events out, and a restore takes
    /// them from the log again (`WaitingBatches`). Changed on the engine's
    /// thread (and by `restore`/`adopt` before it starts).
    private let waiting = Mutex(WaitingBatches())
    /// After adopting a checkpoint that left waiting events out: what the
    /// stream delivers again of the batches taken before it (`ReplaySkip`).
    private let replaySkip = Mutex<ReplaySkip?>(nil)
    /// Checkpoints asked for from other threads (role `correlate`), taken by
    /// the engine's thread right after its next pass.
    private let checkpointRequests = Mutex<[CheckedContinuation<(copy: CorrelationEngine, position: Int64, resumeAfter: Int64), Never>]>([])
    /// How the last `restore` went: from the checkpoint or the log, and how
    /// many batches of the log it replayed.
    public var lastRestore: (source: String, batchesReplayed: Int) { restored.withLock { $0 } }
    private let restored = Mutex<(source: String, batchesReplayed: Int)>(("none", 0))
    /// One checkpoint written at a time, off the engine's thread.
    private let checkpointing = Mutex(false)
    private let checkpointQueue = DispatchQueue(label: "tapio-checkpoint")

    public init(configuration: Configuration, store: any EventStore, logger: Logger) {
        self.configuration = configuration
        self.store = store
        self.archive = StoreIncidentArchive(store: store)
        self.logger = logger
        engine = Mutex(CorrelationEngine(configuration: configuration.engine))
        feed = EngineFeed(capacity: max(1, configuration.queueEvents))
    }

    /// Without a local log (role `correlate`): incidents are kept in
    /// `archive`, the engine starts empty or from `adopt(checkpoint:)`.
    public init(configuration: Configuration, archive: any IncidentArchive, logger: Logger) {
        self.configuration = configuration
        self.store = nil
        self.archive = archive
        self.logger = logger
        engine = Mutex(CorrelationEngine(configuration: configuration.engine))
        feed = EngineFeed(capacity: max(1, configuration.queueEvents))
    }

    /// Rebuilds the engine: from its checkpoint and the log after it when
    /// there is one (docs/storage.md, "Engine checkpoints"), else from the
    /// last `replayWindowNs` of the log.
    public func restore(nowNs: Int64, maxFutureSkewNs: Int64 = CorrelationService.defaultMaxFutureSkewNs) throws {
        guard let store else {
            try rememberArchived()
            return
        }
        var replayed = 0
        var from = "log"
        if let restored = loadCheckpoint() {
            var e = restored.engine
            // Inventories that changed after the checkpoint.
            var byNode: [String: [PodInfo]] = [:]
            for p in try store.pods() { byNode[p.node, default: []].append(p) }
            for node in byNode.keys.sorted() { e.updateInventory(node: node, pods: byNode[node]!) }
            var after = restored.resumeAfter
            var waits = WaitingBatches()
            let skip = ReplaySkip(resumeAfter: restored.resumeAfter, lastTaken: restored.lastTaken, watermarkNs: e.watermarkNs)
            while true {
                let page = try store.batches(afterId: after, limit: 2000)
                for r in page {
                    var events = Self.observed(r.batch, clock: r.clock, receivedNs: r.receivedNs, maxFutureSkewNs: maxFutureSkewNs).events
                    skip?.removeProcessed(from: &events, position: r.id)
                    e.ingest(events)
                    waits.taken(position: r.id, events: events)
                    after = r.id
                }
                replayed += page.count
                if page.count < 2000 { break }
            }
            e.advance(toNs: nowNs)
            waits.passed(watermarkNs: e.watermarkNs)
            let statistics = e.statistics
            engine.withLock { $0 = e }
            waiting.withLock { $0 = waits }
            position.withLock { $0 = max(after, restored.lastTaken) }
            published.withLock { $0 = statistics }
            from = "checkpoint"
        } else {
            let log = try EventLog.load(store: store, sinceNs: nowNs - configuration.replayWindowNs, maxFutureSkewNs: maxFutureSkewNs)
            let statistics = engine.withLock { e in
                log.feed(&e)
                e.advance(toNs: nowNs)
                return e.statistics
            }
            // Which batches hold the events still waiting is not kept here:
            // until they pass the watermark a checkpoint resumes from the
            // log's start (and skips what the engine already processed).
            if statistics.pending > 0 {
                waiting.withLock { $0.taken(position: 1, newestNs: nowNs &+ max(0, maxFutureSkewNs)) }
            }
            position.withLock { $0 = max($0, log.lastBatchId) }
            published.withLock { $0 = statistics }
            replayed = log.batches
        }
        try rememberArchived()
        restored.withLock { $0 = (from, replayed) }
        logger.info("correlation engine restored", metadata: ["from": "\(from)", "batches_replayed": "\(replayed)"])
    }

    /// The archive's incidents count as persisted as they are: a pass saves
    /// only those that change after this.
    private func rememberArchived() throws {
        for (id, updated) in try archive.incidents().map({ ($0.id, $0.updatedNs) }) {
            persisted.withLock { $0[id] = updated }
        }
    }

    /// Takes a checkpoint (`checkpointPosition`'s form: position, then the
    /// engine's state) as the engine's state before `start` (role
    /// `correlate`: the newest checkpoint in JetStream), advances it to
    /// `nowNs`, and returns its position: the engine continues after it.
    @discardableResult
    public func adopt(checkpoint bytes: [UInt8], nowNs: Int64) throws -> Int64 {
        guard let parts = Self.checkpointParts(bytes) else { throw CheckpointFile.Damaged(description: "checkpoint too short (\(bytes.count) bytes)") }
        var e = try CorrelationEngine(checkpoint: Array(parts.state), configuration: configuration.engine)
        let watermarkNs = e.watermarkNs
        e.advance(toNs: nowNs)
        let statistics = e.statistics
        engine.withLock { $0 = e }
        let at = parts.resumeAfter
        position.withLock { $0 = at }
        // The stream delivers again from `at + 1`: of the batches up to the
        // last one taken, only events after the watermark are fed.
        replaySkip.withLock { $0 = ReplaySkip(resumeAfter: at, lastTaken: parts.lastTaken, watermarkNs: watermarkNs) }
        waiting.withLock { $0 = WaitingBatches() }
        published.withLock { $0 = statistics }
        try rememberArchived()
        restored.withLock { $0 = ("checkpoint", 0) }
        return at
    }

    /// The engine's state with the position to resume after, in
    /// `checkpointParts`' form: a copy taken right after a pass (by the
    /// engine's thread when it runs, at its next pass), encoded on the
    /// caller's thread.
    public func checkpointBytes() async throws -> (position: Int64, bytes: [UInt8]) {
        let taken = await withCheckedContinuation { c in
            // Asked under the thread's lock, so that `stop` answers every
            // request it did not see the thread answer.
            let queued = thread.withLock { t -> Bool in
                guard t.done != nil else { return false }
                checkpointRequests.withLock { $0.append(c) }
                return true
            }
            if !queued { c.resume(returning: checkpointCopy()) }
        }
        return (taken.resumeAfter, Self.positioned(resumeAfter: taken.resumeAfter, lastTaken: taken.position,
                                                   try taken.copy.checkpoint(omittingPending: true)))
    }

    /// The engine, the last position it took and the position a restore
    /// resumes after (before the oldest batch whose events still wait).
    /// Only right after a pass: then every event that waits is one taken
    /// so far and dated after the watermark.
    private func checkpointCopy() -> (copy: CorrelationEngine, position: Int64, resumeAfter: Int64) {
        engine.withLock { e in
            let at = position.withLock { $0 }
            return (e, at, waiting.withLock { $0.resumeAfter(lastTaken: at) })
        }
    }

    /// Answers the checkpoints asked for since the last pass; on the
    /// engine's thread, right after a pass.
    private func answerCheckpointRequests() {
        let asked = checkpointRequests.withLock { r -> [CheckedContinuation<(copy: CorrelationEngine, position: Int64, resumeAfter: Int64), Never>] in
            defer { r.removeAll() }
            return r
        }
        guard !asked.isEmpty else { return }
        let taken = checkpointCopy()
        for c in asked { c.resume(returning: taken) }
    }

    /// The position of the last batch the engine took (a store batch id in
    /// role `all`, a stream sequence in role `correlate`).
    public var logPosition: Int64 { position.withLock { $0 } }

    /// A checkpoint: the position a restore resumes after (8 bytes,
    /// little-endian); when the engine had taken batches after it (their
    /// waiting events are left out of the state), `skipMarker` and the last
    /// position taken; then the engine's state.
    static func positioned(resumeAfter: Int64, lastTaken: Int64, _ state: [UInt8]) -> [UInt8] {
        func le(_ v: Int64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * Int64($0))) } }
        return le(resumeAfter) + (lastTaken > resumeAfter ? skipMarker + le(lastTaken) : []) + state
    }

    static let skipMarker = Array("TAPSKIP1".utf8)

    /// A checkpoint's log position, the one a restore resumes after: its
    /// first 8 bytes, little-endian; nil when there is nothing after them.
    public static func checkpointPosition(_ bytes: [UInt8]) -> Int64? {
        checkpointParts(bytes)?.resumeAfter
    }

    /// `positioned`'s parts. A checkpoint of before waiting events were left
    /// out has no marker: the engine took nothing after its position.
    static func checkpointParts(_ bytes: [UInt8]) -> (resumeAfter: Int64, lastTaken: Int64, state: ArraySlice<UInt8>)? {
        func le(_ from: Int) -> Int64 { bytes[from..<from + 8].enumerated().reduce(Int64(0)) { $0 | Int64($1.element) << (8 * Int64($1.offset)) } }
        guard bytes.count > 8 else { return nil }
        let resumeAfter = le(0)
        if bytes.count > 24, Array(bytes[8..<16]) == skipMarker {
            return (resumeAfter, max(resumeAfter, le(16)), bytes[24...])
        }
        return (resumeAfter, resumeAfter, bytes[8...])
    }

    /// The checkpoint's engine and log position; nil (and a warning) when
    /// there is none or it cannot be used.
    private func loadCheckpoint() -> (engine: CorrelationEngine, resumeAfter: Int64, lastTaken: Int64)? {
        guard let path = configuration.checkpointPath else { return nil }
        do {
            guard let bytes = try CheckpointFile.read(path) else { return nil }
            guard let parts = Self.checkpointParts(bytes) else { throw CheckpointFile.Damaged(description: "\(path): too short") }
            let engine = try CorrelationEngine(checkpoint: Array(parts.state), configuration: configuration.engine)
            return (engine, parts.resumeAfter, parts.lastTaken)
        } catch {
            logger.warning("engine checkpoint not used; replaying the recent log instead", metadata: ["error": "\(error)"])
            return nil
        }
    }

    /// Writes the engine's state and log position, taken now on the
    /// caller's thread (a copy: the engine is a value), encoded and written
    /// on the checkpoint queue; skipped (false) while the previous one is
    /// written. `wait`: after the previous one, on the caller's thread, at stop. Only right after a pass
    /// (`checkpointCopy`).
    @discardableResult
    func checkpoint(wait: Bool = false) -> Bool {
        guard let path = configuration.checkpointPath else { return false }
        // At stop, the one being written finishes first and this one follows.
        if wait { checkpointQueue.sync {} }
        let free = checkpointing.withLock { busy -> Bool in
            if busy { return false }
            busy = true
            return true
        }
        guard free else { return false }
        let (copy, at, resumeAfter) = checkpointCopy()
        let logger = self.logger
        let work: @Sendable () -> Void = { [self] in
            defer { checkpointing.withLock { $0 = false } }
            do {
                let started = monotonicNs()
                let bytes = Self.positioned(resumeAfter: resumeAfter, lastTaken: at, try copy.checkpoint(omittingPending: true))
                let written = try CheckpointFile.write(bytes, to: path)
                logger.info("engine checkpoint written", metadata: [
                    "position": "\(at)", "resume_after": "\(resumeAfter)", "bytes": "\(written)",
                    "seconds": "\(Double(monotonicNs() - started) / 1e9)"])
            } catch {
                logger.error("engine checkpoint failed", metadata: ["error": "\(error)"])
            }
        }
        if wait { checkpointQueue.sync(execute: work) } else { checkpointQueue.async(execute: work) }
        return true
    }

    /// The drop reason under which events dated too far ahead are counted.
    public static let futureDropReason = "future_time"
    public static let defaultMaxFutureSkewNs = ServerConfiguration.Limits().maxFutureSkew.nanoseconds

    /// Whether an event, placed on the server's clock, is dated more than
    /// `maxFutureSkewNs` after the batch arrived. Such an event would wait in
    /// the engine for its watermark for as long as it claims, costing memory
    /// and CPU (and, dated decades ahead, forever): it is stored, not
    /// correlated, and counted.
    @inline(__always)
    static func isFuture(_ event: TapioEvent, clock: ClockCorrection, receivedNs: Int64, maxFutureSkewNs: Int64) -> Bool {
        (event.timeNs &- clock.offsetNs) > receivedNs &+ maxFutureSkewNs
    }

    /// The events of a batch as the engine sees them: placed on the server's
    /// clock once, without those dated too far ahead of their arrival, and
    /// how many were left out for that.
    static func observed(_ batch: EventBatch, clock: ClockCorrection, receivedNs: Int64,
                         maxFutureSkewNs: Int64) -> (events: [ObservedEvent], future: Int) {
        var out: [ObservedEvent] = []
        out.reserveCapacity(batch.events.count)
        for e in batch.events where !isFuture(e, clock: clock, receivedNs: receivedNs, maxFutureSkewNs: maxFutureSkewNs) {
            out.append(ObservedEvent(node: batch.node, agentEvent: e, clockOffsetNs: clock.offsetNs, clockErrorNs: clock.errorNs))
        }
        return (out, batch.events.count - out.count)
    }

    /// Queues events (from `observed`) for the engine's thread; never waits.
    /// Returns false when the queue is full: the caller stops reading, and
    /// `onRoom` is called (on the engine's thread) once the queue is below
    /// half. The events are queued either way.
    public func submit(_ events: [ObservedEvent], onRoom: @escaping @Sendable () -> Void) -> Bool {
        feed.push(.events(events, batchId: 0), onRoom: onRoom)
    }

    /// Queues a stored batch's events with its log position; on the storage
    /// thread, in log order. Returns false when the queue is full: the
    /// connection then stops reading and asks `whenRoom`.
    func submit(_ events: [ObservedEvent], batchId: Int64) -> Bool {
        feed.push(.events(events, batchId: batchId), onRoom: nil)
    }

    /// `onRoom` once the queue is below half (at once if it is now).
    func whenRoom(_ onRoom: @escaping @Sendable () -> Void) {
        feed.whenRoom(onRoom)
    }

    /// Queues a node's inventory for the engine, in line with its events.
    public func updateInventory(node: String, pods: [TapioWire.PodInfo]) {
        _ = feed.push(.inventory(node: node, pods: pods), onRoom: nil)
    }

    /// Events queued for the engine and not yet ingested by it.
    public var queueDepth: Int { feed.depth }

    /// Starts the engine's thread; `onPass` is called after every pass.
    public func start(onPass: @escaping @Sendable () -> Void = {}) {
        let done = DispatchSemaphore(value: 0)
        let go = thread.withLock { t -> Bool in
            guard !t.started else { return false }
            t = (true, done)
            return true
        }
        guard go else { return }
        let t = Thread { [self] in
            // At most 15 bytes, or Linux keeps the process's name.
            Thread.current.name = "tapio-engine"
            run(onPass: onPass)
            done.signal()
        }
        t.start()
    }

    /// Lets the engine take everything queued, makes a last pass and ends its thread.
    public func stop() {
        guard let done = thread.withLock({ $0.done }) else {
            tick(nowNs: wallClockNs())
            return
        }
        feed.stop()
        done.wait()
        thread.withLock { $0.done = nil }
        answerCheckpointRequests()
    }

    private func run(onPass: @Sendable () -> Void) {
        let interval = configuration.tickIntervalNs
        var nextPass = monotonicNs() + interval
        var nextCheckpoint = monotonicNs() + configuration.checkpointIntervalNs
        var takenSinceCheckpoint = 0
        while true {
            // Full of events waiting for the watermark: only the next pass makes room.
            let full = published.withLock { $0.pending } >= configuration.maxPendingEvents
            let (items, stopping) = full ? feed.wait(untilMonotonicNs: nextPass) : feed.take(untilMonotonicNs: nextPass)
            for item in items {
                switch item {
                case .events(var events, let batchId):
                    let count = events.count
                    if batchId > 0, let skip = replaySkip.withLock({ $0 }) {
                        if batchId <= skip.throughPosition {
                            skip.removeProcessed(from: &events, position: batchId)
                        } else {
                            replaySkip.withLock { $0 = nil }
                        }
                    }
                    let s = engine.withLock { e in
                        e.ingest(events)
                        if batchId > 0 {
                            position.withLock { $0 = max($0, batchId) }
                            waiting.withLock { $0.taken(position: batchId, events: events) }
                        }
                        return e.statistics
                    }
                    published.withLock { $0 = s }
                    feed.taken(events: count)
                    takenSinceCheckpoint &+= count
                case .inventory(let node, let pods):
                    engine.withLock { $0.updateInventory(node: node, pods: pods) }
                }
            }
            if stopping && items.isEmpty { break }
            let now = monotonicNs()
            if now >= nextPass {
                tick(nowNs: wallClockNs())
                answerCheckpointRequests()
                onPass()
                nextPass = max(nextPass + interval, monotonicNs())
                // One still being written is not waited for: the next pass tries again.
                if now >= nextCheckpoint || takenSinceCheckpoint >= configuration.checkpointEveryEvents, checkpoint() {
                    nextCheckpoint = now + configuration.checkpointIntervalNs
                    takenSinceCheckpoint = 0
                }
            }
        }
        tick(nowNs: wallClockNs())
        answerCheckpointRequests()
        // The next start reads this one and replays only the batches whose
        // events still wait for the watermark.
        checkpoint(wait: true)
    }

    /// Advances the engine to `nowNs` and persists the incidents that
    /// changed. On the engine's thread (or at stop, after it ended).
    func tick(nowNs: Int64) {
        let (incidents, statistics) = engine.withLock { e in
            e.advance(toNs: nowNs)
            waiting.withLock { $0.passed(watermarkNs: e.watermarkNs) }
            return (e.incidents, e.statistics)
        }
        published.withLock { $0 = statistics }
        openByCause.withLock { $0 = Dictionary(grouping: incidents.filter { $0.status == .open }) { $0.rootCauses.first?.kind.rawValue ?? "unknown" }.mapValues(\.count) }
        let changed = incidents.filter { i in persisted.withLock { $0[i.id] != i.updatedNs } }
        var changedJSON: [JSONValue] = []
        let changes = changed.map { i in IncidentChange(incident: i, isNew: persisted.withLock { $0[i.id] == nil }) }
        for i in changed {
            let json = i.explainJSON(weights: configuration.engine.weights)
            changedJSON.append(json)
            do {
                try archive.saveIncident(StoredIncident(id: i.id, status: i.status.rawValue, openedNs: i.openedNs, updatedNs: i.updatedNs,
                                                      json: json.serialized()))
                persisted.withLock { $0[i.id] = i.updatedNs }
            } catch {
                logger.error("saving an incident failed", metadata: ["incident": "\(i.id)", "error": "\(error)"])
            }
        }
        // Told whether or not the save worked: an alert matters most when the store fails.
        if !changedJSON.isEmpty, let observer = observer.withLock({ $0 }) { observer(changedJSON) }
        if !changes.isEmpty { for o in changeObservers.withLock({ $0 }) { o(changes) } }
    }

    /// An incident that changed in a pass; `isNew`: the first time it is persisted (it opened).
    public struct IncidentChange: Sendable {
        public var incident: Incident
        public var isNew: Bool
    }

    /// `observer` is told the incidents that changed after every pass, on
    /// the engine's thread (it must only hand them on). Any number may observe.
    public func observeChanges(_ observer: @escaping @Sendable ([IncidentChange]) -> Void) {
        changeObservers.withLock { $0.append(observer) }
    }

    /// The live incidents the engine holds, then stored ones it no longer holds.
    func incidentModels(status: Incident.Status?, sinceNs: Int64?) throws -> (live: [Incident], stored: [StoredIncident]) {
        let live = engine.withLock { $0.incidents(status: status, sinceNs: sinceNs) }
        let liveIds = Set(live.map(\.id))
        let stored = try archive.incidents().filter { s in
            !liveIds.contains(s.id) && (status == nil || s.status == status!.rawValue) && (sinceNs == nil || s.updatedNs >= sinceNs!)
        }
        return (live, stored)
    }

    /// The live incident `id`, or the store's document of it.
    func incidentModel(id: String) throws -> (live: Incident?, stored: StoredIncident?) {
        if let i = engine.withLock({ $0.incident(id: id) }) { return (i, nil) }
        return (nil, try archive.incidents().first { $0.id == id })
    }

    /// The dependency graph as the engine holds it now.
    var graph: DependencyGraph { engine.withLock { $0.graph } }

    /// The `incidents` answer: live incidents from the engine, then stored ones
    /// it no longer holds (older than the replay window).
    public func incidentsJSON(status: String?, sinceNs: Int64?) throws -> JSONValue {
        let wanted = status.flatMap(Incident.Status.init(rawValue:))
        let live = engine.withLock { $0.incidents(status: wanted, sinceNs: sinceNs) }
        var out = live.map { $0.toJSON() }
        let liveIds = Set(live.map(\.id))
        for s in try archive.incidents() where !liveIds.contains(s.id) {
            guard wanted == nil || s.status == wanted!.rawValue, sinceNs == nil || s.updatedNs >= sinceNs! else { continue }
            if case .object(var o)? = try? JSONValue.parse(Array(s.json.utf8)) {
                o.removeValue(forKey: "timeline")
                o.removeValue(forKey: "links")
                out.append(.object(o))
            }
        }
        return .object(["incidents": .array(out)])
    }

    /// One incident with its timeline (`explain`: also every link's factors and the weights).
    public func incidentJSON(id: String, explain: Bool) throws -> JSONValue? {
        if let i = engine.withLock({ $0.incident(id: id) }) {
            return explain ? i.explainJSON(weights: configuration.engine.weights) : i.timelineJSON()
        }
        guard let s = try archive.incidents().first(where: { $0.id == id }) else { return nil }
        return try JSONValue.parse(Array(s.json.utf8))
    }

    /// `observer` is told the incidents that changed after every pass (their
    /// JSON as stored), on the engine's thread: it must not wait (the alert
    /// notifier only queues them). Set before `start`.
    public func observeIncidents(_ observer: @escaping @Sendable ([JSONValue]) -> Void) {
        self.observer.withLock { $0 = observer }
    }

    /// The open incidents the engine holds now, as stored (after `restore`:
    /// those a previous run announced).
    public func openIncidentsJSON() -> [JSONValue] {
        let weights = configuration.engine.weights
        return engine.withLock { $0.incidents(status: .open, sinceNs: nil) }.map { $0.explainJSON(weights: weights) }
    }

    public func servicesJSON() -> JSONValue {
        engine.withLock { $0.graph.toJSON() }
    }

    /// Open incidents by the kind of their leading root cause ("unknown": none yet).
    public var openIncidentsByRootCause: [String: Int] { openByCause.withLock { $0 } }

    public var statistics: CorrelationEngine.Statistics {
        published.withLock { $0 }
    }
}

/// The queue between ingest and the engine's thread. Bounded softly: a push
/// is never refused (the batch is durable and acknowledged, and the engine
/// must see it), but one that finds `capacity` events queued returns false
/// and keeps `onRoom` until the engine has taken the queue below half; the
/// caller stops reading meanwhile, so the queue grows past `capacity` by at
/// most what connections already had in flight.
final class EngineFeed: @unchecked Sendable {
    enum Item {
        /// A stored batch's events with its log position (0: not from the log).
        case events([ObservedEvent], batchId: Int64)
        case inventory(node: String, pods: [PodInfo])
    }

    let capacity: Int
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var items: [Item] = []
    /// Events pushed and not yet ingested by the engine (queued or taken).
    private var queued = 0
    private var waiters: [@Sendable () -> Void] = []
    private var stopping = false

    init(capacity: Int) {
        self.capacity = capacity
    }

    func push(_ item: Item, onRoom: (@Sendable () -> Void)?) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        items.append(item)
        if case .events(let e, _) = item { queued += e.count }
        condition.signal()
        guard queued >= capacity else { return true }
        if let onRoom { waiters.append(onRoom) }
        return false
    }

    /// `onRoom` once the queue is at or below half, now if it is.
    func whenRoom(_ onRoom: @escaping @Sendable () -> Void) {
        condition.lock()
        guard queued > capacity / 2 else {
            condition.unlock()
            onRoom()
            return
        }
        waiters.append(onRoom)
        condition.unlock()
    }

    /// Everything queued, waiting until something is or the deadline passes
    /// (or the feed stops).
    func take(untilMonotonicNs deadline: Int64) -> (items: [Item], stopping: Bool) {
        condition.lock()
        defer { condition.unlock() }
        while items.isEmpty && !stopping {
            let left = deadline - monotonicNs()
            if left <= 0 { break }
            _ = condition.wait(until: Date(timeIntervalSinceNow: Double(left) / 1e9))
        }
        let taken = items
        items.removeAll(keepingCapacity: true)
        return (taken, stopping)
    }

    /// Nothing taken: waits for the deadline, for an engine that holds as
    /// many events as it may. Once the feed stops, everything queued is
    /// taken (the engine sees every event before it ends).
    func wait(untilMonotonicNs deadline: Int64) -> (items: [Item], stopping: Bool) {
        condition.lock()
        defer { condition.unlock() }
        while !stopping {
            let left = deadline - monotonicNs()
            if left <= 0 { break }
            _ = condition.wait(until: Date(timeIntervalSinceNow: Double(left) / 1e9))
        }
        guard stopping else { return ([], false) }
        let taken = items
        items.removeAll(keepingCapacity: true)
        return (taken, true)
    }

    /// The engine ingested `events` of what it took; below half the
    /// capacity, the connections waiting for room are told.
    func taken(events: Int) {
        condition.lock()
        queued -= events
        var wake: [@Sendable () -> Void] = []
        if queued <= capacity / 2, !waiters.isEmpty { swap(&wake, &waiters) }
        condition.unlock()
        for w in wake { w() }
    }

    var depth: Int {
        condition.lock()
        defer { condition.unlock() }
        return queued
    }

    func stop() {
        condition.lock()
        stopping = true
        condition.signal()
        condition.unlock()
    }
}

/// The batches the engine took whose events may still wait for its
/// watermark, oldest first, each with its newest event's time. A checkpoint
/// leaves waiting events out of the engine's state (at a high rate they are
/// most of it: a second and a half of every node's events) and records the
/// position before the oldest such batch; a restore feeds the log again from
/// there, skipping in the batches taken before the checkpoint the events the
/// engine had already processed (those up to its watermark).
struct WaitingBatches {
    private var batches: [(position: Int64, newestNs: Int64)] = []
    private var head = 0

    mutating func taken(position: Int64, events: [ObservedEvent]) {
        guard var newest = events.first?.timeNs else { return }
        for e in events where e.timeNs > newest { newest = e.timeNs }
        taken(position: position, newestNs: newest)
    }

    mutating func taken(position: Int64, newestNs: Int64) {
        batches.append((position, newestNs))
    }

    /// The engine processed everything up to `watermarkNs`: batches at the
    /// front with nothing after it no longer hold waiting events. (A batch
    /// behind one that still waits is kept until that one passes: resuming
    /// earlier costs a little replay, never an event.)
    mutating func passed(watermarkNs: Int64) {
        while head < batches.count, batches[head].newestNs <= watermarkNs { head += 1 }
        if head == batches.count {
            batches.removeAll(keepingCapacity: true)
            head = 0
        } else if head > 4096, head * 2 > batches.count {
            batches.removeFirst(head)
            head = 0
        }
    }

    /// Where a restore resumes: after the position before the oldest batch
    /// still waiting, or after `lastTaken` when none waits.
    func resumeAfter(lastTaken: Int64) -> Int64 {
        head < batches.count ? min(lastTaken, batches[head].position - 1) : lastTaken
    }
}

/// What a restore from a checkpoint that left waiting events out feeds
/// again of the batches the engine had taken before it (those up to
/// `throughPosition`): only their events dated after the checkpoint's
/// watermark; the others the engine had processed.
struct ReplaySkip: Sendable {
    let throughPosition: Int64
    let watermarkNs: Int64

    /// nil when the checkpoint left nothing out (it resumes after the last
    /// batch taken).
    init?(resumeAfter: Int64, lastTaken: Int64, watermarkNs: Int64) {
        guard lastTaken > resumeAfter else { return nil }
        throughPosition = lastTaken
        self.watermarkNs = watermarkNs
    }

    /// Removes from the events of the batch at `position` those the engine
    /// had already processed.
    func removeProcessed(from events: inout [ObservedEvent], position: Int64) {
        guard position <= throughPosition else { return }
        events.removeAll { $0.timeNs <= watermarkNs }
    }
}
