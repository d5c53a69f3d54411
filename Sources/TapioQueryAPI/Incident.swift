import TapioWire

/// One incident as the `incidents`, `timeline`, `explain` and `subscribe`
/// answers carry it (docs/correlation-contract.md). The list leaves out
/// `timeline`, `links`, `weights` and `model`; `timeline` adds the timeline;
/// `explain` adds all four. Decoding is lenient about fields older servers
/// did not store (they read as empty), so incidents saved by an earlier
/// version still answer.
public struct QueryIncident: Sendable, Equatable, Codable {
    public struct Affected: Sendable, Equatable, Codable {
        public var nodes: [String]
        public var pods: [String]
        public var services: [String]

        public init(nodes: [String] = [], pods: [String] = [], services: [String] = []) {
            self.nodes = nodes
            self.pods = pods
            self.services = services
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(nodes: try c.value(.nodes, or: []), pods: try c.value(.pods, or: []), services: try c.value(.services, or: []))
        }
    }

    /// A change over a baseline where it is measured (connect_refused at api).
    public struct Symptom: Sendable, Equatable, Codable {
        public var entity: String
        public var kind: String
        /// The entity it concerns (a server, a DNS name), when not the entity itself.
        public var peer: String?
        /// RFC 3339: its first failing event, and the end of the last bucket it fired in.
        public var since: String
        public var last: String
        public var count: Int64
        /// The entity's own level before it fired, in `baselineUnit`.
        public var baseline: Double
        public var baselineUnit: String
        public var active: Bool

        public init(entity: String, kind: String, peer: String? = nil, since: String, last: String, count: Int64, baseline: Double, baselineUnit: String, active: Bool) {
            (self.entity, self.kind, self.peer, self.since, self.last) = (entity, kind, peer, since, last)
            (self.count, self.baseline, self.baselineUnit, self.active) = (count, baseline, baselineUnit, active)
        }

        enum CodingKeys: String, CodingKey {
            case entity, kind, peer, since, last, count, baseline, active
            case baselineUnit = "baseline_unit"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(entity: try c.value(.entity, or: ""), kind: try c.value(.kind, or: ""), peer: try c.decodeIfPresent(String.self, forKey: .peer),
                      since: try c.value(.since, or: ""), last: try c.value(.last, or: ""), count: try c.value(.count, or: 0),
                      baseline: try c.value(.baseline, or: 0), baselineUnit: try c.value(.baselineUnit, or: ""), active: try c.value(.active, or: false))
        }
    }

    /// One named input of a confidence, in [0, 1], and its weight.
    public struct Factor: Sendable, Equatable, Codable {
        public var name: String
        public var value: Double
        public var weight: Double

        public init(name: String, value: Double, weight: Double) {
            (self.name, self.value, self.weight) = (name, value, weight)
        }
    }

    /// A ranked root-cause candidate.
    public struct RootCause: Sendable, Equatable, Codable {
        public var entity: String
        /// `oom_kill`, `crash`, … (docs/correlation-contract.md, "Root-cause kinds").
        public var kind: String
        /// A probability, calibrated on lab runs.
        public var confidence: Double
        public var factors: [Factor]
        public var firstSeen: String
        /// `<time> <node> <event kind> <summary>` of the events behind it.
        public var evidence: [String]
        public var nodes: [String]
        /// Inferred from symptoms alone (no cause event seen).
        public var inferred: Bool

        public init(entity: String, kind: String, confidence: Double, factors: [Factor] = [], firstSeen: String = "", evidence: [String] = [],
                    nodes: [String] = [], inferred: Bool = false) {
            (self.entity, self.kind, self.confidence, self.factors) = (entity, kind, confidence, factors)
            (self.firstSeen, self.evidence, self.nodes, self.inferred) = (firstSeen, evidence, nodes, inferred)
        }

        enum CodingKeys: String, CodingKey {
            case entity, kind, confidence, factors, evidence, nodes, inferred
            case firstSeen = "first_seen"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(entity: try c.value(.entity, or: ""), kind: try c.value(.kind, or: ""), confidence: try c.value(.confidence, or: 0),
                      factors: try c.value(.factors, or: []), firstSeen: try c.value(.firstSeen, or: ""), evidence: try c.value(.evidence, or: []),
                      nodes: try c.value(.nodes, or: []), inferred: try c.value(.inferred, or: false))
        }
    }

    /// One cause → symptom link with its own confidence (`explain`).
    public struct Link: Sendable, Equatable, Codable {
        public struct Cause: Sendable, Equatable, Codable {
            public var entity: String
            public var kind: String
            public init(entity: String, kind: String) { (self.entity, self.kind) = (entity, kind) }
        }

        public struct SymptomRef: Sendable, Equatable, Codable {
            public var entity: String
            public var kind: String
            public var peer: String?
            public init(entity: String, kind: String, peer: String? = nil) { (self.entity, self.kind, self.peer) = (entity, kind, peer) }
        }

        public var cause: Cause
        public var symptom: SymptomRef
        /// `self`, `direct`, `cascade`, `graph`, `same_node`.
        public var relation: String
        public var confidence: Double
        public var factors: [Factor]

        public init(cause: Cause, symptom: SymptomRef, relation: String, confidence: Double, factors: [Factor]) {
            (self.cause, self.symptom, self.relation, self.confidence, self.factors) = (cause, symptom, relation, confidence, factors)
        }
    }

    /// One event of the incident on the corrected clock. Entries on different
    /// nodes whose uncertainty intervals overlap name each other in
    /// `concurrentWith`: their order is not known.
    public struct TimelineEntry: Sendable, Equatable, Codable {
        public var id: String
        public var time: String
        public var timeNs: Int64
        public var timeErrorNs: Int64
        public var node: String
        /// The event kind (`oom_kill`, `tcp_connect`, …).
        public var kind: String
        public var entity: String
        public var summary: String
        /// `cause` or `symptom`.
        public var role: String
        public var concurrentWith: [String]

        public init(id: String, time: String, timeNs: Int64, timeErrorNs: Int64, node: String, kind: String, entity: String, summary: String,
                    role: String, concurrentWith: [String]) {
            (self.id, self.time, self.timeNs, self.timeErrorNs, self.node) = (id, time, timeNs, timeErrorNs, node)
            (self.kind, self.entity, self.summary, self.role, self.concurrentWith) = (kind, entity, summary, role, concurrentWith)
        }

        enum CodingKeys: String, CodingKey {
            case id, time, node, kind, entity, summary, role
            case timeNs = "time_ns", timeErrorNs = "time_error_ns", concurrentWith = "concurrent_with"
        }

        public init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            self.init(id: try c.value(.id, or: ""), time: try c.value(.time, or: ""), timeNs: try c.value(.timeNs, or: 0),
                      timeErrorNs: try c.value(.timeErrorNs, or: 0), node: try c.value(.node, or: ""), kind: try c.value(.kind, or: ""),
                      entity: try c.value(.entity, or: ""), summary: try c.value(.summary, or: ""), role: try c.value(.role, or: ""),
                      concurrentWith: try c.value(.concurrentWith, or: []))
        }
    }

    public var id: String
    /// `open` or `resolved`.
    public var status: String
    public var title: String
    /// RFC 3339 times; `resolvedAt` is null on the wire while open.
    public var openedAt: String
    public var updatedAt: String
    public var resolvedAt: String?
    public var detectedAt: String
    public var affected: Affected
    public var symptoms: [Symptom]
    /// Ranked, best first.
    public var rootCauses: [RootCause]
    public var mergedIds: [String]
    /// Worth paging a person (docs/correlation.md, "Paging"); an incident
    /// stored before the field existed pages.
    public var pages: Bool
    /// `timeline` and `explain` only.
    public var timeline: [TimelineEntry]?
    /// `explain` only: every link, the weights of the factors (and `bias`), the formula.
    public var links: [Link]?
    public var weights: [String: Double]?
    public var model: String?

    public init(id: String, status: String, title: String, openedAt: String, updatedAt: String = "", resolvedAt: String? = nil, detectedAt: String = "",
                affected: Affected = Affected(), symptoms: [Symptom] = [], rootCauses: [RootCause] = [], mergedIds: [String] = [], pages: Bool = true,
                timeline: [TimelineEntry]? = nil, links: [Link]? = nil, weights: [String: Double]? = nil, model: String? = nil) {
        (self.id, self.status, self.title, self.openedAt, self.updatedAt, self.resolvedAt) = (id, status, title, openedAt, updatedAt, resolvedAt)
        (self.detectedAt, self.affected, self.symptoms, self.rootCauses, self.mergedIds, self.pages) = (detectedAt, affected, symptoms, rootCauses, mergedIds, pages)
        (self.timeline, self.links, self.weights, self.model) = (timeline, links, weights, model)
    }

    enum CodingKeys: String, CodingKey {
        case id, status, title, affected, symptoms, pages, timeline, links, weights, model
        case openedAt = "opened_at", updatedAt = "updated_at", resolvedAt = "resolved_at", detectedAt = "detected_at"
        case rootCauses = "root_causes", mergedIds = "merged_ids"
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(id: try c.decode(String.self, forKey: .id), status: try c.value(.status, or: ""), title: try c.value(.title, or: ""),
                  openedAt: try c.value(.openedAt, or: ""), updatedAt: try c.value(.updatedAt, or: ""),
                  resolvedAt: try c.decodeIfPresent(String.self, forKey: .resolvedAt), detectedAt: try c.value(.detectedAt, or: ""),
                  affected: try c.value(.affected, or: Affected()), symptoms: try c.value(.symptoms, or: []),
                  rootCauses: try c.value(.rootCauses, or: []), mergedIds: try c.value(.mergedIds, or: []), pages: try c.value(.pages, or: true),
                  timeline: try c.decodeIfPresent([TimelineEntry].self, forKey: .timeline),
                  links: try c.decodeIfPresent([Link].self, forKey: .links), weights: try c.decodeIfPresent([String: Double].self, forKey: .weights),
                  model: try c.decodeIfPresent(String.self, forKey: .model))
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(id, forKey: .id)
        try c.encode(status, forKey: .status)
        try c.encode(title, forKey: .title)
        try c.encode(openedAt, forKey: .openedAt)
        try c.encode(updatedAt, forKey: .updatedAt)
        try c.encode(resolvedAt, forKey: .resolvedAt)  // null while open, as docs/correlation-contract.md shows
        try c.encode(detectedAt, forKey: .detectedAt)
        try c.encode(affected, forKey: .affected)
        try c.encode(symptoms, forKey: .symptoms)
        try c.encode(rootCauses, forKey: .rootCauses)
        try c.encode(mergedIds, forKey: .mergedIds)
        try c.encode(pages, forKey: .pages)
        try c.encodeIfPresent(timeline, forKey: .timeline)
        try c.encodeIfPresent(links, forKey: .links)
        try c.encodeIfPresent(weights, forKey: .weights)
        try c.encodeIfPresent(model, forKey: .model)
    }

    /// The leading root cause, if any.
    public var topCause: RootCause? { rootCauses.first }
    public var isResolved: Bool { status == "resolved" }

    /// The entry of the `incidents` list: without timeline, links, weights and model.
    public var summary: QueryIncident {
        var s = self
        (s.timeline, s.links, s.weights, s.model) = (nil, nil, nil, nil)
        return s
    }
}
