import ArgumentParser
import Foundation
import TapioClient
import TapioQueryAPI
import TapioWire

enum OutputFormat: String, ExpressibleByArgument {
    case table, json, ndjson, svg, html

    /// `svg` and `html` draw a timeline's lanes (docs/ui.md); only `timeline` takes them.
    var isDrawing: Bool { self == .svg || self == .html }
    static let drawingsOnlyForTimeline = "-o svg and -o html draw an incident's timeline: use them with `tapio timeline ID`; this command prints table, json or ndjson"
}

extension ConnectionOptions {
    /// One query through the typed client, failures in words (see `ResolvedConnection.explain`).
    func ask<T>(_ query: (QueryClient) throws -> T) throws -> T {
        try resolve().ask(query)
    }

    /// Prints an answer as `-o` asks: `json` the whole document, `ndjson`
    /// each of `items` on a line of its own (the whole document on one line
    /// when there are none), `table` via `table`.
    func print<Answer: Encodable, Item: Encodable>(_ answer: Answer, items: [Item]?, table: (Answer) -> String) {
        switch output {
        case .json: Swift.print(QueryCoding.string(answer))
        case .ndjson:
            if let items {
                for item in items { Swift.print(QueryCoding.string(item)) }
            } else {
                Swift.print(QueryCoding.string(answer))
            }
        case .table: Swift.print(table(answer))
        case .svg, .html: Tapio.exit(withError: CLIError(OutputFormat.drawingsOnlyForTimeline))
        }
    }

    /// `print` for an answer that is one document (no list).
    func print<Answer: Encodable>(_ answer: Answer, table: (Answer) -> String) {
        print(answer, items: [Answer]?.none, table: table)
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
        let answer = try connection.ask { try $0.nodes() }
        connection.print(answer, items: answer.nodes) { doc in
            let rows = doc.nodes.map { n -> [String] in
                [n.node, n.connected ? "yes" : "no", n.lastSeen,
                 String(format: "%+.3f ± %.3f ms", Double(n.clockOffsetNs) / 1e6, Double(n.clockErrorNs) / 1e6), String(n.eventsReceived),
                 String(n.dropsTotal), "\(n.capabilities.count) running, \(n.degraded.count) degraded"]
            }
            return table(["NODE", "CONNECTED", "LAST SEEN", "CLOCK OFFSET", "EVENTS", "DROPS", "PROGRAMS"], rows)
        }
    }
}

struct Pods: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Pods the agents reported, with their IPs and services.")

    @OptionGroup var connection: ConnectionOptions

    func run() throws {
        let answer = try connection.ask { try $0.pods() }
        connection.print(answer, items: answer.pods) { doc in
            let rows = doc.pods.map { p in [p.namespace, p.name, p.service, p.node, p.ips.joined(separator: ",")] }
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

func eventDetail(_ e: QueryEvent) -> String {
    switch e.eventKind {
    case .processExec: return e.filename ?? ""
    case .processExit:
        let signal = e.signal ?? 0
        return signal != 0 ? "signal=\(signal)" : "exit_code=\(e.exitCode ?? 0)"
    case .oomKill:
        return "victim=\(e.victimPid ?? 0) (\(e.victimComm ?? "")) anon_rss=\(e.anonRssKb ?? 0)kB"
    case .tcpConnect:
        let count = e.count ?? 1
        return "\(peer(e)) \(e.outcome ?? "")\(count > 1 ? " x\(count)" : "") \(ms(e.latencyNs))"
    case .tcpListen:
        return "\(e.ip ?? "*"):\(e.port ?? 0) \(e.state ?? "")"
    case .tcpReset:
        return "\(peer(e)) \(e.direction ?? "") x\(e.count ?? 1)"
    case .tcpRetransmit:
        return "\(peer(e)) retransmits=\(e.count ?? 0)"
    case .tcpLatency:
        return "\(peer(e)) srtt=\(e.srttUs ?? 0)us responses=\(e.responses ?? 0) avg=\(ms(e.responseNsAvg)) max=\(ms(e.responseNsMax))"
    case .packetDrop:
        return "\(e.reason ?? "") x\(e.count ?? 0) \(e.ipProtocol ?? "") \(peer(e))"
    case .dns:
        return "\(e.qtype ?? "") \(e.name ?? "") \(e.rcode ?? "") \(ms(e.latencyNs))"
    case .cpuThrottle:
        return "\(e.cgroup ?? "") throttled \(e.throttledPeriods ?? 0)/\(e.periods ?? 0) periods, \(ms(e.throttledNs))"
    case .memoryPressure:
        return "\(e.cgroup ?? "") \(e.source ?? "") x\(e.count ?? 0) usage=\((e.usageBytes ?? 0) >> 20)MiB limit=\((e.limitBytes ?? 0) >> 20)MiB"
    case .ioError:
        return "\(e.syscall ?? "") \(e.errno ?? "") x\(e.count ?? 0)"
    case .unspecified, nil: return ""
    }
}

/// "10.0.1.5:41000 → 10.0.2.7:6379 (redis)".
func peer(_ e: QueryEvent) -> String {
    let src = "\(e.srcIp ?? "?"):\(e.srcPort ?? 0)"
    var dst = "\(e.dstIp ?? "?"):\(e.dstPort ?? 0)"
    if let peer = e.dstPeer { dst += " (\(peer.service ?? peer.pod))" }
    return "\(src) → \(dst)"
}

func ms(_ ns: Int64?) -> String {
    String(format: "%.3fms", Double(ns ?? 0) / 1e6)
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
