import Foundation
import TapioQueryAPI
import TapioWire

/// A soak: the healthy scenarios' activities, all on one cluster, repeated for
/// minutes against one server and one agent per node. What it proves is the
/// two things a short run cannot: that healthy churn of every kind, mixed and
/// repeated, pages nobody, and that the server's and agents' CPU and memory
/// stay flat (a leak shows as a rising RSS). docs/lab.md, "Soak".
public enum LabSoak {
    /// Seconds of steady load before the first activity (the engine's baseline).
    public static let warmupS = 15.0
    /// Seconds between resource samples.
    public static let sampleIntervalS = 5.0

    /// One scenario that runs every given healthy scenario's activities.
    /// The cluster is their union (services merged by name, field by field,
    /// the way `extends` merges), the load is the first one's, and the
    /// scenarios' activities (their `faults`) take turns, one scenario after
    /// another, round after round, until `minutes` are over.
    public static func scenario(mixing healthy: [Scenario], minutes: Double) throws -> Scenario {
        guard let first = healthy.first else { throw ScenarioError("soak: no healthy scenario to run") }
        for s in healthy where !s.isHealthy { throw ScenarioError("soak: \(s.name) expects a root cause; a soak runs healthy scenarios only") }
        let total = minutes * 60
        guard total >= warmupS + 15 else { throw ScenarioError("soak: \(minutes) minutes is too short (at least \(Int(warmupS) + 15) s)") }
        var doc = try json(first)
        for s in healthy.dropFirst() {
            var overlay = try json(s)
            if case .object(var o) = overlay {
                // The first scenario's load, timing and seed; every scenario's
                // services and nodes.
                for key in ["load", "timing", "seed", "name", "description", "faults", "expected"] { o[key] = nil }
                overlay = .object(o)
            }
            doc = Scenario.merge(doc, overlay)
        }
        var mixed = try JSONDecoder().decode(Scenario.self, from: Data(doc.serialized().utf8))
        mixed.name = "soak"
        mixed.description = "The activities of \(healthy.map(\.name).joined(separator: ", ")), repeated for \(minutes) min"
        mixed.timing = Timing(warmupS: warmupS, observeS: total - warmupS)
        mixed.expected = []
        // One scenario's activities after another, each in a slot as long as
        // its activities plus a pause, and round again: a cycle. All of them
        // at once would be no healthy cluster (a single-replica api restarted
        // while four times the load and two pools hit it is an outage).
        var faults: [FaultSpec] = []
        var offset = 0.0
        var round = 0
        while offset < mixed.timing.observeS {
            for s in healthy {
                let span = s.faults.map { $0.atS + ($0.durationS ?? 0) }.max() ?? 0
                for f in s.faults {
                    // An activity without an end (a CronJob) starts once and goes on.
                    if round > 0, f.durationS == nil, f.type == "start" { continue }
                    var g = f
                    g.atS = offset + f.atS
                    guard g.atS < mixed.timing.observeS else { continue }
                    faults.append(g)
                }
                offset += max(20, span + 10)
            }
            round += 1
        }
        mixed.faults = faults.sorted { $0.atS < $1.atS }
        try mixed.validate()
        return mixed
    }

    private static func json(_ s: Scenario) throws -> JSONValue {
        try JSONValue.parse(Array(try JSONEncoder().encode(s)))
    }

    /// Runs the soak and returns its report; everything the run created is gone when it returns.
    public static func run(scenario: Scenario, options: LabOptions, progress: @escaping (String) -> Void) throws -> SoakReport {
        let lab = try LabRun(scenario: scenario, options: options)
        lab.collectEvents = false
        let sampler = ResourceSampler(interval: sampleIntervalS, progress: progress)
        lab.onTick = { sampler.tick($0) }
        let started = Date()
        let report = try lab.run()
        let paging = report.serverIncidents.filter(Scoring.pages)
        let soak = SoakReport(
            date: started, minutes: (scenario.timing.warmupS + scenario.timing.observeS) / 60,
            activities: scenario.faults.count, description: scenario.description ?? "",
            pagingIncidents: paging, observations: report.serverIncidents.count - paging.count,
            samples: sampler.samples, load: report.load, notes: report.notes, runDirectory: report.runDirectory)
        try? Shell.write(soak.json.serialized(pretty: true) + "\n", to: report.runDirectory + "/soak.json")
        try? Shell.write(soak.text, to: report.runDirectory + "/soak.txt")
        return soak
    }
}

/// CPU and resident memory of the server and each agent, read from
/// /proc/<pid>/stat and /proc/<pid>/status, and the events the server has
/// received (its `nodes` answer), every `interval` seconds.
final class ResourceSampler: @unchecked Sendable {
    let interval: Double
    let progress: (String) -> Void
    private(set) var samples: [SoakReport.Sample] = []
    private var last: (ns: Int64, cpuTicks: [String: Int64], events: Int64)?
    private var firstNs: Int64?

    init(interval: Double, progress: @escaping (String) -> Void) {
        self.interval = interval
        self.progress = progress
    }

    /// Clock ticks per second of /proc's utime and stime.
    static let ticksPerSecond = Double(sysconf(Int32(_SC_CLK_TCK)))

    func tick(_ lab: LabRun) {
        let now = Shell.nowNs()
        if let last, Double(now - last.ns) / 1e9 < interval { return }
        let processes = lab.infra.filter { $0.key == "tapio-server" || $0.key.hasPrefix("agent-") }
        var ticks: [String: Int64] = [:]
        var rss: [String: Int64] = [:]
        for (name, child) in processes where child.isRunning {
            if let t = ResourceSampler.cpuTicks(pid: child.pid) { ticks[name] = t }
            if let r = ResourceSampler.rssBytes(pid: child.pid) { rss[name] = r }
        }
        let nodes = lab.nodes()
        let events = nodes.reduce(Int64(0)) { $0 + $1.eventsReceived }
        if firstNs == nil { firstNs = now }
        if let last {
            let dt = Double(now - last.ns) / 1e9
            var cpu: [String: Double] = [:]
            for (name, t) in ticks {
                if let before = last.cpuTicks[name] { cpu[name] = Double(t - before) / ResourceSampler.ticksPerSecond / dt * 100 }
            }
            let sample = SoakReport.Sample(
                elapsedS: Double(now - firstNs!) / 1e9, cpuPct: cpu, rssBytes: rss,
                eventsPerS: Double(events - last.events) / dt, eventsTotal: events)
            samples.append(sample)
            if Int(sample.elapsedS) % 60 < Int(interval) { progress(sample.line) }
        }
        last = (now, ticks, events)
    }

    /// utime + stime of a process, in clock ticks (/proc/<pid>/stat fields 14 and 15).
    static func cpuTicks(pid: Int32) -> Int64? {
        guard let text = Shell.read("/proc/\(pid)/stat"), let close = text.lastIndex(of: ")") else { return nil }
        // Fields after the command name (which may hold spaces) start at field 3.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let u = Int64(fields[11]), let s = Int64(fields[12]) else { return nil }
        return u + s
    }

    /// VmRSS of a process in bytes (/proc/<pid>/status).
    static func rssBytes(pid: Int32) -> Int64? {
        guard let text = Shell.read("/proc/\(pid)/status") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("VmRSS:") {
            let parts = line.split(separator: " ", omittingEmptySubsequences: true)
            if parts.count >= 2, let kb = Int64(parts[1]) { return kb * 1024 }
        }
        return nil
    }
}

/// What a soak answers: the incidents that paged (must be none), the event
/// rate, and the resources over time.
public struct SoakReport: Sendable {
    public struct Sample: Sendable {
        /// Seconds since the first sample.
        public var elapsedS: Double
        /// Percent of one CPU over the interval before the sample, by process
        /// (`tapio-server`, `agent-<node>`).
        public var cpuPct: [String: Double]
        public var rssBytes: [String: Int64]
        /// Events the server received per second over the interval, all nodes.
        public var eventsPerS: Double
        public var eventsTotal: Int64

        var agents: [String] { cpuPct.keys.filter { $0.hasPrefix("agent-") }.sorted() }
        var agentCpuMax: Double { agents.compactMap { cpuPct[$0] }.max() ?? 0 }
        var agentRssMax: Int64 { rssBytes.filter { $0.key.hasPrefix("agent-") }.values.max() ?? 0 }

        var line: String {
            String(format: "%6.0f  %7.1f  %8.1f  %9.1f  %10.1f  %8.0f",
                   elapsedS, cpuPct["tapio-server"] ?? 0, Double(rssBytes["tapio-server"] ?? 0) / 1048576,
                   agentCpuMax, Double(agentRssMax) / 1048576, eventsPerS)
        }
    }

    public var date: Date
    public var minutes: Double
    public var activities: Int
    public var description: String
    public var pagingIncidents: [QueryIncident]
    public var observations: Int
    public var samples: [Sample]
    public var load: LoadSummary
    public var notes: [String]
    public var runDirectory: String

    /// A soak passes when no incident paged.
    public var passed: Bool { pagingIncidents.isEmpty }

    public var eventsPerS: Double {
        guard let first = samples.first, let last = samples.last, last.elapsedS > first.elapsedS else { return samples.first?.eventsPerS ?? 0 }
        return samples.map(\.eventsPerS).reduce(0, +) / Double(samples.count)
    }

    static let header = "  time s  server %CPU  server RSS MiB  agent %CPU max  agent RSS MiB max  events/s"

    public var text: String {
        var out: [String] = []
        let f = ISO8601DateFormatter()
        out.append("soak \(f.string(from: date)): \(String(format: "%.1f", minutes)) min, \(activities) activities (\(description))")
        out.append("run directory \(runDirectory)")
        out.append("load: \(load.requests) requests, \(load.ok) ok, \(load.failed) failed")
        out.append("incidents that paged: \(pagingIncidents.count)\(passed ? "" : " — FAIL")   observations (not paging): \(observations)")
        for i in pagingIncidents {
            let causes = i.rootCauses.map { "\($0.entity)/\($0.kind) \(String(format: "%.2f", $0.confidence))" }.joined(separator: ", ")
            out.append("  \(i.id)  opened \(i.openedAt)  \(i.title)  [\(causes)]")
        }
        out.append(String(format: "events/s (mean over the samples): %.0f", eventsPerS))
        out.append("")
        out.append("  time s  srv %CPU  srv MiB  agent %CPU  agent MiB  events/s   (agent: the highest of the agents)")
        // At most ~20 rows: every n-th sample, and always the last.
        let step = max(1, samples.count / 20)
        for (i, s) in samples.enumerated() where i % step == 0 || i == samples.count - 1 { out.append("  " + s.line) }
        for n in notes { out.append("note: " + n) }
        return out.joined(separator: "\n") + "\n"
    }

    public var json: JSONValue {
        func r(_ v: Double, _ places: Double = 10) -> JSONValue { .double((v * places).rounded() / places) }
        return .object([
            "date": .string(ISO8601DateFormatter().string(from: date)),
            "minutes": r(minutes),
            "activities": .int(Int64(activities)),
            "description": .string(description),
            "passed": .bool(passed),
            "paging": .int(Int64(pagingIncidents.count)),
            "observations": .int(Int64(observations)),
            "incidents": .array(pagingIncidents.map { i in
                .object(["id": .string(i.id), "opened_at": .string(i.openedAt), "title": .string(i.title),
                         "root_causes": .array(i.rootCauses.map { .object(["entity": .string($0.entity), "kind": .string($0.kind), "confidence": r($0.confidence, 1000)]) })])
            }),
            "events_per_s": r(eventsPerS),
            "load": load.json,
            "samples": .array(samples.map { s in
                .object([
                    "elapsed_s": r(s.elapsedS),
                    "events_per_s": r(s.eventsPerS),
                    "events_total": .int(s.eventsTotal),
                    "cpu_pct": .object(s.cpuPct.mapValues { r($0) }),
                    "rss_bytes": .object(s.rssBytes.mapValues { .int($0) }),
                ])
            }),
            "notes": .array(notes.map { .string($0) }),
            "run_dir": .string(runDirectory),
        ])
    }
}
