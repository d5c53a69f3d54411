import ArgumentParser
import Foundation
import TapioClient
import TapioQueryAPI
import TapioUI
import TapioWire

struct Incidents: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Incidents with their ranked root causes.")

    @OptionGroup var connection: ConnectionOptions
    @Option(help: "open, resolved or all.")
    var status = "all"
    @Option(help: "Only incidents updated within this duration, e.g. 1h.")
    var since: String?

    func run() throws {
        var sinceNs: Int64?
        if let since {
            guard let ns = parseDuration(since) else { throw ValidationError("cannot read duration \(since)") }
            sinceNs = wallClockNs() - ns
        }
        let answer = try connection.ask { [status] in try $0.incidents(status: status, sinceNs: sinceNs) }
        connection.print(answer, items: answer.incidents, table: incidentTable)
    }
}

/// One row per incident. PAGES says whether the server pages a person for it
/// (`"pages"`, docs/correlation.md "Paging"): `no` marks an observation — its
/// candidates are only inferred or below the paging floor — which alerts do
/// not send. An incident from a server that predates the field pages.
func incidentTable(_ answer: IncidentsAnswer) -> String {
    let rows = answer.incidents.map { i -> [String] in
        let cause = i.topCause.map { "\($0.kind) \($0.entity) (\(String(format: "%.2f", $0.confidence)))" } ?? "-"
        return [i.id, i.status, i.pages ? "yes" : "no", i.openedAt, cause, i.affected.services.joined(separator: ","), i.title]
    }
    return table(["ID", "STATUS", "PAGES", "OPENED", "TOP ROOT CAUSE (CONFIDENCE)", "AFFECTED", "TITLE"], rows)
}

struct Timeline: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "An incident's events across nodes on the corrected clock; entries whose uncertainty intervals overlap are marked concurrent (≈).",
        discussion: "-o svg draws one lane per node with each event's uncertainty as a bar (a file for a ticket); -o html is the same drawing with the events listed in a table.")

    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Incident id.")
    var id: String?
    @Option(help: ArgumentHelp("Render a timeline saved earlier with `tapio timeline ID -o json` instead of asking the server.", valueName: "file"))
    var file: String?

    func validate() throws {
        if (id == nil) == (file == nil) { throw ValidationError("give an incident id, or --file with a saved timeline") }
    }

    func run() throws {
        let incident: QueryIncident
        if let file {
            guard let data = FileManager.default.contents(atPath: file) else { throw CLIError("cannot read \(file)") }
            let saved: QueryIncident
            do {
                saved = try QueryCoding.decode(QueryIncident.self, from: Array(data))
            } catch {
                throw CLIError("\(file) is not a timeline saved with `tapio timeline ID -o json`: \(error)")
            }
            guard saved.timeline != nil else { throw CLIError("\(file) is not a timeline saved with `tapio timeline ID -o json`: it has no timeline") }
            incident = saved
        } else {
            incident = try connection.ask { [id] in try $0.timeline(id: id!) }
        }
        switch connection.output {
        case .svg: print(TimelineLanes.svg(incident, standalone: true))
        case .html: print(TimelineLanes.htmlDocument(incident))
        default: connection.print(incident) { timelineText($0, width: terminalWidth()) }
        }
    }
}

/// A header with the ranked causes, then one row per event with its node
/// (lanes side by side grow with the number of nodes: ~260 columns at
/// three). Rows fit in `width` columns: node and entity are shortened with
/// "…" past a bound, the summary (with `[cause]` before a cause's) is wrapped
/// onto continuation lines under its column; the event kind and the rest
/// are in `-o json`. Times are the time of day in UTC, the date said once above
/// (the full time when the events span two days).
func timelineText(_ incident: QueryIncident, width: Int) -> String {
    let width = max(width, 60)
    var out = "\(incident.id)  \(incident.status)  \(incident.title)\n"
    for (rank, c) in incident.rootCauses.enumerated() {
        out += "  #\(rank + 1) \(c.kind) \(c.entity)  confidence \(String(format: "%.2f", c.confidence))\n"
    }
    let entries = incident.timeline ?? []
    guard !entries.isEmpty else { return out + "\n(no timeline entries)" }
    let times = entries.map(\.time)
    let days = Set(times.map { $0.prefix(10) })
    let sameDay = days.count == 1
    let nodes = Set(entries.map(\.node))
    var legend = "\(entries.count) events on \(nodes.count) node\(nodes.count == 1 ? "" : "s")"
    legend += sameDay ? ", times UTC on \(days.first!)" : ""
    legend += "; ≈ marks an event concurrent with another (their uncertainty intervals overlap)"
    out += "\n" + wrap(legend, width).joined(separator: "\n") + "\n\n"
    let rows = entries.enumerated().map { index, e -> [String] in
        let concurrent = !e.concurrentWith.isEmpty
        let time = times[index]
        let shown = sameDay && time.count > 11 ? String(time.dropFirst(11).dropLast(time.hasSuffix("Z") ? 1 : 0)) : time
        let role = e.role == "cause" ? "[cause] " : ""
        return [(concurrent ? "≈ " : "  ") + shown, String(format: "±%.1fms", Double(e.timeErrorNs) / 1e6),
                shorten(e.node, 16), shorten(e.entity, 20), role + e.summary]
    }
    let header = ["  TIME", "±", "NODE", "ENTITY", "SUMMARY"]
    var widths = header.map(\.count)
    for r in rows { for i in 0..<(r.count - 1) { widths[i] = max(widths[i], r[i].count) } }
    let indent = widths.dropLast().reduce(0) { $0 + $1 + 2 }
    // Narrower than the columns plus 40 for the summary: the summary goes
    // under its row, indented, in the whole width.
    let beside = width - indent >= 40
    let summaryIndent = beside ? indent : 4
    let summaryWidth = width - summaryIndent
    func line(_ cells: [String]) -> [String] {
        let lead = cells.dropLast().enumerated().map { i, c in c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ") + "  "
        let wrapped = wrap(cells.last!, summaryWidth)
        let under = wrapped.map { String(repeating: " ", count: summaryIndent) + $0 }
        return beside ? [lead + wrapped[0]] + under.dropFirst() : [lead] + under
    }
    out += (line(header) + rows.flatMap(line)).map { $0.replacingOccurrences(of: " +$", with: "", options: .regularExpression) }.joined(separator: "\n")
    return out
}

/// At most `limit` characters, the last one "…" when cut.
func shorten(_ text: String, _ limit: Int) -> String {
    text.count <= limit ? text : String(text.prefix(limit - 1)) + "…"
}

/// Splits at spaces into lines of at most `width` characters (a longer word is cut).
func wrap(_ text: String, _ width: Int) -> [String] {
    var lines: [String] = []
    var current = ""
    for word in text.split(separator: " ", omittingEmptySubsequences: true).map(String.init) {
        var word = word
        while word.count > width {
            if !current.isEmpty { lines.append(current); current = "" }
            lines.append(String(word.prefix(width)))
            word = String(word.dropFirst(width))
        }
        if current.isEmpty { current = word } else if current.count + 1 + word.count <= width { current += " " + word } else {
            lines.append(current)
            current = word
        }
    }
    lines.append(current)
    return lines
}

/// The terminal's width: $COLUMNS, else the terminal's own, else 120 (a pipe or a file).
func terminalWidth() -> Int {
    if let c = ProcessInfo.processInfo.environment["COLUMNS"].flatMap(Int.init), c > 0 { return c }
    var size = winsize()
    if isatty(STDOUT_FILENO) != 0, ioctl(STDOUT_FILENO, UInt(TIOCGWINSZ), &size) == 0, size.ws_col > 0 { return Int(size.ws_col) }
    return 120
}

struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Why Tapio ranked an incident's root causes as it did: each link's factors and their weights.")

    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Incident id.")
    var id: String

    func run() throws {
        let incident = try connection.ask { [id] in try $0.explain(id: id) }
        connection.print(incident) { i in
            var out = "\(i.id)  \(i.title)\n"
            for (rank, c) in i.rootCauses.enumerated() {
                out += "\n#\(rank + 1) \(c.kind) \(c.entity)  confidence \(String(format: "%.3f", c.confidence))\n"
                let rows = c.factors.map { f in ["  " + f.name, String(format: "%.3f", f.value), String(format: "%.3f", f.weight)] }
                out += table(["  FACTOR", "VALUE", "WEIGHT"], rows) + "\n"
                for e in c.evidence.prefix(5) { out += "  evidence: \(e)\n" }
            }
            return out
        }
    }
}

struct Services: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Who calls whom, learned from connections and DNS, with errors and latency.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        let answer = try connection.ask { try $0.services() }
        connection.print(answer, items: answer.services) { doc in
            let rows = doc.services.map { e -> [String] in
                [e.client, e.server, String(e.connects), String(e.failures), String(format: "%.1f%%", 100 * e.failureRatio),
                 String(format: "%.2fms", e.connectLatency.p50Ms), String(format: "%.2fms", e.connectLatency.p99Ms)]
            }
            return table(["CLIENT", "SERVER", "CONNECTS", "FAILURES", "FAIL%", "CONNECT P50", "P99"], rows)
        }
    }
}

struct Watch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stream incident changes as they happen (one line per change; -o json or ndjson: one JSON object per line).",
        discussion: """
            Subscribes to the server's incident changes: the server pushes each one as its engine makes it, and a \
            keepalive every --interval seconds while nothing happens. When the server goes away (a restart, a rollout) \
            a status line says so on stderr and watch reconnects when it is back, without repeating the changes it \
            already printed.
            """)

    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Seconds between the server's keepalives (0.1 to 60); a connection silent for three of them is taken as lost.")
    var interval: Double = 5
    @Option(help: "Stop after this many seconds (default: run until interrupted).")
    var duration: Double?

    func validate() throws {
        if interval < 0.1 || interval > 60 { throw ValidationError("--interval must be from 0.1 to 60 seconds") }
        if connection.output.isDrawing { throw ValidationError(OutputFormat.drawingsOnlyForTimeline) }
    }

    func run() throws {
        let stream = Reconnecting(connection: connection, interval: 0.2)
        var seen: [String: String] = [:]
        let deadline = duration.map { Date(timeIntervalSinceNow: $0) }
        let keepaliveMs = Int64((interval * 1000).rounded())
        while deadline.map({ Date() < $0 }) ?? true {
            _ = try stream.attempt { client in
                try client.subscribe(keepaliveMs: keepaliveMs, until: deadline) { message in
                    switch message.type {
                    case .snapshot:
                        stream.connected()
                        for i in message.incidents ?? [] { report(i, seen: &seen) }
                    case .change:
                        if let i = message.incident { report(i, seen: &seen) }
                    case .keepalive:
                        break
                    }
                    fflush(nil)  // every stream: lines reach a pipe as they happen
                    return true
                }
            }
        }
    }

    /// Prints a line when the incident is new to this watch or changed
    /// since it was last printed (status, top cause or update time): a
    /// snapshot after a reconnect repeats nothing already said.
    private func report(_ i: QueryIncident, seen: inout [String: String]) {
        let top = i.topCause
        let signature = "\(i.status)|\(top?.kind ?? "")|\(top?.entity ?? "")|\(i.updatedAt)"
        guard seen[i.id] != signature else { return }
        let change: SubscriptionMessage.Change = seen[i.id] == nil ? .opened : (i.isResolved ? .resolved : .updated)
        seen[i.id] = signature
        switch connection.output {
        case .json, .ndjson:
            print(QueryCoding.string(WatchLine(change: change, incident: i)))
        case .table, .svg, .html:
            let cause = top.map { "\($0.kind) \($0.entity) \(String(format: "%.2f", $0.confidence))" } ?? "-"
            let observation = i.pages ? "" : "  (observation: does not page)"
            print("\(rfc3339(ns: wallClockNs()))  \(change.rawValue)  \(i.id)  \(cause)  \(i.title)\(observation)")
        }
    }
}

/// One line of `watch -o json`.
struct WatchLine: Encodable {
    var change: SubscriptionMessage.Change
    var incident: QueryIncident
}
