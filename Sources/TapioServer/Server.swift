import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization
import TapioAlerting
import TapioCorrelation
import TapioStore
import TapioWire

/// tapio-server: the ingest listener (agents), the query listener (operators)
/// and /metrics, over one durable event store.
///
/// Start with `start()`; `shutdown()` stops accepting, lets every connection
/// finish storing and acknowledging what it accepted, says goodbye, and closes.
public final class TapioServer: Sendable {
    public static let version = TapioVersion.current

    public let configuration: ServerConfiguration
    public let metrics: ServerMetrics
    /// Open connections per listener and those to drain on shutdown.
    private let admission: ConnectionAdmission
    public let registry: NodeRegistry
    public let pods: PodDirectory
    public let correlation: CorrelationService
    /// Sends incident notifications when receivers are configured (docs/alerts.md).
    public let alerts: AlertNotifier?
    public let store: any EventStore
    /// What /healthz and /readyz report.
    public let health: ServerHealth
    public let operations: ServerConfiguration.Operations
    /// Held from before the store opens until `shutdown()` ends.
    private let lock: DataDirectoryLock
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let storage = NIOThreadPool(numberOfThreads: 1)
    private let queries = NIOThreadPool(numberOfThreads: 1)
    private let state = Mutex<RunState>(RunState())

    private struct RunState {
        var listeners: [Channel] = []
        /// The /metrics listener, closed last on shutdown.
        var http: Channel?
        var storeCheck: RepeatedTask?
        var tls: TLSReloader?
    }

    /// Bound addresses after `start()` (port 0 in the configuration picks a free one).
    public struct BoundAddresses: Sendable {
        public var ingest: SocketAddress
        public var query: SocketAddress
        public var metrics: SocketAddress?
    }

    /// Takes the data directory's lock (a second server on the same directory
    /// fails here with `DataDirectoryLock.Held`), then opens the store.
    public init(configuration: ServerConfiguration, operations: ServerConfiguration.Operations = .init(), logger: Logger) throws {
        self.configuration = configuration
        self.operations = operations
        self.logger = logger
        let metrics = ServerMetrics()
        self.metrics = metrics
        self.admission = ConnectionAdmission(metrics: metrics)
        self.lock = try DataDirectoryLock(directory: configuration.dataDirectory)
        self.health = ServerHealth(operations: operations)
        self.store = try SegmentEventStore(directory: configuration.dataDirectory, configuration: configuration.storage)
        self.registry = NodeRegistry(restoring: try store.nodes())
        self.pods = PodDirectory(restoring: try store.pods())
        var correlationConfiguration = configuration.correlation
        if correlationConfiguration.checkpointPath == nil {
            correlationConfiguration.checkpointPath = (configuration.dataDirectory as NSString).appendingPathComponent("engine.checkpoint")
        }
        self.correlation = CorrelationService(configuration: correlationConfiguration, store: store, logger: logger)
        self.alerts = configuration.alerting.isEnabled
            ? try AlertNotifier(configuration: configuration.alerting, logger: logger) { metrics.add($0, $1) } : nil
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, System.coreCount))
    }

    /// The TLS context of one set of the server's files (read by `TLSReloader`,
    /// which builds a new one whenever they change).
    static func makeTLSContext(_ files: TLSReloader.Contents, closeGrace: ServerConfiguration.TimeAmount) throws -> NIOSSLContext {
        var config = TLSConfiguration.makeServerConfigurationWithMTLS(
            certificateChain: try NIOSSLCertificate.fromPEMBytes(files.certificate).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: files.key, format: .pem)),
            trustRoots: .certificates(try NIOSSLCertificate.fromPEMBytes(files.ca)))
        config.minimumTLSVersion = .tlsv13
        // Clients are identified by certificate, not by host name.
        config.certificateVerification = .noHostnameVerification
        // A close_notify the peer does not answer holds the socket no longer than this.
        config.shutdownTimeout = .nanoseconds(closeGrace.nanoseconds)
        return try NIOSSLContext(configuration: config)
    }

    /// Binds the /metrics listener first (so /readyz says what start is
    /// doing), restores the engine, then binds the ingest and query listeners.
    public func start() throws -> BoundAddresses {
        storage.start()
        queries.start()
        let closeGrace = configuration.limits.closeGrace
        let tls = try TLSReloader(files: configuration.tls, metrics: metrics, logger: logger) {
            try Self.makeTLSContext($0, closeGrace: closeGrace)
        }
        state.withLock { $0.tls = tls }
        var metricsAddress: SocketAddress?
        if configuration.metricsHost != nil {
            let channel = try bindMetrics()
            state.withLock { $0.http = channel }
            metricsAddress = channel.localAddress
        }
        do {
            return try startListening(tls: tls, metricsAddress: metricsAddress)
        } catch {
            let listeners = state.withLock { s in
                defer { (s.listeners, s.http) = ([], nil) }
                return s.listeners + (s.http.map { [$0] } ?? [])
            }
            for l in listeners { try? l.close().wait() }
            throw error
        }
    }

    private func startListening(tls: TLSReloader, metricsAddress: SocketAddress?) throws -> BoundAddresses {
        health.set(.restoring)
        try correlation.restore(nowNs: wallClockNs(), maxFutureSkewNs: configuration.limits.maxFutureSkew.nanoseconds)
        let context = ServerContext(configuration: configuration, store: store, registry: registry, pods: pods, correlation: correlation, metrics: metrics, storage: storage, logger: logger, version: Self.version)
        let limits = configuration.limits
        let logger = self.logger

        let ingestPolicy = ConnectionPolicy(listener: .ingest, role: PeerIdentity.nodeRole, action: "send events", limits: limits) { code, message in
            Frame(type: .error, payload: WireError(code, message).encoded())
        }
        let ingest = try bootstrap(tls: tls, listener: .ingest, maxConnections: limits.maxConnections) { [metrics] channel in
            try channel.pipeline.syncOperations.addHandlers([
                ConnectionGuard(policy: ingestPolicy, metrics: metrics, logger: logger),
                ByteToMessageHandler(FrameDecoder(maximumPayload: limits.maxFrameBytes)),
                MessageToByteHandler(FrameEncoder()),
                IngestHandler(server: context.ingest),
            ])
        }.bind(host: configuration.ingestHost, port: configuration.ingestPort).wait()
        state.withLock { $0.listeners.append(ingest) }

        let queryPolicy = ConnectionPolicy(listener: .query, role: PeerIdentity.operatorRole, action: "query", limits: limits) { code, message in
            Frame(type: .queryResponse, payload: QueryResponse(status: code.rawValue, error: message).encoded())
        }
        let subscriptions = QuerySubscriptions()
        correlation.observeChanges { subscriptions.publish($0) }
        let query = try bootstrap(tls: tls, listener: .query, maxConnections: limits.maxQueryConnections) { [queries, metrics] channel in
            try channel.pipeline.syncOperations.addHandlers([
                ConnectionGuard(policy: queryPolicy, metrics: metrics, logger: logger),
                ByteToMessageHandler(FrameDecoder(maximumPayload: min(limits.maxQueryFrameBytes, limits.maxFrameBytes))),
                MessageToByteHandler(FrameEncoder()),
                QueryHandler(server: context.query, queries: queries, subscriptions: subscriptions),
            ])
        }.bind(host: configuration.queryHost, port: configuration.queryPort).wait()
        state.withLock { $0.listeners.append(query) }

        // The engine takes durable batches from its queue and moves on four
        // times a second, on its own thread: a bucket is decided within 250 ms
        // of its watermark passing. /healthz says when the last pass ended.
        let health = self.health
        metrics.add("tapio_server_engine_backpressure_total", 0)
        if let alerts {
            // Incidents open now were announced by the previous run; the
            // engine's thread hands every change over without waiting.
            alerts.start(restoring: correlation.openIncidentsJSON())
            correlation.observeIncidents { alerts.incidentsChanged($0) }
        }
        correlation.start { health.engineTicked() }
        // The store's write check runs on the storage thread, in line with batches.
        let storeCheck = scheduleStoreCheck()
        state.withLock { $0.storeCheck = storeCheck }
        if let interval = operations.tlsReloadInterval { tls.start(interval: interval) }
        health.set(.ready)
        logger.info("tapio-server listening", metadata: [
            "ingest": "\(ingest.localAddress!)", "query": "\(query.localAddress!)",
            "metrics": "\(metricsAddress.map { "\($0)" } ?? "off")", "data_dir": "\(configuration.dataDirectory)",
        ])
        return BoundAddresses(ingest: ingest.localAddress!, query: query.localAddress!, metrics: metricsAddress)
    }

    private func bindMetrics() throws -> Channel {
        try MetricsHTTPHandler.bind(group: group, configuration: configuration, admission: admission, metrics: metrics, source: self)
    }

    /// Every `storeCheckInterval`: a small fsynced write in the data directory
    /// on the storage thread, and a look at how batch commits went since the last check.
    private func scheduleStoreCheck() -> RepeatedTask {
        let interval = TimeAmount.nanoseconds(max(operations.storeCheckInterval.nanoseconds, 1_000_000))
        let loop = group.next()
        let checking = Busy()
        let (storage, health, metrics, store, logger) = (self.storage, self.health, self.metrics, self.store, self.logger)
        let directory = configuration.dataDirectory
        return loop.scheduleRepeatedTask(initialDelay: .zero, delay: interval) { _ in
            health.commitsObserved(
                succeeded: metrics.value("tapio_server_batches_total") + metrics.value("tapio_server_duplicate_batches_total"),
                failed: metrics.value("tapio_server_connections_rejected_total{reason=\"storage\"}"))
            guard checking.enter() else { return }
            storage.runIfActive(eventLoop: loop) { () -> String? in
                let error = ServerHealth.writeCheck(directory: directory)
                // Retention on the storage thread too, between group commits.
                do {
                    for d in try store.enforceRetention(nowNs: wallClockNs()) {
                        logger.info("segment deleted", metadata: [
                            "segment": "\(d.segment)", "reason": "\(d.reason.rawValue)", "bytes": "\(d.bytes)",
                            "events": "\(d.events)", "newest_event": "\(rfc3339(ns: d.newestEventNs))"])
                    }
                } catch {
                    logger.error("retention failed", metadata: ["error": "\(error)"])
                }
                return error
            }.whenComplete { result in
                checking.leave()
                if case .success(let error) = result { health.storeChecked(error: error) }
            }
        }
    }

    private func bootstrap(tls: TLSReloader, listener: Listener, maxConnections: Int,
                           _ handlers: @escaping @Sendable (Channel) throws -> Void) -> ServerBootstrap {
        ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            // IPPROTO_TCP: at SOL_SOCKET level option 1 is SO_DEBUG, which needs
            // CAP_NET_ADMIN, so every accepted connection was closed in a pod.
            .childChannelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] channel in
                guard admission.admit(channel, listener: listener, maxConnections: maxConnections, drain: true) else {
                    return channel.close()
                }
                return channel.eventLoop.makeCompletedFuture {
                    // The context of the files as they are now: a renewed
                    // certificate serves new connections, open ones keep theirs.
                    try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls.context))
                    try handlers(channel)
                }
            }
    }

    /// Open connections on one listener.
    func openConnections(on listener: Listener) -> Int {
        admission.open(on: listener)
    }

    public var connectionCount: Int {
        admission.drainingCount
    }

    /// Graceful shutdown: close the listeners, ask every connection to drain
    /// (store and acknowledge what it accepted, then goodbye), wait up to the
    /// grace period, then stop the threads.
    public func shutdown() {
        let connections = admission.stopAccepting()
        let (listeners, http, storeCheck, tls) = state.withLock { s in (s.listeners, s.http, s.storeCheck, s.tls) }
        guard health.phase != .stopped else { return }
        health.set(.shuttingDown)
        storeCheck?.cancel()
        tls?.stop()
        // The ingest and query listeners close now; /metrics (answering
        // /readyz "shutting down") only once the connections are drained.
        for l in listeners { try? l.close().wait() }
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
        for snap in registry.snapshot() { try? store.saveNode(snap.record) }
        // The engine takes what is queued, makes a last pass and stops.
        correlation.stop()
        // After the engine's last pass, so its notifications are queued.
        alerts?.shutdown()
        try? storage.syncShutdownGracefully()
        try? queries.syncShutdownGracefully()
        try? http?.close().wait()
        try? group.syncShutdownGracefully()
        health.set(.stopped)
        lock.release()
        logger.info("tapio-server stopped")
    }
}

/// What the HTTP endpoint of a server in any role answers.
protocol HTTPStatusSource: Sendable {
    func metricsText() -> String
    func healthReport() -> ServerHealth.Report
    func readinessReport() -> ServerHealth.Report
}

extension TapioServer: HTTPStatusSource {
    func healthReport() -> ServerHealth.Report { health.health() }
    func readinessReport() -> ServerHealth.Report { health.readiness() }
}

/// GET /metrics (Prometheus text), GET /healthz (the store takes writes and
/// the engine advances; 503 with what is wrong otherwise) and GET /readyz
/// (listening, restored, not shutting down).
final class MetricsHTTPHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: any HTTPStatusSource
    private var path = ""

    init(server: any HTTPStatusSource) {
        self.server = server
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            path = head.uri
        case .body:
            break
        case .end:
            let (status, body): (HTTPResponseStatus, String)
            switch path {
            case "/metrics": (status, body) = (.ok, server.metricsText())
            case "/healthz", "/livez":
                let report = server.healthReport()
                (status, body) = (report.ok ? .ok : .serviceUnavailable, report.text)
            case "/readyz":
                let report = server.readinessReport()
                (status, body) = (report.ok ? .ok : .serviceUnavailable, report.text)
            default: (status, body) = (.notFound, "not found\n")
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: path == "/metrics" ? "text/plain; version=0.0.4" : "text/plain")
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            headers.add(name: "Connection", value: "close")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in bound.value.close(promise: nil) }
        }
    }
}

extension MetricsHTTPHandler {
    /// The HTTP listener of a process in any role (`--metrics-listen`):
    /// its own connection limit, a deadline per connection, `source` answering.
    static func bind(group: any EventLoopGroup, configuration: ServerConfiguration, admission: ConnectionAdmission, metrics: ServerMetrics,
                     source: any HTTPStatusSource) throws -> Channel {
        let limits = configuration.limits
        let metricsTimeout = TimeAmount.nanoseconds(limits.metricsTimeout.nanoseconds)
        return try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                guard admission.admit(channel, listener: .metrics, maxConnections: limits.maxMetricsConnections, drain: false) else {
                    return channel.close()
                }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ConnectionDeadline(timeout: metricsTimeout, metric: "metrics_timeout", metrics: metrics))
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHTTPHandler(server: source))
                }
            }
            .bind(host: configuration.metricsHost ?? "127.0.0.1", port: configuration.metricsPort).wait()
    }
}

/// A flag for "one at a time": `enter()` is false while another holds it.
private final class Busy: Sendable {
    private let busy = Mutex(false)
    func enter() -> Bool {
        busy.withLock { b in
            if b { return false }
            b = true
            return true
        }
    }
    func leave() { busy.withLock { $0 = false } }
}
