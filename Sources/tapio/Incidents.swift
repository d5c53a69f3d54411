import ArgumentParser
import Foundation
import TapioClient
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
        let doc = try connection.client().json("incidents", params)
        switch connection.output {
        case .json: print(doc.serialized())
        case .table: print(incidentTable(doc))
        }
    }
}

func incidentTable(_ doc: JSONValue) -> String {
    let rows = (doc["incidents"]?.arrayValue ?? []).map { i -> [String] in
        let top = i["root_causes"]?.arrayValue?.first
        let cause = top.map { "\($0["kind"]?.stringValue ?? "") \($0["entity"]?.stringValue ?? "") (\(String(format: "%.2f", $0["confidence"].flatMap(number) ?? 0)))" } ?? "-"
        let services = (i["affected"]?["services"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: ",")
        return [i["id"]?.stringValue ?? "", i["status"]?.stringValue ?? "", i["opened_at"]?.stringValue ?? "", cause, services, i["title"]?.stringValue ?? ""]
    }
    return table(["ID", "STATUS", "OPENED", "TOP ROOT CAUSE (CONFIDENCE)", "AFFECTED", "TITLE"], rows)
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
        abstract: "An incident's events across nodes on the corrected clock; entries whose uncertainty intervals overlap are marked concurrent (≈).")

    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Incident id.")
    var id: String

    func run() throws {
        let doc = try connection.client().json("timeline", ["id": id])
        switch connection.output {
        case .json: print(doc.serialized())
        case .table: print(timelineText(doc))
        }
    }
}

/// A header with the ranked causes, then one lane per node.
func timelineText(_ doc: JSONValue) -> String {
    var out = "\(doc["id"]?.stringValue ?? "")  \(doc["status"]?.stringValue ?? "")  \(doc["title"]?.stringValue ?? "")\n"
    for (rank, c) in (doc["root_causes"]?.arrayValue ?? []).enumerated() {
        out += "  #\(rank + 1) \(c["kind"]?.stringValue ?? "") \(c["entity"]?.stringValue ?? "")  confidence \(String(format: "%.2f", c["confidence"].flatMap(number) ?? 0))\n"
    }
    let entries = doc["timeline"]?.arrayValue ?? []
    let nodes = Array(Set(entries.compactMap { $0["node"]?.stringValue })).sorted()
    let rows = entries.map { e -> [String] in
        let concurrent = !(e["concurrent_with"]?.arrayValue ?? []).isEmpty
        let err = Double(e["time_error_ns"]?.intValue ?? 0) / 1e6
        var row = [(concurrent ? "≈ " : "  ") + (e["time"]?.stringValue ?? ""), String(format: "±%.1fms", err)]
        for n in nodes {
            row.append(e["node"]?.stringValue == n ? "\(e["role"]?.stringValue.map { "[\($0)] " } ?? "")\(e["entity"]?.stringValue ?? ""): \(e["summary"]?.stringValue ?? "")" : "")
        }
        return row
    }
    out += "\n" + table(["TIME", "±"] + nodes.map { $0.uppercased() }, rows)
    return out
}

struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Why Tapio ranked an incident's root causes as it did: each link's factors and their weights.")

    @OptionGroup var connection: ConnectionOptions
    @Argument(help: "Incident id.")
    var id: String

    func run() throws {
        let doc = try connection.client().json("explain", ["id": id])
        switch connection.output {
        case .json:
            print(doc.serialized())
        case .table:
            var out = "\(doc["id"]?.stringValue ?? "")  \(doc["title"]?.stringValue ?? "")\n"
            for (rank, c) in (doc["root_causes"]?.arrayValue ?? []).enumerated() {
                out += "\n#\(rank + 1) \(c["kind"]?.stringValue ?? "") \(c["entity"]?.stringValue ?? "")  confidence \(String(format: "%.3f", c["confidence"].flatMap(number) ?? 0))\n"
                let rows = (c["factors"]?.arrayValue ?? []).map { f in
                    ["  " + (f["name"]?.stringValue ?? ""), String(format: "%.3f", f["value"].flatMap(number) ?? 0), String(format: "%.3f", f["weight"].flatMap(number) ?? 0)]
                }
                out += table(["  FACTOR", "VALUE", "WEIGHT"], rows) + "\n"
                for e in (c["evidence"]?.arrayValue ?? []).prefix(5) { out += "  evidence: \(e.stringValue ?? "")\n" }
            }
            print(out)
        }
    }
}

struct Services: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Who calls whom, learned from connections and DNS, with errors and latency.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        let doc = try connection.client().json("services")
        switch connection.output {
        case .json:
            print(doc.serialized())
        case .table:
            let rows = (doc["services"]?.arrayValue ?? []).map { e -> [String] in
                let lat = e["connect_latency"]
                return [e["client"]?.stringValue ?? "", e["server"]?.stringValue ?? "", e["connects"]?.intValue.map(String.init) ?? "0",
                        e["failures"]?.intValue.map(String.init) ?? "0",
                        String(format: "%.1f%%", 100 * (e["failure_ratio"].flatMap(number) ?? 0)),
                        String(format: "%.2fms", lat?["p50_ms"].flatMap(number) ?? 0), String(format: "%.2fms", lat?["p99_ms"].flatMap(number) ?? 0)]
            }
            print(table(["CLIENT", "SERVER", "CONNECTS", "FAILURES", "FAIL%", "CONNECT P50", "P99"], rows))
        }
    }
}

struct Watch: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Stream incident changes as they happen (one line per change; -o json: one JSON object per line).")

    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Seconds between polls.")
    var interval: Double = 1
    @Option(help: "Stop after this many seconds (default: run until interrupted).")
    var duration: Double?

    func run() throws {
        let client = try connection.client()
        var seen: [String: String] = [:]
        let deadline = duration.map { Date(timeIntervalSinceNow: $0) }
        while deadline.map({ Date() < $0 }) ?? true {
            let doc = try client.json("incidents", ["status": "all"])
            for i in doc["incidents"]?.arrayValue ?? [] {
                guard let id = i["id"]?.stringValue else { continue }
                let top = i["root_causes"]?.arrayValue?.first
                let signature = "\(i["status"]?.stringValue ?? "")|\(top?["kind"]?.stringValue ?? "")|\(top?["entity"]?.stringValue ?? "")|\(i["updated_at"]?.stringValue ?? "")"
                guard seen[id] != signature else { continue }
                let change = seen[id] == nil ? "opened" : (i["status"] == .string("resolved") ? "resolved" : "updated")
                seen[id] = signature
                switch connection.output {
                case .json:
                    print(JSONValue.object(["change": .string(change), "incident": i]).serialized())
                case .table:
                    let cause = top.map { "\($0["kind"]?.stringValue ?? "") \($0["entity"]?.stringValue ?? "") \(String(format: "%.2f", $0["confidence"].flatMap(number) ?? 0))" } ?? "-"
                    print("\(rfc3339(ns: wallClockNs()))  \(change)  \(id)  \(cause)  \(i["title"]?.stringValue ?? "")")
                }
                fflush(nil)  // every stream: lines reach a pipe as they happen
            }
            Thread.sleep(forTimeInterval: interval)
        }
    }
}
