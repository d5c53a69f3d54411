import Logging
import NIOPosix
import Synchronization
import TapioCorrelation
import TapioStore
import TapioWire

/// The correlation engine inside the server: fed every stored batch (with the
/// clock correction it was stored with) and every inventory, advanced every
/// 250 ms on its own thread, its incidents persisted to the store whenever they
/// change. At start it replays the recent log, so a restart loses no incident
/// state that the log can rebuild; older incidents come back from the store.
public final class CorrelationService: Sendable {
    public struct Configuration: Sendable {
        public var engine = CorrelationConfiguration()
        /// How much of the stored log is replayed at start.
        public var replayWindowNs: Int64 = 3_600_000_000_000
        public init() {}
    }

    private let engine: Mutex<CorrelationEngine>
    private let persisted = Mutex<[String: Int64]>([:])  // id → updatedNs stored
    private let store: any EventStore
    private let logger: Logger
    public let configuration: Configuration

    public init(configuration: Configuration, store: any EventStore, logger: Logger) {
        self.configuration = configuration
        self.store = store
        self.logger = logger
        engine = Mutex(CorrelationEngine(configuration: configuration.engine))
    }

    /// Rebuilds the engine from the last `replayWindowNs` of the log.
    public func restore(nowNs: Int64, maxFutureSkewNs: Int64 = CorrelationService.defaultMaxFutureSkewNs) throws {
        let log = try EventLog.load(store: store, sinceNs: nowNs - configuration.replayWindowNs, maxFutureSkewNs: maxFutureSkewNs)
        engine.withLock { e in
            log.feed(&e)
            e.advance(toNs: nowNs)
        }
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

    /// Hands events (from `observed`) to the engine.
    public func ingest(_ events: [ObservedEvent]) {
        engine.withLock { $0.ingest(events) }
    }

    public func updateInventory(node: String, pods: [TapioWire.PodInfo]) {
        engine.withLock { $0.updateInventory(node: node, pods: pods) }
    }

    /// Advances the engine to `nowNs` and persists the incidents that changed.
    public func tick(nowNs: Int64) {
        let changed: [Incident] = engine.withLock { e in
            e.advance(toNs: nowNs)
            return e.incidents
        }.filter { i in persisted.withLock { $0[i.id] != i.updatedNs } }
        for i in changed {
            do {
                try store.saveIncident(StoredIncident(id: i.id, status: i.status.rawValue, openedNs: i.openedNs, updatedNs: i.updatedNs,
                                                      json: i.explainJSON(weights: configuration.engine.weights).serialized()))
                persisted.withLock { $0[i.id] = i.updatedNs }
            } catch {
                logger.error("saving an incident failed", metadata: ["incident": "\(i.id)", "error": "\(error)"])
            }
        }
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

    public func servicesJSON() -> JSONValue {
        engine.withLock { $0.graph.toJSON() }
    }

    public var statistics: CorrelationEngine.Statistics {
        engine.withLock { $0.statistics }
    }
}
