import Foundation
import TapioQueryAPI
import TapioWire

/// What `tapio-lab run` prints (binding shape: docs/lab.md).
public struct RunReport: Sendable {
    public var scenario: String
    public var expected: [Cause]
    public var reported: [RankedCause]
    public var ac1: Double
    public var ac3: Double
    public var timeToDetectS: Double?
    public var timeToTop1S: Double?
    /// The same from the first kernel event of that answer (its root cause's
    /// `first_seen`) instead of the fault's injection: an OOM kill, say,
    /// comes seconds after the filler starts.
    public var timeToTop1AfterEvidenceS: Double? = nil
    /// Incidents the server had open or resolved for this run.
    public var incidents: Int
    /// Of those, the ones that page (`"pages": true`); the others are
    /// observations that page nobody.
    public var paging: Int
    /// Of those, opened before the first fault (false alarms on the healthy warmup).
    public var incidentsBeforeFault: Int
    public var baseline: [RankedCause]
    public var baselineAc1: Double
    public var baselineAc3: Double
    public var notes: [String]
    public var runDirectory: String
    public var labTimeline: [LabTimeline.Entry]
    public var serverIncidents: [QueryIncident]
    public var serverTimeline: [QueryIncident.TimelineEntry]
    public var load: LoadSummary
    public var healthy: Bool
    /// Which server ran: `single` (one `tapio-server --data-dir`) or
    /// `distributed` (NATS, ClickHouse and the ingest, correlate and query
    /// roles; `run --distributed`).
    public var mode: String = "single"

    public var json: JSONValue {
        func causes(_ list: [RankedCause]) -> JSONValue {
            .array(list.map { .object(["entity": .string($0.entity), "kind": .string($0.kind), "confidence": .double(($0.confidence * 1000).rounded() / 1000)]) })
        }
        func seconds(_ v: Double?) -> JSONValue { v.map { .double(($0 * 10).rounded() / 10) } ?? .null }
        return .object([
            "scenario": .string(scenario),
            "expected": .array(expected.map { .object(["entity": .string($0.entity), "kind": .string($0.kind)]) }),
            "reported": causes(reported),
            "ac1": .double(ac1),
            "ac3": .double(ac3),
            "time_to_detect_s": seconds(timeToDetectS),
            "time_to_top1_s": seconds(timeToTop1S),
            "time_to_top1_after_evidence_s": seconds(timeToTop1AfterEvidenceS),
            "incidents": .int(Int64(incidents)),
            "paging": .int(Int64(paging)),
            "observations": .int(Int64(incidents - paging)),
            "incidents_before_fault": .int(Int64(incidentsBeforeFault)),
            "baseline": .object(["reported": causes(baseline), "ac1": .double(baselineAc1), "ac3": .double(baselineAc3)]),
            "notes": .array(notes.map { .string($0) }),
            "run_dir": .string(runDirectory),
            "load": load.json,
            "mode": .string(mode),
        ])
    }

    /// The human report: what the lab did, what the server answered, the score.
    public var text: String {
        var out = "scenario \(scenario)\(healthy ? " (healthy: the right answer is no incident that pages)" : "")\n"
        out += "run directory \(runDirectory)\n"
        out += mode == "distributed"
            ? "server: distributed mode (nats-server, clickhouse-server, tapio-server --role ingest, correlate and query)\n"
            : "server: single process (tapio-server --role all)\n"
        out += "\n== what the lab did\n"
        let t0 = labTimeline.first?.timeNs ?? 0
        for e in labTimeline {
            out += String(format: "  %@  +%6.1fs  %@\n", LabTimeline.clock(e.timeNs), Double(e.timeNs - t0) / 1e9, e.text)
        }
        out += "\n== load: \(load.requests) requests, \(load.ok) ok, \(load.failed) failed (by status: \(load.byStatus.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")))\n"
        let observations = incidents - paging
        out += "\n== what the server reported: \(incidents) incident\(incidents == 1 ? "" : "s")"
        out += observations == 0 ? "\n" : " (\(paging) paging, \(observations) observation\(observations == 1 ? "" : "s") that page\(observations == 1 ? "s" : "") nobody)\n"
        for inc in serverIncidents {
            let role = Scoring.pages(inc) ? "" : "  observation (does not page)"
            out += "  \(inc.id)  \(inc.status)  \(inc.title)  opened \(inc.openedAt.isEmpty ? "?" : inc.openedAt)\(role)\n"
            for rc in inc.rootCauses {
                out += "     root cause \(rc.entity) \(rc.kind) confidence \(String(format: "%.2f", rc.confidence))\n"
            }
        }
        if !serverTimeline.isEmpty {
            out += "\n== timeline of the top incident (server)\n"
            for e in serverTimeline {
                out += "  \(e.time)  \(e.node)  \(e.kind)  \(e.entity)  \(e.summary)\n"
            }
        }
        for n in notes { out += "\nnote: \(n)" }
        if !notes.isEmpty { out += "\n" }
        func list(_ l: [RankedCause]) -> String {
            l.isEmpty ? "nothing" : l.prefix(3).map { "\($0.entity)/\($0.kind) (\(String(format: "%.2f", $0.confidence)))" }.joined(separator: ", ")
        }
        out += "\n== score\n"
        out += "  expected   \(expected.isEmpty ? "no incident that pages" : expected.map { "\($0.entity)/\($0.kind)" }.joined(separator: ", "))\n"
        out += "  reported   \(list(reported))\n"
        out += String(format: "  AC@1 %.2f  AC@3 %.2f  time to detect %@  time to correct top-1 %@\n", ac1, ac3,
                      timeToDetectS.map { String(format: "%.1f s", $0) } ?? "never", timeToTop1S.map { String(format: "%.1f s", $0) } ?? "never")
        if let e = timeToTop1AfterEvidenceS { out += String(format: "             time to correct top-1 after its first kernel event %.1f s\n", e) }
        out += "  baseline   \(list(baseline))  AC@1 \(String(format: "%.2f", baselineAc1))  AC@3 \(String(format: "%.2f", baselineAc3))\n"
        return out
    }
}

/// The load client's view of the run.
public struct LoadSummary: Sendable {
    public var requests = 0
    public var ok = 0
    public var failed = 0
    public var byStatus: [String: Int] = [:]
    /// Start time of the first successful request (ns), nil if none.
    public var firstOkNs: Int64?

    public init() {}

    /// Reads loadgen.py's output lines: `<start ns> <status> <latency ms>`.
    public init(file: String, fromNs: Int64 = 0, untilNs: Int64 = .max) {
        for line in (Shell.read(file) ?? "").split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 2, let t = Int64(f[0]), t >= fromNs, t <= untilNs else { continue }
            requests += 1
            let status = String(f[1])
            byStatus[status, default: 0] += 1
            if status.hasPrefix("2") {
                ok += 1
                firstOkNs = min(firstOkNs ?? t, t)
            } else {
                failed += 1
            }
        }
    }

    public var json: JSONValue {
        .object(["requests": .int(Int64(requests)), "ok": .int(Int64(ok)), "failed": .int(Int64(failed)),
                 "by_status": .object(byStatus.mapValues { .int(Int64($0)) })])
    }
}

/// `tapio-lab bench`: every scenario N times, averaged.
public struct BenchReport: Sendable {
    public struct Row: Sendable {
        public var name: String
        public var runs: Int
        public var healthy: Bool
        public var ac1: Double
        public var ac3: Double
        public var timeToDetectS: Double?
        public var timeToTop1S: Double?
        public var timeToTop1AfterEvidenceS: Double? = nil
        public var incidentsOnHealthy: Double?
        public var failedRuns: Int
    }

    public var rows: [Row]
    public var baselineRows: [Row]
    public var notes: [String]
    /// Every fault run's time to a correct top-1, from the fault's injection
    /// and from the answer's first kernel event (for the medians).
    public var top1Times: [Double] = []
    public var top1TimesAfterEvidence: [Double] = []

    public static func median(_ xs: [Double]) -> Double? {
        guard !xs.isEmpty else { return nil }
        let s = xs.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// Averages one scenario's runs; `pick` chooses the engine's or the baseline's numbers.
    public static func row(name: String, reports: [RunReport], failed: Int, baseline: Bool) -> Row {
        func mean(_ xs: [Double]) -> Double { xs.isEmpty ? 0 : xs.reduce(0, +) / Double(xs.count) }
        func meanOpt(_ xs: [Double?]) -> Double? {
            let v = xs.compactMap { $0 }
            return v.isEmpty ? nil : mean(v)
        }
        let healthy = reports.first?.healthy ?? false
        let ac1 = reports.map { baseline ? $0.baselineAc1 : $0.ac1 }
        let ac3 = reports.map { baseline ? $0.baselineAc3 : $0.ac3 }
        // The baseline "detects" when its rule finds anything; it has no clock of its own.
        // On a healthy run only incidents that page are false pages; observations are not.
        let onHealthy: Double? = healthy
            ? mean(reports.map { Double(baseline ? ($0.baseline.isEmpty ? 0 : 1) : $0.paging) })
            : mean(reports.map { Double(baseline ? 0 : $0.incidentsBeforeFault) })
        return Row(name: name, runs: reports.count, healthy: healthy, ac1: mean(ac1), ac3: mean(ac3),
                   timeToDetectS: baseline ? nil : meanOpt(reports.map(\.timeToDetectS)),
                   timeToTop1S: baseline ? nil : meanOpt(reports.map(\.timeToTop1S)),
                   timeToTop1AfterEvidenceS: baseline ? nil : meanOpt(reports.map(\.timeToTop1AfterEvidenceS)),
                   incidentsOnHealthy: onHealthy, failedRuns: failed)
    }

    static func macro(_ rows: [Row]) -> (ac1: Double, ac3: Double) {
        guard !rows.isEmpty else { return (0, 0) }
        return (rows.map(\.ac1).reduce(0, +) / Double(rows.count), rows.map(\.ac3).reduce(0, +) / Double(rows.count))
    }

    static func rowsJSON(_ rows: [Row]) -> JSONValue {
        func r(_ v: Double) -> JSONValue { .double((v * 1000).rounded() / 1000) }
        func o(_ v: Double?) -> JSONValue { v.map { .double(($0 * 10).rounded() / 10) } ?? .null }
        let m = macro(rows)
        return .object([
            "scenarios": .array(rows.map {
                .object(["name": .string($0.name), "runs": .int(Int64($0.runs)), "ac1": r($0.ac1), "ac3": r($0.ac3),
                         "time_to_detect_s": o($0.timeToDetectS), "time_to_top1_s": o($0.timeToTop1S),
                         "incidents_on_healthy": $0.incidentsOnHealthy.map(r) ?? .null, "failed_runs": .int(Int64($0.failedRuns))])
            }),
            "macro": .object(["ac1": r(m.ac1), "ac3": r(m.ac3)]),
        ])
    }

    public var json: JSONValue {
        guard case .object(var o) = BenchReport.rowsJSON(rows) else { return .null }
        o["baseline"] = BenchReport.rowsJSON(baselineRows)
        o["notes"] = .array(notes.map { .string($0) })
        o["median_time_to_top1_s"] = BenchReport.median(top1Times).map { .double(($0 * 100).rounded() / 100) } ?? .null
        o["median_time_to_top1_after_evidence_s"] = BenchReport.median(top1TimesAfterEvidence).map { .double(($0 * 100).rounded() / 100) } ?? .null
        return .object(o)
    }

    public var text: String {
        func table(_ title: String, _ rows: [Row]) -> String {
            var lines = ["\(title)", String(format: "  %-22@ %4@ %6@ %6@ %9@ %9@ %9@", "SCENARIO" as NSString, "RUNS" as NSString, "AC@1" as NSString,
                                          "AC@3" as NSString, "DETECT" as NSString, "TOP-1" as NSString, "FALSE+" as NSString)]
            for r in rows {
                lines.append(String(format: "  %-22@ %4d %6.2f %6.2f %9@ %9@ %9@", r.name as NSString, r.runs, r.ac1, r.ac3,
                                    (r.timeToDetectS.map { String(format: "%.1fs", $0) } ?? "-") as NSString,
                                    (r.timeToTop1S.map { String(format: "%.1fs", $0) } ?? "-") as NSString,
                                    (r.incidentsOnHealthy.map { String(format: "%.1f", $0) } ?? "-") as NSString))
            }
            let m = BenchReport.macro(rows)
            lines.append(String(format: "  %-22@ %4@ %6.2f %6.2f", "macro average" as NSString, "" as NSString, m.ac1, m.ac3))
            return lines.joined(separator: "\n")
        }
        var out = table("tapio (server incidents)", rows) + "\n\n" + table("baseline (most recent OOM/exit/drop on the failing path)", baselineRows) + "\n"
        if let m = BenchReport.median(top1Times) {
            out += String(format: "\nmedian time to a correct top-1 over %d fault runs: %.2f s after the fault's injection", top1Times.count, m)
            if let e = BenchReport.median(top1TimesAfterEvidence) { out += String(format: ", %.2f s after the answer's first kernel event", e) }
            out += "\n"
        }
        out += "\nFALSE+: incidents that page, per run, on a healthy scenario; on a faulty one, incidents opened before the fault.\n"
        for n in notes { out += "note: \(n)\n" }
        return out
    }
}
