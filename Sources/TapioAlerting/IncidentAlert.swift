import Foundation
import TapioWire

/// What an alert says about one incident, read from the incident's JSON as
/// the server stores and answers it (docs/correlation-contract.md). Only the
/// fields alerts need; unknown fields are ignored, so the incident may grow.
public struct IncidentAlert: Sendable, Equatable {
    public enum Status: String, Sendable { case open, resolved }

    public var id: String
    public var status: Status
    public var title: String
    public var openedNs: Int64
    public var resolvedNs: Int64?
    /// The incident's `pages` (worth paging a person); an incident without
    /// the field pages.
    public var pages: Bool
    /// The top-ranked root cause, nil while the incident has none.
    public var cause: Cause?
    /// The incident's namespace when it names one (`namespace`, or the only
    /// entry of `affected.namespaces`).
    public var namespace: String?
    /// Where the first symptom was seen: the service that is failing.
    public var service: String?
    public var affectedServices: [String]
    /// The incident's `severity` when it has one, else `critical` for a top
    /// cause at 0.8 or more and `warning` below (decided when the incident
    /// is announced and kept: see `AlertTracker`).
    public var severity: String
    /// Whether `severity` is the incident's own, not derived from confidence.
    public var severityGiven: Bool
    /// Ids of incidents merged into this one (their alerts end with this one's start).
    public var mergedIds: [String]
    /// The incident's entry as the `incidents` query answers it (no timeline,
    /// links or weights): the webhook's `incident` object.
    public var summaryJSON: JSONValue

    public struct Cause: Sendable, Equatable {
        public var entity: String
        public var kind: String
        public var confidence: Double
    }

    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    public init(json: JSONValue) throws {
        guard case .object(let o) = json else { throw Invalid(description: "an incident is not a JSON object") }
        guard let id = o["id"]?.stringValue, !id.isEmpty else { throw Invalid(description: "an incident without an id") }
        guard let s = o["status"]?.stringValue, let status = Status(rawValue: s) else {
            throw Invalid(description: "incident \(id): status \(o["status"]?.serialized() ?? "missing") is not open or resolved")
        }
        self.id = id
        self.status = status
        title = o["title"]?.stringValue ?? id
        openedNs = o["opened_at"]?.stringValue.flatMap(parseRFC3339) ?? 0
        resolvedNs = o["resolved_at"]?.stringValue.flatMap(parseRFC3339)
        if case .bool(let p)? = o["pages"] { pages = p } else { pages = true }
        if let top = o["root_causes"]?.arrayValue?.first, let entity = top["entity"]?.stringValue, let kind = top["kind"]?.stringValue {
            cause = Cause(entity: entity, kind: kind, confidence: top["confidence"].flatMap(number) ?? 0)
        }
        let affected = o["affected"]
        affectedServices = affected?["services"]?.arrayValue?.compactMap(\.stringValue) ?? []
        if let ns = o["namespace"]?.stringValue, !ns.isEmpty {
            namespace = ns
        } else if let list = affected?["namespaces"]?.arrayValue?.compactMap(\.stringValue), list.count == 1 {
            namespace = list[0]
        }
        service = o["symptoms"]?.arrayValue?.first?["entity"]?.stringValue ?? affectedServices.first
        if let s = o["severity"]?.stringValue, !s.isEmpty {
            severity = s
            severityGiven = true
        } else {
            severity = (cause?.confidence ?? 0) >= 0.8 ? "critical" : "warning"
            severityGiven = false
        }
        mergedIds = o["merged_ids"]?.arrayValue?.compactMap(\.stringValue) ?? []
        var summary = o
        for key in ["timeline", "links", "weights", "model"] { summary.removeValue(forKey: key) }
        summaryJSON = .object(summary)
    }

    /// Whether the incident should page: open, worth paging (`pages`), and
    /// its top cause at least `minimumConfidence` sure.
    public func qualifies(minimumConfidence: Double) -> Bool {
        status == .open && pages && (cause?.confidence ?? 0) >= minimumConfidence
    }

    public func link(base: String?) -> String? { base.map { $0 + id } }

    /// Alertmanager labels: what identifies the alert and routes it. Labels
    /// without a value are left out (Alertmanager treats empty as absent).
    public var labels: [String: String] {
        var l = ["alertname": "TapioIncident", "incident_id": id, "severity": severity]
        if let cause {
            l["root_cause_kind"] = cause.kind
            l["root_cause_entity"] = cause.entity
        }
        if let namespace { l["namespace"] = namespace }
        if let service { l["service"] = service }
        return l
    }

    /// Alertmanager annotations: what the alert says.
    public func annotations(linkBase: String?) -> [String: String] {
        var a = ["summary": title, "confidence": cause.map { String(format: "%.2f", $0.confidence) } ?? "0.00"]
        if let cause { a["description"] = "Root cause: \(cause.kind) of \(cause.entity) (confidence \(String(format: "%.2f", cause.confidence)))." }
        if !affectedServices.isEmpty { a["affected_services"] = affectedServices.joined(separator: ", ") }
        if let link = link(base: linkBase) { a["link"] = link }
        return a
    }

    /// Whether a notification already sent for `old` no longer says what this
    /// one would: labels or summary changed, or the top cause's confidence
    /// moved by 0.05 or more (smaller moves are not worth a notification).
    public func differs(from old: IncidentAlert) -> Bool {
        if labels != old.labels || title != old.title || affectedServices != old.affectedServices || status != old.status { return true }
        return abs((cause?.confidence ?? 0) - (old.cause?.confidence ?? 0)) >= 0.05
    }
}

/// A JSON number as a Double.
func number(_ v: JSONValue) -> Double? {
    switch v {
    case .int(let i): return Double(i)
    case .double(let d): return d
    default: return nil
    }
}

/// ns since the epoch from RFC 3339 in UTC with up to nine fraction digits
/// (what `rfc3339(ns:)` writes), nil for anything else.
func parseRFC3339(_ s: String) -> Int64? {
    let u = Array(s.utf8)
    guard u.count >= 20, u.last == UInt8(ascii: "Z") else { return nil }
    func digits(_ r: Range<Int>) -> Int? {
        var v = 0
        for i in r {
            guard u[i] >= 48, u[i] <= 57 else { return nil }
            v = v * 10 + Int(u[i] - 48)
        }
        return v
    }
    guard let y = digits(0..<4), u[4] == 45, let mo = digits(5..<7), u[7] == 45, let d = digits(8..<10), u[10] == 84,
          let h = digits(11..<13), u[13] == 58, let mi = digits(14..<16), u[16] == 58, let sec = digits(17..<19) else { return nil }
    var fraction: Int64 = 0
    if u[19] == 46 {
        let frac = u[20..<(u.count - 1)]
        guard !frac.isEmpty, frac.count <= 9, let f = digits(20..<(u.count - 1)) else { return nil }
        fraction = Int64(f) * Int64(pow(10, Double(9 - frac.count)))
    } else if u.count != 20 {
        return nil
    }
    var t = tm()
    t.tm_year = Int32(y - 1900)
    t.tm_mon = Int32(mo - 1)
    t.tm_mday = Int32(d)
    t.tm_hour = Int32(h)
    t.tm_min = Int32(mi)
    t.tm_sec = Int32(sec)
    let seconds = timegm(&t)
    guard seconds != -1 || (y == 1969) else { return nil }
    return Int64(seconds) * 1_000_000_000 + fraction
}
