import ArgumentParser
import Foundation
import TapioClient
import TapioWire

enum OutputFormat: String, ExpressibleByArgument {
    case table, json, ndjson, svg, html

    /// `svg` and `html` draw a timeline's lanes (docs/ui.md); only `timeline` takes them.
    var isDrawing: Bool { self == .svg || self == .html }
    static let drawingsOnlyForTimeline = "-o svg and -o html draw an incident's timeline: use them with `tapio timeline ID`; this command prints table, json or ndjson"
}

extension ConnectionOptions {
    /// One query, failures in words (see `ResolvedConnection.explain`).
    func json(_ method: String, _ params: [String: String] = [:]) throws -> JSONValue {
        try resolve().json(method, params)
    }

    /// Prints a document as `-o` asks: `json` the whole document, `ndjson`
    /// each element of its `key` array on a line of its own (the whole
    /// document on one line when it has no such array), `table` via `table`.
    func print(_ doc: JSONValue, list key: String?, table: (JSONValue) -> String) {
        switch output {
        case .json: Swift.print(doc.serialized())
        case .ndjson:
            if let key, let items = doc[key]?.arrayValue {
                for item in items { Swift.print(item.serialized()) }
            } else {
                Swift.print(doc.serialized())
            }
        case .table: Swift.print(table(doc))
        case .svg, .html: Tapio.exit(withError: CLIError(OutputFormat.drawingsOnlyForTimeline))
        }
    }
}

@main
struct Tapio: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tapio",
        abstract: "Ask tapio-server about events, nodes and incidents; manage the development PKI.",
        version: TapioVersion.current,
        subcommands: [Events.self, Nodes.self, Pods.self, Incidents.self, Timeline.self, Explain.self, Services.self, Watch.self,
                      UI.self, Config.self, Certs.self])

    static func main() {
        main(arguments(Array(CommandLine.arguments.dropFirst())))
    }

    /// `tapio --server X --tls-dir D events` is the documented form, with the
    /// connection options before the command; the parser wants them after it.
    /// `tapio help events` (and `tapio --tls-dir D help events`) is left to the
    /// parser's own help command, without the options before it.
    static func arguments(_ arguments: [String]) -> [String] {
        let commands = Set(configuration.subcommands.map { $0._commandName })
        guard let index = arguments.firstIndex(where: { commands.contains($0) || $0 == "help" }) else { return arguments }
        if arguments[index] == "help" { return Array(arguments[index...]) }
        guard index > 0 else { return arguments }
        return [arguments[index]] + Array(arguments[..<index]) + Array(arguments[(index + 1)...])
    }
}

struct Nodes: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Agents: connected, last seen, clock offset, events and drops received.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        connection.print(try connection.json("nodes"), list: "nodes") { doc in
            let rows = (doc["nodes"]?.arrayValue ?? []).map { n -> [String] in
                let offset = Double(n["clock_offset_ns"]?.intValue ?? 0) / 1e6
                let error = Double(n["clock_error_ns"]?.intValue ?? 0) / 1e6
                let degraded = n["degraded"]?.arrayValue?.count ?? 0
                return [n["node"]?.stringValue ?? "", n["connected"] == .bool(true) ? "yes" : "no", n["last_seen"]?.stringValue ?? "",
                        String(format: "%+.3f ± %.3f ms", offset, error), n["events_received"]?.intValue.map(String.init) ?? "0",
                        n["drops_total"]?.intValue.map(String.init) ?? "0",
                        (n["capabilities"]?.arrayValue?.count).map { "\($0) running, \(degraded) degraded" } ?? ""]
            }
            return table(["NODE", "CONNECTED", "LAST SEEN", "CLOCK OFFSET", "EVENTS", "DROPS", "PROGRAMS"], rows)
        }
    }
}

struct Pods: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pods the agents reported, with their IPs and services.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        connection.print(try connection.json("pods"), list: "pods") { doc in
            let rows = (doc["pods"]?.arrayValue ?? []).map { p -> [String] in
                [p["namespace"]?.stringValue ?? "", p["name"]?.stringValue ?? "", p["service"]?.stringValue ?? "", p["node"]?.stringValue ?? "",
                 (p["ips"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: ",")]
            }
            return table(["NAMESPACE", "POD", "SERVICE", "NODE", "IPS"], rows)
        }
    }
}

struct Certs: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Development PKI.", subcommands: [Init.self])

    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write a CA and server, node and operator identities in the cert-manager secret layout.")

        @Option(help: "Directory to write into: ca/, server/, nodes/<name>/, operators/<name>/.")
        var dir: String
        @Option(help: "Node names, comma-separated.")
        var nodes = ""
        @Option(help: "Operator names, comma-separated.")
        var operators = "admin"
        @Option(help: "Extra server names (DNS names or IP addresses), comma-separated.")
        var serverNames = ""
        @Option(help: "Validity of the issued certificates in days.")
        var days = 365

        func run() throws {
            func list(_ s: String) -> [String] { s.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty } }
            var sans = DevelopmentPKI.defaultServerNames
            for name in list(serverNames) {
                sans.append(name.first!.isNumber || name.contains(":") ? "IP:" + name : "DNS:" + name)
            }
            let issued = try DevelopmentPKI.initialize(directory: dir, nodes: list(nodes), operators: list(operators), serverNames: sans, days: days)
            print(table(["ROLE", "NAME", "DIRECTORY"], issued.map { [$0.role, $0.name, $0.directory] }))
        }
    }
}

func eventDetail(_ e: JSONValue) -> String {
    switch e["kind"]?.stringValue {
    case "process_exec": return e["filename"]?.stringValue ?? ""
    case "process_exit":
        let signal = e["signal"]?.intValue ?? 0
        return signal != 0 ? "signal=\(signal)" : "exit_code=\(e["exit_code"]?.intValue ?? 0)"
    case "oom_kill":
        return "victim=\(e["victim_pid"]?.intValue ?? 0) (\(e["victim_comm"]?.stringValue ?? "")) anon_rss=\(e["anon_rss_kb"]?.intValue ?? 0)kB"
    case "tcp_connect":
        let count = e["count"]?.intValue ?? 1
        return "\(peer(e)) \(e["outcome"]?.stringValue ?? "")\(count > 1 ? " x\(count)" : "") \(ms(e["latency_ns"]))"
    case "tcp_listen":
        return "\(e["ip"]?.stringValue ?? "*"):\(e["port"]?.intValue ?? 0) \(e["state"]?.stringValue ?? "")"
    case "tcp_reset":
        return "\(peer(e)) \(e["direction"]?.stringValue ?? "") x\(e["count"]?.intValue ?? 1)"
    case "tcp_retransmit":
        return "\(peer(e)) retransmits=\(e["count"]?.intValue ?? 0)"
    case "tcp_latency":
        return "\(peer(e)) srtt=\(e["srtt_us"]?.intValue ?? 0)us responses=\(e["responses"]?.intValue ?? 0) avg=\(ms(e["response_ns_avg"])) max=\(ms(e["response_ns_max"]))"
    case "packet_drop":
        return "\(e["reason"]?.stringValue ?? "") x\(e["count"]?.intValue ?? 0) \(e["protocol"]?.stringValue ?? "") \(peer(e))"
    case "dns":
        return "\(e["qtype"]?.stringValue ?? "") \(e["name"]?.stringValue ?? "") \(e["rcode"]?.stringValue ?? "") \(ms(e["latency_ns"]))"
    case "cpu_throttle":
        return "\(e["cgroup"]?.stringValue ?? "") throttled \(e["throttled_periods"]?.intValue ?? 0)/\(e["periods"]?.intValue ?? 0) periods, \(ms(e["throttled_ns"]))"
    case "memory_pressure":
        return "\(e["cgroup"]?.stringValue ?? "") \(e["source"]?.stringValue ?? "") x\(e["count"]?.intValue ?? 0) usage=\((e["usage_bytes"]?.intValue ?? 0) >> 20)MiB limit=\((e["limit_bytes"]?.intValue ?? 0) >> 20)MiB"
    case "io_error":
        return "\(e["syscall"]?.stringValue ?? "") \(e["errno"]?.stringValue ?? "") x\(e["count"]?.intValue ?? 0)"
    default: return ""
    }
}

/// "10.0.1.5:41000 → 10.0.2.7:6379 (redis)".
func peer(_ e: JSONValue) -> String {
    let src = "\(e["src_ip"]?.stringValue ?? "?"):\(e["src_port"]?.intValue ?? 0)"
    var dst = "\(e["dst_ip"]?.stringValue ?? "?"):\(e["dst_port"]?.intValue ?? 0)"
    if let service = e["dst_service"]?.stringValue ?? e["dst_pod"]?.stringValue { dst += " (\(service))" }
    return "\(src) → \(dst)"
}

func ms(_ v: JSONValue?) -> String {
    String(format: "%.3fms", Double(v?.intValue ?? 0) / 1e6)
}

/// "500ms", "30s", "5m", "2h", "1d" → ns.
func parseDuration(_ text: String) -> Int64? {
    let units: [(String, Int64)] = [("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000), ("h", 3_600_000_000_000), ("d", 86_400_000_000_000)]
    for (suffix, scale) in units where text.hasSuffix(suffix) {
        if let v = Double(text.dropLast(suffix.count)), v >= 0 { return Int64(v * Double(scale)) }
    }
    return nil
}

func table(_ header: [String], _ rows: [[String]]) -> String {
    var widths = header.map(\.count)
    for r in rows { for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in i == cells.count - 1 ? c : c.padding(toLength: widths[i], withPad: " ", startingAt: 0) }.joined(separator: "  ")
    }
    return ([line(header)] + rows.map(line)).joined(separator: "\n")
}
