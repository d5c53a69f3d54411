import TapioCorrelation
import TapioQueryAPI
import TapioStore
import TapioWire

/// The engine's model as the query API's types: the one place the server
/// turns incidents and the dependency graph into answers. The shape is the
/// one docs/correlation-contract.md describes (and `Incident.explainJSON`
/// stores): confidences, factors and baselines rounded to three decimals.
extension QueryIncident {
    init(_ i: Incident, timeline withTimeline: Bool = false, explainWith weights: ConfidenceWeights? = nil) {
        func factor(_ f: TapioCorrelation.Factor) -> QueryIncident.Factor { .init(name: f.name, value: round3(f.value), weight: round3(f.weight)) }
        self.init(
            id: i.id, status: i.status.rawValue, title: i.title,
            openedAt: rfc3339(ns: i.openedNs), updatedAt: rfc3339(ns: i.updatedNs), resolvedAt: i.resolvedNs.map { rfc3339(ns: $0) },
            detectedAt: rfc3339(ns: i.detectedNs),
            affected: .init(nodes: i.affected.nodes, pods: i.affected.pods, services: i.affected.services),
            symptoms: i.symptoms.map { s in
                .init(entity: s.entity, kind: s.kind.rawValue, peer: s.peer, since: rfc3339(ns: s.sinceNs), last: rfc3339(ns: s.lastNs),
                      count: s.count, baseline: round3(s.baseline), baselineUnit: s.kind.baselineUnit, active: s.active)
            },
            rootCauses: i.rootCauses.map { c in
                .init(entity: c.entity, kind: c.kind.rawValue, confidence: round3(c.confidence), factors: c.factors.map(factor),
                      firstSeen: rfc3339(ns: c.firstSeenNs), evidence: c.evidence, nodes: c.nodes, inferred: c.inferred)
            },
            mergedIds: i.mergedIds, pages: i.pages)
        if withTimeline || weights != nil {
            timeline = i.timeline.map { e in
                .init(id: e.id, time: rfc3339(ns: e.timeNs), timeNs: e.timeNs, timeErrorNs: e.errorNs, node: e.node, kind: e.kind,
                      entity: e.entity, summary: e.summary, role: e.role, concurrentWith: e.concurrentWith)
            }
        }
        if let weights {
            links = i.links.map { l in
                .init(cause: .init(entity: l.causeEntity, kind: l.causeKind.rawValue),
                      symptom: .init(entity: l.symptomEntity, kind: l.symptomKind.rawValue, peer: l.symptomPeer),
                      relation: l.relation, confidence: round3(l.confidence), factors: l.factors.map(factor))
            }
            var w = ["bias": weights.bias]
            for name in ConfidenceWeights.factorNames { w[name] = weights.weight(name) }
            self.weights = w
            model = "confidence = 1 / (1 + exp(-(bias + sum(weight * value))))"
        }
    }

    /// An incident the store holds (its `explain` document as saved).
    init(stored: StoredIncident) throws {
        self = try QueryCoding.decode(QueryIncident.self, from: Array(stored.json.utf8))
    }
}

extension ServicesAnswer {
    init(_ graph: DependencyGraph) {
        func latency(_ l: DependencyGraph.LatencySummary) -> ServiceEdge.Latency {
            .init(count: Int64(clamping: l.count), meanMs: round3(l.meanNs / 1e6), p50Ms: round3(Double(l.quantileNs(0.5)) / 1e6),
                  p99Ms: round3(Double(l.quantileNs(0.99)) / 1e6), maxMs: round3(Double(l.maxNs) / 1e6))
        }
        self.init(services: graph.edges.map { e in
            ServiceEdge(client: e.client, server: e.server, connects: Int64(clamping: e.connects), failures: Int64(clamping: e.failureCount),
                        failuresByOutcome: e.failures.mapValues { Int64(clamping: $0) },
                        failureRatio: e.connects == 0 ? 0 : round3(Double(e.failureCount) / Double(e.connects)),
                        ports: e.ports.sorted().map { Int64($0) }, connectLatency: latency(e.connectLatency), responseLatency: latency(e.responseLatency),
                        srttMs: round3((e.roundTrip?.meanUs ?? 0) / 1000), firstSeen: rfc3339(ns: e.firstSeenNs), lastSeen: rfc3339(ns: e.lastSeenNs))
        }, names: graph.names)
    }
}

private func round3(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }
