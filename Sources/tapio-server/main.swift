import ArgumentParser
import Dispatch
import Foundation
import Logging
import TapioAlerting
import TapioCorrelation
import TapioNATS
import TapioServer
import TapioStore
import TapioWire

struct ServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tapio-server",
        abstract: "Receives agents' event batches over mutual TLS, stores them durably, correlates, answers queries.",
        discussion: """
            One binary in roles (--role; docs/scaling.md):
              all        the whole server in one process with its own log (default)
              ingest     stateless replicas: agents' batches go to a NATS JetStream
                         stream, acknowledged after JetStream's
              correlate  the engine on that stream: one replica active (a lease in
                         JetStream KV), the others standing by to take over from
                         its checkpoint; all of them answer incidents
              query      writes the stream's batches to ClickHouse (replicas share
                         one durable consumer) and answers events from ClickHouse,
                         incidents from the incident bucket
            """,
        version: TapioVersion.current,
        subcommands: [Serve.self, Replay.self, Calibrate.self, BenchIngest.self, BenchSink.self, BenchEngine.self],
        defaultSubcommand: Serve.self)
}

/// Runs the correlation engine offline over a stored event log and prints the
/// incidents it finds: the same engine, the same answer, no agents needed.
struct Replay: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Replay a stored event log through the correlation engine and print its incidents as JSON.")

    @Option(help: "Data directory of a (stopped or running) server.")
    var dataDir: String
    @Option(help: "Only batches received in the last N seconds (default: all).")
    var lastSeconds: Int64?
    @Flag(help: "Print each incident with its timeline and explanation.")
    var explain = false

    func run() throws {
        let log = try EventLog.load(dataDirectory: dataDir, sinceNs: lastSeconds.map { wallClockNs() - $0 * 1_000_000_000 } ?? .min)
        let config = CorrelationConfiguration()
        let engine = log.replay(configuration: config)
        let incidents = engine.incidents.map { explain ? $0.explainJSON(weights: config.weights) : $0.toJSON() }
        print(JSONValue.object(["incidents": .array(incidents), "events": .int(Int64(log.events.count))]).serialized())
    }
}

/// Fits the confidence weights on recorded lab runs (logistic regression of
/// every candidate's factors against the known answer) and reports the Brier
/// score of the top-1 confidence with the current weights, with the fitted
/// ones, and leaving each scenario out of its own fit.
struct Calibrate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Fit the confidence weights on recorded lab runs and report Brier scores.")

    @Option(help: "Directory of recordings (<run>.json + <run>.tar.gz, or .sqlite.gz of the earlier layout).")
    var recordings = "lab/recordings"
    @Option(help: "Gradient steps of the fit.")
    var iterations = 4000
    @Option(help: "Candidates shown per recording.")
    var top = 1

    func run() throws {
        let runs = try RecordedRun.loadAll(directory: recordings)
        let current = CorrelationConfiguration()
        func evaluate(_ run: RecordedRun, _ weights: ConfidenceWeights) -> (ranked: [RootCause], engine: CorrelationEngine) {
            var c = current
            c.weights = weights
            let engine = run.log.replay(configuration: c)
            return (run.ranked(engine), engine)
        }
        var samples: [[Calibration.Sample]] = []
        var rows: [(String, Double, Double, Double, String)] = []
        for run in runs {
            let (ranked, engine) = evaluate(run, current.weights)
            samples.append(run.samples(engine))
            rows.append((run.name, run.accuracy(ranked, k: 1), run.accuracy(ranked, k: 3), run.topOneBrier(ranked),
                         ranked.isEmpty ? "-" : ranked.prefix(max(top, 1)).map { "\($0.entity)/\($0.kind.rawValue) \(String(format: "%.2f", $0.confidence))" }
                            .joined(separator: ", ")))
        }
        let all = samples.flatMap { $0 }
        let n = Double(runs.count)
        print("recording                         AC@1  AC@3  brier  top-\(max(top, 1)) (current weights)")
        for r in rows { print(r.0.padding(toLength: 32, withPad: " ", startingAt: 0), String(format: "%5.2f %5.2f %6.3f", r.1, r.2, r.3), " ", r.4) }
        print("recordings: \(runs.count) of \(Set(runs.map(\.scenario)).count) scenarios; candidates: \(all.count), right: \(all.filter(\.correct).count)")
        print("                    AC@1   top-1 Brier  candidate Brier   (means over recordings)")
        print(String(format: "current weights     %.2f   %.3f        %.3f", rows.map(\.1).reduce(0, +) / n, rows.map(\.3).reduce(0, +) / n,
                     Calibration.brierScore(all, weights: current.weights)))
        // Two ways to fit, each also scored leaving the recording's whole
        // scenario out of its own fit (its other recordings would leak the answer).
        let fits: [(String, ([Calibration.Sample]) -> ConfidenceWeights)] = [
            ("scaled (Platt)", { Calibration.fitScale($0, weights: current.weights, iterations: iterations) }),
            ("all weights", { Calibration.fit($0, start: current.weights, iterations: iterations) }),
        ]
        for (name, fit) in fits {
            let w = fit(all)
            var ac1 = 0.0, top1 = 0.0, looAc1 = 0.0, looTop1 = 0.0
            var looPairs: [(confidence: Double, correct: Bool)] = []  // each scored with the fold's weights
            for (i, run) in runs.enumerated() {
                let (ranked, _) = evaluate(run, w)
                ac1 += run.accuracy(ranked, k: 1)
                top1 += run.topOneBrier(ranked)
                let lw = fit(samples.enumerated().filter { runs[$0.offset].scenario != run.scenario }.flatMap(\.element))
                let (looRanked, _) = evaluate(run, lw)
                looAc1 += run.accuracy(looRanked, k: 1)
                looTop1 += run.topOneBrier(looRanked)
                looPairs += samples[i].map { (lw.confidence($0.values), $0.correct) }
            }
            print(String(format: "%@ fitted on all      %.2f   %.3f        %.3f", name, ac1 / n, top1 / n, Calibration.brierScore(all, weights: w)))
            print(String(format: "%@ leave one out      %.2f   %.3f        %.3f", name, looAc1 / n, looTop1 / n, Calibration.brierScore(looPairs)))
            print("  weights: bias " + String(format: "%.2f", w.bias) + ", " +
                  ConfidenceWeights.factorNames.map { "\($0) " + String(format: "%.2f", w.weight($0)) }.joined(separator: ", "))
        }
    }
}

/// The ingest benchmark's load generator (scripts/bench.sh, BENCH=ingest):
/// simulated agents with their own node certificates speaking the real
/// protocol; prints `key=value` lines.
struct BenchIngest: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-ingest", abstract: "Benchmark: send batches as N agents and count acknowledgements.")

    @Option(help: "Server ingest address, HOST:PORT.")
    var server = "127.0.0.1:7400"
    @Option(help: "Name the server certificate must carry.")
    var serverName = "localhost"
    @Option(help: "A development PKI (tapio certs init): nodes/<name>/ for every --nodes name.")
    var pki: String
    @Option(help: "Simulated agents, one per node certificate, comma-separated.")
    var nodes = "a,b,c,d"
    @Option(help: "Seconds of sending.")
    var seconds: Double = 10
    @Option(help: "Events per batch.")
    var batchEvents = 512
    @Option(help: "Events per second over all agents (default: as fast as acks come).")
    var rate: Double?

    func run() throws {
        var o = IngestBench.Options()
        let (host, port) = try parseHostPort(server)
        o.host = host
        o.port = UInt16(port)
        o.serverName = serverName
        o.agents = nodes.split(separator: ",").map { IngestBench.Agent(node: String($0), tls: TLSFiles(directory: "\(pki)/nodes/\($0)")) }
        o.seconds = seconds
        o.batchEvents = batchEvents
        o.rate = rate
        print(IngestBench.run(o).report, terminator: "")
    }
}

/// The decode-only sink the ingest benchmark compares the server with.
struct BenchSink: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-sink", abstract: "Benchmark: a TLS + frame + EventBatch decode sink that acknowledges at once (until SIGTERM).")

    @Option(help: "Directory with ca.crt, tls.crt, tls.key.")
    var tlsDir: String
    @Option(help: "Listener, HOST:PORT.")
    var listen = "127.0.0.1:7400"

    func run() throws {
        let (host, port) = try parseHostPort(listen)
        let termination = TerminationSignal()
        let sink = try DecodeSink(tls: TLSFiles(directory: tlsDir), host: host, port: port)
        FileHandle.standardOutput.write(Data("ready port=\(sink.port)\n".utf8))
        termination.wait()
        sink.close()
    }
}

/// The engine alone: replays recorded lab runs (or one data directory's
/// log) through a fresh engine as fast as it goes, on this thread, and
/// reports events per CPU-second of the replays.
struct BenchEngine: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bench-engine", abstract: "Benchmark: the correlation engine alone over recorded lab runs or a stored log.")

    @Option(help: "Directory of recordings (<run>.json + <run>.tar.gz, or .sqlite.gz of the earlier layout).")
    var recordings = "lab/recordings"
    @Option(help: "Replay this server data directory's log instead of the recordings.")
    var dataDir: String?
    @Option(help: "Times each log is replayed.")
    var repeats = 3

    func run() throws {
        let logs = try dataDir.map { [try EventLog.load(dataDirectory: $0)] } ?? RecordedRun.loadAll(directory: recordings).map(\.log)
        var events = 0
        var incidents = 0
        // Only the replays are timed, not reading the logs.
        let before = threadCPUSeconds()
        for _ in 0..<max(1, repeats) {
            for log in logs {
                let engine = log.replay()
                events += log.events.count
                incidents += engine.incidents.count
            }
        }
        let cpu = threadCPUSeconds() - before
        print(String(format: "logs=%d\nevents=%d\nincidents=%d\ncpu_seconds=%.3f\nevents_per_cpu_second=%.0f", logs.count, events, incidents, cpu, Double(events) / cpu))
    }

    private func threadCPUSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}

/// What one `tapio-server` process does (docs/scaling.md).
enum ServerRole: String, ExpressibleByArgument, CaseIterable {
    /// Ingest, the local log, the engine and queries in one process.
    case all
    /// A stateless ingest replica publishing batches to NATS JetStream.
    case ingest
    /// The correlation engine on the stream, one active with standbys.
    case correlate
    /// Events from the stream into ClickHouse; events and incidents for operators.
    case query
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the server (the default).")

    @Option(help: ArgumentHelp("What this process does: all (ingest, local event log, correlation and queries in one process; the default), ingest (a stateless replica: agents' batches go to a NATS JetStream stream, acknowledged after JetStream's; needs --nats) correlate (the correlation engine on that stream, one replica active and the others standing by; answers incidents on --query-listen; needs --nats) or query (writes the stream's events to ClickHouse and answers events from there and incidents from the incident bucket on --query-listen; needs --nats and --clickhouse).",
                               valueName: "all|ingest|correlate|query"))
    var role: ServerRole = .all

    @Option(help: "Directory of the durable event store (role all; required there).")
    var dataDir: String?

    @Option(help: ArgumentHelp("NATS server of the JetStream cluster, nats://HOST:PORT or tls://HOST:PORT (roles ingest, correlate and query; repeat for each server).", valueName: "url"))
    var nats: [String] = []
    @Option(help: "JetStream stream the batches go to (role ingest creates or updates it at start; role correlate consumes it; subjects tapio.events.> and tapio.inventory.>).")
    var natsStream = "TAPIO_EVENTS"
    @Option(help: "Replicas of the stream (role ingest) and of the KV buckets TAPIO_LEADER, TAPIO_ENGINE, TAPIO_INCIDENTS (role correlate): 1 for a single NATS server, 3 for a cluster of three or more.")
    var natsReplicas = 1
    @Option(help: "The stream's duplicate window: a batch resent within it is stored once (s, m, h: 10m). It must outlast an agent's resend after a lost acknowledgement.")
    var natsDuplicateWindow = "10m"
    @Option(help: "JetStream deletes batches older than this (s, m, h, d, w); 0: no age limit.")
    var natsMaxAge = "7d"
    @Option(help: "Seconds a publish waits for JetStream's acknowledgement (or for a connection) before the batch is left unacknowledged; also the timeout of every JetStream call in role correlate.")
    var natsPublishTimeout: Double = 5
    @Option(help: "Role correlate: seconds without a renewal after which a standby takes the engine lease over (a leader that could not renew for this long publishes nothing until it can).")
    var leaseTimeout: Double = 5
    @Option(help: "Seconds between the engine's checkpoints: role all to <data-dir>/engine.checkpoint (also after every million events, so a start after a crash replays little at any rate), role correlate to JetStream (each with the stream sequence it covers).")
    var checkpointInterval: Double = 10
    @Option(help: ArgumentHelp("Role query: ClickHouse's HTTP interface, http://HOST:PORT (port 8123 if none) or https://HOST:PORT (HTTPS, port 8443 if none; the server's certificate is verified with --clickhouse-tls-dir's ca.crt, else the system's trust store).", valueName: "url"))
    var clickhouse: String?
    @Option(help: "Role query: directory with ca.crt (verifies ClickHouse's certificate) and optionally tls.crt and tls.key (a client certificate, for a ClickHouse that verifies clients); needs an https:// --clickhouse.")
    var clickhouseTlsDir: String?
    @Option(help: "Role query: ClickHouse user (sent with --clickhouse-password-file in ClickHouse's X-ClickHouse-User/-Key headers); default: ClickHouse's default user.")
    var clickhouseUser: String?
    @Option(help: "Role query: file holding the ClickHouse user's password (trailing newlines ignored).")
    var clickhousePasswordFile: String?
    @Option(help: "Role query: ClickHouse database of the events table (default: the user's default database).")
    var clickhouseDatabase: String?
    @Option(help: "Role query: the events table (created if missing; <table>_retention beside it).")
    var clickhouseTable = "tapio_events"
    @Option(help: "Role query: seconds a batch fetched by a query replica may go without its ClickHouse insert being accepted before the stream delivers it again (to any query replica).")
    var queryAckWait: Double = 60
    @Option(help: "Directory with ca.crt (verifies the NATS servers) and optionally tls.crt and tls.key (a client certificate); turns TLS on towards NATS.")
    var natsTlsDir: String?
    @Option(help: "NATS user name (with --nats-password-file).")
    var natsUser: String?
    @Option(help: "File holding the NATS user's password (trailing newlines ignored).")
    var natsPasswordFile: String?
    @Option(help: "File holding a NATS authentication token (trailing newlines ignored).")
    var natsTokenFile: String?

    @Option(help: "Directory with ca.crt, tls.crt, tls.key (cert-manager secret layout).")
    var tlsDir: String?
    @Option(help: "CA certificate (PEM) that client certificates must chain to.")
    var tlsCa: String?
    @Option(help: "Server certificate (PEM).")
    var tlsCert: String?
    @Option(help: "Server private key (PEM).")
    var tlsKey: String?

    @Option(help: "Agent ingest listener, HOST:PORT (roles all and ingest).")
    var listen = "127.0.0.1:7400"
    @Option(help: "Operator query listener, HOST:PORT (roles all, correlate and query).")
    var queryListen = "127.0.0.1:7401"
    @Option(help: "HTTP /metrics, /healthz and /readyz listener, HOST:PORT, or 'off'.")
    var metricsListen = "127.0.0.1:9400"

    @Option(help: "Largest accepted frame payload in bytes.")
    var maxFrameBytes: UInt32 = FrameHeader.defaultMaximumPayload
    @Option(help: "Unacknowledged batches an agent may have in flight.")
    var windowBatches: UInt32 = 32
    @Option(help: "Agent connections open at once on the ingest listener.")
    var maxConnections = 4096
    @Option(help: "Operator connections open at once on the query listener.")
    var maxQueryConnections = 64
    @Option(help: "Connections open at once on the /metrics listener.")
    var maxMetricsConnections = 64
    @Option(help: "Connections one certificate name (a node, an operator) may have open at once on one listener.")
    var maxConnectionsPerPeer = 16
    @Option(help: "Seconds a TLS handshake may take after the TCP accept.")
    var handshakeTimeout: Double = 10
    @Option(help: "Seconds a frame may take from its first byte to its last.")
    var frameTimeout: Double = 30
    @Option(help: "Seconds without a complete frame before a connection is closed.")
    var idleTimeout: Double = 60
    @Option(help: "Seconds between time-sync exchanges on each agent connection.")
    var timeSyncInterval: Double = 2
    @Option(help: "Seconds between reads of the TLS files; a renewed, valid set serves new connections. 0: never.")
    var tlsReloadInterval: Double = 5
    @Option(help: "Seconds between the store's write checks (/healthz; role all).")
    var storeCheckInterval: Double = 5
    @Option(help: "Alertmanager to send incident alerts to (its v2 API), e.g. http://alertmanager:9093. Repeat for each instance of a cluster.")
    var alertmanager: [String] = []
    @Option(help: "URL to POST incident notifications to as JSON (signed with --webhook-secret-file).")
    var webhook: String?
    @Option(help: "File holding the HMAC-SHA256 key that signs webhook notifications (trailing newlines ignored).")
    var webhookSecretFile: String?
    @Option(help: "OpenTelemetry collector to send incident notifications to as OTLP logs (OTLP/HTTP protobuf to URL/v1/logs), e.g. http://otel-collector:4318.")
    var otlpEndpoint: String?
    @Option(help: "PEM file of the CA certificates https alert receivers must chain to (default: the system's trust store).")
    var alertTlsCa: String?
    @Option(help: "Every alert links to this URL followed by the incident id.")
    var alertLinkBase: String?
    @Option(help: "An incident pages only when its top root cause has at least this confidence (0 to 1).")
    var alertMinConfidence: Double = 0
    @Option(help: "Seconds between re-sends of open alerts to Alertmanager (each valid for four periods).")
    var alertResendInterval: Double = 60
    @Option(help: "Delete stored events whose batch arrived longer ago than this (s, m, h, d, w: 7d, 36h; role all). Role query: drop ClickHouse's whole UTC days that ended longer ago than this.")
    var retention = "7d"
    @Option(help: "Keep the event store under this size by deleting the oldest events: bytes with K, M, G, T (20GiB), or a percentage of the data directory's volume (role all).")
    var maxDisk = "80%"
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    func run() throws {
        // Events are allocated on the event loops and freed on the engine's
        // thread; with glibc's default of up to 8 arenas per core the freed
        // memory stays spread over them (a 15 s full-rate ingest peaked at
        // 580 MiB with the default, 490 MiB with 2). MALLOC_ARENA_MAX, when
        // set, still decides.
        if ProcessInfo.processInfo.environment["MALLOC_ARENA_MAX"] == nil { limitMallocArenas(2) }
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "tapio-server")

        let tls: TLSFiles
        if let dir = tlsDir {
            tls = TLSFiles(directory: dir)
        } else if let ca = tlsCa, let cert = tlsCert, let key = tlsKey {
            tls = TLSFiles(ca: ca, certificate: cert, key: key)
        } else {
            throw ValidationError("give --tls-dir, or all of --tls-ca, --tls-cert and --tls-key")
        }
        let nats = try natsConfiguration()
        if role == .all, dataDir == nil { throw ValidationError("--data-dir is required (role all)") }
        if role == .ingest, dataDir != nil { throw ValidationError("--data-dir is not used in role ingest: an ingest replica keeps no data (the stream does)") }
        if role == .query, dataDir != nil {
            throw ValidationError("--data-dir is not used in role query: events are kept in ClickHouse, incidents in JetStream")
        }
        if role != .query {
            let given = [("--clickhouse", clickhouse != nil), ("--clickhouse-tls-dir", clickhouseTlsDir != nil), ("--clickhouse-user", clickhouseUser != nil),
                         ("--clickhouse-password-file", clickhousePasswordFile != nil), ("--clickhouse-database", clickhouseDatabase != nil)].filter(\.1).map(\.0)
            if !given.isEmpty { throw ValidationError("\(given.joined(separator: ", ")): for --role query only (this is --role \(role.rawValue))") }
        }
        if role == .correlate, dataDir != nil {
            throw ValidationError("--data-dir is not used in role correlate: the engine's checkpoints and incidents are kept in JetStream")
        }
        var config = ServerConfiguration(dataDirectory: dataDir ?? "", tls: tls)
        (config.ingestHost, config.ingestPort) = try parseHostPort(listen)
        (config.queryHost, config.queryPort) = try parseHostPort(queryListen)
        if metricsListen == "off" {
            config.metricsHost = nil
        } else {
            let (host, port) = try parseHostPort(metricsListen)
            config.metricsHost = host
            config.metricsPort = port
        }
        config.limits.maxFrameBytes = maxFrameBytes
        config.limits.windowBatches = windowBatches
        guard maxConnections > 0, maxQueryConnections > 0, maxMetricsConnections > 0, maxConnectionsPerPeer > 0 else {
            throw ValidationError("connection limits must be positive")
        }
        config.limits.maxConnections = maxConnections
        config.limits.maxQueryConnections = maxQueryConnections
        config.limits.maxMetricsConnections = maxMetricsConnections
        config.limits.maxConnectionsPerPeer = maxConnectionsPerPeer
        for (name, seconds) in [("--handshake-timeout", handshakeTimeout), ("--frame-timeout", frameTimeout), ("--idle-timeout", idleTimeout)]
        where !(seconds > 0 && seconds <= 86_400) {
            throw ValidationError("\(name) must be between 0 and 86400 seconds, got \(seconds)")
        }
        config.limits.handshakeTimeout = .milliseconds(Int64(handshakeTimeout * 1000))
        config.limits.frameTimeout = .milliseconds(Int64(frameTimeout * 1000))
        config.limits.idleTimeout = .milliseconds(Int64(idleTimeout * 1000))
        config.timeSyncInterval = .milliseconds(Int64(timeSyncInterval * 1000))
        do {
            config.storage.retentionNs = try StorageLimits.parseDuration(retention)
            if let dataDir { config.storage.maxDiskBytes = try StorageLimits.parseSize(maxDisk, directory: dataDir) }
        } catch {
            throw ValidationError("\(error)")
        }

        var operations = ServerConfiguration.Operations()
        guard tlsReloadInterval >= 0, tlsReloadInterval <= 86_400 else {
            throw ValidationError("--tls-reload-interval must be between 0 and 86400 seconds, got \(tlsReloadInterval)")
        }
        guard storeCheckInterval > 0, storeCheckInterval <= 3600 else {
            throw ValidationError("--store-check-interval must be between 0 and 3600 seconds, got \(storeCheckInterval)")
        }
        operations.tlsReloadInterval = tlsReloadInterval == 0 ? nil : .milliseconds(Int64(tlsReloadInterval * 1000))
        operations.storeCheckInterval = .milliseconds(Int64(storeCheckInterval * 1000))
        // A check that has not completed for four intervals (and at least 20 s) is stuck.
        operations.storeCheckStaleAfter = .milliseconds(max(20_000, Int64(storeCheckInterval * 4000)))
        config.alerting = try alertingConfiguration()
        guard checkpointInterval >= 1, checkpointInterval <= 3600 else {
            throw ValidationError("--checkpoint-interval must be between 1 and 3600 seconds, got \(checkpointInterval)")
        }
        config.correlation.checkpointIntervalNs = Int64(checkpointInterval * 1e9)

        // Taken before the server starts: a SIGTERM right after it says it
        // is listening (a quick rollout, a test) is not lost.
        let termination = TerminationSignal()
        signal(SIGPIPE, SIG_IGN)
        if let nats, role == .correlate {
            for (name, seconds) in [("--lease-timeout", leaseTimeout)] where !(seconds >= 1 && seconds <= 3600) {
                throw ValidationError("\(name) must be between 1 and 3600 seconds, got \(seconds)")
            }
            let holder = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(String(UInt16.random(in: 0...UInt16.max), radix: 16))"
            var settings = NATSCorrelateConfiguration(nats: nats, holder: holder)
            settings.leaseTimeout = .milliseconds(Int64(leaseTimeout * 1000))
            settings.renewInterval = .milliseconds(max(200, Int64(leaseTimeout * 1000) / 5))
            settings.checkpointInterval = .milliseconds(Int64(checkpointInterval * 1000))
            let replica = CorrelateReplica(configuration: config, settings: settings, operations: operations, logger: logger) { why in
                logger.critical("exiting: the engine lease was lost", metadata: ["reason": "\(why)"])
                Glibc.exit(3)
            }
            _ = try replica.start()
            termination.wait()
            logger.info("shutting down")
            replica.shutdown()
            return
        }
        if let nats, role == .query {
            let holder = "\(ProcessInfo.processInfo.hostName)-\(getpid())-\(String(UInt16.random(in: 0...UInt16.max), radix: 16))"
            var settings = NATSQueryConfiguration(nats: nats, holder: holder)
            try clickhouseSettings(&settings)
            settings.retention = config.storage.retentionNs.map { .nanoseconds($0) }
            let replica = try QueryReplica(configuration: config, settings: settings, operations: operations, logger: logger)
            _ = try replica.start()
            termination.wait()
            logger.info("shutting down")
            replica.shutdown()
            return
        }
        if let nats {
            let replica = IngestReplica(configuration: config, nats: nats, operations: operations, logger: logger)
            _ = try replica.start()
            termination.wait()
            logger.info("shutting down: no new connections; draining")
            replica.shutdown()
            return
        }
        // A second server on the same data directory stops here, naming the holder.
        let server = try TapioServer(configuration: config, operations: operations, logger: logger)
        _ = try server.start()

        termination.wait()
        logger.info("shutting down: no new connections; draining")
        server.shutdown()
    }
}

extension Serve {
    /// The NATS side of role ingest from the flags; nil in role all (where
    /// NATS flags are refused rather than ignored).
    func natsConfiguration() throws -> NATSIngestConfiguration? {
        guard role != .all else {
            let given = [("--nats", !nats.isEmpty), ("--nats-tls-dir", natsTlsDir != nil), ("--nats-user", natsUser != nil),
                         ("--nats-password-file", natsPasswordFile != nil), ("--nats-token-file", natsTokenFile != nil)].filter(\.1).map(\.0)
            if !given.isEmpty { throw ValidationError("\(given.joined(separator: ", ")): for --role ingest, correlate or query only (this is --role \(role.rawValue))") }
            return nil
        }
        let unused = [("--alertmanager", !alertmanager.isEmpty), ("--webhook", webhook != nil), ("--webhook-secret-file", webhookSecretFile != nil),
                      ("--otlp-endpoint", otlpEndpoint != nil), ("--alert-link-base", alertLinkBase != nil), ("--alert-tls-ca", alertTlsCa != nil)]
            .filter(\.1).map(\.0)
        if !unused.isEmpty, role == .ingest || role == .query {
            throw ValidationError("\(unused.joined(separator: ", ")): incidents are not made in role \(role.rawValue) (no engine runs here; the correlate leader notifies), so nothing would be sent")
        }
        guard !nats.isEmpty else { throw ValidationError("--role \(role.rawValue) needs at least one --nats URL (nats://HOST:PORT or tls://HOST:PORT)") }
        if let url = nats.first(where: { $0.contains("://") && !$0.hasPrefix("nats://") && !$0.hasPrefix("tls://") }) {
            throw ValidationError("--nats: '\(url)' is neither nats:// nor tls://")
        }
        var c: NATSIngestConfiguration
        do {
            c = NATSIngestConfiguration(servers: try nats.map { try NATSServerAddress($0) })
        } catch {
            throw ValidationError("--nats: \(error)")
        }
        c.stream = natsStream
        guard !natsStream.isEmpty, natsStream.utf8.allSatisfy({ $0 > 32 && $0 < 127 && !".*>/\\".utf8.contains($0) }) else {
            throw ValidationError("--nats-stream: '\(natsStream)' is not a JetStream stream name (printable, no spaces, no . * > / \\)")
        }
        guard (1...5).contains(natsReplicas) else { throw ValidationError("--nats-replicas must be 1 to 5 (JetStream's limit), got \(natsReplicas)") }
        c.replicas = natsReplicas
        do {
            let window = try StorageLimits.parseDuration(natsDuplicateWindow)
            guard window >= 1_000_000_000 else { throw ValidationError("--nats-duplicate-window must be at least 1s") }
            c.duplicateWindow = .nanoseconds(window)
            c.maxAge = natsMaxAge == "0" ? .zero : .nanoseconds(try StorageLimits.parseDuration(natsMaxAge))
        } catch let error as ValidationError {
            throw error
        } catch {
            throw ValidationError("\(error)")
        }
        if c.maxAge != .zero, c.maxAge < c.duplicateWindow {
            throw ValidationError("--nats-max-age (\(natsMaxAge)) must not be shorter than --nats-duplicate-window (\(natsDuplicateWindow))")
        }
        guard natsPublishTimeout > 0, natsPublishTimeout <= 300 else {
            throw ValidationError("--nats-publish-timeout must be between 0 and 300 seconds, got \(natsPublishTimeout)")
        }
        c.publishTimeout = .milliseconds(Int64(natsPublishTimeout * 1000))
        if let dir = natsTlsDir {
            do { c.tls = try NATSIngestConfiguration.tls(directory: dir) } catch { throw ValidationError("--nats-tls-dir: \(error)") }
        } else if nats.contains(where: { $0.hasPrefix("tls://") }) {
            c.tls = NATSIngestConfiguration.systemTLS
        }
        func secret(_ path: String, _ flag: String) throws -> String {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw ValidationError("\(flag): cannot read \(path)") }
            let value = String(text.reversed().drop { $0 == "\n" || $0 == "\r" }.reversed())
            guard !value.isEmpty else { throw ValidationError("\(flag): \(path) is empty") }
            return value
        }
        switch (natsUser, natsPasswordFile, natsTokenFile) {
        case (nil, nil, nil): break
        case (let user?, let file?, nil): c.authentication = .userPassword(user: user, password: try secret(file, "--nats-password-file"))
        case (nil, nil, let file?): c.authentication = .token(try secret(file, "--nats-token-file"))
        default: throw ValidationError("NATS credentials: give --nats-user with --nats-password-file, or --nats-token-file alone")
        }
        return c
    }

    /// ClickHouse from the flags (role query).
    func clickhouseSettings(_ settings: inout NATSQueryConfiguration) throws {
        guard let url = clickhouse else { throw ValidationError("--role query needs --clickhouse http://HOST:PORT or https://HOST:PORT (ClickHouse's HTTP interface)") }
        let https = url.hasPrefix("https://")
        guard https || url.hasPrefix("http://") else {
            throw ValidationError("--clickhouse: '\(url)' is neither http://HOST:PORT nor https://HOST:PORT")
        }
        var rest = String(url.dropFirst(https ? "https://".count : "http://".count))
        while rest.hasSuffix("/") { rest.removeLast() }
        guard !rest.contains("/"), !rest.contains("@") else {
            throw ValidationError("--clickhouse: give \(https ? "https" : "http")://HOST:PORT only (no path, no credentials in the URL), got '\(url)'")
        }
        // A port is there unless the text ends in a bare name or a bracketed IPv6 address.
        if !rest.contains(":") || rest.hasSuffix("]") { rest += https ? ":8443" : ":8123" }
        let (host, port) = try parseHostPort(rest)
        (settings.clickhouseHost, settings.clickhousePort) = (host, port)
        switch (https, clickhouseTlsDir) {
        case (false, _?): throw ValidationError("--clickhouse-tls-dir needs an https:// --clickhouse (got '\(url)')")
        case (false, nil): settings.clickhouseTLS = nil
        case (true, nil): settings.clickhouseTLS = ClientTLSDirectory.systemTrust
        case (true, let dir?):
            do {
                settings.clickhouseTLS = try ClientTLSDirectory.configuration(directory: dir, servers: "the ClickHouse servers")
            } catch {
                throw ValidationError("--clickhouse-tls-dir: \(error)")
            }
        }
        switch (clickhouseUser, clickhousePasswordFile) {
        case (nil, nil): break
        case (let user?, let file):
            settings.clickhouseUser = user
            if let file {
                guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { throw ValidationError("--clickhouse-password-file: cannot read \(file)") }
                settings.clickhousePassword = String(text.reversed().drop { $0 == "\n" || $0 == "\r" }.reversed())
            }
        case (nil, _?): throw ValidationError("--clickhouse-password-file needs --clickhouse-user")
        }
        settings.clickhouseDatabase = clickhouseDatabase
        for (flag, name) in [("--clickhouse-table", clickhouseTable), ("--clickhouse-database", clickhouseDatabase ?? "default")] {
            guard let first = name.utf8.first, !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(first),
                  name.utf8.allSatisfy({ ($0 >= 65 && $0 <= 90) || ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 95 }) else {
                throw ValidationError("\(flag): '\(name)' is not a plain identifier (letters, digits and _, not starting with a digit)")
            }
        }
        settings.clickhouseTable = clickhouseTable
        guard queryAckWait >= 1, queryAckWait <= 3600 else { throw ValidationError("--query-ack-wait must be between 1 and 3600 seconds, got \(queryAckWait)") }
        settings.ackWait = .milliseconds(Int64(queryAckWait * 1000))
    }

    /// The alert receivers and rules from the flags (docs/alerts.md).
    func alertingConfiguration() throws -> AlertingConfiguration {
        var a = AlertingConfiguration()
        do {
            a.alertmanagers = try alertmanager.map { try AlertTarget(url: $0) }
        } catch {
            throw ValidationError("--alertmanager: \(error)")
        }
        do {
            a.webhook = try webhook.map { try AlertTarget(url: $0) }
        } catch {
            throw ValidationError("--webhook: \(error)")
        }
        do {
            a.otlp = try otlpEndpoint.map { try AlertTarget(url: $0) }
        } catch {
            throw ValidationError("--otlp-endpoint: \(error)")
        }
        if let path = webhookSecretFile {
            guard webhook != nil else { throw ValidationError("--webhook-secret-file needs --webhook") }
            do { a.webhookSecret = try WebhookSignature.readSecret(path: path) } catch { throw ValidationError("\(error)") }
        }
        if let base = alertLinkBase {
            guard base.hasPrefix("http://") || base.hasPrefix("https://"), URL(string: base + "x") != nil else {
                throw ValidationError("--alert-link-base must be an http:// or https:// URL, got \(base.debugDescription)")
            }
            a.linkBase = base
        }
        if let ca = alertTlsCa {
            guard FileManager.default.isReadableFile(atPath: ca) else { throw ValidationError("--alert-tls-ca: cannot read \(ca)") }
            a.trustRootsFile = ca
        }
        guard (0...1).contains(alertMinConfidence) else {
            throw ValidationError("--alert-min-confidence must be between 0 and 1, got \(alertMinConfidence)")
        }
        a.minimumConfidence = alertMinConfidence
        guard alertResendInterval >= 1, alertResendInterval <= 3600 else {
            throw ValidationError("--alert-resend-interval must be between 1 and 3600 seconds, got \(alertResendInterval)")
        }
        a.resendInterval = .milliseconds(Int64(alertResendInterval * 1000))
        return a
    }
}

ServerCommand.main()

/// SIGTERM and SIGINT, taken from their default action when this is made;
/// `wait()` blocks until one has arrived (before or during the wait).
final class TerminationSignal {
    private let done = DispatchSemaphore(value: 0)
    private var sources: [DispatchSourceSignal] = []

    init() {
        // The default action off first, then the sources (the order dispatch
        // needs: its handler replaces SIG_IGN; set after, SIG_IGN would
        // replace the handler). Made before the server starts, so the
        // sources are in place by the time it says it is listening.
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        sources = [SIGTERM, SIGINT].map { sig in
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { [done] in done.signal() }
            source.resume()
            return source
        }
    }

    func wait() {
        done.wait()
    }
}

/// glibc's `mallopt(M_ARENA_MAX, n)` (malloc.h is outside Swift's Glibc
/// module); before the server's threads start. Nothing on a C library
/// without it.
func limitMallocArenas(_ n: Int32) {
    typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
    let M_ARENA_MAX: Int32 = -8
    guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
    _ = unsafeBitCast(symbol, to: Mallopt.self)(M_ARENA_MAX, n)
}
