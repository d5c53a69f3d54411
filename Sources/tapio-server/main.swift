import ArgumentParser
import Dispatch
import Foundation
import Logging
import TapioCorrelation
import TapioServer
import TapioStore
import TapioWire

struct ServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tapio-server",
        abstract: "Receives agents' event batches over mutual TLS, stores them durably, correlates, answers queries.",
        subcommands: [Serve.self, Replay.self],
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
        let store = try SQLiteEventStore(directory: dataDir)
        var inventory: [String: [PodInfo]] = [:]
        for p in try store.pods() { inventory[p.node, default: []].append(p) }
        var events: [ObservedEvent] = []
        var since: Int64 = lastSeconds.map { wallClockNs() - $0 * 1_000_000_000 } ?? .min
        while true {
            let page = try store.batches(sinceNs: since, limit: 5000)
            for r in page {
                events += r.batch.events.map { ObservedEvent(node: r.batch.node, agentEvent: $0, clockOffsetNs: r.clock.offsetNs, clockErrorNs: r.clock.errorNs) }
            }
            guard page.count == 5000, let last = page.last else { break }
            since = last.receivedNs + 1
        }
        let config = CorrelationConfiguration()
        let engine = CorrelationEngine.replay(events, inventory: inventory, configuration: config)
        let incidents = engine.incidents.map { explain ? $0.explainJSON(weights: config.weights) : $0.toJSON() }
        print(JSONValue.object(["incidents": .array(incidents), "events": .int(Int64(events.count))]).serialized())
    }
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run the server (the default).")

    @Option(help: "Directory of the durable event store.")
    var dataDir: String

    @Option(help: "Directory with ca.crt, tls.crt, tls.key (cert-manager secret layout).")
    var tlsDir: String?
    @Option(help: "CA certificate (PEM) that client certificates must chain to.")
    var tlsCa: String?
    @Option(help: "Server certificate (PEM).")
    var tlsCert: String?
    @Option(help: "Server private key (PEM).")
    var tlsKey: String?

    @Option(help: "Agent ingest listener, HOST:PORT.")
    var listen = "127.0.0.1:7400"
    @Option(help: "Operator query listener, HOST:PORT.")
    var queryListen = "127.0.0.1:7401"
    @Option(help: "HTTP /metrics and /healthz listener, HOST:PORT, or 'off'.")
    var metricsListen = "127.0.0.1:9400"

    @Option(help: "Largest accepted frame payload in bytes.")
    var maxFrameBytes: UInt32 = FrameHeader.defaultMaximumPayload
    @Option(help: "Unacknowledged batches an agent may have in flight.")
    var windowBatches: UInt32 = 32
    @Option(help: "Seconds between time-sync exchanges on each agent connection.")
    var timeSyncInterval: Double = 2
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    func run() throws {
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
        var config = ServerConfiguration(dataDirectory: dataDir, tls: tls)
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
        config.timeSyncInterval = .milliseconds(Int64(timeSyncInterval * 1000))

        let server = try TapioServer(configuration: config, logger: logger)
        _ = try server.start()

        let done = DispatchSemaphore(value: 0)
        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        signal(SIGPIPE, SIG_IGN)
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { done.signal() }
            source.resume()
            sources.append(source)
        }
        done.wait()
        logger.info("shutting down: no new connections; draining")
        server.shutdown()
        _ = sources
    }
}

ServerCommand.main()
