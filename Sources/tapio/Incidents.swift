import ArgumentParser
import Foundation
import TapioClient
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
        var params = ["status": status]
        if let since {
            guard let ns = parseDuration(since) else { throw ValidationError("cannot read duration \(since)") }
            params["since_ns"] = String(wallClockNs() - ns)
        }
        connection.print(try connection.json("incidents", params), list: "incidents", table: incidentTable)
    }
}

/// One row per incident. PAGES says whether the server pages a person for it
/// (`"pages"`, docs/correlation.md "Paging"): `no` marks an observation — its
/// candidates are only inferred or below the paging floor — which alerts do
/// not send. An incident from a server that predates the field pages.
func incidentTable(_ doc: JSONValue) -> String {
    let rows = (doc["incidents"]?.arrayValue ?? []).map { i -> [String] in
        let top = i["root_causes"]?.arrayValue?.first
        let cause = top.map { "\($0["kind"]?.stringValue ?? "") \($0["entity"]?.stringValue ?? "") (\(String(format: "%.2f", $0["confidence"].flatMap(number) ?? 0)))" } ?? "-"
        let services = (i["affected"]?["services"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: ",")
        let pages = i["pages"] == .bool(false) ? "no" : "yes"
        return [i["id"]?.stringValue ?? "", i["status"]?.stringValue ?? "", pages, i["opened_at"]?.stringValue ?? "", cause, services, i["title"]?.stringValue ?? ""]
    }
    return table(["ID", "STATUS", "PAGES", "OPENED", "TOP ROOT CAUSE (CONFIDENCE)", "AFFECTED", "TITLE"], rows)
}

func number(_ v: JSONValue) -> Double? {
    switch v {
    case .double(let d): return d
    case .int(let i): return Double(i)
    default: return nil
    }
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
        let doc: JSONValue
        if let file {
            guard let data = FileManager.default.contents(atPath: file) else { throw CLIError("cannot read \(file)") }
            guard let parsed = try? JSONValue.parse(Array(data)), parsed["timeline"] != nil else {
                throw CLIError("\(file) is not a timeline saved with `tapio timeline ID -o json`")
            }
            doc = parsed
        } else {
            doc = try connection.json("timeline", ["id": id!])
        }
        switch connection.output {
        case .svg: print(TimelineLanes.svg(doc, standalone: true))
        case .html: print(TimelineLanes.htmlDocument(doc))
        default: connection.print(doc, list: nil) { timelineText($0, width: terminalWidth()) }
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
func timelineText(_ doc: JSONValue, width: Int) -> String {
    let width = max(width, 60)
    var out = "\(doc["id"]?.stringValue ?? "")  \(doc["status"]?.stringValue ?? "")  \(doc["title"]?.stringValue ?? "")\n"
    for (rank, c) in (doc["root_causes"]?.arrayValue ?? []).enumerated() {
        out += "  #\(rank + 1) \(c["kind"]?.stringValue ?? "") \(c["entity"]?.stringValue ?? "")  confidence \(String(format: "%.2f", c["confidence"].flatMap(number) ?? 0))\n"
    }
    let entries = doc["timeline"]?.arrayValue ?? []
    guard !entries.isEmpty else { return out + "\n(no timeline entries)" }
    let times = entries.map { $0["time"]?.stringValue ?? "" }
    let days = Set(times.map { $0.prefix(10) })
    let sameDay = days.count == 1
    let nodes = Set(entries.compactMap { $0["node"]?.stringValue })
    var legend = "\(entries.count) events on \(nodes.count) node\(nodes.count == 1 ? "" : "s")"
    legend += sameDay ? ", times UTC on \(days.first!)" : ""
    legend += "; ≈ marks an event concurrent with another (their uncertainty intervals overlap)"
    out += "\n" + wrap(legend, width).joined(separator: "\n") + "\n\n"
    let rows = entries.enumerated().map { index, e -> [String] in
        let concurrent = !(e["concurrent_with"]?.arrayValue ?? []).isEmpty
        let time = times[index]
        let shown = sameDay && time.count > 11 ? String(time.dropFirst(11).dropLast(time.hasSuffix("Z") ? 1 : 0)) : time
        let role = e["role"]?.stringValue == "cause" ? "[cause] " : ""
        return [(concurrent ? "≈ " : "  ") + shown,
                String(format: "±%.1fms", Double(e["time_error_ns"]?.intValue ?? 0) / 1e6),
                shorten(e["node"]?.stringValue ?? "", 16), shorten(e["entity"]?.stringValue ?? "", 20),
                role + (e["summary"]?.stringValue ?? "")]
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
        connection.print(try connection.json("explain", ["id": id]), list: nil) { doc in
            var out = "\(doc["id"]?.stringValue ?? "")  \(doc["title"]?.stringValue ?? "")\n"
            for (rank, c) in (doc["root_causes"]?.arrayValue ?? []).enumerated() {
                out += "\n#\(rank + 1) \(c["kind"]?.stringValue ?? "") \(c["entity"]?.stringValue ?? "")  confidence \(String(format: "%.3f", c["confidence"].flatMap(number) ?? 0))\n"
                let rows = (c["factors"]?.arrayValue ?? []).map { f in
                    ["  " + (f["name"]?.stringValue ?? ""), String(format: "%.3f", f["value"].flatMap(number) ?? 0), String(format: "%.3f", f["weight"].flatMap(number) ?? 0)]
                }
                out += table(["  FACTOR", "VALUE", "WEIGHT"], rows) + "\n"
                for e in (c["evidence"]?.arrayValue ?? []).prefix(5) { out += "  evidence: \(e.stringValue ?? "")\n" }
            }
            return out
        }
    }
}

struct Services: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Who calls whom, learned from connections and DNS, with errors and latency.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        connection.print(try connection.json("services"), list: "services") { doc in
            let rows = (doc["services"]?.arrayValue ?? []).map { e -> [String] in
                let lat = e["connect_latency"]
                return [e["client"]?.stringValue ?? "", e["server"]?.stringValue ?? "", e["connects"]?.intValue.map(String.init) ?? "0",
                        e["failures"]?.intValue.map(String.init) ?? "0",
                        String(format: "%.1f%%", 100 * (e["failure_ratio"].flatMap(number) ?? 0)),
                        String(format: "%.2fms", lat?["p50_ms"].flatMap(number) ?? 0), String(format: "%.2fms", lat?["p99_ms"].flatMap(number) ?? 0)]
            }
            return table(["CLIENT", "SERVER", "CONNECTS", "FAILURES", "FAIL%", "CONNECT P50", "P99"], rows)
        }
    }
}

struct Watch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stream incident changes as they happen (one line per change; -o json or ndjson: one JSON object per line).",
        discussion: """
            Asks the server every --interval seconds and prints what changed since the last answer. When the server             goes away (a restart, a rollout) a status line says so on stderr and watch waits for it to come back,             without repeating the changes it already printed.
            """)

    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Seconds between asks.")
    var interval: Double = 1
    @Option(help: "Stop after this many seconds (default: run until interrupted).")
    var duration: Double?

    func validate() throws {
        if interval <= 0 { throw ValidationError("--interval must be positive") }
        if connection.output.isDrawing { throw ValidationError(OutputFormat.drawingsOnlyForTimeline) }
    }

    func run() throws {
        var stream = Reconnecting(connection: connection, interval: interval)
        var seen: [String: String] = [:]
        let deadline = duration.map { Date(timeIntervalSinceNow: $0) }
        while deadline.map({ Date() < $0 }) ?? true {
            guard let doc = try stream.query("incidents", ["status": "all"]) else { continue }
            for i in doc["incidents"]?.arrayValue ?? [] {
                guard let id = i["id"]?.stringValue else { continue }
                let top = i["root_causes"]?.arrayValue?.first
                let signature = "\(i["status"]?.stringValue ?? "")|\(top?["kind"]?.stringValue ?? "")|\(top?["entity"]?.stringValue ?? "")|\(i["updated_at"]?.stringValue ?? "")"
                guard seen[id] != signature else { continue }
                let change = seen[id] == nil ? "opened" : (i["status"] == .string("resolved") ? "resolved" : "updated")
                seen[id] = signature
                switch connection.output {
                case .json, .ndjson:
                    print(JSONValue.object(["change": .string(change), "incident": i]).serialized())
                case .table, .svg, .html:
                    let cause = top.map { "\($0["kind"]?.stringValue ?? "") \($0["entity"]?.stringValue ?? "") \(String(format: "%.2f", $0["confidence"].flatMap(number) ?? 0))" } ?? "-"
                    let observation = i["pages"] == .bool(false) ? "  (observation: does not page)" : ""
                    print("\(rfc3339(ns: wallClockNs()))  \(change)  \(id)  \(cause)  \(i["title"]?.stringValue ?? "")\(observation)")
                }
            }
            fflush(nil)  // every stream: lines reach a pipe as they happen
            Thread.sleep(forTimeInterval: interval)
        }
    }
}
