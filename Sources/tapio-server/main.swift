import ArgumentParser
import Dispatch
import Foundation
import Logging
import TapioServer
import TapioWire

struct ServerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tapio-server",
        abstract: "Receives agents' event batches over mutual TLS, stores them durably, answers queries.")

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
