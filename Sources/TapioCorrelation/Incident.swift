import TapioWire

/// An incident as the server answers it (docs/correlation-contract.md).
public struct Incident: Sendable, Equatable, Codable {
    public enum Status: String, Sendable, Codable {
        case open
        case resolved
    }

    public struct Affected: Sendable, Equatable, Codable {
        public var nodes: [String] = []
        public var pods: [String] = []
        public var services: [String] = []
    }

    public var id: String
    public var status: Status
    public var title: String
    /// When the engine opened it: the end of the bucket whose symptom opened it.
    public var openedNs: Int64
    public var updatedNs: Int64
    public var resolvedNs: Int64?
    /// The first symptom's first failing event.
    public var detectedNs: Int64
    public var affected = Affected()
    public var symptoms: [Symptom] = []
    /// Ranked, best first.
    public var rootCauses: [RootCause] = []
    /// Every cause → symptom link behind the candidates, best first.
    public var links: [CausalLink] = []
    public var timeline: [TimelineEntry] = []
    /// Ids of incidents merged into this one.
    public var mergedIds: [String] = []
    /// Worth paging a person: at least one candidate stands on a cause event
    /// the kernel reported (not only inferred from symptoms) and the best of
    /// them reaches `CorrelationConfiguration.pagingFloor`. An incident that
    /// does not page is still kept, answered and shown; alerts skip it.
    public var pages = false
    /// Set when the leading candidate is a listener closed on purpose: the
    /// engine holds such an incident back while a restart may follow.
    var plannedStop: PlannedStop?

    /// The entry of the `incidents` answer.
    public func toJSON() -> JSONValue {
        .object([
            "id": .string(id), "status": .string(status.rawValue), "title": .string(title),
            "opened_at": .string(rfc3339(ns: openedNs)), "updated_at": .string(rfc3339(ns: updatedNs)),
            "resolved_at": resolvedNs.map { .string(rfc3339(ns: $0)) } ?? .null,
            "detected_at": .string(rfc3339(ns: detectedNs)),
            "affected": .object(["nodes": .array(affected.nodes.map { .string($0) }), "pods": .array(affected.pods.map { .string($0) }),
                                 "services": .array(affected.services.map { .string($0) })]),
            "symptoms": .array(symptoms.map(\.json)),
            "root_causes": .array(rootCauses.map(\.json)),
            "merged_ids": .array(mergedIds.map { .string($0) }), "pages": .bool(pages),
        ])
    }

    /// The answer of `timeline`: the incident plus its events across nodes.
    public func timelineJSON() -> JSONValue {
        guard case .object(var o) = toJSON() else { return .null }
        o["timeline"] = .array(timeline.map(\.json))
        return .object(o)
    }

    /// The answer of `explain`: the incident, its timeline and every link with its factors.
    public func explainJSON(weights: ConfidenceWeights) -> JSONValue {
        guard case .object(var o) = timelineJSON() else { return .null }
        o["links"] = .array(links.map(\.json))
        var w: [String: JSONValue] = ["bias": .double(weights.bias)]
        for name in ConfidenceWeights.factorNames { w[name] = .double(weights.weight(name)) }
        o["weights"] = .object(w)
        o["model"] = .string("confidence = 1 / (1 + exp(-(bias + sum(weight * value))))")
        return .object(o)
    }
}

public struct Symptom: Sendable, Equatable, Codable {
    /// Where it is measured.
    public var entity: String
    public var kind: SymptomKind
    /// The entity it concerns (a server, a DNS name), nil for the entity itself.
    public var peer: String?
    /// First failing event of its first firing window.
    public var sinceNs: Int64
    /// End of the last bucket in which it fired.
    public var lastNs: Int64
    /// Failing events (counts) or elevated samples (levels) while it fired.
    public var count: Int64
    /// The entity's own baseline before it fired, in `kind.baselineUnit`.
    public var baseline: Double
    public var active: Bool

    var json: JSONValue {
        var o: [String: JSONValue] = [
            "entity": .string(entity), "kind": .string(kind.rawValue), "since": .string(rfc3339(ns: sinceNs)),
            "last": .string(rfc3339(ns: lastNs)), "count": .int(count), "baseline": .double(round3(baseline)),
            "baseline_unit": .string(kind.baselineUnit), "active": .bool(active),
        ]
        if let peer { o["peer"] = .string(peer) }
        return .object(o)
    }
}

public struct RootCause: Sendable, Equatable, Codable {
    public var entity: String
    public var kind: CauseKind
    /// A probability, calibrated on lab runs (docs/correlation.md).
    public var confidence: Double
    public var factors: [Factor]
    public var firstSeenNs: Int64
    /// `<time> <node> <event kind> <summary>` of the events behind it.
    public var evidence: [String]
    /// Nodes of its events.
    public var nodes: [String]
    /// Inferred from symptoms alone (no cause event seen).
    public var inferred: Bool

    public init(entity: String, kind: CauseKind, confidence: Double, factors: [Factor], firstSeenNs: Int64, evidence: [String], nodes: [String], inferred: Bool) {
        self.entity = entity
        self.kind = kind
        self.confidence = confidence
        self.factors = factors
        self.firstSeenNs = firstSeenNs
        self.evidence = evidence
        self.nodes = nodes
        self.inferred = inferred
    }

    var json: JSONValue {
        .object([
            "entity": .string(entity), "kind": .string(kind.rawValue), "confidence": .double(round3(confidence)),
            "factors": .array(factors.map(\.json)), "first_seen": .string(rfc3339(ns: firstSeenNs)),
            "evidence": .array(evidence.map { .string($0) }), "nodes": .array(nodes.map { .string($0) }), "inferred": .bool(inferred),
        ])
    }
}

/// One cause → symptom link with its own confidence.
public struct CausalLink: Sendable, Equatable, Codable {
    public var causeEntity: String
    public var causeKind: CauseKind
    public var symptomEntity: String
    public var symptomKind: SymptomKind
    public var symptomPeer: String?
    /// How the cause reaches the symptom: `self`, `direct`, `cascade`, `graph`, `same_node`.
    public var relation: String
    public var confidence: Double
    public var factors: [Factor]

    var json: JSONValue {
        var s: [String: JSONValue] = ["entity": .string(symptomEntity), "kind": .string(symptomKind.rawValue)]
        if let symptomPeer { s["peer"] = .string(symptomPeer) }
        return .object([
            "cause": .object(["entity": .string(causeEntity), "kind": .string(causeKind.rawValue)]),
            "symptom": .object(s), "relation": .string(relation), "confidence": .double(round3(confidence)),
            "factors": .array(factors.map(\.json)),
        ])
    }
}

/// One event of an incident on the corrected clock. Events on different
/// nodes whose uncertainty intervals overlap are `concurrentWith` each other:
/// their order is not known. Events of one node share a clock and keep their order.
public struct TimelineEntry: Sendable, Equatable, Codable {
    public var id: String
    public var timeNs: Int64
    public var errorNs: Int64
    public var node: String
    /// The event kind (`oom_kill`, `tcp_connect`, …).
    public var kind: String
    public var entity: String
    public var summary: String
    /// `cause` or `symptom`.
    public var role: String
    public var concurrentWith: [String]

    var json: JSONValue {
        .object([
            "id": .string(id), "time": .string(rfc3339(ns: timeNs)), "time_ns": .int(timeNs), "time_error_ns": .int(errorNs),
            "node": .string(node), "kind": .string(kind), "entity": .string(entity), "summary": .string(summary),
            "role": .string(role), "concurrent_with": .array(concurrentWith.map { .string($0) }),
        ])
    }
}

/// A listener closed on purpose (a stop request, a graceful shutdown) and
/// when its entity listened on the port again, if it has.
struct PlannedStop: Sendable, Equatable, Codable {
    var closedNs: Int64
    var reopenedNs: Int64?
}
