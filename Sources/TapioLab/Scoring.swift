import Foundation
import TapioQueryAPI
import TapioWire

/// A root-cause candidate as reported, best first.
public struct RankedCause: Codable, Sendable, Equatable {
    public var entity: String
    public var kind: String
    public var confidence: Double

    public init(entity: String, kind: String, confidence: Double) {
        self.entity = entity
        self.kind = kind
        self.confidence = confidence
    }

    public var cause: Cause { Cause(entity: entity, kind: kind) }
}

/// How a run is scored (docs/lab.md, "Scoring").
public enum Scoring {
    /// AC@k for one run: the share of the expected root causes found among
    /// the first k reported, out of at most k — |top-k ∩ expected| / min(k, |expected|).
    /// A healthy scenario (nothing expected) scores 1 when nothing is
    /// reported and 0 otherwise.
    public static func accuracy(expected: [Cause], reported: [RankedCause], k: Int) -> Double {
        let want = Set(expected)
        if want.isEmpty { return reported.isEmpty ? 1 : 0 }
        let top = Set(reported.prefix(k).map(\.cause))
        return Double(top.intersection(want).count) / Double(min(k, want.count))
    }

    /// The first kernel event of a reported cause: the earliest `first_seen`
    /// of that entity and kind among `incidents`.
    public static func firstEvidenceNs(of cause: RankedCause, in incidents: [QueryIncident]) -> Int64? {
        incidents.flatMap(\.rootCauses).filter { $0.entity == cause.entity && $0.kind == cause.kind }
            .compactMap { RFC3339.parseNs($0.firstSeen) }.min()
    }

    /// True when the first reported cause is one of the expected ones.
    public static func topOneCorrect(expected: [Cause], reported: [RankedCause]) -> Bool {
        guard let first = reported.first else { return false }
        return expected.contains(first.cause)
    }

    /// Whether the server pages a person for this incident (`pages`,
    /// docs/correlation.md "Paging"). An incident without the field (a server
    /// from before paging) pages: every incident paged then (`QueryIncident`
    /// reads it so).
    public static func pages(_ incident: QueryIncident) -> Bool {
        incident.pages
    }

    /// The incidents a run is scored on. On a healthy run only those that
    /// page: an incident that pages nobody is an observation, not a false
    /// page (the report still lists it). On a fault run every incident, paging
    /// or not: what is scored there is the answer, not whether it paged.
    public static func scored(_ incidents: [QueryIncident], healthy: Bool) -> [QueryIncident] {
        healthy ? incidents.filter(pages) : incidents
    }

    /// The root causes of every incident opened at or after `sinceNs`, one
    /// list: ranked by confidence, each (entity, kind) once with its highest
    /// confidence.
    public static func reported(incidents: [QueryIncident], sinceNs: Int64) -> [RankedCause] {
        var best: [Cause: Double] = [:]
        var order: [Cause] = []
        for incident in incidents {
            let opened = openedNs(incident) ?? Int64.max
            guard opened >= sinceNs else { continue }
            for rc in incident.rootCauses {
                let c = Cause(entity: rc.entity, kind: rc.kind)
                let conf = rc.confidence
                if let old = best[c] { best[c] = max(old, conf) } else { best[c] = conf; order.append(c) }
            }
        }
        // Stable: equal confidences keep the server's order.
        return order.enumerated().sorted { a, b in
            let (ca, cb) = (best[a.element]!, best[b.element]!)
            return ca != cb ? ca > cb : a.offset < b.offset
        }.map { RankedCause(entity: $0.element.entity, kind: $0.element.kind, confidence: best[$0.element]!) }
    }

    /// When the incident was detected (its first symptom), else opened.
    public static func detectedNs(_ incident: QueryIncident) -> Int64? {
        RFC3339.parseNs(incident.detectedAt) ?? openedNs(incident)
    }

    public static func openedNs(_ incident: QueryIncident) -> Int64? {
        RFC3339.parseNs(incident.openedAt)
    }

    /// The trivial rule the engine must beat: the most recent OOM kill, bad
    /// exit (non-zero code or a signal) or packet drop of a service in
    /// `scope` (`Scenario.baselineScope`: the services on the nodes the
    /// failing path crosses), most recent first. Three or more bad
    /// exits of one service make it a crash loop; a drop whose kernel reason
    /// names netfilter is a firewall drop, any other a packet loss.
    /// `entityOf` names an event's service (nil: not a lab service).
    public static func baseline(events: [QueryEvent], scope: Set<String>,
                                entityOf: (QueryEvent) -> String?) -> [RankedCause] {
        var evidence: [(time: Int64, cause: Cause)] = []
        var oomPids: [Int64: Int64] = [:]
        var crashes: [String: Int] = [:]
        for e in events.sorted(by: { $0.timeNs < $1.timeNs }) {
            let t = e.timeNs
            let kind = e.kind
            guard let entity = entityOf(e), scope.contains(entity) else { continue }
            switch kind {
            case "oom_kill":
                oomPids[e.victimPid ?? e.pid ?? -1] = t
                evidence.append((t, Cause(entity: entity, kind: "oom_kill")))
            case "process_exit":
                let signal = e.signal ?? 0
                let code = e.exitCode ?? 0
                guard signal != 0 || code != 0 else { continue }
                if signal == 9, let at = oomPids[e.pid ?? -2], t - at < 5_000_000_000 { continue }
                crashes[entity, default: 0] += 1
                evidence.append((t, Cause(entity: entity, kind: crashes[entity]! >= 3 ? "crash_loop" : "crash")))
            case "packet_drop":
                let reason = (e.reason ?? "").uppercased()
                evidence.append((t, Cause(entity: entity, kind: reason.contains("NETFILTER") ? "firewall_drop" : "packet_loss")))
            default:
                continue
            }
        }
        var seen = Set<Cause>()
        var out: [RankedCause] = []
        for (_, cause) in evidence.reversed() where !seen.contains(cause) {
            // A crash loop's single crashes are the same cause.
            if cause.kind == "crash", seen.contains(Cause(entity: cause.entity, kind: "crash_loop")) { continue }
            seen.insert(cause)
            out.append(RankedCause(entity: cause.entity, kind: cause.kind, confidence: 1.0 / Double(out.count + 1)))
        }
        return out
    }
}

/// RFC 3339 times as the server prints them (`2026-11-27T15:03:49.423395387Z`).
public enum RFC3339 {
    public static func parseNs(_ text: String) -> Int64? {
        let s = Array(text.utf8)
        func num(_ from: Int, _ len: Int) -> Int64? {
            guard from + len <= s.count else { return nil }
            var v: Int64 = 0
            for b in s[from..<(from + len)] {
                guard b >= 48, b <= 57 else { return nil }
                v = v * 10 + Int64(b - 48)
            }
            return v
        }
        guard s.count >= 20, let y = num(0, 4), let mo = num(5, 2), let d = num(8, 2), let h = num(11, 2),
              let mi = num(14, 2), let se = num(17, 2) else { return nil }
        var i = 19
        var frac: Int64 = 0
        if i < s.count, s[i] == UInt8(ascii: ".") {
            i += 1
            var digits = 0
            while i < s.count, s[i] >= 48, s[i] <= 57 {
                if digits < 9 { frac = frac * 10 + Int64(s[i] - 48); digits += 1 }
                i += 1
            }
            for _ in digits..<9 { frac *= 10 }
        }
        var offset: Int64 = 0
        if i < s.count, s[i] == UInt8(ascii: "+") || s[i] == UInt8(ascii: "-") {
            guard let oh = num(i + 1, 2), let om = num(i + 4, 2) else { return nil }
            offset = (oh * 60 + om) * 60 * (s[i] == UInt8(ascii: "+") ? 1 : -1)
        }
        // Days from the civil date (Howard Hinnant's algorithm).
        let yy = mo <= 2 ? y - 1 : y
        let era = (yy >= 0 ? yy : yy - 399) / 400
        let yoe = yy - era * 400
        let doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        let days = era * 146_097 + doe - 719_468
        let seconds = days * 86400 + h * 3600 + mi * 60 + se - offset
        return seconds * 1_000_000_000 + frac
    }
}
