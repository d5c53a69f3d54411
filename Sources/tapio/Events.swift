import ArgumentParser
import Foundation
import TapioQueryAPI
import TapioWire

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Events the agents reported, oldest first.",
        discussion: """
            Times for --since and --until are a duration back from now (30s, 5m, 2h, 1d) or an RFC 3339 time \
            (2026-12-01T10:00:00Z). --pod NAME matches one pod; --pod 'PREFIX*' every pod whose name starts with PREFIX. \
            --service NAME is the pods the inventory lists for that service (tapio pods). With --follow, new events are \
            printed as the server stores them, until interrupted; a server restart is waited out.
            """)

    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Only events at or after this time: a duration ago (30s, 5m, 2h, 1d) or an RFC 3339 time.")
    var since: String?
    @Option(help: "Only events before this time: a duration ago or an RFC 3339 time.")
    var until: String?
    @Option(help: "Only events of this node.")
    var node: String?
    @Option(help: "Only events of this kind, e.g. process_exit.")
    var kind: String?
    @Option(help: "Only events of this pid.")
    var pid: UInt32?
    @Option(help: "Only events of this pod; a trailing * matches every pod whose name starts with what precedes it, e.g. 'api-*'.")
    var pod: String?
    @Option(help: "Only events of the pods of this service (from the pod inventory).")
    var service: String?
    @Option(help: "Only events attributed to this Kubernetes namespace.")
    var namespace: String?
    @Option(help: "At most this many (the most recent); with --follow, how many to show before following.")
    var limit = 1000
    @Flag(name: [.short, .long], help: "Keep printing new events as they are stored (-o json prints one object per line then).")
    var follow = false
    @Option(help: "With --follow, seconds between asks.")
    var interval: Double = 1

    /// How far back each ask of --follow looks again for events that were
    /// stored after later ones (batches of other nodes, a resent spool):
    /// those up to this much older than the newest shown still appear.
    static let followLookbackNs: Int64 = 30_000_000_000
    /// What --follow asks for after the first answer: everything since its
    /// cursor (the server caps it at its own maximum).
    static let followPageLimit = 100_000

    func validate() throws {
        if connection.output.isDrawing { throw ValidationError(OutputFormat.drawingsOnlyForTimeline) }
        if follow, until != nil { throw ValidationError("--until and --follow do not go together: following has no end") }
        if limit < 1 { throw ValidationError("--limit must be at least 1") }
        if interval <= 0 { throw ValidationError("--interval must be positive") }
        if let kind, EventKind(name: kind) == nil {
            throw ValidationError("unknown kind \(kind); one of: \(EventKind.allCases.dropFirst().map(\.name).joined(separator: ", "))")
        }
        if pod == "*" { throw ValidationError("--pod '*' matches every pod: leave --pod out") }
        _ = try parameters()
    }

    func parameters(now: Int64 = wallClockNs()) throws -> [String: String] {
        var params: [String: String] = ["limit": String(limit)]
        if let since { params["since_ns"] = String(try parseTime(since, now: now, flag: "--since")) }
        if let until { params["until_ns"] = String(try parseTime(until, now: now, flag: "--until")) }
        if let node { params["node"] = node }
        if let kind { params["kind"] = kind }
        if let pid { params["pid"] = String(pid) }
        if let pod {
            if pod.hasSuffix("*") { params["pod_prefix"] = String(pod.dropLast()) } else { params["pod"] = pod }
        }
        if let service { params["service"] = service }
        if let namespace { params["namespace"] = namespace }
        return params
    }

    func run() throws {
        let params = try parameters()
        guard follow else {
            let answer = try connection.ask { try $0.events(params) }
            switch connection.output {
            case .json: print(QueryCoding.string(answer))
            case .ndjson: for e in answer.events { print(QueryCoding.string(e)) }
            case .table, .svg, .html: print(table(Self.header, answer.events.map(Self.row)))
            }
            // The answer is short of what retention deleted: said on stderr,
            // so stdout stays the events.
            if let note = answer.retention?.note {
                FileHandle.standardError.write(Data("tapio: \(note)\n".utf8))
            }
            return
        }
        try followEvents(params)
    }

    static let header = ["TIME", "NODE", "KIND", "PID", "COMM", "POD", "DETAIL"]

    static func row(_ e: QueryEvent) -> [String] {
        [e.time, e.node, e.kind, e.pid.map(String.init) ?? "", e.comm ?? "", e.pod.map { "\(e.namespace ?? "")/\($0)" } ?? "", eventDetail(e)]
    }

    /// Polls with a moving `since_ns`: each ask covers from the newest event
    /// shown minus `followLookbackNs`, and events already shown (the same
    /// JSON object) are skipped. Table rows are printed as they come, with
    /// fixed column widths (a stream cannot be measured first).
    private func followEvents(_ initial: [String: String]) throws {
        let stream = Reconnecting(connection: connection, interval: interval)
        var shown: [String: Int64] = [:]
        var newest: Int64?
        let firstSince = initial["since_ns"].flatMap { Int64($0) }
        var params = initial
        let widths = [30, 10, 15, 7, 15, 24]
        if connection.output == .table { emit(Self.header, widths: widths) }
        while true {
            let asked = params
            guard let answer = try stream.attempt({ try $0.events(asked) }) else { continue }
            for e in answer.events {
                let key = QueryCoding.string(e)
                guard shown[key] == nil else { continue }
                let t = e.timeNs
                shown[key] = t
                newest = max(newest ?? t, t)
                switch connection.output {
                case .json, .ndjson: print(key)
                case .table, .svg, .html: emit(Self.row(e), widths: widths)
                }
            }
            fflush(nil)
            if let newest {
                let from = max(firstSince ?? .min, newest - Self.followLookbackNs)
                params["since_ns"] = String(from)
                shown = shown.filter { $0.value >= from }
            }
            params["limit"] = String(Self.followPageLimit)
            Thread.sleep(forTimeInterval: interval)
        }
    }

    private func emit(_ cells: [String], widths: [Int]) {
        print(cells.enumerated().map { i, c in i < widths.count ? c.padding(toLength: max(widths[i], c.count), withPad: " ", startingAt: 0) : c }
            .joined(separator: "  "))
    }
}

/// A point in time given on the command line: a duration back from `now`
/// ("5m") or an RFC 3339 time ("2026-12-01T10:00:00Z", "…T10:00:00.5+02:00").
func parseTime(_ text: String, now: Int64, flag: String) throws -> Int64 {
    if let ago = parseDuration(text) { return now - ago }
    if let t = parseRFC3339(text) { return t }
    throw ValidationError("cannot read \(flag) \(text): use a duration ago (30s, 5m, 2h, 1d) or an RFC 3339 time such as 2026-12-01T10:00:00Z")
}

/// RFC 3339 (`T` or a space between date and time, fraction up to ns) → ns since the epoch.
func parseRFC3339(_ text: String) -> Int64? {
    let chars = Array(text.utf8)
    func number(_ from: Int, _ count: Int) -> Int? {
        guard from + count <= chars.count else { return nil }
        var v = 0
        for c in chars[from..<(from + count)] {
            guard c >= 48, c <= 57 else { return nil }
            v = v * 10 + Int(c - 48)
        }
        return v
    }
    guard chars.count >= 20, let year = number(0, 4), chars[4] == 45, let month = number(5, 2), chars[7] == 45, let day = number(8, 2),
          chars[10] == 84 || chars[10] == 116 || chars[10] == 32, let hour = number(11, 2), chars[13] == 58, let minute = number(14, 2),
          chars[16] == 58, let second = number(17, 2),
          (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61 else { return nil }
    var i = 19
    var fraction: Int64 = 0
    if i < chars.count, chars[i] == 46 {
        i += 1
        var digits = 0
        while i < chars.count, chars[i] >= 48, chars[i] <= 57 {
            if digits < 9 { fraction = fraction * 10 + Int64(chars[i] - 48) }
            digits += 1
            i += 1
        }
        guard digits > 0 else { return nil }
        if digits < 9 { for _ in digits..<9 { fraction *= 10 } }
    }
    guard i < chars.count else { return nil }
    var offset = 0
    if chars[i] == 90 || chars[i] == 122 {
        i += 1
    } else if chars[i] == 43 || chars[i] == 45, let h = number(i + 1, 2), chars.count > i + 3, chars[i + 3] == 58, let m = number(i + 4, 2) {
        offset = (h * 60 + m) * 60 * (chars[i] == 43 ? 1 : -1)
        i += 6
    } else {
        return nil
    }
    guard i == chars.count else { return nil }
    var parts = tm()
    parts.tm_year = Int32(year - 1900)
    parts.tm_mon = Int32(month - 1)
    parts.tm_mday = Int32(day)
    parts.tm_hour = Int32(hour)
    parts.tm_min = Int32(minute)
    parts.tm_sec = Int32(second)
    let seconds = Int64(timegm(&parts)) - Int64(offset)
    return seconds * 1_000_000_000 + fraction
}
