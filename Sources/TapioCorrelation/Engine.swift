import Foundation
import TapioWire

/// The correlation engine: no I/O, deterministic, replayable. Feed it the
/// merged event stream (`ingest`) and the pod inventories
/// (`updateInventory`), move time forward (`advance(toNs:)`), read
/// `incidents`. The same events give the same incidents whatever order they
/// arrived in, as long as none is later than `allowedLatenessNs`.
///
/// A value type: the server keeps one on its own thread, behind a lock that
/// only that thread and queries take.
public struct CorrelationEngine: Sendable {
    /// Counters of what the engine did with its input.
    public struct Statistics: Sendable, Equatable, Codable {
        public var processed: UInt64 = 0
        /// Events older than the bucket being filled when they were processed:
        /// they count as causes and topology but not in rates.
        public var late: UInt64 = 0
        public var pending: Int = 0
        public var series: Int = 0
        /// Incidents never shown because a restart explained them (a listener
        /// closed on purpose and open again within the grace, the symptoms over).
        public var restartsSuppressed: UInt64 = 0
        /// Resets the client end of a connection sent (a client or a proxy
        /// that hung up): aborts, not failures, so not counted as `resets`.
        public var clientAborts: UInt64 = 0
        /// DNS queries that went unanswered but were retried and answered:
        /// the same client was answered for the same name after it sent
        /// them (a DNS server restarting, a lost datagram). Not DNS errors.
        public var dnsRetriesAnswered: UInt64 = 0

        public init() {}

        /// Counters a checkpoint written before they existed lacks start at 0.
        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            processed = try c.decodeIfPresent(UInt64.self, forKey: .processed) ?? 0
            late = try c.decodeIfPresent(UInt64.self, forKey: .late) ?? 0
            pending = try c.decodeIfPresent(Int.self, forKey: .pending) ?? 0
            series = try c.decodeIfPresent(Int.self, forKey: .series) ?? 0
            restartsSuppressed = try c.decodeIfPresent(UInt64.self, forKey: .restartsSuppressed) ?? 0
            clientAborts = try c.decodeIfPresent(UInt64.self, forKey: .clientAborts) ?? 0
            dnsRetriesAnswered = try c.decodeIfPresent(UInt64.self, forKey: .dnsRetriesAnswered) ?? 0
        }
    }

    public let configuration: CorrelationConfiguration
    public private(set) var graph = DependencyGraph()
    public private(set) var statistics = Statistics()
    /// Everything at or before this corrected time has been processed.
    public private(set) var watermarkNs: Int64 = .min

    var topology = Topology()
    var causes = CauseStore()
    var cpuUsage = CPUUsageLog()
    var deliveries = DeliveryLog()
    /// When each client entity was last answered (NOERROR) for each name,
    /// keyed `entity NUL name`: what tells a retried query from a failed one.
    private var dnsAnswered: [String: Int64] = [:]
    private var pending: [ObservedEvent] = []
    private var maxSeenNs: Int64 = .min
    private var series: [SeriesKey: Series] = [:]
    private var touched: Set<SeriesKey> = []
    private var currentBucket: Int64?
    private var firstBucket: Int64 = 0
    private var openIncidents: [IncidentState] = []
    private var resolvedIncidents: [Incident] = []
    private var aliases: [String: String] = [:]
    /// Each open incident's last evaluation and the stamps of what it read
    /// (Reuse.swift). Not part of checkpoints.
    private var evaluations: [String: Evaluation] = [:]
    private var stamps = ChangeStamps()
    /// Evaluations answered from the last one (not part of checkpoints).
    private(set) var reusedEvaluations = 0

    public init(configuration: CorrelationConfiguration = CorrelationConfiguration()) {
        self.configuration = configuration
    }

    // MARK: Checkpoints

    /// Everything the engine holds but its configuration, for a checkpoint
    /// (docs/storage.md, "Engine checkpoints"): restored, the engine goes on
    /// as if it had never stopped.
    private struct State: Codable {
        static let version = 1
        var version = State.version
        var graph: DependencyGraph
        var statistics: Statistics
        var watermarkNs: Int64
        var topology: Topology
        var causes: CauseStore
        /// Absent from checkpoints written before usage was kept.
        var cpuUsage: CPUUsageLog?
        var deliveries: DeliveryLog
        /// Absent from checkpoints written before retried lookups were told apart.
        var dnsAnswered: [String: Int64]?
        var pending: [ObservedEvent]
        var maxSeenNs: Int64
        var series: [SeriesKey: Series]
        var touched: Set<SeriesKey>
        var currentBucket: Int64?
        var firstBucket: Int64
        var openIncidents: [IncidentState]
        var resolvedIncidents: [Incident]
        var aliases: [String: String]
    }

    public struct CheckpointError: Error, CustomStringConvertible {
        public let description: String
    }

    /// The engine's state as bytes (JSON). `omittingPending`: without the
    /// events buffered after the watermark, which at a high rate are most of
    /// the state (a second and a half of every node's events); whoever
    /// restores such a checkpoint feeds them again from the log, as they are
    /// when taken right after `advance`: every event ingested so far that is
    /// dated after `watermarkNs` (docs/storage.md, "Engine checkpoints").
    public func checkpoint(omittingPending: Bool = false) throws -> [UInt8] {
        let state = State(graph: graph, statistics: statistics, watermarkNs: watermarkNs, topology: topology, causes: causes, cpuUsage: cpuUsage,
                          deliveries: deliveries, dnsAnswered: dnsAnswered, pending: omittingPending ? [] : pending, maxSeenNs: maxSeenNs,
                          series: series, touched: touched,
                          currentBucket: currentBucket, firstBucket: firstBucket, openIncidents: openIncidents,
                          resolvedIncidents: resolvedIncidents, aliases: aliases)
        return Array(try JSONEncoder().encode(state))
    }

    /// An engine restored from `checkpoint()`'s bytes, with `configuration`
    /// (today's, not the one the checkpoint was taken with).
    public init(checkpoint bytes: [UInt8], configuration: CorrelationConfiguration = CorrelationConfiguration()) throws {
        let state: State
        do {
            state = try JSONDecoder().decode(State.self, from: Data(bytes))
        } catch {
            throw CheckpointError(description: "not an engine checkpoint of this version: \(error)")
        }
        guard state.version == State.version else {
            throw CheckpointError(description: "engine checkpoint version \(state.version), this server reads \(State.version)")
        }
        self.configuration = configuration
        graph = state.graph
        statistics = state.statistics
        watermarkNs = state.watermarkNs
        topology = state.topology
        causes = state.causes
        cpuUsage = state.cpuUsage ?? CPUUsageLog()
        deliveries = state.deliveries
        dnsAnswered = state.dnsAnswered ?? [:]
        pending = state.pending
        maxSeenNs = state.maxSeenNs
        series = state.series
        touched = state.touched
        currentBucket = state.currentBucket
        firstBucket = state.firstBucket
        openIncidents = state.openIncidents
        resolvedIncidents = state.resolvedIncidents
        aliases = state.aliases
    }

    /// Past `maxGraphEdges` (a burst of new peers between two periodic
    /// prunes), the graph forgets its least recently seen edges at once.
    private mutating func boundGraph(nowNs: Int64) {
        if graph.edgeCount > configuration.maxGraphEdges {
            if graph.forget(seenBeforeNs: nowNs - configuration.forgetEdgeAfterNs, maxEdges: configuration.maxGraphEdges) > 0 { stamps.edgesForgotten() }
        }
    }

    /// (client, name) pairs whose last answer is remembered now.
    public var dnsAnswersRemembered: Int { dnsAnswered.count }
    /// Entities whose nodes the engine remembers (bounded by `maxLearnedAddresses`).
    public var entitiesRemembered: Int { topology.entityNodes.count }
    /// Buckets held over all series (bounded by the windows in play, not by
    /// how long a pair keeps succeeding after a failure).
    public var seriesBucketsRemembered: Int { series.values.reduce(0) { $0 + $1.buckets.count } }

    /// Past `maxDNSAnswerEntries`: answers older than a minute go, and when
    /// that is not enough (a flood of distinct names), the oldest go until a
    /// quarter of the room is free. A prune then comes once per quarter of
    /// the bound's new answers, not on every answer: pruning only by age, a
    /// flood of 90 000 names a second ran a filter over the whole map on
    /// every answer and the engine fell to 3 000 events a second.
    /// Entries are removed in place: the map keeps its room, where a
    /// filtered copy had to grow again, rehashing, as the next answers came.
    private mutating func pruneDNSAnswers(nowNs: Int64) {
        removeDNSAnswers { $0 < nowNs - 60_000_000_000 }
        let keep = configuration.maxDNSAnswerEntries * 3 / 4
        guard dnsAnswered.count > keep else { return }
        let cutoff = nthLargest(Array(dnsAnswered.values), max(keep - 1, 0))
        removeDNSAnswers { $0 < cutoff }
        // Answers at the cutoff's very time may still be too many.
        let surplus = dnsAnswered.count - keep
        if surplus > 0 {
            for key in dnsAnswered.filter({ $0.value == cutoff }).keys.prefix(surplus) { dnsAnswered[key] = nil }
        }
    }

    private mutating func removeDNSAnswers(where old: (Int64) -> Bool) {
        var gone: [String] = []
        for (key, time) in dnsAnswered where old(time) { gone.append(key) }
        for key in gone { dnsAnswered.removeValue(forKey: key) }
    }

    // MARK: Input

    /// Replaces what is known of `node`'s pods (its agent's inventory).
    public mutating func updateInventory(node: String, pods: [PodInfo]) {
        topology.replace(node: node, pods: pods)
        stamps.inventoryChanged()
    }

    public mutating func ingest(_ event: ObservedEvent) {
        pending.append(event)
        maxSeenNs = max(maxSeenNs, event.timeNs)
        statistics.pending = pending.count
    }

    public mutating func ingest(_ events: [ObservedEvent]) {
        // Room for a whole log at once (a replay) instead of doubling up to
        // it; geometric still, so that batch after batch stays linear.
        if pending.isEmpty {
            // Nothing buffered (a replay, a quiet pass): the caller's array
            // becomes the queue as it is, shared, not copied event by event.
            pending = events
            for e in events where e.timeNs > maxSeenNs { maxSeenNs = e.timeNs }
            statistics.pending = pending.count
            return
        }
        let need = pending.count + events.count
        if need > pending.capacity { pending.reserveCapacity(max(need, 2 * pending.capacity)) }
        for e in events { ingest(e) }
    }

    /// Processes, in corrected-time order, every buffered event at or before
    /// `nowNs − allowedLatenessNs` (the watermark), and decides every bucket
    /// that ends by then: symptoms, incidents, candidates, resolution.
    public mutating func advance(toNs nowNs: Int64) {
        let mark = nowNs - configuration.allowedLatenessNs
        guard mark > watermarkNs else { return }
        // Positions are sorted, not the events: moving an event costs
        // reference counting on its fields, moving an index nothing. The
        // index breaks ties, as a stable sort of the events would.
        // Each position carries its event's time, so that only equal times
        // look at the events themselves (the same total order as before).
        let events = pending
        var order = events.indices.map { (timeNs: events[$0].timeNs, index: $0) }
        order.sort { x, y in
            if x.timeNs != y.timeNs { return x.timeNs < y.timeNs }
            let (i, j) = (x.index, y.index)
            let (a, b) = (events[i], events[j])
            if ObservedEvent.precedes(a, b) { return true }
            return !ObservedEvent.precedes(b, a) && i < j
        }
        let split = order.firstIndex { $0.timeNs > mark } ?? order.count
        for o in order[..<split] { process(events[o.index]) }
        pending = order[split...].map { events[$0.index] }
        statistics.pending = pending.count
        if var b = currentBucket {
            while (b + 1) * configuration.bucketNs <= mark {
                closeBucket(b)
                b += 1
                if touched.isEmpty && openIncidents.isEmpty {
                    b = max(b, floorDiv(mark, configuration.bucketNs))
                }
            }
            currentBucket = b
            if configuration.decideWithinBucket { decideEarly(b, mark: mark) }
        }
        watermarkNs = mark
    }

    /// Processes everything buffered and decides the bucket of the newest
    /// event: the end of a replay.
    public mutating func finish() {
        guard maxSeenNs > .min else { return }
        let end = (floorDiv(maxSeenNs, configuration.bucketNs) + 1) * configuration.bucketNs
        advance(toNs: end + configuration.allowedLatenessNs)
    }

    /// Runs `events` through a fresh engine: the offline replay of a stored log.
    public static func replay(_ events: [ObservedEvent], inventory: [String: [PodInfo]] = [:],
                              configuration: CorrelationConfiguration = CorrelationConfiguration()) -> CorrelationEngine {
        var engine = CorrelationEngine(configuration: configuration)
        for node in inventory.keys.sorted() { engine.updateInventory(node: node, pods: inventory[node]!) }
        engine.ingest(events)
        engine.finish()
        return engine
    }

    // MARK: Output

    /// Every incident, open and resolved, oldest first.
    public var incidents: [Incident] {
        (resolvedIncidents + openIncidents.filter(\.published).map(\.snapshot)).sorted { ($0.openedNs, $0.id) < ($1.openedNs, $1.id) }
    }

    /// The incidents of the `incidents` query: `status` nil for all, and
    /// those updated at or after `sinceNs`.
    public func incidents(status: Incident.Status? = nil, sinceNs: Int64? = nil) -> [Incident] {
        incidents.filter { (status == nil || $0.status == status) && (sinceNs == nil || $0.updatedNs >= sinceNs!) }
    }

    /// One incident by id; an id merged into another answers the survivor.
    public func incident(id: String) -> Incident? {
        var id = id
        while let next = aliases[id] { id = next }
        return incidents.first { $0.id == id }
    }

    /// `{"incidents": [...]}` as the query answers it.
    public func incidentsJSON(status: Incident.Status? = nil, sinceNs: Int64? = nil) -> JSONValue {
        .object(["incidents": .array(incidents(status: status, sinceNs: sinceNs).map { $0.toJSON() })])
    }

    // MARK: Processing

    private mutating func process(_ e: ObservedEvent) {
        statistics.processed += 1
        let b = floorDiv(e.timeNs, configuration.bucketNs)
        if currentBucket == nil {
            currentBucket = b
            firstBucket = b
        }
        var late = false
        if b < currentBucket! {
            late = true
            statistics.late += 1
        } else {
            while currentBucket! < b {
                closeBucket(currentBucket!)
                currentBucket! += 1
                if touched.isEmpty && openIncidents.isEmpty { currentBucket = b }
            }
        }
        classify(e, bucket: late ? nil : b)
    }

    private static let connectFailureKinds: [SymptomKind] = [.connectRefused, .connectTimeout, .connectErrors]

    private mutating func observe(_ key: SeriesKey, from: String?, to: String?, bucket: Int64?, count: Double, level: Double? = nil, event: ObservedEvent) {
        guard let bucket else { return }
        // In place: copying the series out of the dictionary and back made
        // its buckets (and their events) a copy-on-write copy per event.
        // One hash of the key when the series exists.
        let wasTouched: Bool
        if let i = series.index(forKey: key) {
            // Touched in this (still open) bucket already: the key is in
            // `touched` (a close removes only keys idle for a whole window).
            wasTouched = series.values[i].lastTouched == bucket
            series.values[i].observe(bucket: bucket, count: count, level: level, event: event, keepEvents: 2)
        } else {
            wasTouched = false
            var succeededBefore = false
            if key.kind == .dnsErrors {
                succeededBefore = dnsAnswered[key.observer + "\u{0}" + key.peer] != nil
            } else if key.kind.hasAttempts, let from, let to, let edge = graph.edge(client: from, server: to) {
                succeededBefore = edge.connects > edge.failureCount
            }
            var s = Series(key: key, edgeFrom: from, edgeTo: to, bucket: bucket, quietBuckets: bucket - firstBucket, succeededBefore: succeededBefore)
            s.observe(bucket: bucket, count: count, level: level, event: event, keepEvents: 2)
            series[key] = s
            statistics.series = series.count
        }
        if !wasTouched { touched.insert(key) }
    }

    private mutating func addCause(_ signal: Signal, _ ref: EntityRef, _ e: ObservedEvent, addresses: Set<String> = [], port: UInt16 = 0,
                                   serverEndpoint: Endpoint? = nil, clientAddress: IPAddress? = nil) {
        var addrs = addresses
        if let p = ref.pod { addrs.formUnion(p.info.ips) }
        let newOnNode = causes.add(CauseEvent(signal: signal, entity: ref.name, quality: ref.quality, observed: e, addresses: addrs, port: port,
                                              summary: summarize(e, entity: ref.name), serverEndpoint: serverEndpoint, clientAddress: clientAddress),
                                   limit: configuration.maxCauseEventsPerEntity)
        stamps.causeAdded(entity: ref.name, node: e.node, newOnNode: newOnNode)
    }

    /// Whether the local end of a flow is its server, nil when nothing
    /// tells: a zero port is the ephemeral (client) side, which the agent
    /// zeroes where it knows it; with both ports kept, a port seen serving
    /// (listened on, connected to) is the server's, then the dependency graph
    /// decides, then the port outside the kernel's ephemeral range. The ports
    /// come before the graph: the graph learns edges from these very flows,
    /// so one flow read the wrong way round (a server's segments to a
    /// client's port) made an edge back, and with edges both ways every later
    /// flow read the local side as the client — redis's drops towards the
    /// api then named the api.
    private func localServes(local: EntityRef, remote: EntityRef, flow: Flow) -> Bool? {
        if flow.sourcePort == 0 && flow.destinationPort != 0 { return false }
        if flow.destinationPort == 0 && flow.sourcePort != 0 { return true }
        let ports = topology.serverPorts
        let localServes = ports.contains(flow.sourcePort), remoteServes = ports.contains(flow.destinationPort)
        if localServes != remoteServes { return localServes }
        let toLocal = graph.hasEdge(remote.name, local.name), toRemote = graph.hasEdge(local.name, remote.name)
        if toLocal != toRemote { return toLocal }
        // Last: the kernel picks a client's port from its ephemeral range
        // (Linux's default, 32768–60999); a server seldom listens there.
        let localEphemeral = Self.ephemeralPorts.contains(flow.sourcePort), remoteEphemeral = Self.ephemeralPorts.contains(flow.destinationPort)
        if localEphemeral != remoteEphemeral { return remoteEphemeral }
        return nil
    }

    /// The two ends of a flow as client → server (`localServes`); the local
    /// side is the client when nothing tells.
    private func orient(local: EntityRef, remote: EntityRef, flow: Flow) -> (client: EntityRef, server: EntityRef) {
        localServes(local: local, remote: remote, flow: flow) == true ? (remote, local) : (local, remote)
    }

    /// Whether the local end of a reset's connection is its server, nil
    /// when nothing tells (`localServes`). A reset sent for a segment no
    /// connection owns carries the incoming segment's tuple, reversed, and
    /// the agent assumes the segment's sender started the connection, which
    /// is wrong when a client's kernel answers a server's late segment after
    /// the client gave up: there the local port decides — a port something
    /// serves on is the server's.
    private func resetRoles(local: EntityRef, remote: EntityRef, flow: Flow, sent: Bool, state: UInt32) -> Bool? {
        // TCP_LISTEN (10) or no socket (0): the tuple is the incoming segment's, reversed.
        if sent && (state == 0 || state == 10) { return topology.serverPorts.contains(flow.sourcePort) }
        return localServes(local: local, remote: remote, flow: flow)
    }

    static let ephemeralPorts: ClosedRange<UInt16> = 32768...60999

    private mutating func classify(_ e: ObservedEvent, bucket: Int64?) {
        let ev = e.event
        switch ev.detail {
        case .none:
            topology.sawEntity(topology.entity(of: e).name, node: e.node, limit: configuration.maxLearnedAddresses)
        case .exec:
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            addCause(.workloadStart, me, e)
        case .exit(let code, let signal, _):
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            // SIGTERM and SIGINT are requests to stop (a rollout, a scale-down,
            // an operator): exits by them are churn, not crashes.
            let stopRequested = signal == SIGTERM || signal == SIGINT
            causes.exited(node: e.node, pid: ev.pid, timeNs: e.timeNs, planned: stopRequested || (code == 0 && signal == 0))
            if (code != 0 || signal != 0) && !stopRequested {
                addCause(.exit, me, e, port: 0)
                observe(SeriesKey(observer: me.name, kind: .exits, peer: ""), from: nil, to: nil, bucket: bucket, count: 1, event: e)
            }
        case .oomKill:
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            addCause(.oomKill, me, e)
        case .tcpConnect(let flow, let outcome, let latencyNs, _, let count):
            let client = topology.resolve(of: e, localAddress: flow.source)
            let server = topology.resolve(address: flow.destination)
            topology.sawEntity(client.name, node: e.node, limit: configuration.maxLearnedAddresses)
            topology.sawServerPort(flow.destinationPort)
            if outcome == .established, let k = Endpoint(flow.destination, flow.destinationPort) {
                deliveries.add(server: k, client: flow.source, bucket: floorDiv(e.timeNs, configuration.bucketNs), count: UInt64(max(count, 1)))
                if bucket == nil { stamps.deliveriesChanged() }  // late: see Reuse.swift
            }
            if outcome == .established, let bucket, !series.isEmpty {
                // The attempts of the pair's failure series (those that exist: a pair that never failed has none).
                for kind in Self.connectFailureKinds {
                    if let i = series.index(forKey: SeriesKey(observer: client.name, kind: kind, peer: server.name)) {
                        let t = configuration.threshold(kind)
                        series.values[i].succeeded(bucket: bucket, count: Double(max(count, 1)), window: t.windowBuckets, alpha: t.alpha)
                    }
                }
            }
            let edges = graph.edgeCount
            graph.connect(client: client.name, server: server.name, port: flow.destinationPort, outcome: outcome, latencyNs: latencyNs, count: count, timeNs: e.timeNs)
            if graph.edgeCount != edges { stamps.edgeAdded(client: client.name) }
            boundGraph(nowNs: e.timeNs)
            let kind: SymptomKind?
            switch outcome {
            case .established: kind = nil
            case .refused: kind = .connectRefused
            case .timeout: kind = .connectTimeout
            case .reset, .error: kind = .connectErrors
            }
            if let kind {
                observe(SeriesKey(observer: client.name, kind: kind, peer: server.name), from: client.name, to: server.name, bucket: bucket,
                        count: Double(max(count, 1)), event: e)
            }
        case .tcpListen(let address, let port, let open):
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            topology.sawListener(me.name, port: port)
            if open {
                topology.sawServer(me.name, address: address, limit: configuration.maxLearnedAddresses)
                addCause(.listenerOpened, me, e, port: port)
            }
            if !open {
                var addrs = Set<String>()
                if let a = address, !a.isUnspecified { addrs.insert(topology.text(of: a)) }
                addCause(.listenerClosed, me, e, addresses: addrs, port: port)
            }
        case .tcpReset(let flow, let sent, let state, let count):
            let local = topology.resolve(of: e, localAddress: flow.source)
            let remote = topology.resolve(address: flow.destination)
            topology.sawEntity(local.name, node: e.node, limit: configuration.maxLearnedAddresses)
            let localIsServer = resetRoles(local: local, remote: remote, flow: flow, sent: sent, state: state)
            // Who reset: the client end hanging up (a client that gave up, a
            // proxy whose own client left) is no failure of the server; the
            // server end resetting (a crash, a closed port, an abort by the
            // server) is.
            if let localIsServer, sent != localIsServer {
                statistics.clientAborts += UInt64(max(count, 1))
                break
            }
            let (c, s) = localIsServer.map { $0 ? (remote, local) : (local, remote) } ?? orient(local: local, remote: remote, flow: flow)
            observe(SeriesKey(observer: local.name, kind: .resets, peer: remote.name), from: c.name, to: s.name, bucket: bucket,
                    count: Double(max(count, 1)), event: e)
        case .tcpRetransmit(let flow, let count, _):
            let local = topology.resolve(of: e, localAddress: flow.source)
            let remote = topology.resolve(address: flow.destination)
            topology.sawEntity(local.name, node: e.node, limit: configuration.maxLearnedAddresses)
            let (c, s) = orient(local: local, remote: remote, flow: flow)
            observe(SeriesKey(observer: local.name, kind: .retransmits, peer: remote.name), from: c.name, to: s.name, bucket: bucket,
                    count: Double(max(count, 1)), event: e)
        case .tcpLatency(let flow, let srttUs, let responses, let total, _, _):
            let local = topology.resolve(of: e, localAddress: flow.source)
            let remote = topology.resolve(address: flow.destination)
            topology.sawEntity(local.name, node: e.node, limit: configuration.maxLearnedAddresses)
            let (c, s) = orient(local: local, remote: remote, flow: flow)
            if flow.destinationPort == 0 && flow.sourcePort != 0 {
                topology.sawServer(local.name, address: flow.source, limit: configuration.maxLearnedAddresses)
                topology.sawServerPort(flow.sourcePort)
            } else if flow.sourcePort == 0 {
                topology.sawServerPort(flow.destinationPort)
            }
            let localServes = flow.destinationPort == 0 && flow.sourcePort != 0
            if responses > 0, let k = localServes ? Endpoint(flow.source, flow.sourcePort) : Endpoint(flow.destination, flow.destinationPort) {
                deliveries.add(server: k, client: localServes ? flow.destination : flow.source, bucket: floorDiv(e.timeNs, configuration.bucketNs),
                               count: UInt64(responses))
                if bucket == nil { stamps.deliveriesChanged() }  // late: see Reuse.swift
            }
            let meanNs = responses > 0 ? total / UInt64(responses) : UInt64(srttUs) * 1000
            let serverPort = c.name == local.name ? flow.destinationPort : flow.sourcePort
            let edges = graph.edgeCount
            graph.response(client: c.name, server: s.name, port: serverPort, meanNs: meanNs, responses: responses, timeNs: e.timeNs)
            if graph.edgeCount != edges { stamps.edgeAdded(client: c.name) }
            // The path itself slow: round trips far above their usual while
            // the answers take hardly longer than the round trips.
            if responses > 0, c.name != s.name,
               graph.roundTrip(client: c.name, server: s.name, srttUs: srttUs, responseMeanNs: meanNs, rule: configuration.slowPath) != nil {
                let serverAddress = localServes ? flow.source : flow.destination
                var addrs = Set<String>()
                if let a = serverAddress { addrs.insert(topology.text(of: a)) }
                addCause(.networkLatency, s, e, addresses: addrs, port: serverPort,
                         serverEndpoint: Endpoint(serverAddress, serverPort), clientAddress: localServes ? flow.destination : flow.source)
            }
            boundGraph(nowNs: e.timeNs)
            observe(SeriesKey(observer: local.name, kind: .latency, peer: remote.name), from: c.name, to: s.name, bucket: bucket,
                    count: 1, level: Double(meanNs) / 1e6, event: e)
        case .packetDrop(let reason, let count, let flow, _, _, _):
            let src = flow.source != nil ? topology.resolve(address: flow.source) : topology.entity(of: e)
            let dst = topology.resolve(address: flow.destination)
            let (c, s) = orient(local: src, remote: dst, flow: flow)
            let upper = reason.uppercased()
            var addrs = Set<String>()
            if let a = flow.source { addrs.insert(topology.text(of: a)) }
            if let a = flow.destination { addrs.insert(topology.text(of: a)) }
            let srcIsClient = c.name == src.name
            let serverPort = srcIsClient ? flow.destinationPort : flow.sourcePort
            let endpoint = Endpoint(srcIsClient ? flow.destination : flow.source, serverPort)
            let clientAddress = srcIsClient ? flow.source : flow.destination
            if isNetfilterReason(reason) {
                if let endpoint { deliveries.watch(endpoint, bucket: floorDiv(e.timeNs, configuration.bucketNs)) }
                // The agent zeroes the client port of dropped connection
                // attempts (SYNs); a segment of an established flow keeps both
                // ports. First reading: drops of established traffic are loss
                // (random or rate-based filtering), drops that only ever meet
                // SYNs a firewall closing the port. The analysis then weighs
                // what got through meanwhile (`DeliveryLog`): a rule that drops
                // every packet lets nothing through, loss lets the rest.
                let established = flow.sourcePort != 0 && flow.destinationPort != 0
                addCause(established ? .packetLoss : .firewallDrop, s, e, addresses: addrs, port: serverPort, serverEndpoint: endpoint, clientAddress: clientAddress)
            } else if !(upper == "NO_SOCKET" || upper.hasPrefix("TCP_") || upper.hasPrefix("SOCKET_")) {
                addCause(.packetLoss, s, e, addresses: addrs, port: serverPort, serverEndpoint: endpoint, clientAddress: clientAddress)
            }
            observe(SeriesKey(observer: c.name, kind: .packetDrops, peer: s.name), from: c.name, to: s.name, bucket: bucket,
                    count: Double(max(count, 1)), event: e)
        case .dns(let name, _, let rcode, let latencyNs, _, _, _, let answers):
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            let answeredKey = me.name + "\u{0}" + name
            if rcode == 0 {
                topology.learnAnswer(name: name, answers: answers, limit: configuration.maxLearnedAddresses)
                if let svc = topology.service(ofName: name) { graph.resolved(name: name, service: svc) }
                // In place through the default subscript: one hash, not a read and a write.
                func raise(_ t: inout Int64, to new: Int64) { if t < new { t = new } }
                raise(&dnsAnswered[answeredKey, default: .min], to: e.timeNs)
                if dnsAnswered.count > configuration.maxDNSAnswerEntries { pruneDNSAnswers(nowNs: e.timeNs) }
                if let bucket, let i = series.index(forKey: SeriesKey(observer: me.name, kind: .dnsErrors, peer: name)) {
                    let t = configuration.threshold(.dnsErrors)
                    series.values[i].succeeded(bucket: bucket, count: 1, window: t.windowBuckets, alpha: t.alpha)
                }
            } else if rcode == -1, let answered = dnsAnswered[answeredKey], answered >= e.timeNs - Int64(clamping: latencyNs) {
                // A query that got no answer (its event comes at the agent's
                // timeout, `latencyNs` after it was sent), while the same
                // client asked again and was answered after sending it: the
                // lookup was retried and succeeded. What a client sees is a
                // slower lookup, not a failed one.
                statistics.dnsRetriesAnswered += 1
            } else {
                addCause(.dnsFailure, EntityRef(name: name, quality: 1, pod: nil, isService: false), e)
                observe(SeriesKey(observer: me.name, kind: .dnsErrors, peer: name), from: me.name, to: name, bucket: bucket, count: 1, event: e)
            }
        case .cpuThrottle(let periods, let throttled, _, _, _, let usage):
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            let ratio = periods == 0 ? 0 : Double(throttled) / Double(periods)
            if let usage, case .cpuThrottle(_, _, _, let intervalNs, let cgroup, _) = ev.detail {
                // What a pod consumed and what the node had (its root's
                // event); a cgroup that is neither (a parent of pods, a
                // system slice) cannot be told from the pods' parent.
                let root = usage.node != nil
                let b = floorDiv(e.timeNs, configuration.bucketNs)
                if root {
                    cpuUsage.addNode(e.node, bucket: b, usageNs: usage.usageNs, intervalNs: intervalNs)
                    stamps.cpuUsageChanged()
                } else if me.pod != nil {
                    stamps.cpuUsageChanged()
                    cpuUsage.addPod(CauseEvent(signal: .cpuUsage, entity: me.name, quality: me.quality, observed: e, addresses: Set(me.pod!.info.ips), port: 0,
                                               summary: summarize(e, entity: me.name)),
                                    bucket: b, cgroup: cgroup, usageNs: usage.usageNs, gapNs: configuration.starvationGapNs)
                }
                // Waiting for a CPU while not held to its own quota: starved.
                var psi = usage.pressure.map { Double($0.someAvg10Permille) / 10 }
                if root, psi == nil { psi = usage.node?.pressure.map { Double($0.someAvg10Permille) / 10 } }
                let waited = psi.map { $0 >= configuration.cpuPressureStarvationPsi }
                    ?? (root && usage.node!.runnable > usage.node!.cpus)
                if waited && ratio < configuration.throttleCauseRatio && (me.pod != nil || root) { addCause(.cpuPressure, me, e) }
            }
            // A cgroup that is no pod's (the node's, a system slice) is the
            // node short of CPU: evidence for a neighbour, not a symptom.
            if me.pod == nil {
                if ratio >= configuration.throttleCauseRatio { addCause(.nodeContention, me, e) }
            } else {
                if ratio >= configuration.throttleCauseRatio { addCause(.cpuThrottle, me, e) }
                // A sample of a cgroup without a quota (usage alone) says nothing of throttling.
                if periods > 0 {
                    observe(SeriesKey(observer: me.name, kind: .throttling, peer: ""), from: nil, to: nil, bucket: bucket, count: 1, level: ratio, event: e)
                }
            }
        case .memoryPressure(_, _, let usage, let limit, let psi, _, _):
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            let full = limit > 0 && Double(usage) >= configuration.memoryPressureCauseUsage * Double(limit)
            if Double(psi) / 10 >= configuration.memoryPressureCausePsi || full { addCause(me.pod == nil ? .nodeContention : .memoryPressure, me, e) }
        case .ioError(let error, _, let count, _):
            let me = topology.entity(of: e)
            topology.sawEntity(me.name, node: e.node, limit: configuration.maxLearnedAddresses)
            if error == 28 || error == 122 { addCause(.diskFull, me, e) }  // ENOSPC, EDQUOT
            observe(SeriesKey(observer: me.name, kind: .ioErrors, peer: ""), from: nil, to: nil, bucket: bucket, count: Double(max(count, 1)), event: e)
        }
    }

    // MARK: Buckets and incidents

    private mutating func closeBucket(_ b: Int64) {
        let end = (b + 1) * configuration.bucketNs
        let mayFire = b >= firstBucket + Int64(configuration.warmupBuckets)
        var fired: [(Series, BucketVerdict, Double)] = []
        for key in touched.sorted() {
            var s = series[key]!
            let t = configuration.threshold(key.kind)
            let currentCount = s.buckets.last.map { $0.index == b ? ($0.samples > 0 ? Double($0.samples) : $0.count) : 0 } ?? 0
            if let v = s.close(b, threshold: t, mayFire: mayFire), v.firing { fired.append((s, v, currentCount)) }
            if s.idle(at: b, threshold: t) { touched.remove(key) }
            series[key] = s
        }
        for (s, v, current) in fired { record(s, v, current: current, end: end) }
        for i in openIncidents.indices { refresh(i, end: end) }
        mergeIncidents(end: end)
        resolveIncidents(end: end)
        if b % 30 == 0 {
            let horizonNs = end - configuration.causeLookbackNs - configuration.crashLoopWindowNs - configuration.quietPeriodNs
            if causes.prune(before: horizonNs) { stamps.causesPruned() }
            // Unseen for long by the newest event, not by the clock: a log
            // replayed days later (a restart, a recording) keeps its graph
            // while no event says time went on without the edge.
            if graph.forget(seenBeforeNs: min(end, maxSeenNs) - configuration.forgetEdgeAfterNs, maxEdges: configuration.maxGraphEdges) > 0 {
                stamps.edgesForgotten()
            }
            cpuUsage.prune(beforeBucket: floorDiv(horizonNs, configuration.bucketNs))
            stamps.cpuUsageChanged()
            deliveries.prune(beforeBucket: floorDiv(horizonNs, configuration.bucketNs))
            stamps.deliveriesChanged()
            // A series silent for a long time forgets its baseline (it would have decayed to zero).
            let horizon = b - Int64(configuration.forgetSeriesAfterNs / configuration.bucketNs)
            for key in series.keys.sorted() where !touched.contains(key) && series[key]!.lastTouched < horizon { series[key] = nil }
            statistics.series = series.count
        }
    }

    /// Decisions within the open bucket `b`: a series not yet part of an
    /// incident whose bucket already fires with the events processed so far
    /// opens (or joins) its incident now rather than at the bucket's end —
    /// up to a bucket width plus a tick sooner. Sound, not a guess: a
    /// bucket's count and level only grow as events arrive, and its
    /// threshold rests on closed buckets alone, so what fires now fires at
    /// the close as well, which confirms the symptom (`record`).
    /// Once per pass over the series in play (`touched`), not per event: the
    /// ingest path pays nothing for it.
    private mutating func decideEarly(_ b: Int64, mark: Int64) {
        guard b >= firstBucket + Int64(configuration.warmupBuckets), !touched.isEmpty else { return }
        let inIncidents = Set(openIncidents.flatMap(\.symptoms.keys))
        var fired: [(Series, BucketVerdict)] = []
        for key in touched where !inIncidents.contains(key) {
            guard let s = series[key], s.buckets.last?.index == b else { continue }
            var trial = s
            if let v = trial.close(b, threshold: configuration.threshold(key.kind), mayFire: true), v.firing { fired.append((s, v)) }
        }
        guard !fired.isEmpty else { return }
        fired.sort { $0.0.key < $1.0.key }
        for (s, _) in fired { series[s.key]?.firedEarly(in: b) }
        let before = Set(openIncidents.map(\.id))
        var changed = Set<String>()
        for (s, v) in fired {
            if let id = record(s, v, current: v.count, end: mark, provisional: true) { changed.insert(id) }
        }
        for i in openIncidents.indices where changed.contains(openIncidents[i].id) || !before.contains(openIncidents[i].id) {
            refresh(i, end: mark)
        }
        mergeIncidents(end: mark)
    }

    /// Returns the incident the symptom is now part of, if any.
    @discardableResult
    private mutating func record(_ s: Series, _ v: BucketVerdict, current: Double, end: Int64, provisional: Bool = false) -> String? {
        let key = s.key
        if let i = openIncidents.firstIndex(where: { $0.symptoms[key] != nil }) {
            var st = openIncidents[i].symptoms[key]!
            if let early = st.provisionalCount {
                // Decided within this bucket (`decideEarly`); its close
                // confirms it with the bucket's whole count.
                st.count += v.count - early
                st.provisionalCount = nil
                st.lastNs = end
                for e in v.events where st.events.count < configuration.maxEvidence && !st.events.contains(e) { st.events.append(e) }
                openIncidents[i].symptoms[key] = st
                return openIncidents[i].id
            }
            st.count += st.lastNs == end - configuration.bucketNs ? current : v.count
            st.lastNs = end
            for e in v.events where st.events.count < configuration.maxEvidence && !st.events.contains(e) { st.events.append(e) }
            openIncidents[i].symptoms[key] = st
            return openIncidents[i].id
        }
        var st = SymptomState(key: key, edgeFrom: s.edgeFrom, edgeTo: s.edgeTo, sinceNs: v.events.first?.timeNs ?? end - configuration.bucketNs,
                              lastNs: end, count: v.count, baseline: v.baseline, events: Array(v.events.prefix(configuration.maxEvidence)))
        if provisional { st.provisionalCount = v.count }
        if let i = openIncidents.firstIndex(where: { $0.joins(st) }) {
            openIncidents[i].symptoms[key] = st
            return openIncidents[i].id
        }
        // A process exiting again and again with nobody failing because of
        // it (a cron job off every request path) is no incident: exits only
        // join an incident that something else opened.
        if key.kind == .exits { return nil }
        let id = "inc-" + hex16(fnv1a("\(key.text)|\(st.sinceNs)"))
        var inc = IncidentState(id: id, openedNs: end)
        inc.symptoms[key] = st
        openIncidents.append(inc)
        return id
    }

    private mutating func refresh(_ i: Int, end: Int64) {
        var inc = openIncidents[i]
        var fresh = evaluate(inc, at: end)
        // A restart explains an incident led by its planned stop whether the
        // stop's symptoms opened it or joined one already shown (an
        // observation still open): such an incident pages only when a new one
        // would be shown — the listener not back within the grace, or the
        // symptoms going on after it came back.
        if fresh.plannedStop != nil, !publishable(fresh, inc.symptoms, end: end) { fresh.pages = false }
        // Decided within a bucket, an incident is shown at once, but whether
        // it pages waits for that bucket's close: a first look may name the
        // right entity with a kind the rest of the bucket corrects (a crash
        // that the next exit makes a crash loop; drops that what got through
        // meanwhile reads as loss, not a firewall).
        if inc.symptoms.values.contains(where: { $0.provisionalCount != nil }) {
            fresh.pages = inc.snapshot.id.isEmpty ? false : inc.snapshot.pages
        }
        if fresh.contentDiffers(from: inc.snapshot) || inc.snapshot.id.isEmpty {
            inc.snapshot = fresh
            inc.snapshot.updatedNs = end
        } else {
            // Times of active symptoms move on without counting as an update.
            let updated = inc.snapshot.updatedNs
            inc.snapshot = fresh
            inc.snapshot.updatedNs = updated
        }
        if !inc.published { inc.published = publishable(fresh, inc.symptoms, end: end) }
        openIncidents[i] = inc
    }

    /// `Analysis.evaluate`, or the incident's last evaluation when nothing
    /// it depends on changed since (Reuse.swift).
    private mutating func evaluate(_ inc: IncidentState, at end: Int64) -> Incident {
        if configuration.reuseEvaluations, let last = evaluations[inc.id], let again = last.reuse(for: inc, at: end, stamps: stamps, causes: causes, topology: topology, configuration: configuration) {
            if configuration.checkReuse {
                let fresh = Analysis(engine: self).evaluate(inc, at: end)
                precondition(again == fresh, "incident \(inc.id) reused at \(end) differs from its evaluation")
            }
            reusedEvaluations += 1
            return again
        }
        let analysis = Analysis(engine: self)
        let fresh = analysis.evaluate(inc, at: end)
        evaluations[inc.id] = Evaluation(inc, fresh, at: end, reads: analysis.reads, stamps: stamps)
        return fresh
    }

    /// Whether an incident may be shown: unless its leading candidate is a
    /// listener closed on purpose, at once; otherwise once the restart grace
    /// has passed without the listener coming back, or when a symptom that
    /// began between the stop and the restart settling goes on after it. A symptom that
    /// begins after (a load spike 25 s later, while the restart's incident
    /// waits out its quiet period) is another episode, not the restart
    /// failing: it paged `listener_closed` for a restart that had worked.
    private func publishable(_ i: Incident, _ symptoms: [SeriesKey: SymptomState], end: Int64) -> Bool {
        guard let stop = i.plannedStop else { return true }
        let b = configuration.bucketNs
        if let r = stop.reopenedNs, r - stop.closedNs <= configuration.restartGraceNs {
            let settled = (floorDiv(r, b) + 2) * b
            // One the stop can have caused: it began after the stop (less
            // the lag of aggregates stamped with their interval's start). A
            // symptom already there before the stop (a load spike that the
            // restart happened to overlap) says nothing about the restart.
            let stopped = stop.closedNs - configuration.eventCauseLagNs
            return symptoms.values.contains { $0.sinceNs >= stopped && $0.sinceNs < settled && $0.lastNs > settled }
        }
        return end >= stop.closedNs + configuration.restartGraceNs
    }

    private mutating func mergeIncidents(end: Int64) {
        var changed = true
        while changed {
            changed = false
            let order = openIncidents.indices.sorted { (openIncidents[$0].openedNs, openIncidents[$0].id) < (openIncidents[$1].openedNs, openIncidents[$1].id) }
            search: for a in order {
                for b in order where b != a && (openIncidents[a].openedNs, openIncidents[a].id) < (openIncidents[b].openedNs, openIncidents[b].id) {
                    if openIncidents[a].related(to: openIncidents[b]) {
                        let other = openIncidents[b]
                        let survivor = openIncidents[a].id
                        for (k, v) in other.symptoms where openIncidents[a].symptoms[k] == nil { openIncidents[a].symptoms[k] = v }
                        openIncidents[a].mergedIds = (openIncidents[a].mergedIds + [other.id] + other.mergedIds).sorted()
                        openIncidents[a].published = openIncidents[a].published || other.published
                        aliases[other.id] = survivor
                        openIncidents.remove(at: b)
                        let ia = openIncidents.firstIndex { $0.id == survivor }!
                        openIncidents[ia].snapshot.id = ""
                        refresh(ia, end: end)
                        changed = true
                        break search
                    }
                }
            }
        }
    }

    private mutating func resolveIncidents(end: Int64) {
        var keep: [IncidentState] = []
        for inc in openIncidents {
            let last = inc.symptoms.values.map(\.lastNs).max() ?? inc.openedNs
            if last + configuration.quietPeriodNs > end {
                keep.append(inc)
            } else if !inc.published {
                // Held back and never shown: a restart explained it.
                statistics.restartsSuppressed += 1
            } else {
                var done = inc.snapshot
                done.status = .resolved
                done.resolvedNs = end
                done.updatedNs = end
                for j in done.symptoms.indices { done.symptoms[j].active = false }
                resolvedIncidents.append(done)
            }
        }
        openIncidents = keep
        if evaluations.count > openIncidents.count {
            let open = Set(openIncidents.map(\.id))
            evaluations = evaluations.filter { open.contains($0.key) }
        }
        if resolvedIncidents.count > configuration.maxResolvedIncidents {
            resolvedIncidents.removeFirst(resolvedIncidents.count - configuration.maxResolvedIncidents)
        }
    }
}

/// `values.sorted(by: >)[k]` without sorting: a three-way quickselect,
/// linear on average (sorting 65 536 answer times on every prune of a DNS
/// flood was the largest part of it).
func nthLargest(_ values: [Int64], _ k: Int) -> Int64 {
    precondition(k >= 0 && k < values.count)
    var a = values
    var lo = 0, hi = a.count - 1
    while lo < hi {
        let (x, y, z) = (a[lo], a[lo + (hi - lo) / 2], a[hi])
        let pivot = max(min(x, y), min(max(x, y), z))  // median of three
        // [lo, lt) above the pivot, [lt, gt] equal, (gt, hi] below.
        var lt = lo, i = lo, gt = hi
        while i <= gt {
            if a[i] > pivot {
                a.swapAt(lt, i)
                lt += 1
                i += 1
            } else if a[i] < pivot {
                a.swapAt(i, gt)
                gt -= 1
            } else {
                i += 1
            }
        }
        if k < lt {
            hi = lt - 1
        } else if k > gt {
            lo = gt + 1
        } else {
            return pivot
        }
    }
    return a[lo]
}

/// Floor division (Swift's `/` truncates toward zero).
func floorDiv(_ a: Int64, _ b: Int64) -> Int64 {
    let q = a / b
    return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q
}

/// One symptom as an incident holds it.
struct SymptomState: Sendable, Equatable, Codable {
    var key: SeriesKey
    var edgeFrom: String?
    var edgeTo: String?
    var sinceNs: Int64
    var lastNs: Int64
    var count: Double
    var baseline: Double
    var events: [ObservedEvent]
    /// Set while the symptom was decided within its first bucket and that
    /// bucket has not closed yet: the count it was decided with.
    var provisionalCount: Double? = nil
}

struct IncidentState: Sendable, Codable {
    var id: String
    var openedNs: Int64
    var symptoms: [SeriesKey: SymptomState] = [:]
    var mergedIds: [String] = []
    var snapshot: Incident
    /// Shown in `incidents` (held back while a planned stop may be a restart).
    var published = false

    init(id: String, openedNs: Int64) {
        self.id = id
        self.openedNs = openedNs
        snapshot = Incident(id: "", status: .open, title: "", openedNs: openedNs, updatedNs: openedNs, detectedNs: openedNs)
    }

    /// Observers and both ends of every symptom.
    var entities: Set<String> {
        var s = Set<String>()
        for v in symptoms.values {
            s.insert(v.key.observer)
            if let f = v.edgeFrom { s.insert(f) }
            if let t = v.edgeTo { s.insert(t) }
        }
        return s
    }

    /// Servers of its symptoms and its leading candidates' entities (not a
    /// noisy neighbour's: its own troubles are not this incident's).
    var upstream: Set<String> {
        var s = Set(symptoms.values.compactMap(\.edgeTo))
        for c in snapshot.rootCauses.prefix(3) where !c.inferred && c.kind != .noisyNeighbour { s.insert(c.entity) }
        return s
    }

    /// A symptom belongs here when it concerns an entity already involved:
    /// its server is one of ours, or its client is one of our servers or
    /// causes (a cascade seen from either end), or it is a symptom of one of
    /// our entities itself.
    func joins(_ s: SymptomState) -> Bool {
        if symptoms[s.key] != nil { return true }
        if let to = s.edgeTo {
            return entities.contains(to) || upstream.contains(s.edgeFrom ?? s.key.observer)
        }
        return entities.contains(s.key.observer) || upstream.contains(s.key.observer)
    }

    func related(to other: IncidentState) -> Bool {
        if other.symptoms.values.contains(where: joins) || symptoms.values.contains(where: other.joins) { return true }
        if let a = snapshot.rootCauses.first, let b = other.snapshot.rootCauses.first, !a.inferred, !b.inferred, a.entity == b.entity { return true }
        return false
    }
}

extension Incident {
    /// Whether anything but the moving times of active symptoms changed.
    func contentDiffers(from old: Incident) -> Bool {
        if id != old.id || status != old.status || title != old.title || affected != old.affected || mergedIds != old.mergedIds || pages != old.pages {
            return true
        }
        if symptoms.count != old.symptoms.count || rootCauses.count != old.rootCauses.count { return true }
        for (a, b) in zip(symptoms, old.symptoms) where a.entity != b.entity || a.kind != b.kind || a.peer != b.peer || a.sinceNs != b.sinceNs { return true }
        for (a, b) in zip(rootCauses, old.rootCauses) where a.entity != b.entity || a.kind != b.kind || round3(a.confidence) != round3(b.confidence) { return true }
        return false
    }
}
