import Foundation
import TapioWire

/// A root-cause candidate before scoring.
struct Candidate: Sendable {
    var entity: String
    var kind: CauseKind
    /// Its cause events, absorbed ones included, in time order.
    var events: [CauseEvent]
    /// Kinds folded into this one (an OOM kill's exit and closed listener).
    var absorbed: [CauseKind] = []
    var quality: Double
    var inferred = false
    /// For an inferred candidate: the symptoms' events it stands on.
    var symptomEvents: [ObservedEvent] = []
    var inferredSince: Int64 = 0
    /// For a closed listener: every close was on purpose (a stop request or
    /// a graceful shutdown), and when the entity listened again on that port.
    var plannedStop: PlannedStop?
    /// The node itself short of CPU or memory, with no neighbour to name.
    var nodeShortage = false
    /// The kernel saw what rules this kind out (the `contradicted` factor).
    var contradicted = false

    var firstSeenNs: Int64 { events.first?.timeNs ?? inferredSince }
    var nodes: Set<String> { inferred ? Set(symptomEvents.map(\.node)) : Set(events.map(\.node)) }
    var addresses: Set<String> { events.reduce(into: Set<String>()) { $0.formUnion($1.addresses) } }
    var ports: Set<UInt16> { Set(events.map(\.port).filter { $0 != 0 }) }
}

/// One evaluation of an incident: candidates from cause events along the
/// failing paths, links to symptoms, factors, confidence, timeline.
struct Analysis {
    let engine: CorrelationEngine
    var cfg: CorrelationConfiguration { engine.configuration }
    /// What this analysis read of the engine's state (every read goes
    /// through the accessors below): what `Evaluation` checks before it
    /// answers an incident again without evaluating it.
    let reads = EvaluationReads()

    private struct Link {
        var symptom: SymptomState
        var relation: String
        var topology: Double
        var time: Double
        var prior: Double
    }

    func evaluate(_ inc: IncidentState, at end: Int64) -> Incident {
        let symptoms = Analysis.sorted(inc.symptoms)
        let detected = symptoms.map(\.sinceNs).min() ?? inc.openedNs
        let from = detected - cfg.causeLookbackNs
        // A cause comes before what it explains: one that began after the
        // last symptom's onset (plus the lag of sampled signals) is no candidate.
        let lastOnset = symptoms.map(\.sinceNs).max() ?? detected
        let until = min(end, lastOnset + cfg.causeLagNs)
        // What the kernel reports at once (an OOM kill, an exit, a closed
        // listener) gets no sampling lag: only the interval a symptom's
        // aggregate covers and both clocks' uncertainty. A listener closed
        // after its clients had already begun to fail is not why they fail.
        let symptomClock = symptoms.compactMap { $0.events.first.map { err($0.errorNs) } }.max() ?? 0
        func early(_ c: Candidate) -> Bool {
            guard [.oomKill, .crash, .crashLoop, .listenerClosed].contains(c.kind) else { return c.firstSeenNs <= until }
            let clock = err(c.events.first?.observed.errorNs ?? -1) + symptomClock
            return c.firstSeenNs <= min(end, lastOnset + cfg.eventCauseLagNs + clock)
        }

        // The failing paths: client → server edges of the symptoms.
        var adjacency: [String: Set<String>] = [:]
        for s in symptoms {
            if let f = s.edgeFrom, let t = s.edgeTo, f != t { adjacency[f, default: []].insert(t) }
        }
        func depth(_ a: String, _ b: String) -> Int? {
            if a == b { return 0 }
            var seen: Set<String> = [a]
            var frontier = [a]
            var d = 0
            while !frontier.isEmpty {
                d += 1
                var next: [String] = []
                for x in frontier {
                    for y in (adjacency[x] ?? []).sorted() where !seen.contains(y) {
                        if y == b { return d }
                        seen.insert(y)
                        next.append(y)
                    }
                }
                frontier = next
            }
            return nil
        }
        let pathEntities = Set(adjacency.keys).union(adjacency.values.flatMap { $0 })
        let selfObservers = Set(symptoms.filter { $0.edgeTo == nil }.map(\.key.observer))

        // Observed candidates on the paths and one hop further down the graph.
        var examine = pathEntities.union(selfObservers)
        for t in symptoms.compactMap(\.edgeTo) { examine.formUnion(dependencies(of: t)) }
        var candidates: [Candidate] = []
        for e in examine.sorted() {
            // A listener closed after the last symptom began (the next
            // rolling restart, 30 s later) is not why these symptoms began:
            // with it, the restart that did explain them looked unfinished.
            let all = causeEvents(of: e, from: from, to: end, end: end).filter { c in
                c.signal != .listenerClosed || c.timeNs <= min(end, lastOnset + cfg.eventCauseLagNs + err(c.observed.errorNs) + symptomClock)
            }
            candidates += structured(all.filter { ![.workloadStart, .listenerOpened, .nodeContention, .cpuUsage, .cpuPressure].contains($0.signal) },
                                     opened: all.filter { $0.signal == .listenerOpened }).filter(early)
        }

        // Firewall or loss: netfilter drops are read by what got through
        // meanwhile (see `dropReading`).
        for e in Set(candidates.filter { [.firewallDrop, .packetLoss].contains($0.kind) }.map(\.entity)).sorted() {
            let fw = candidates.firstIndex { $0.entity == e && $0.kind == .firewallDrop }
            let pl = candidates.firstIndex { $0.entity == e && $0.kind == .packetLoss }
            let drops = ((fw.map { candidates[$0].events } ?? []) + (pl.map { candidates[$0].events } ?? [])).filter(\.netfilter)
                .sorted { ObservedEvent.precedes($0.observed, $1.observed) }
            guard let reading = dropReading(drops) else { continue }
            let quality = drops.map(\.quality).max() ?? 0
            switch reading {
            case .fraction:
                if let fw { candidates[fw].contradicted = true }
                if pl == nil { candidates.append(Candidate(entity: e, kind: .packetLoss, events: drops, quality: quality)) }
            case .everything:
                if let pl, candidates[pl].events.allSatisfy(\.netfilter) { candidates[pl].contradicted = true }
                if fw == nil { candidates.append(Candidate(entity: e, kind: .firewallDrop, events: drops, quality: quality)) }
            }
        }

        // Noisy neighbours: another workload on a victim's node, named only
        // on evidence that the victim was starved while the neighbour
        // consumed. Being near is not enough: a probe, a short job or a
        // process that started while nobody lacked anything is no neighbour.
        let victimSymptoms = symptoms.filter { [.latency, .connectTimeout, .retransmits, .throttling].contains($0.key.kind) }
        var victimNodes: [String: Set<String>] = [:]
        var victimOnset: [String: Int64] = [:]  // node → earliest victim symptom
        for s in victimSymptoms {
            // A workload throttled by its own quota off the failing paths is
            // not a victim (it may be the neighbour).
            if s.edgeTo == nil && !pathEntities.contains(s.key.observer) { continue }
            let v = s.edgeTo ?? s.key.observer
            var nodes = entityNodes(of: v)
            if s.key.observer == v { nodes.formUnion(s.events.map(\.node)) }
            victimNodes[v, default: []].formUnion(nodes)
            for n in nodes { victimOnset[n] = min(victimOnset[n] ?? .max, s.sinceNs) }
        }
        let victims = Set(victimNodes.keys)
        for node in victimOnset.keys.sorted() {
            let onNode = causeEntities(onNode: node).sorted()
            let lo = max(from, victimOnset[node]! - cfg.starvationLeadNs)
            // Starvation: the node itself short of CPU or memory (a cgroup
            // above the pods throttled or under pressure), or a victim on it
            // stalled on memory (PSI: reclaim). A victim throttled by its own
            // quota is short of its own limit, which no neighbour changes:
            // that is its own cpu_throttle.
            // It must show near the symptoms; it began where its unbroken run
            // of samples began (a shortage that was there before a process
            // started is not that process's doing).
            // On a host without pods there is no cgroup above pods: a
            // throttled cgroup there is a service held to its own quota (a
            // sibling), which starves nobody.
            let podsHere = hasPods(node: node)
            let nodeEvents = onNode.flatMap { causeEvents(of: $0, from: from, to: until, end: end) }.filter { $0.node == node }
            let contentionAll = nodeEvents.filter { podsHere && $0.signal == .nodeContention }
            let victimEvents = victims.sorted().flatMap { causeEvents(of: $0, from: from, to: until, end: end) }.filter { $0.node == node }
            let stalls = victimEvents.filter { $0.signal == .memoryPressure && memoryStall($0) }
            // CPU pressure (where the agent reports it): a victim waiting for
            // a CPU while not throttled by its own quota, or the node's root
            // waiting — unless a victim here was held to its own quota, whose
            // waits the node's figure includes.
            let ownQuota = victimEvents.contains { $0.signal == .cpuThrottle && $0.timeNs >= lo }
            let cpuWaits = victimEvents.filter { $0.signal == .cpuPressure }
                + nodeEvents.filter { podsHere && !ownQuota && $0.signal == .cpuPressure && isNodeRoot($0) }
            var starvation = (contentionAll + stalls + cpuWaits).sorted { ObservedEvent.precedes($0.observed, $1.observed) }
            if let near = starvation.firstIndex(where: { $0.timeNs >= lo }) {
                var start = near
                while start > 0 && starvation[start].timeNs - starvation[start - 1].timeNs <= cfg.starvationGapNs { start -= 1 }
                starvation.removeFirst(start)
            } else {
                starvation = []
            }
            let contention = starvation.filter { $0.signal == .nodeContention }
            var named = false
            if let first = starvation.first?.timeNs, let last = starvation.last?.timeNs {
                let slack = cfg.neighbourSlackNs
                let cpuShort = starvation.contains { isCPU($0) }
                let memoryShort = starvation.contains { !isCPU($0) }
                // Where the node's agent reports CPU usage (its root's
                // samples), CPU is consumed by using it: a pod's share of
                // what the node used over the shortage. Elsewhere (older
                // agents) the rule of before: throttled at its own quota, or
                // started before the shortage and still running.
                let usage = cpuShort ? cpuConsumption(node: node, excluding: pathEntities.union(victims),
                                                      from: first - slack, to: last + slack, lookback: from) : nil
                let neighbours = Set(onNode).union(usage == nil ? [] : cpuUsage.pods(of: node)).sorted()
                for x in neighbours where !pathEntities.contains(x) && !victims.contains(x) {
                    // What the neighbour consumed meanwhile, for the
                    // resource the victim lacked: CPU it used (where usage is
                    // reported; its evidence is when it began to consume and
                    // its latest samples), else its own quota used up
                    // (throttled); its memory at the limit; or it started
                    // before the starvation began and still ran when it last
                    // showed.
                    let consumed = usage?.consumers.contains(x) == true
                        ? usageSamples(node: node, pod: x, end: end).filter { $0.timeNs >= from && $0.timeNs <= until } : []
                    let evs = consumed + causeEvents(of: x, from: from, to: until, end: end).filter { c in
                        guard c.node == node else { return false }
                        let during = c.timeNs >= first - slack && c.timeNs <= last + slack
                        switch c.signal {
                        case .cpuThrottle: return usage == nil && cpuShort && during
                        case .memoryPressure: return memoryShort && during
                        case .workloadStart:
                            // Where usage is known, a start is no evidence of
                            // consuming CPU; for memory it stays as it was.
                            guard usage == nil || memoryShort, c.timeNs <= first + slack else { return false }
                            let exit = exitTime(node: c.node, pid: c.observed.event.pid)
                            return exit == nil || exit! >= last - slack
                        default: return false
                        }
                    }
                    guard !evs.isEmpty, !candidates.contains(where: { $0.entity == x && $0.kind == .noisyNeighbour }) else { continue }
                    let all = (evs + starvation).sorted { ObservedEvent.precedes($0.observed, $1.observed) }
                    candidates.append(Candidate(entity: x, kind: .noisyNeighbour, events: all, quality: evs.map(\.quality).max() ?? 0))
                    named = true
                }
            }
            // No neighbour to name: the node's own shortage is the candidate.
            if !named, let first = contention.first, !candidates.contains(where: { $0.entity == first.entity }) {
                let cpu = contention.contains { isCPU($0) }
                var shortage = Candidate(entity: first.entity, kind: cpu ? .cpuThrottle : .memoryPressure, events: contention,
                                         quality: contention.map(\.quality).max() ?? 0)
                shortage.nodeShortage = true
                candidates.append(shortage)
            }
        }

        func relation(_ c: Candidate, _ s: SymptomState, _ keys: inout AddressKeys?) -> (String, Double)? {
            let e = c.entity
            if c.kind == .noisyNeighbour || c.nodeShortage {
                if s.edgeTo == nil && s.key.observer == e { return ("self", 0.9) }
                let v = s.edgeTo ?? s.key.observer
                if victims.contains(v), !(victimNodes[v] ?? []).isDisjoint(with: c.nodes), victimSymptoms.contains(s) { return ("same_node", 0.6) }
                return nil
            }
            if let to = s.edgeTo {
                if to == e {
                    if keys == nil { keys = addressKeys(c) }
                    return ("direct", addressMatch(c, keys!, s) ? 1.0 : 0.8)
                }
                if let d = depth(to, e) { return ("cascade", 0.75 * pow(0.95, Double(d - 1))) }
                if hasEdge(to, e) { return ("graph", 0.4) }
                if c.kind == .dnsFailure, service(ofName: e) == to { return ("dns", 0.6) }
                if s.edgeFrom == e, [.firewallDrop, .packetLoss].contains(c.kind) { return ("client_side", 0.6) }
                return nil
            }
            if s.key.observer == e { return ("self", 0.9) }
            if let d = depth(s.key.observer, e), d > 0 { return ("cascade", 0.7 * pow(0.95, Double(d - 1))) }
            return nil
        }

        func links(_ c: Candidate) -> [Link] {
            // A candidate's addresses and ports, gathered from its events
            // once for all its symptoms rather than once per symptom.
            var keys: AddressKeys?
            return symptoms.compactMap { s in
                guard let (rel, topo) = relation(c, s, &keys) else { return nil }
                // A closed listener is felt by those who talk to it as
                // connections refused or broken, never as a slower answer or
                // retransmitted segments: nothing reaches a closed port. (A
                // replica drained and stopped, then a slow client elsewhere,
                // once paged as the replica's listener_closed.) Symptoms
                // further up a cascade keep their link.
                if c.kind == .listenerClosed, rel == "direct" || rel == "graph",
                   ![.connectRefused, .connectErrors, .resets].contains(s.key.kind) { return nil }
                // Lost and retransmitted segments belong to the path they
                // were sent on: a failure further along a cascade slows or
                // fails the answers that come back over that path, it does not
                // make its segments go missing. (A replica scaled down behind
                // the frontend once paged for the frontend's retransmits to a
                // slow client on its other side.)
                if rel == "cascade", [.retransmits, .packetDrops].contains(s.key.kind) { return nil }
                return Link(symptom: s, relation: rel, topology: topo, time: c.inferred ? 0.5 : proximity(c, s), prior: cfg.priors.prior(c.kind, s.key.kind))
            }
        }

        var scored: [(Candidate, [Link])] = candidates.map { ($0, links($0)) }.filter { !$0.1.isEmpty }

        // Symptoms' ends with no cause seen: an inferred candidate there.
        let observedEntities = Set(scored.map(\.0.entity))
        var sinks = Set(symptoms.compactMap(\.edgeTo)).union(selfObservers).filter { (adjacency[$0] ?? []).isEmpty }
        sinks.subtract(observedEntities)
        for t in sinks.sorted() {
            let into = symptoms.filter { $0.edgeTo == t || ($0.edgeTo == nil && $0.key.observer == t) }
            var votes: [CauseKind: Int] = [:]
            for s in into { votes[inferredKind(s.key.kind), default: 0] += 1 }
            guard let kind = votes.keys.sorted().max(by: { votes[$0]! < votes[$1]! }) else { continue }
            var c = Candidate(entity: t, kind: kind, events: [], quality: 0, inferred: true)
            c.symptomEvents = into.flatMap(\.events).sorted(by: ObservedEvent.precedes)
            c.inferredSince = into.map(\.sinceNs).min() ?? detected
            let l = links(c)
            if !l.isEmpty { scored.append((c, l)) }
        }

        // Score.
        let w = cfg.weights
        var causes: [(RootCause, [CausalLink])] = []
        for (c, ls) in scored {
            let outs = adjacency[c.entity] ?? []
            var deepest = 1.0
            if !outs.isEmpty {
                let below = scored.contains { other in
                    !other.0.inferred && other.0.entity != c.entity && (depth(c.entity, other.0.entity) ?? 0) > 0
                }
                deepest = below ? 0 : 0.5
            }
            let factors = [
                Factor(name: "time_proximity", value: ls.map(\.time).max() ?? 0, weight: w.timeProximity),
                Factor(name: "topology_match", value: ls.map(\.topology).max() ?? 0, weight: w.topologyMatch),
                Factor(name: "metadata_match", value: c.quality, weight: w.metadataMatch),
                Factor(name: "symptoms_explained", value: Double(ls.count) / Double(max(symptoms.count, 1)), weight: w.symptomsExplained),
                Factor(name: "pattern_prior", value: ls.map(\.prior).reduce(0, +) / Double(ls.count), weight: w.patternPrior),
                Factor(name: "deepest", value: deepest, weight: w.deepest),
                Factor(name: "observed_cause", value: c.inferred ? 0 : 1, weight: w.observedCause),
                Factor(name: "contradicted", value: c.contradicted ? 1 : 0, weight: w.contradicted),
            ]
            let p = confidence(of: factors, bias: w.bias)
            let evidence: [String]
            if c.inferred {
                evidence = c.symptomEvents.prefix(cfg.maxEvidence).map { evidenceLine($0, summarize($0, entity: symptomEntity(of: $0, in: symptoms))) }
            } else {
                var evs = Array(c.events.prefix(cfg.maxEvidence - 1))
                if let last = c.events.last, c.events.count >= cfg.maxEvidence { evs.append(last) }
                evidence = evs.map { evidenceLine($0.observed, $0.summary) }
            }
            let root = RootCause(entity: c.entity, kind: c.kind, confidence: p, factors: factors, firstSeenNs: c.firstSeenNs,
                                 evidence: evidence, nodes: c.nodes.sorted(), inferred: c.inferred)
            let causal = ls.map { l -> CausalLink in
                let lf = [
                    Factor(name: "time_proximity", value: l.time, weight: w.timeProximity),
                    Factor(name: "topology_match", value: l.topology, weight: w.topologyMatch),
                    Factor(name: "metadata_match", value: c.quality, weight: w.metadataMatch),
                    Factor(name: "symptoms_explained", value: 1, weight: w.symptomsExplained),
                    Factor(name: "pattern_prior", value: l.prior, weight: w.patternPrior),
                    Factor(name: "deepest", value: deepest, weight: w.deepest),
                    Factor(name: "observed_cause", value: c.inferred ? 0 : 1, weight: w.observedCause),
                    Factor(name: "contradicted", value: c.contradicted ? 1 : 0, weight: w.contradicted),
                ]
                return CausalLink(causeEntity: c.entity, causeKind: c.kind, symptomEntity: l.symptom.key.observer, symptomKind: l.symptom.key.kind,
                                  symptomPeer: l.symptom.key.peer.isEmpty ? nil : l.symptom.key.peer, relation: l.relation,
                                  confidence: confidence(of: lf, bias: w.bias), factors: lf)
            }
            causes.append((root, causal))
        }
        causes.sort { a, b in
            if a.0.confidence != b.0.confidence { return a.0.confidence > b.0.confidence }
            if a.0.inferred != b.0.inferred { return !a.0.inferred }
            return (a.0.entity, a.0.kind.rawValue) < (b.0.entity, b.0.kind.rawValue)
        }
        let kept = Array(causes.prefix(cfg.maxCandidates))
        let top = kept.first.flatMap { k in scored.first { !$0.0.inferred && $0.0.entity == k.0.entity && $0.0.kind == k.0.kind }?.0 }

        var out = Incident(id: inc.id, status: .open, title: "", openedNs: inc.openedNs, updatedNs: end, detectedNs: detected)
        out.mergedIds = inc.mergedIds
        out.symptoms = Analysis.shown(symptoms, at: end, configuration: cfg)
        out.rootCauses = kept.map(\.0)
        out.links = kept.flatMap(\.1).sorted { a, b in
            if a.confidence != b.confidence { return a.confidence > b.confidence }
            return (a.causeEntity, a.causeKind.rawValue, a.symptomEntity, a.symptomKind.rawValue, a.symptomPeer ?? "")
                < (b.causeEntity, b.causeKind.rawValue, b.symptomEntity, b.symptomKind.rawValue, b.symptomPeer ?? "")
        }
        out.title = title(out)
        out.pages = (out.rootCauses.filter { !$0.inferred }.map(\.confidence).max() ?? 0) >= cfg.pagingFloor
        out.plannedStop = top?.plannedStop

        // Timeline and what is affected: the symptoms' events and those of the leading candidates.
        var entries: [(ObservedEvent, String, String, String)] = []  // event, entity, summary, role
        for s in symptoms {
            for e in s.events { entries.append((e, s.key.observer, summarize(e, entity: s.key.observer), "symptom")) }
        }
        let leading = scored.filter { c in kept.prefix(3).contains { !$0.0.inferred && $0.0.entity == c.0.entity && $0.0.kind == c.0.kind } }.map(\.0)
        for c in leading {
            var evs = Array(c.events.prefix(cfg.maxEvidence - 1))
            if let last = c.events.last, c.events.count >= cfg.maxEvidence { evs.append(last) }
            for ce in evs { entries.append((ce.observed, ce.entity, ce.summary, "cause")) }
        }
        entries.sort { a, b in
            if a.0 != b.0 { return ObservedEvent.precedes(a.0, b.0) }
            return (a.3, a.1) < (b.3, b.1)
        }
        // One entry per event; an event that is both a symptom's and a cause's is shown as the cause.
        var unique: [(ObservedEvent, String, String, String)] = []
        for e in entries {
            if let i = unique.firstIndex(where: { $0.0 == e.0 }) {
                if e.3 == "cause" { unique[i] = e }
            } else {
                unique.append(e)
            }
        }
        var timeline = unique.enumerated().map { i, e in
            TimelineEntry(id: "t\(i + 1)", timeNs: e.0.timeNs, errorNs: e.0.errorNs, node: e.0.node, kind: e.0.event.kind.name, entity: e.1,
                          summary: e.2, role: e.3, concurrentWith: [])
        }
        for i in timeline.indices {
            for j in timeline.indices where i != j && timeline[i].node != timeline[j].node {
                let ei = err(timeline[i].errorNs), ej = err(timeline[j].errorNs)
                if timeline[i].timeNs - ei <= timeline[j].timeNs + ej && timeline[j].timeNs - ej <= timeline[i].timeNs + ei {
                    timeline[i].concurrentWith.append(timeline[j].id)
                }
            }
        }
        out.timeline = timeline

        var nodes = Set<String>(), pods = Set<String>(), services = Set<String>()
        for e in unique {
            nodes.insert(e.0.node)
            let ev = e.0.event
            // Both read the inventory alone (`Evaluation` checks its stamp).
            if !ev.pod.isEmpty { pods.insert(ev.pod) } else if let p = engine.topology.entity(of: e.0).pod { pods.insert(p.info.name) }
            if let dst = flowOf(ev)?.destination, let p = engine.topology.pod(ip: dst.description) { pods.insert(p.name) }
        }
        var named = Set(symptoms.map(\.key.observer)).union(symptoms.compactMap(\.edgeTo))
        if let top = out.rootCauses.first { named.insert(top.entity) }
        for n in named where engine.topology.isService(n) { services.insert(n) }  // the inventory
        out.affected = Incident.Affected(nodes: nodes.sorted(), pods: pods.sorted(), services: services.sorted())
        return out
    }

    /// The symptoms as the incident shows them, in the analysis' order.
    /// Their counts and last times go nowhere else in an evaluation
    /// (`Evaluation` sets them again when it reuses one).
    static func shown(_ sorted: [SymptomState], at end: Int64, configuration cfg: CorrelationConfiguration) -> [Symptom] {
        sorted.map { s in
            let k = s.key.kind
            let unit = cfg.bucketNs
            let baseline = k.isLevel ? s.baseline : s.baseline * 1e9 / Double(unit)
            return Symptom(entity: s.key.observer, kind: k, peer: s.key.peer.isEmpty ? nil : s.key.peer, sinceNs: s.sinceNs, lastNs: s.lastNs,
                           count: Int64(s.count.rounded()), baseline: baseline, active: s.lastNs == end)
        }
    }

    /// The order the analysis takes symptoms in.
    static func sorted(_ symptoms: [SeriesKey: SymptomState]) -> [SymptomState] {
        symptoms.values.sorted { ($0.sinceNs, $0.key) < ($1.sinceNs, $1.key) }
    }

    /// An entity's cause events as candidates: the deepest of OOM kill,
    /// disk full, crash loop, crash and closed listener absorbs those that
    /// came with or after it (the exit and closed listener of an OOM-killed
    /// process are the OOM kill); network, DNS and resource signals stand alone.
    private func structured(_ events: [CauseEvent], opened: [CauseEvent]) -> [Candidate] {
        guard !events.isEmpty else { return [] }
        var by: [Signal: [CauseEvent]] = [:]
        for e in events { by[e.signal, default: []].append(e) }
        func make(_ kind: CauseKind, _ evs: [CauseEvent]) -> Candidate {
            Candidate(entity: evs[0].entity, kind: kind, events: evs, quality: evs.map(\.quality).max() ?? 0)
        }
        var chain: [Candidate] = []
        if let d = by[.diskFull] { chain.append(make(.diskFull, d)) }
        if let o = by[.oomKill] { chain.append(make(.oomKill, o)) }
        if let x = by[.exit] { chain.append(make(isCrashLoop(x) ? .crashLoop : .crash, x)) }
        var listenerReopenedNs: Int64?
        if let l = by[.listenerClosed] {
            var c = make(.listenerClosed, l)
            // On purpose, and no process of the entity crashed after it (a
            // restart that crashes is no restart).
            let crashedAfter = (by[.exit] ?? []).contains { $0.timeNs > (l.last?.timeNs ?? .max) }
            if let last = l.last {
                let ports = Set(l.map(\.port))
                listenerReopenedNs = opened.first { $0.timeNs > last.timeNs && ports.contains($0.port) }?.timeNs
                if !crashedAfter, l.allSatisfy({ closedOnPurpose(node: $0.node, pid: $0.observed.event.pid) }) {
                    c.plannedStop = PlannedStop(closedNs: last.timeNs, reopenedNs: listenerReopenedNs)
                }
            }
            chain.append(c)
        }
        var out: [Candidate] = []
        if var top = chain.first {
            let start = top.firstSeenNs - 1_000_000_000
            for c in chain.dropFirst() {
                // A listener closed by a stop shortly before the restarted
                // process crashed (a rollout into a bad configuration) is the
                // crash's too: it never came back.
                let restartedIntoCrash = c.kind == .listenerClosed && [.crash, .crashLoop].contains(top.kind)
                    && (listenerReopenedNs.map { $0 > top.firstSeenNs } ?? true)
                    && (c.events.last?.timeNs ?? .min) >= top.firstSeenNs - cfg.restartGraceNs
                if (c.events.last?.timeNs ?? .min) >= start || restartedIntoCrash {
                    top.events += c.events
                    top.absorbed.append(c.kind)
                } else {
                    out.append(c)
                }
            }
            if top.kind == .oomKill, let m = by[.memoryPressure] {
                top.events += m
                top.absorbed.append(.memoryPressure)
                by[.memoryPressure] = nil
            }
            top.events.sort { ObservedEvent.precedes($0.observed, $1.observed) }
            out.insert(top, at: 0)
        }
        let standalone: [(Signal, CauseKind)] = [(.firewallDrop, .firewallDrop), (.packetLoss, .packetLoss), (.dnsFailure, .dnsFailure),
                                                 (.cpuThrottle, .cpuThrottle), (.memoryPressure, .memoryPressure),
                                                 (.networkLatency, .networkLatency)]
        // Drops on a path explain its slowness as well (a lost segment
        // waits out a retransmit timeout; a queue that overflows was deep
        // first): where the entity's traffic is dropped, its slow round
        // trips are the loss's evidence, not a second cause beside it.
        let dropping = by[.packetLoss] != nil ? Signal.packetLoss : by[.firewallDrop] != nil ? .firewallDrop : nil
        for (sig, kind) in standalone {
            guard let evs = by[sig], !(sig == .networkLatency && dropping != nil) else { continue }
            var c = make(kind, evs)
            if sig == dropping, let slow = by[.networkLatency] {
                c.events = (c.events + slow).sorted { ObservedEvent.precedes($0.observed, $1.observed) }
                c.absorbed.append(.networkLatency)
            }
            out.append(c)
        }
        return out
    }

    enum DropReading {
        /// The same clients still got through: a fraction of their packets
        /// is dropped (loss, e.g. a random or rate-based rule).
        case fraction
        /// Nothing got through to the dropped endpoints: a rule drops every
        /// packet (a firewall DROP).
        case everything
    }

    /// What netfilter drops (time-ordered) mean, from what got through to
    /// their server endpoints in the buckets strictly inside the drops
    /// (the first and last may hold traffic from before the rule came or
    /// after it went). Nil when that span is empty, or when other clients
    /// got through but none of the dropped ones did — which with address
    /// translation may be the same clients seen under another address.
    private func dropReading(_ drops: [CauseEvent]) -> DropReading? {
        guard let first = drops.first, let last = drops.last else { return nil }
        let from = floorDiv(first.timeNs, cfg.bucketNs) + 1, to = floorDiv(last.timeNs, cfg.bucketNs) - 1
        guard from <= to else { return nil }
        let servers = Set(drops.compactMap(\.serverEndpoint)).sorted()
        let clients = Set(drops.compactMap(\.clientAddress))
        guard !servers.isEmpty else { return nil }
        reads.deliveries = true
        if servers.contains(where: { engine.deliveries.delivered(server: $0, from: from, to: to, clients: clients) }) { return .fraction }
        if !servers.contains(where: { engine.deliveries.delivered(server: $0, from: from, to: to, clients: nil) }) { return .everything }
        return nil
    }

    private func isCPU(_ c: CauseEvent) -> Bool {
        if case .cpuThrottle = c.observed.event.detail { return true }
        return false
    }

    /// The event of a node's root cgroup (it carries the node's CPUs).
    private func isNodeRoot(_ c: CauseEvent) -> Bool {
        if case .cpuThrottle(_, _, _, _, _, let usage?) = c.observed.event.detail { return usage.node != nil }
        return false
    }

    struct CPUConsumption {
        /// Entities that consumed the CPU the victims lacked.
        var consumers: Set<String>
    }

    /// Who consumed the node's CPU in `from...to`, from the agents' usage
    /// samples; nil when the node's agent reports no usage since `lookback`
    /// (its root sends a sample every interval; an older agent none), so the
    /// rule of before applies. A consumer used at least `neighbourCPUShare`
    /// of what the node used, or at least `neighbourCPUCores` CPUs on
    /// average while it was the largest consumer apart from `excluding` (the
    /// victims and the failing paths).
    private func cpuConsumption(node: String, excluding: Set<String>, from: Int64, to: Int64, lookback: Int64) -> CPUConsumption? {
        let log = cpuUsage
        let lo = floorDiv(from, cfg.bucketNs), hi = floorDiv(to, cfg.bucketNs)
        guard log.reports(node: node, from: floorDiv(lookback, cfg.bucketNs), to: hi) else { return nil }
        let total = log.node(node, from: lo, to: hi)
        var byPod: [String: UInt64] = [:]
        for x in log.pods(of: node) where !excluding.contains(x) {
            let used = log.usage(node: node, pod: x, from: lo, to: hi)
            if used > 0 { byPod[x] = used }
        }
        let largest = byPod.values.max() ?? 0
        let consumers = byPod.filter { _, used in
            let share = total.usageNs == 0 ? 0 : Double(used) / Double(total.usageNs)
            let cores = total.intervalNs == 0 ? 0 : Double(used) / Double(total.intervalNs)
            return share >= cfg.neighbourCPUShare || (cores >= cfg.neighbourCPUCores && used == largest)
        }
        return CPUConsumption(consumers: Set(consumers.keys))
    }

    /// A memory_pressure sample whose PSI says the workload stalled on memory
    /// (reclaim) while it was not at its own limit: reclaim forced by the
    /// node, not by the workload's own size.
    private func memoryStall(_ c: CauseEvent) -> Bool {
        guard case .memoryPressure(_, _, let usage, let limit, let psi, _, _) = c.observed.event.detail else { return false }
        let atOwnLimit = limit > 0 && Double(usage) >= cfg.memoryPressureCauseUsage * Double(limit)
        return Double(psi) / 10 >= cfg.memoryPressureCausePsi && !atOwnLimit
    }

    private func isCrashLoop(_ exits: [CauseEvent]) -> Bool {
        let n = cfg.crashLoopExits
        guard exits.count >= n else { return false }
        for i in 0...(exits.count - n) where exits[i + n - 1].timeNs - exits[i].timeNs <= cfg.crashLoopWindowNs { return true }
        return false
    }

    private func err(_ e: Int64) -> Int64 { e < 0 ? cfg.unknownClockErrorNs : e }

    /// How close the cause is before the symptom, allowing for both clocks'
    /// uncertainty (none between events of one node: they share a clock).
    /// A symptom's onset is known to its bucket: it began somewhere between
    /// its first event in the firing bucket and the bucket's end, so a cause
    /// up to that end is not "after" it.
    private func proximity(_ c: Candidate, _ s: SymptomState) -> Double {
        let first = s.events.first
        let errS = err(first?.errorNs ?? -1)
        let onsetSlack = Double((floorDiv(s.sinceNs, cfg.bucketNs) + 1) * cfg.bucketNs - s.sinceNs)
        var best = 0.0
        for ce in c.events {
            let allowance = first?.node == ce.node ? 0 : errS + err(ce.observed.errorNs)
            let gap = Double(s.sinceNs - ce.timeNs)
            let a = Double(allowance)
            let v = gap >= -(a + onsetSlack) ? exp(-max(0, gap - a) / Double(cfg.timeDecayNs)) : 0.2 * exp(-(-gap - a - onsetSlack) / 1e9)
            best = max(best, v)
            if best >= 1 { break }  // nothing is closer than at once
        }
        return best
    }

    /// What identifies a candidate on the wire: its events' addresses and
    /// ports (with the ports its entity listened on, for kinds that stop a server).
    struct AddressKeys {
        var addresses: Set<String>
        var ports: Set<UInt16>
    }

    private func addressKeys(_ c: Candidate) -> AddressKeys {
        var ports = c.ports
        if [.oomKill, .crash, .crashLoop, .listenerClosed, .diskFull].contains(c.kind) {
            ports.formUnion(listenPorts(of: c.entity) ?? [])
        }
        return AddressKeys(addresses: c.addresses, ports: ports)
    }

    private func addressMatch(_ c: Candidate, _ keys: AddressKeys, _ s: SymptomState) -> Bool {
        let addrs = keys.addresses
        let ports = keys.ports
        for e in s.events {
            guard let f = flowOf(e.event) else { continue }
            if let d = f.destination?.description, addrs.contains(d) { return true }
            if [.firewallDrop, .packetLoss].contains(c.kind), let src = f.source?.description, addrs.contains(src) { return true }
            if f.destinationPort != 0 && ports.contains(f.destinationPort) { return true }
        }
        return false
    }

    private func inferredKind(_ k: SymptomKind) -> CauseKind {
        switch k {
        case .connectRefused: return .listenerClosed
        case .connectTimeout: return .firewallDrop
        case .connectErrors, .resets: return .crash
        case .retransmits, .packetDrops: return .packetLoss
        case .dnsErrors: return .dnsFailure
        case .latency, .throttling: return .cpuThrottle
        case .exits: return .crashLoop
        case .ioErrors: return .diskFull
        }
    }

    private func symptomEntity(of e: ObservedEvent, in symptoms: [SymptomState]) -> String {
        symptoms.first { $0.events.contains(e) }?.key.observer ?? e.node
    }

    private func title(_ inc: Incident) -> String {
        let kinds = Array(Set(inc.symptoms.map(\.kind.rawValue))).sorted().joined(separator: ", ")
        let at = Array(Set(inc.symptoms.map(\.entity))).sorted().joined(separator: ", ")
        if let top = inc.rootCauses.first {
            return "\(top.kind.rawValue) at \(top.entity): \(kinds) at \(at)"
        }
        return "\(kinds) at \(at)"
    }
}

func flowOf(_ e: TapioEvent) -> Flow? {
    switch e.detail {
    case .tcpConnect(let f, _, _, _, _), .tcpReset(let f, _, _, _), .tcpRetransmit(let f, _, _), .tcpLatency(let f, _, _, _, _, _):
        return f
    case .packetDrop(_, _, let f, _, _, _):
        return f
    default:
        return nil
    }
}
