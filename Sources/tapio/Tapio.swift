import ArgumentParser
import Foundation
import TapioClient
import TapioWire

/// Options every query command shares: where the server is and who we are.
struct ConnectionOptions: ParsableArguments {
    @Option(help: "Server query address, HOST:PORT.")
    var server = "127.0.0.1:7401"
    @Option(help: "Directory with ca.crt, tls.crt, tls.key of an operator identity.")
    var tlsDir: String?
    @Option(help: "CA certificate (PEM).")
    var tlsCa: String?
    @Option(help: "Operator certificate (PEM).")
    var tlsCert: String?
    @Option(help: "Operator private key (PEM).")
    var tlsKey: String?
    @Option(name: [.short, .customLong("output")], help: "Output format: table or json.")
    var output: OutputFormat = .table

    func client() throws -> QueryClient {
        let (host, port) = try parseHostPort(server)
        if let dir = tlsDir {
            return try QueryClient(host: host, port: port, ca: dir + "/ca.crt", certificate: dir + "/tls.crt", key: dir + "/tls.key")
        }
        guard let ca = tlsCa, let cert = tlsCert, let key = tlsKey else {
            throw ValidationError("give --tls-dir, or all of --tls-ca, --tls-cert and --tls-key")
        }
        return try QueryClient(host: host, port: port, ca: ca, certificate: cert, key: key)
    }
}

enum OutputFormat: String, ExpressibleByArgument {
    case table, json
}

@main
struct Tapio: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tapio",
        abstract: "Ask tapio-server about events, nodes and incidents; manage the development PKI.",
        version: TapioVersion.current,
        subcommands: [Events.self, Nodes.self, Pods.self, Incidents.self, Timeline.self, Explain.self, Services.self, Watch.self, Certs.self])

    /// `tapio --server X --tls-dir D events` is the documented form, with the
    /// connection options before the command; the parser wants them after it.
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        let commands = Set(configuration.subcommands.map { $0._commandName })
        guard let index = arguments.firstIndex(where: { commands.contains($0) }), index > 0 else {
            main(nil)
            return
        }
        main([arguments[index]] + Array(arguments[..<index]) + Array(arguments[(index + 1)...]))
    }
}

struct Events: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Events the agents reported, oldest first.")

    @OptionGroup var connection: ConnectionOptions
    @Option(help: "Only events newer than this, e.g. 30s, 5m, 2h, 1d.")
    var since: String?
    @Option(help: "Only events of this node.")
    var node: String?
    @Option(help: "Only events of this kind, e.g. process_exit.")
    var kind: String?
    @Option(help: "Only events of this pid.")
    var pid: UInt32?
    @Option(help: "Only events attributed to this pod.")
    var pod: String?
    @Option(help: "Only events attributed to this Kubernetes namespace.")
    var namespace: String?
    @Option(help: "At most this many (the most recent).")
    var limit = 1000

    func run() throws {
        var params: [String: String] = ["limit": String(limit)]
        if let since {
            guard let ns = parseDuration(since) else { throw ValidationError("cannot read duration \(since): use e.g. 30s, 5m, 2h, 1d") }
            params["since_ns"] = String(wallClockNs() - ns)
        }
        if let node { params["node"] = node }
        if let kind {
            guard EventKind(name: kind) != nil else {
                throw ValidationError("unknown kind \(kind); one of: \(EventKind.allCases.dropFirst().map(\.name).joined(separator: ", "))")
            }
            params["kind"] = kind
        }
        if let pid { params["pid"] = String(pid) }
        if let pod { params["pod"] = pod }
        if let namespace { params["namespace"] = namespace }
        let doc = try connection.client().json("events", params)
        switch connection.output {
        case .json:
            print(doc.serialized())
        case .table:
            let rows = (doc["events"]?.arrayValue ?? []).map { e -> [String] in
                [e["time"]?.stringValue ?? "", e["node"]?.stringValue ?? "", e["kind"]?.stringValue ?? "",
                 e["pid"]?.intValue.map(String.init) ?? "", e["comm"]?.stringValue ?? "",
                 e["pod"]?.stringValue.map { "\(e["namespace"]?.stringValue ?? "")/\($0)" } ?? "", eventDetail(e)]
            }
            print(table(["TIME", "NODE", "KIND", "PID", "COMM", "POD", "DETAIL"], rows))
        }
    }
}

struct Nodes: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Agents: connected, last seen, clock offset, events and drops received.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        let doc = try connection.client().json("nodes")
        switch connection.output {
        case .json:
            print(doc.serialized())
        case .table:
            let rows = (doc["nodes"]?.arrayValue ?? []).map { n -> [String] in
                let offset = Double(n["clock_offset_ns"]?.intValue ?? 0) / 1e6
                let error = Double(n["clock_error_ns"]?.intValue ?? 0) / 1e6
                let degraded = n["degraded"]?.arrayValue?.count ?? 0
                return [n["node"]?.stringValue ?? "", n["connected"] == .bool(true) ? "yes" : "no", n["last_seen"]?.stringValue ?? "",
                        String(format: "%+.3f ± %.3f ms", offset, error), n["events_received"]?.intValue.map(String.init) ?? "0",
                        n["drops_total"]?.intValue.map(String.init) ?? "0",
                        (n["capabilities"]?.arrayValue?.count).map { "\($0) running, \(degraded) degraded" } ?? ""]
            }
            print(table(["NODE", "CONNECTED", "LAST SEEN", "CLOCK OFFSET", "EVENTS", "DROPS", "PROGRAMS"], rows))
        }
    }
}

struct Pods: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pods the agents reported, with their IPs and services.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        let doc = try connection.client().json("pods")
        switch connection.output {
        case .json:
            print(doc.serialized())
        case .table:
            let rows = (doc["pods"]?.arrayValue ?? []).map { p -> [String] in
                [p["namespace"]?.stringValue ?? "", p["name"]?.stringValue ?? "", p["service"]?.stringValue ?? "", p["node"]?.stringValue ?? "",
                 (p["ips"]?.arrayValue ?? []).compactMap(\.stringValue).joined(separator: ",")]
            }
            print(table(["NAMESPACE", "POD", "SERVICE", "NODE", "IPS"], rows))
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
