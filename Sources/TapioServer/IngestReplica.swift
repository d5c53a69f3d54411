import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization
import TapioNATS
import TapioWire

/// `tapio-server --role ingest`: a stateless ingest replica. Agents connect
/// exactly as to the single process (mutual TLS, hello with the node bound to
/// the certificate, frames, limits, time sync); the same `IngestHandler`
/// serves them, with a `JetStreamBatchSink` in place of the local log, so an
/// agent is acknowledged only after JetStream's publish acknowledgement.
/// There is no data directory, no store and no engine; /metrics, /healthz and
/// /readyz (not ready while NATS is unreachable) answer on the HTTP listener.
public final class IngestReplica: Sendable {
    public let configuration: ServerConfiguration
    public let operations: ServerConfiguration.Operations
    public let metrics: ServerMetrics
    /// Open connections per listener and those to drain on shutdown.
    private let admission: ConnectionAdmission
    public let registry = NodeRegistry(restoring: [])
    let sink: JetStreamBatchSink
    private let pods = PodDirectory(restoring: [])
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let state = Mutex(RunState())

    private struct RunState {
        var ingest: Channel?
        var http: Channel?
        var phase = Phase.starting
        var tls: TLSReloader?
    }

    enum Phase: String {
        case starting = "starting"
        case running = "running"
        case shuttingDown = "shutting down: draining connections"
        case stopped = "stopped"
    }

    public struct BoundAddresses: Sendable {
        public var ingest: SocketAddress
        public var metrics: SocketAddress?
    }

    public init(configuration: ServerConfiguration, nats: NATSIngestConfiguration, operations: ServerConfiguration.Operations = .init(), logger: Logger) {
        self.configuration = configuration
        self.operations = operations
        self.logger = logger
        let metrics = ServerMetrics()
        self.metrics = metrics
        self.admission = ConnectionAdmission(metrics: metrics)
        self.sink = JetStreamBatchSink(configuration: nats, metrics: metrics, logger: logger)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, System.coreCount))
    }

    /// Binds /metrics and the ingest listener and starts connecting to NATS in
    /// the background: agents are served at once, and their batches fail
    /// (unacknowledged, resent later) until the stream is ready.
    public func start() throws -> BoundAddresses {
        let closeGrace = configuration.limits.closeGrace
        let tls = try TLSReloader(files: configuration.tls, metrics: metrics, logger: logger) {
            try TapioServer.makeTLSContext($0, closeGrace: closeGrace)
        }
        state.withLock { $0.tls = tls }
        for name in ["tapio_server_hellos_total", "tapio_server_batches_total", "tapio_server_duplicate_batches_total", "tapio_server_events_total",
                     "tapio_server_events_future_total", "tapio_server_connection_errors_total"] {
            metrics.add(name, 0)
        }
        for reason in MetricsCatalog.rejectReasons { metrics.add("tapio_server_connections_rejected_total{reason=\"\(reason)\"}", 0) }
        sink.start()
        var metricsAddress: SocketAddress?
        do {
            if configuration.metricsHost != nil {
                let http = try bindMetrics()
                state.withLock { $0.http = http }
                metricsAddress = http.localAddress
            }
            let context = IngestContext(configuration: configuration, registry: registry, pods: pods, metrics: metrics, logger: logger,
                                        version: TapioServer.version, sink: sink)
            let limits = configuration.limits
            let policy = ConnectionPolicy(listener: .ingest, role: PeerIdentity.nodeRole, action: "send events", limits: limits) { code, message in
                Frame(type: .error, payload: WireError(code, message).encoded())
            }
            let logger = self.logger
            let ingest = try ServerBootstrap(group: group)
                .serverChannelOption(ChannelOptions.backlog, value: 256)
                .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
                .childChannelInitializer { [self, metrics] channel in
                    guard admission.admit(channel, listener: .ingest, maxConnections: limits.maxConnections, drain: true) else { return channel.close() }
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandlers([
                            NIOSSLServerHandler(context: tls.context),
                            ConnectionGuard(policy: policy, metrics: metrics, logger: logger),
                            ByteToMessageHandler(FrameDecoder(maximumPayload: limits.maxFrameBytes)),
                            MessageToByteHandler(FrameEncoder()),
                            IngestHandler(server: context),
                        ])
                    }
                }
                .bind(host: configuration.ingestHost, port: configuration.ingestPort).wait()
            state.withLock {
                $0.ingest = ingest
                $0.phase = .running
            }
            if let interval = operations.tlsReloadInterval { tls.start(interval: interval) }
            logger.info("tapio-server ingest replica listening", metadata: [
                "role": "ingest", "ingest": "\(ingest.localAddress!)", "metrics": "\(metricsAddress.map { "\($0)" } ?? "off")",
                "nats": "\(sink.configuration.servers.map { "\($0)" }.joined(separator: ","))", "stream": "\(sink.configuration.stream)",
            ])
            return BoundAddresses(ingest: ingest.localAddress!, metrics: metricsAddress)
        } catch {
            let channels = state.withLock { s in [s.ingest, s.http].compactMap { $0 } }
            for c in channels { try? c.close().wait() }
            throw error
        }
    }

    private func bindMetrics() throws -> Channel {
        try MetricsHTTPHandler.bind(group: group, configuration: configuration, admission: admission, metrics: metrics, source: self)
    }

    /// Stop accepting, let every connection finish publishing and
    /// acknowledging what it accepted (up to the grace period), goodbye,
    /// then close NATS and the HTTP listener.
    public func shutdown() {
        let (ingest, http, tls, phase) = state.withLock { s in
            let before = s.phase
            if s.phase != .stopped { s.phase = .shuttingDown }
            return (s.ingest, s.http, s.tls, before)
        }
        guard phase != .stopped else { return }
        let connections = admission.stopAccepting()
        tls?.stop()
        try? ingest?.close().wait()
        for c in connections { c.pipeline.fireUserInboundEventTriggered(ServerShutdownEvent()) }
        let deadline = NIODeadline.now() + .nanoseconds(configuration.shutdownGrace.nanoseconds)
        for c in connections {
            let remaining = deadline - .now()
            if remaining > .zero {
                let timeout = c.eventLoop.scheduleTask(in: remaining) { c.close(promise: nil) }
                try? c.closeFuture.wait()
                timeout.cancel()
            } else {
                try? c.close().wait()
            }
        }
        let done = DispatchSemaphore(value: 0)
        let sink = self.sink
        Task {
            await sink.stop()
            done.signal()
        }
        _ = done.wait(timeout: .now() + 10)
        try? http?.close().wait()
        try? group.syncShutdownGracefully()
        state.withLock { $0.phase = .stopped }
        logger.info("tapio-server ingest replica stopped")
    }

    public var connectionCount: Int { admission.drainingCount }

    /// Why the replica should get no agents now, nil when it should.
    public var notReadyReason: String? {
        let phase = state.withLock { $0.phase }
        guard phase == .running else { return phase.rawValue }
        return sink.notReadyReason.map { "nats: \($0)" }
    }
}

extension IngestReplica: HTTPStatusSource {
    /// Live while the process serves; NATS trouble shows in the text and in
    /// /readyz, not as a reason to restart the replica.
    func healthReport() -> ServerHealth.Report {
        let phase = state.withLock { $0.phase }
        let nats = sink.notReadyReason.map { "nats: not ready: \($0)" } ?? "nats: ok (\(sink.connectedServer.map { "\($0)" } ?? "?"))"
        return ServerHealth.Report(ok: phase == .running || phase == .shuttingDown, lines: ["role: ingest (\(phase.rawValue))", nats])
    }

    /// Ready while listening and JetStream takes batches.
    func readinessReport() -> ServerHealth.Report {
        if let why = notReadyReason { return ServerHealth.Report(ok: false, lines: [why]) }
        return ServerHealth.Report(ok: true, lines: ["listening, NATS connected, stream \(sink.configuration.stream) ready"])
    }

    /// The families of the catalog that an ingest replica counts, the node
    /// gauges of its own agents, and the NATS publisher's.
    public func metricsText() -> String {
        var byName: [String: [MetricsText.Sample]] = [:]
        for (key, value) in metrics.all() {
            let name = key.split(separator: "{", maxSplits: 1).first.map(String.init) ?? key
            byName[name, default: []].append(.init(rawLabels: String(key.dropFirst(name.count)), value))
        }
        let (connections, open) = (admission.drainingCount, admission.openByListener)
        byName["tapio_server_connections"] = [.init([], connections)]
        byName["tapio_server_listener_connections"] = [Listener.ingest, .metrics].map { .init([("listener", $0.rawValue)], open[$0] ?? 0) }
        byName["tapio_server_healthy"] = [.init([], healthReport().ok ? 1 : 0)]
        byName["tapio_server_ready"] = [.init([], readinessReport().ok ? 1 : 0)]
        byName["tapio_server_build_info"] = [.init([("version", TapioServer.version)], 1)]
        byName["tapio_server_nats_connected"] = [.init([], sink.connectedServer == nil ? 0 : 1)]
        byName["tapio_server_nats_reconnects_total"] = [.init([], sink.reconnects)]
        let snaps = registry.snapshot()
        byName["tapio_node_connected"] = snaps.map { .init([("node", $0.record.node)], $0.connected ? 1 : 0) }
        byName["tapio_node_events_received_total"] = snaps.map { .init([("node", $0.record.node)], $0.record.eventsReceived) }
        // The clock estimate the replica sends with each batch, as role all exports it.
        byName["tapio_node_clock_offset_seconds"] = snaps.map { .init([("node", $0.record.node)], Double($0.record.clockOffsetNs) / 1e9) }
        byName["tapio_node_clock_error_seconds"] = snaps.map { .init([("node", $0.record.node)], Double($0.record.clockErrorNs) / 1e9) }
        // The agents' own drop counters as their batches carried them; the
        // replica keeps no history, so this is what it has seen since it started.
        byName["tapio_node_dropped_events_total"] = snaps.flatMap { s in
            s.drops.map { .init([("node", s.record.node), ("kind", $0.kind.name), ("reason", $0.reason)], Int64(clamping: $0.count)) }
        }
        var text = MetricsText()
        for name in byName.keys.sorted() {
            let family = Self.families[name] ?? MetricsCatalog.family(name)
            text.add(name, family.kind, family.help, byName[name] ?? [], unlabelled: family.unlabelled)
        }
        text.add("tapio_server_nats_publish_seconds", "Time from publishing a batch to JetStream's acknowledgement, for acknowledged publishes.", histogram: sink.publishLatency)
        text.addProcessMetrics()
        return text.text
    }

    /// The ingest replica's own families (the rest are the catalog's).
    static let families: [String: MetricsCatalog.Family] = [
        "tapio_server_batches_total": .init(kind: .counter, help: "Batches JetStream acknowledged as stored, acknowledged to the agent.", unlabelled: true),
        "tapio_server_duplicate_batches_total": .init(kind: .counter, help: "Batches JetStream acknowledged as duplicates (stored before), acknowledged to the agent.", unlabelled: true),
        "tapio_server_events_total": .init(kind: .counter, help: "Events in the batches JetStream stored.", unlabelled: true),
        "tapio_server_nats_publish_failures_total": .init(kind: .counter, help: "Batches not acknowledged because their publish failed, by reason (timeout, connection_lost, not_connected, no_responders, refused, wrong_stream); the agent resends them.", unlabelled: false),
        "tapio_server_nats_inventory_failures_total": .init(kind: .counter, help: "Pod inventories that could not be published to the stream.", unlabelled: true),
        "tapio_server_nats_connected": .init(kind: .gauge, help: "1 while the replica has a NATS connection.", unlabelled: true),
        "tapio_server_nats_reconnects_total": .init(kind: .counter, help: "NATS connections made after the first (another server of the list, or the same again).", unlabelled: true),
        "tapio_server_ready": .init(kind: .gauge, help: "1 while /readyz answers 200 (listening, NATS connected, the stream ready).", unlabelled: true),
        "tapio_server_healthy": .init(kind: .gauge, help: "1 while /healthz answers 200 (the replica serves).", unlabelled: true),
        "tapio_node_dropped_events_total": .init(kind: .counter, help: "Events the node's agent could not deliver, by kind and reason, as the agent's batches to this replica reported them (summed over the agent's runs since the replica started; a node that moved between replicas is reported by each: take the max).", unlabelled: false),
    ]
}
