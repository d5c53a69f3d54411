import Foundation
import TapioCorrelation
import TapioStore
import TapioWire

/// A stored event log read back for the engine: every batch's events with
/// the clock correction they were received with, and the pods the agents
/// reported. What `tapio-server replay` and `calibrate` run the engine over.
public struct EventLog: Sendable {
    public var events: [ObservedEvent] = []
    /// When each of `events` reached the server (its batch's arrival, on
    /// the server's clock), in the same order.
    public var arrivalNs: [Int64] = []
    public var inventory: [String: [PodInfo]] = [:]
    /// Batches the events came in.
    public var batches = 0
    /// The log position of the last of them (0: none, or not known).
    public var lastBatchId: Int64 = 0

    /// The log of a server's data directory, batches received at or after
    /// `sinceNs`, read without writing anything (the server may be running).
    /// `convert`: a private copy whose store may be converted from the
    /// row-per-event layout (a recording).
    public static func load(dataDirectory: String, sinceNs: Int64 = .min, convert: Bool = false,
                            maxFutureSkewNs: Int64 = CorrelationService.defaultMaxFutureSkewNs) throws -> EventLog {
        try load(store: SegmentEventStore(directory: dataDirectory, readOnly: !convert), sinceNs: sinceNs, maxFutureSkewNs: maxFutureSkewNs)
    }

    /// The log of an open store, batches received at or after `sinceNs`, read
    /// a page at a time.
    /// Events dated more than `maxFutureSkewNs` after their batch arrived are
    /// left out, as live ingest leaves them out.
    public static func load(store: any EventStore, sinceNs: Int64 = .min,
                            maxFutureSkewNs: Int64 = CorrelationService.defaultMaxFutureSkewNs) throws -> EventLog {
        var log = EventLog()
        for p in try store.pods() { log.inventory[p.node, default: []].append(p) }
        var since = sinceNs
        let pageSize = 2000
        while true {
            let page = try store.batches(sinceNs: since, limit: pageSize)
            for r in page {
                let observed = CorrelationService.observed(r.batch, clock: r.clock, receivedNs: r.receivedNs, maxFutureSkewNs: maxFutureSkewNs).events
                log.events += observed
                log.arrivalNs += repeatElement(r.receivedNs, count: observed.count)
                log.lastBatchId = max(log.lastBatchId, r.id)
            }
            log.batches += page.count
            guard page.count == pageSize, let last = page.last else { break }
            since = last.receivedNs + 1
        }
        return log
    }

    /// Runs the log through a fresh engine.
    public func replay(configuration: CorrelationConfiguration = CorrelationConfiguration()) -> CorrelationEngine {
        CorrelationEngine.replay(events, inventory: inventory, configuration: configuration)
    }

    /// What a live server's engine would have said over the run: each event
    /// is given to the engine when it arrived, and the engine advances every
    /// `tickNs` of server time, as the server's engine thread does.
    /// `watch` sees the engine after every pass, with the pass's time.
    public func replayLive(configuration: CorrelationConfiguration = CorrelationConfiguration(), tickNs: Int64 = 250_000_000,
                           watch: (Int64, CorrelationEngine) -> Void = { _, _ in }) -> CorrelationEngine {
        var engine = CorrelationEngine(configuration: configuration)
        for node in inventory.keys.sorted() { engine.updateInventory(node: node, pods: inventory[node]!) }
        let arrivals = arrivalNs.count == events.count ? arrivalNs : events.map(\.timeNs)
        let order = events.indices.sorted { (arrivals[$0], $0) < (arrivals[$1], $1) }
        guard let first = order.first, let last = order.last else { return engine }
        var next = 0
        var t = arrivals[first]
        let end = arrivals[last] + configuration.allowedLatenessNs + 2 * configuration.bucketNs
        while t <= end {
            while next < order.count, arrivals[order[next]] <= t {
                engine.ingest(events[order[next]])
                next += 1
            }
            engine.advance(toNs: t)
            watch(t, engine)
            t += tickNs
        }
        engine.finish()
        return engine
    }

    /// Feeds the log into `engine` (inventories first), without advancing it.
    public func feed(_ engine: inout CorrelationEngine) {
        for node in inventory.keys.sorted() { engine.updateInventory(node: node, pods: inventory[node]!) }
        engine.ingest(events)
    }
}

/// A lab run kept as a regression case (`lab/recordings/<run>.json` and
/// `.tar.gz` or, older, `.sqlite.gz`, written by scripts/record-lab-run.py): its event log, the
/// known answer and when the fault began.
public struct RecordedRun: Sendable {
    /// The recording's file name without extension (`<scenario>-<date>-<time>`).
    public var name: String
    public var scenario: String
    public var expected: [KnownAnswer]
    /// Wall time of the first fault; incidents opened before `faultNs − 5 s`
    /// are not the fault's (the lab scores the same way).
    public var faultNs: Int64?
    public var log: EventLog

    public var isHealthy: Bool { expected.isEmpty }

    public enum LoadError: Error, CustomStringConvertible {
        case unreadable(String)
        public var description: String {
            switch self {
            case .unreadable(let why): return why
            }
        }
    }

    /// Every recording in `directory`, by file name.
    public static func loadAll(directory: String) throws -> [RecordedRun] {
        let names = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".json") }.sorted()
        return try names.map { try load(directory + "/" + $0) }
    }

    /// One recording, from its `.json`; the log is unpacked with gzip into a
    /// temporary directory that is removed again.
    public static func load(_ jsonPath: String) throws -> RecordedRun {
        guard let data = FileManager.default.contents(atPath: jsonPath), let meta = try? JSONValue.parse([UInt8](data)) else {
            throw LoadError.unreadable("\(jsonPath): not a recording")
        }
        guard let scenario = meta["scenario"]?.stringValue else { throw LoadError.unreadable("\(jsonPath): no scenario") }
        var expected: [KnownAnswer] = []
        for e in meta["expected"]?.arrayValue ?? [] {
            guard let entity = e["entity"]?.stringValue, let k = e["kind"]?.stringValue, let kind = CauseKind(rawValue: k) else {
                throw LoadError.unreadable("\(jsonPath): bad expected entry")
            }
            expected.append(KnownAnswer(entity: entity, kind: kind))
        }
        let base = String(jsonPath.dropLast(".json".count))
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("tapio-recording-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: tmp) }
        if FileManager.default.fileExists(atPath: base + ".tar.gz") {
            try unpack("/bin/tar", ["-xzf", base + ".tar.gz", "-C", tmp], output: nil)
        } else {
            // The row-per-event layout, converted when the store opens it.
            try unpack("/bin/gzip", ["-dc", base + ".sqlite.gz"], output: tmp + "/events.sqlite")
        }
        let log = try EventLog.load(dataDirectory: tmp, convert: true)
        let name = String((jsonPath.split(separator: "/").last ?? "").dropLast(".json".count))
        return RecordedRun(name: name, scenario: scenario, expected: expected, faultNs: meta["fault_ns"]?.intValue, log: log)
    }

    private static func unpack(_ program: String, _ arguments: [String], output: String?) throws {
        guard let input = arguments.first(where: { $0.hasSuffix(".gz") }), FileManager.default.fileExists(atPath: input) else {
            throw LoadError.unreadable("\(arguments.joined(separator: " ")): recording missing")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = arguments
        var out: FileHandle?
        if let output {
            guard FileManager.default.createFile(atPath: output, contents: nil) else { throw LoadError.unreadable("\(output): cannot be created") }
            out = try FileHandle(forWritingTo: URL(fileURLWithPath: output))
            p.standardOutput = out
        }
        defer { try? out?.close() }
        try p.run()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else { throw LoadError.unreadable("\(input): \(program) exited \(p.terminationStatus)") }
    }

    /// The incidents that count for the run: for a fault, those opened from
    /// 5 s before it; for a healthy run, all.
    public func scoredIncidents(_ engine: CorrelationEngine) -> [Incident] {
        guard let f = faultNs, !isHealthy else { return engine.incidents }
        return engine.incidents.filter { $0.openedNs >= f - 5_000_000_000 }
    }

    /// The candidates of the scored incidents, each (entity, kind) once with
    /// its highest confidence, best first (the lab's ranking).
    public func ranked(_ engine: CorrelationEngine) -> [RootCause] {
        var best: [String: RootCause] = [:]
        var order: [String] = []
        for inc in scoredIncidents(engine) {
            for rc in inc.rootCauses {
                let key = rc.entity + "|" + rc.kind.rawValue
                if let old = best[key] {
                    if rc.confidence > old.confidence { best[key] = rc }
                } else {
                    best[key] = rc
                    order.append(key)
                }
            }
        }
        return order.enumerated().sorted { a, b in
            let (ca, cb) = (best[a.element]!.confidence, best[b.element]!.confidence)
            return ca != cb ? ca > cb : a.offset < b.offset
        }.map { best[$0.element]! }
    }

    /// AC@k as the lab computes it: |top-k ∩ expected| / min(k, |expected|);
    /// a healthy run scores 1 with nothing reported, else 0.
    public func accuracy(_ ranked: [RootCause], k: Int) -> Double {
        if expected.isEmpty { return ranked.isEmpty ? 1 : 0 }
        let top = ranked.prefix(k)
        let hits = expected.filter { e in top.contains { $0.entity == e.entity && $0.kind == e.kind } }.count
        return Double(hits) / Double(min(k, expected.count))
    }

    /// (confidence − right)² of the first of `ranked`; a fault run with
    /// nothing ranked counts 1, a healthy run with nothing 0.
    public func topOneBrier(_ ranked: [RootCause]) -> Double {
        guard let top = ranked.first else { return isHealthy ? 0 : 1 }
        let y = expected.contains { $0.entity == top.entity && $0.kind == top.kind } ? 1.0 : 0.0
        return (top.confidence - y) * (top.confidence - y)
    }

    /// Labelled candidates for fitting the weights: every candidate of the
    /// scored incidents, right when it is one of the expected answers.
    public func samples(_ engine: CorrelationEngine) -> [Calibration.Sample] {
        scoredIncidents(engine).flatMap { inc in
            inc.rootCauses.map { rc in
                Calibration.Sample(values: Dictionary(uniqueKeysWithValues: rc.factors.map { ($0.name, $0.value) }),
                                   correct: expected.contains { $0.entity == rc.entity && $0.kind == rc.kind })
            }
        }
    }
}
