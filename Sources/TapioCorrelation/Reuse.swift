import TapioWire

// An open incident was evaluated again at every bucket's close, though
// often nothing it depends on had changed: its symptoms gone quiet, its
// entities reporting no new cause, the graph around it as it was.
// Replaying the recorded lab runs, evaluating was about half of the
// engine's time. The engine now keeps each open incident's last evaluation
// with what it read (`EvaluationReads`) and answers it again when none of
// that changed (`Evaluation.reuse`); the answer is the one a fresh
// evaluation gives, byte for byte, which `CorrelationConfiguration.checkReuse`
// makes the engine check on every reuse (on in debug builds: the tests).
//
// How "none of that changed" is told:
// - the incident's own inputs (symptoms, merged ids) are compared as values,
//   but for a symptom's count and last time, which an evaluation only
//   shows (a symptom firing bucket after bucket changes nothing else once
//   its evidence is full): they are shown afresh on reuse;
// - the engine's state it read is either compared as values (a process's
//   exit, an entity's nodes, a name's service, an entity's ports) or
//   stamped: every change of an entity's cause events, of a node's set of
//   entities with causes, of a client's edges, of the inventory, of CPU
//   usage and of deliveries takes a new stamp (`ChangeStamps`), and the
//   evaluation keeps the stamps of what it read;
// - time: an evaluation compares its end (and `min(end, x)`) only with the
//   times of the cause events and usage samples it read, and sets symptoms'
//   `active` and the incident's `updatedNs` from it (set again on reuse).
//   When none of what it read lies after its end, a later end compares the
//   same way: the events read are the same (their stamps), all at or before
//   either end. An evaluation that read anything after its end is not
//   reused.
// - deliveries (what got through to endpoints with netfilter drops) are
//   read for buckets strictly before the last drop's, which was processed:
//   before the bucket being filled. A delivery in that bucket or later
//   cannot change what an evaluation read; only a late one (an event
//   older than the bucket being filled) or a prune takes a stamp.
//
// None of this is part of checkpoints: a restored engine evaluates every
// incident afresh once.

/// What one `Analysis` read of the engine's state.
final class EvaluationReads {
    /// Entities whose cause events were read.
    var causeEntities: Set<String> = []
    /// Nodes whose entities with causes were read.
    var causeNodes: Set<String> = []
    /// Clients whose edges were read (`dependencies(of:)`, `hasEdge`).
    var graphClients: Set<String> = []
    var exits: [ExitKey: CauseStore.ProcessExit?] = [:]
    var entityNodes: [String: Set<String>] = [:]
    var services: [String: String?] = [:]
    var listenPorts: [String: Set<UInt16>?] = [:]
    var cpuUsage = false
    var deliveries = false
    /// A cause event or usage sample read lies after the evaluation's end.
    var afterEnd = false

    struct ExitKey: Hashable {
        var node: String
        var pid: UInt32
    }
}

extension Analysis {
    /// `end`: the evaluation's.
    func causeEvents(of entity: String, from: Int64, to: Int64, end: Int64) -> [CauseEvent] {
        reads.causeEntities.insert(entity)
        let all = engine.causes.byEntity[entity] ?? []
        // Kept in time order: the last is the latest.
        if let last = all.last, last.timeNs > end { reads.afterEnd = true }
        return all.filter { $0.timeNs >= from && $0.timeNs <= to }
    }

    func usageSamples(node: String, pod: String, end: Int64) -> [CauseEvent] {
        let samples = cpuUsage.samples(node: node, pod: pod)
        if samples.contains(where: { $0.timeNs > end }) { reads.afterEnd = true }
        return samples
    }

    func causeEntities(onNode node: String) -> Set<String> {
        reads.causeNodes.insert(node)
        return engine.causes.entitiesByNode[node] ?? []
    }

    func exitTime(node: String, pid: UInt32) -> Int64? {
        processExit(node: node, pid: pid)?.timeNs
    }

    /// `CauseStore.closedOnPurpose`.
    func closedOnPurpose(node: String, pid: UInt32) -> Bool {
        processExit(node: node, pid: pid)?.planned ?? true
    }

    private func processExit(node: String, pid: UInt32) -> CauseStore.ProcessExit? {
        let x = engine.causes.processExit(node: node, pid: pid)
        reads.exits[EvaluationReads.ExitKey(node: node, pid: pid)] = .some(x)
        return x
    }

    func dependencies(of client: String) -> [String] {
        reads.graphClients.insert(client)
        return engine.graph.dependencies(of: client)
    }

    func hasEdge(_ client: String, _ server: String) -> Bool {
        reads.graphClients.insert(client)
        return engine.graph.hasEdge(client, server)
    }

    func entityNodes(of entity: String) -> Set<String> {
        let n = engine.topology.nodes(of: entity)
        reads.entityNodes[entity] = n
        return n
    }

    func service(ofName name: String) -> String? {
        let s = engine.topology.service(ofName: name)
        reads.services[name] = .some(s)
        return s
    }

    func listenPorts(of entity: String) -> Set<UInt16>? {
        let p = engine.topology.listenPorts[entity]
        reads.listenPorts[entity] = .some(p)
        return p
    }

    /// Whether `node`'s inventory lists pods (the inventory's stamp covers it).
    func hasPods(node: String) -> Bool { engine.topology.hasPods(node: node) }

    var cpuUsage: CPUUsageLog {
        reads.cpuUsage = true
        return engine.cpuUsage
    }
}

/// Stamps of the engine's changes that an evaluation may have read: each
/// change takes the next value of `clock`. Not part of checkpoints.
struct ChangeStamps: Sendable {
    private(set) var clock: UInt64 = 0
    /// Entity → its cause events' last change.
    private(set) var causes: [String: UInt64] = [:]
    /// Node → its set of entities with causes' last change.
    private(set) var causeNodes: [String: UInt64] = [:]
    /// Client → its last new edge.
    private(set) var graphClients: [String: UInt64] = [:]
    /// Cause events pruned (any entity), edges forgotten (any client); a
    /// delivery recorded late, deliveries pruned.
    private(set) var causePrune: UInt64 = 0
    private(set) var graphForget: UInt64 = 0
    private(set) var inventory: UInt64 = 0
    private(set) var cpuUsage: UInt64 = 0
    private(set) var deliveries: UInt64 = 0

    private mutating func next() -> UInt64 {
        clock += 1
        return clock
    }

    mutating func causeAdded(entity: String, node: String, newOnNode: Bool) {
        causes[entity] = next()
        if newOnNode { causeNodes[node] = clock }
    }

    /// A prune stamps every entity and node at once: their own stamps start
    /// afresh (an evaluation from before holds the old `causePrune`).
    mutating func causesPruned() {
        causePrune = next()
        causes.removeAll(keepingCapacity: true)
        causeNodes.removeAll(keepingCapacity: true)
    }

    mutating func edgeAdded(client: String) { graphClients[client] = next() }

    mutating func edgesForgotten() {
        graphForget = next()
        graphClients.removeAll(keepingCapacity: true)
    }

    mutating func inventoryChanged() { inventory = next() }
    mutating func cpuUsageChanged() { cpuUsage = next() }
    mutating func deliveriesChanged() { deliveries = next() }
}

/// An open incident's last evaluation, with what it read.
struct Evaluation: Sendable {
    let result: Incident
    let endNs: Int64
    let openedNs: Int64
    let symptoms: [SeriesKey: SymptomState]
    let mergedIds: [String]
    let reusable: Bool
    let causes: [(String, UInt64)]
    let causeNodes: [(String, UInt64)]
    let graphClients: [(String, UInt64)]
    let exits: [(EvaluationReads.ExitKey, CauseStore.ProcessExit?)]
    let entityNodes: [(String, Set<String>)]
    let services: [(String, String?)]
    let listenPorts: [(String, Set<UInt16>?)]
    let causePrune: UInt64
    let graphForget: UInt64
    let inventory: UInt64
    /// Nil when not read.
    let cpuUsage: UInt64?
    let deliveries: UInt64?

    init(_ inc: IncidentState, _ result: Incident, at end: Int64, reads: EvaluationReads, stamps: ChangeStamps) {
        self.result = result
        endNs = end
        openedNs = inc.openedNs
        symptoms = inc.symptoms
        mergedIds = inc.mergedIds
        reusable = !reads.afterEnd && result.symptoms.count == inc.symptoms.count
        causes = reads.causeEntities.map { ($0, stamps.causes[$0] ?? 0) }
        causeNodes = reads.causeNodes.map { ($0, stamps.causeNodes[$0] ?? 0) }
        graphClients = reads.graphClients.map { ($0, stamps.graphClients[$0] ?? 0) }
        exits = reads.exits.map { ($0.key, $0.value) }
        entityNodes = reads.entityNodes.map { ($0.key, $0.value) }
        services = reads.services.map { ($0.key, $0.value) }
        listenPorts = reads.listenPorts.map { ($0.key, $0.value) }
        causePrune = stamps.causePrune
        graphForget = stamps.graphForget
        inventory = stamps.inventory
        cpuUsage = reads.cpuUsage ? stamps.cpuUsage : nil
        deliveries = reads.deliveries ? stamps.deliveries : nil
    }

    /// What evaluating `inc` at `end` would give, when nothing it depends on
    /// changed since this evaluation; nil otherwise.
    func reuse(for inc: IncidentState, at end: Int64, stamps: ChangeStamps, causes store: CauseStore, topology: Topology,
               configuration: CorrelationConfiguration) -> Incident? {
        guard reusable, end >= endNs,
              stamps.causePrune == causePrune, stamps.graphForget == graphForget, stamps.inventory == inventory,
              cpuUsage == nil || cpuUsage == stamps.cpuUsage, deliveries == nil || deliveries == stamps.deliveries,
              inc.openedNs == openedNs, inc.mergedIds == mergedIds, inc.symptoms.count == symptoms.count
        else { return nil }
        for (k, s) in inc.symptoms {
            guard let t = symptoms[k], s.sameAnalysis(as: t) else { return nil }
        }
        for (e, s) in causes where (stamps.causes[e] ?? 0) != s { return nil }
        for (n, s) in causeNodes where (stamps.causeNodes[n] ?? 0) != s { return nil }
        for (c, s) in graphClients where (stamps.graphClients[c] ?? 0) != s { return nil }
        for (k, x) in exits where store.processExit(node: k.node, pid: k.pid) != x { return nil }
        for (e, n) in entityNodes where topology.nodes(of: e) != n { return nil }
        for (name, s) in services where topology.service(ofName: name) != s { return nil }
        for (e, p) in listenPorts where topology.listenPorts[e] != p { return nil }
        var out = result
        out.updatedNs = end
        out.symptoms = Analysis.shown(Analysis.sorted(inc.symptoms), at: end, configuration: configuration)
        return out
    }
}

extension SymptomState {
    /// Equal in everything an evaluation reads but its count and last time
    /// (`Analysis.shown`) and the provisional count it does not read.
    func sameAnalysis(as o: SymptomState) -> Bool {
        key == o.key && edgeFrom == o.edgeFrom && edgeTo == o.edgeTo && sinceNs == o.sinceNs && baseline == o.baseline && events == o.events
    }
}
