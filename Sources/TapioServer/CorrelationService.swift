import Foundation
import Logging
import NIOPosix
import Synchronization
import TapioCorrelation
import TapioStore
import TapioWire

/// The correlation engine inside the server, on its own thread
/// (`tapio-engine`). Ingest hands it every durable batch (events placed
/// on the server's clock, with the clock correction they were stored with)
/// and every inventory through a bounded queue and never waits for it: the
/// thread takes from the queue, and every 250 ms processes events up to the
/// watermark and persists the incidents that changed. When the queue holds
/// `queueEvents` events, `submit` says so and the connection that fed it
/// stops reading (backpressure: its agent keeps the batches, in memory and
/// then in its spool) until the engine has taken the queue below half.
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
        /// How often the engine processes events up to its watermark.
        public var tickIntervalNs: Int64 = 250_000_000
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
    private let store: any EventStore
    private let logger: Logger
    public let configuration: Configuration

    public init(configuration: Configuration, store: any EventStore, logger: Logger) {
        self.configuration = configuration
        self.store = store
        self.logger = logger
        engine = Mutex(CorrelationEngine(configuration: configuration.engine))
        feed = EngineFeed(capacity: max(1, configuration.queueEvents))
    }

    /// Rebuilds the engine from the last `replayWindowNs` of the log.
    public func restore(nowNs: Int64, maxFutureSkewNs: Int64 = CorrelationService.defaultMaxFutureSkewNs) throws {
        let log = try EventLog.load(store: store, sinceNs: nowNs - configuration.replayWindowNs, maxFutureSkewNs: maxFutureSkewNs)
        let statistics = engine.withLock { e in
            log.feed(&e)
            e.advance(toNs: nowNs)
            return e.statistics
        }
        published.withLock { $0 = statistics }
        for (id, updated) in try store.incidents().map({ ($0.id, $0.updatedNs) }) {
            persisted.withLock { $0[id] = updated }
        }
        logger.info("correlation engine restored", metadata: ["batches_replayed": "\(log.batches)"])
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
        feed.push(.events(events), onRoom: onRoom)
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
    }

    private func run(onPass: @Sendable () -> Void) {
        let interval = configuration.tickIntervalNs
        var nextPass = monotonicNs() + interval
        while true {
            let (items, stopping) = feed.take(untilMonotonicNs: nextPass)
            for item in items {
                switch item {
                case .events(let events):
                    let s = engine.withLock { e in
                        e.ingest(events)
                        return e.statistics
                    }
                    published.withLock { $0 = s }
                    feed.taken(events: events.count)
                case .inventory(let node, let pods):
                    engine.withLock { $0.updateInventory(node: node, pods: pods) }
                }
            }
            if stopping && items.isEmpty { break }
            let now = monotonicNs()
            if now >= nextPass {
                tick(nowNs: wallClockNs())
                onPass()
                nextPass = max(nextPass + interval, monotonicNs())
            }
        }
        tick(nowNs: wallClockNs())
    }

    /// Advances the engine to `nowNs` and persists the incidents that
    /// changed. On the engine's thread (or at stop, after it ended).
    func tick(nowNs: Int64) {
        let (incidents, statistics) = engine.withLock { e in
            e.advance(toNs: nowNs)
            return (e.incidents, e.statistics)
        }
        published.withLock { $0 = statistics }
        openByCause.withLock { $0 = Dictionary(grouping: incidents.filter { $0.status == .open }) { $0.rootCauses.first?.kind.rawValue ?? "unknown" }.mapValues(\.count) }
        let changed = incidents.filter { i in persisted.withLock { $0[i.id] != i.updatedNs } }
        var changedJSON: [JSONValue] = []
        for i in changed {
            let json = i.explainJSON(weights: configuration.engine.weights)
            changedJSON.append(json)
            do {
                try store.saveIncident(StoredIncident(id: i.id, status: i.status.rawValue, openedNs: i.openedNs, updatedNs: i.updatedNs,
                                                      json: json.serialized()))
                persisted.withLock { $0[i.id] = i.updatedNs }
            } catch {
                logger.error("saving an incident failed", metadata: ["incident": "\(i.id)", "error": "\(error)"])
            }
        }
        // Told whether or not the save worked: an alert matters most when the store fails.
        if !changedJSON.isEmpty, let observer = observer.withLock({ $0 }) { observer(changedJSON) }
    }

    /// The `incidents` answer: live incidents from the engine, then stored ones
    /// it no longer holds (older than the replay window).
    public func incidentsJSON(status: String?, sinceNs: Int64?) throws -> JSONValue {
        let wanted = status.flatMap(Incident.Status.init(rawValue:))
        let live = engine.withLock { $0.incidents(status: wanted, sinceNs: sinceNs) }
        var out = live.map { $0.toJSON() }
        let liveIds = Set(live.map(\.id))
        for s in try store.incidents() where !liveIds.contains(s.id) {
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
        guard let s = try store.incidents().first(where: { $0.id == id }) else { return nil }
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
        case events([ObservedEvent])
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
        if case .events(let e) = item { queued += e.count }
        condition.signal()
        guard let onRoom, queued >= capacity else { return true }
        waiters.append(onRoom)
        return false
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
