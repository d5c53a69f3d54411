import Foundation
import TapioClient
import TapioLocalServers
import TapioQueryAPI

/// The lab's distributed mode (`tapio-lab run --distributed`): instead of one
/// `tapio-server --data-dir`, the run starts what docs/scaling.md describes,
/// one of each, on loopback: Debian's nats-server (one JetStream node, its
/// store under `<run>/nats`), Debian's clickhouse-server (its data under
/// `<run>/clickhouse`), and `tapio-server` as one ingest replica (the agents
/// connect to it), one correlate replica (incidents and timelines are asked
/// of it) and one query replica (the events the baseline is scored from).
/// Everything else of the run — nodes, services, faults, scoring — is the
/// same, so a scenario scores the same in both modes when the roles
/// together answer as the single process does.
///
/// The lab starts these itself rather than through the tests' launchers
/// (TapioTestSupport), which depend on XCTest.
extension LabRun {
    /// Where Debian installs the two servers.
    static func distributedBinary(_ name: String) -> String? {
        ["/usr/sbin/", "/usr/bin/", "/usr/local/bin/"].map { $0 + name }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// What the distributed mode needs that this machine lacks, in words (nil: nothing).
    public static func distributedMissing() -> String? {
        let missing = ["nats-server", "clickhouse-server"].filter { distributedBinary($0) == nil }
        guard !missing.isEmpty else { return nil }
        return "the distributed mode needs \(missing.joined(separator: " and ")) (Debian packages \(missing.joined(separator: ", ")); make deps installs them)"
    }

    func startDistributed() throws {
        if let why = LabRun.distributedMissing() { throw LabError(why) }
        let pki = plan.runDirectory + "/pki"
        _ = try DevelopmentPKI.initialize(directory: pki, nodes: scenario.topology.nodes.map(\.name), operators: ["lab"])
        let logs = plan.runDirectory + "/logs"

        // NATS: one JetStream node, file store in the run directory.
        let natsPort = LabRun.freePort()
        let natsDir = plan.runDirectory + "/nats"
        try Shell.mkdir(natsDir + "/store")
        try Shell.write("""
            server_name: tapio-lab-\(plan.id)
            listen: 127.0.0.1:\(natsPort)
            jetstream { store_dir: "\(natsDir)/store", max_memory_store: 64MB, max_file_store: 2GB }

            """, to: natsDir + "/nats.conf")
        _ = try startInfra("nats-server", [LabRun.distributedBinary("nats-server")!, "-c", natsDir + "/nats.conf"], stopOrder: 3)

        // ClickHouse: its own config, users and data in the run directory;
        // nothing of the system's installation is read or touched.
        let chDir = plan.runDirectory + "/clickhouse"
        let chHTTP = LabRun.freePort()
        var chTCP = LabRun.freePort()
        while chTCP == chHTTP || chTCP == natsPort { chTCP = LabRun.freePort() }
        var chConfig = ClickHouseLocalConfig(directory: chDir, httpPort: chHTTP, tcpPort: chTCP)
        (chConfig.logDirectory, chConfig.logFileName, chConfig.errorLogFileName) = (logs, "clickhouse-server.log", "clickhouse-server.err.log")
        try chConfig.write()
        _ = try startInfra("clickhouse-server", [LabRun.distributedBinary("clickhouse-server")!, "--config-file=\(chConfig.configPath)"], stopOrder: 3)

        try waitFor("nats-server", timeout: 20, log: "nats-server.log") { LabRun.portOpen(natsPort) }
        // ClickHouse binds its HTTP port once its tables are loaded.
        try waitFor("clickhouse-server", timeout: 60, log: "clickhouse-server.err.log") { LabRun.portOpen(chHTTP) }

        let server = options.binDirectory + "/tapio-server"
        let tls = ["--tls-dir", pki + "/server"]
        let nats = ["--nats", "nats://127.0.0.1:\(natsPort)"]
        let ingest = LabRun.freePort()
        roleMetricsPorts["ingest"] = LabRun.freePort()
        roleMetricsPorts["correlate"] = LabRun.freePort()
        roleMetricsPorts["query"] = LabRun.freePort()
        queryPort = LabRun.freePort()
        let eventsPort = LabRun.freePort()
        // The ingest replica first: it creates the stream the others consume.
        _ = try startInfra("tapio-ingest", [server, "--role", "ingest"] + tls + nats + [
            "--listen", "127.0.0.1:\(ingest)", "--metrics-listen", "127.0.0.1:\(roleMetricsPorts["ingest"]!)"], stopOrder: 2)
        _ = try startInfra("tapio-correlate", [server, "--role", "correlate"] + tls + nats + [
            "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "127.0.0.1:\(roleMetricsPorts["correlate"]!)"], stopOrder: 2)
        _ = try startInfra("tapio-query", [server, "--role", "query"] + tls + nats + [
            "--clickhouse", "http://127.0.0.1:\(chHTTP)",
            "--query-listen", "127.0.0.1:\(eventsPort)", "--metrics-listen", "127.0.0.1:\(roleMetricsPorts["query"]!)"], stopOrder: 2)
        for role in ["ingest", "correlate", "query"] {
            try waitFor("tapio-\(role)", timeout: 60, log: "tapio-\(role).log") { self.roleHTTP(role, "/readyz")?.status == 200 }
        }
        ingestPort = ingest
        let op = pki + "/operators/lab"
        client = try QueryClient(host: "127.0.0.1", port: queryPort, ca: op + "/ca.crt", certificate: op + "/tls.crt", key: op + "/tls.key")
        eventsClient = try QueryClient(host: "127.0.0.1", port: eventsPort, ca: op + "/ca.crt", certificate: op + "/tls.crt", key: op + "/tls.key")
        // Both answer once ready; probed anyway, as the single process is
        // (a QueryClient that fails to connect trips a debug assertion in NIO).
        try waitFor("tapio-correlate", timeout: 20, log: "tapio-correlate.log") {
            LabRun.portOpen(self.queryPort) && (try? self.client!.incidents(status: "all", timeoutSeconds: 2)) != nil
        }
        try waitFor("tapio-query", timeout: 20, log: "tapio-query.log") {
            LabRun.portOpen(eventsPort) && (try? self.eventsClient!.events(["limit": "1"], timeoutSeconds: 5)) != nil
        }
        timeline.note("distributed mode up: nats-server 127.0.0.1:\(natsPort) (JetStream, store \(natsDir)/store), "
            + "clickhouse-server http 127.0.0.1:\(chHTTP) (data \(chDir)/data), tapio-server --role ingest 127.0.0.1:\(ingest), "
            + "--role correlate (incidents) 127.0.0.1:\(queryPort), --role query (events) 127.0.0.1:\(eventsPort)")
    }

    /// Waits until `ready` holds, or throws naming the process and its log when it exits or the time is up.
    func waitFor(_ name: String, timeout: Double, log: String, _ ready: () -> Bool) throws {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while !ready() {
            let running = infra[name]?.isRunning ?? false
            guard running, Date() < deadline else {
                throw LabError("\(name) \(running ? "not ready after \(Int(timeout)) s" : "exited"); see \(plan.runDirectory)/logs/\(log)")
            }
            try LabSignals.sleep(0.2)
        }
    }

    /// An HTTP GET of a role's metrics listener (`ingest`, `correlate`, `query`).
    func roleHTTP(_ role: String, _ path: String) -> (status: Int, body: String)? {
        guard let port = roleMetricsPorts[role], infra["tapio-\(role)"]?.isRunning == true else { return nil }
        return LabHTTP.get(port: port, path: path)
    }

    /// The samples of one metric family from a role's /metrics: labels text → value.
    func roleMetric(_ role: String, _ name: String) -> [String: Double] {
        guard let r = roleHTTP(role, "/metrics"), r.status == 200 else { return [:] }
        return LabHTTP.samples(r.body, name)
    }

    /// The agents as the ingest replica sees them (its /metrics: connected,
    /// events received, clock offset), in the shape of the `nodes` answer the
    /// single process gives. No replica answers `nodes` in this mode.
    func distributedNodes() -> [QueryNode] {
        guard let r = roleHTTP("ingest", "/metrics"), r.status == 200 else { return [] }
        let connected = LabHTTP.samples(r.body, "tapio_node_connected")
        let events = LabHTTP.samples(r.body, "tapio_node_events_received_total")
        let offsets = LabHTTP.samples(r.body, "tapio_node_clock_offset_seconds")
        let node = { (labels: String) in LabHTTP.label(labels, "node") }
        var byNode: [String: QueryNode] = [:]
        for (labels, v) in connected {
            guard let n = node(labels) else { continue }
            byNode[n] = QueryNode(node: n, connected: v == 1, agentVersion: "", bootId: "", capabilities: [], degraded: [],
                                  firstSeen: "", lastSeen: "", lastSeenAgeS: 0, clockOffsetNs: 0, clockErrorNs: 0, clockSamples: 0,
                                  eventsReceived: 0, batchesReceived: 0, duplicateBatches: 0, drops: [:], dropsTotal: 0)
        }
        for (labels, v) in events { if let n = node(labels) { byNode[n]?.eventsReceived = Int64(v) } }
        for (labels, v) in offsets { if let n = node(labels) { byNode[n]?.clockOffsetNs = Int64((v * 1e9).rounded()) } }
        return Array(byNode.values)
    }

    /// At the end of a run: until the query replica has written to ClickHouse
    /// every event the ingest replica took (at most `timeout` seconds), so
    /// the baseline reads what the single process would have stored.
    func waitForEventsWritten(timeout: Double) {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while Date() < deadline {
            let received = roleMetric("ingest", "tapio_server_events_total").values.reduce(0, +)
            let written = roleMetric("query", "tapio_query_events_written_total").values.reduce(0, +)
            if received > 0, written >= received { return }
            if (try? LabSignals.sleep(0.25)) == nil { return }
        }
        notes.append("the query replica had not written every event the ingest replica took after \(Int(timeout)) s: the baseline may miss the last ones")
    }
}

/// A plain HTTP/1.0 GET on loopback and Prometheus text parsing: enough for
/// the roles' /readyz and /metrics.
enum LabHTTP {
    static func get(port: Int, path: String, timeout: Double = 3) -> (status: Int, body: String)? {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
        guard connected else { return nil }
        let request = Array("GET \(path) HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".utf8)
        guard request.withUnsafeBytes({ send(fd, $0.baseAddress, $0.count, 0) }) == request.count else { return nil }
        var data: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            data += buffer[0..<n]
        }
        let text = String(decoding: data, as: UTF8.self)
        guard let statusLine = text.split(separator: "\r\n", maxSplits: 1).first,
              let status = statusLine.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return nil }
        let body = text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? ""
        return (status, body)
    }

    /// `name{labels} value` lines of one family: labels text (without the
    /// braces, "" when none) → value.
    static func samples(_ text: String, _ name: String) -> [String: Double] {
        var out: [String: Double] = [:]
        for line in text.split(separator: "\n") where line.hasPrefix(name) && !line.hasPrefix("#") {
            let rest = line.dropFirst(name.count)
            var labels = ""
            var valueText: Substring
            if rest.first == "{" {
                guard let close = rest.lastIndex(of: "}") else { continue }
                labels = String(rest[rest.index(after: rest.startIndex)..<close])
                valueText = rest[rest.index(after: close)...]
            } else if rest.first == " " {
                valueText = rest
            } else {
                continue  // another family with this one's name as its prefix
            }
            if let v = valueText.split(separator: " ").first.flatMap({ Double($0) }) { out[labels] = v }
        }
        return out
    }

    /// One label's value out of `a="x",b="y"`.
    static func label(_ labels: String, _ key: String) -> String? {
        guard let r = labels.range(of: key + "=\"") else { return nil }
        let rest = labels[r.upperBound...]
        return rest.firstIndex(of: "\"").map { String(rest[..<$0]) }
    }
}
