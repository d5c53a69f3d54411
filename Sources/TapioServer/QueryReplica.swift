import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import TapioClickHouse
import TapioCorrelation
import TapioNATS
import TapioQueryAPI
import TapioStore
import TapioWire

/// Where a query replica works (`tapio-server --role query`,
/// docs/scaling.md): the stream whose batches it writes to ClickHouse, the
/// ClickHouse it writes to and answers `events` from, the incident bucket it
/// mirrors.
public struct NATSQueryConfiguration: Sendable {
    /// The NATS servers, credentials, TLS and the events stream.
    public var nats: NATSIngestConfiguration
    /// The incidents the correlate leader publishes, one key per incident id.
    public var incidentBucket = "TAPIO_INCIDENTS"
    /// The durable consumer every query replica shares: each batch is
    /// delivered to one of them, and again (to any) when it was not
    /// acknowledged within `ackWait`.
    public var durableName = "TAPIO_QUERY_WRITER"
    /// How long a delivered batch may wait for ClickHouse's acceptance
    /// before the stream delivers it again.
    public var ackWait: Duration = .seconds(60)
    /// Messages fetched (and written in one INSERT) at a time.
    public var fetchBatch = 256
    /// ClickHouse's HTTP interface.
    public var clickhouseHost = "127.0.0.1"
    public var clickhousePort = 8123
    /// HTTPS to ClickHouse with these settings; nil: plain HTTP.
    public var clickhouseTLS: TLSConfiguration?
    /// A user and password (sent as ClickHouse's X-ClickHouse-User/-Key headers); none: ClickHouse's `default` user.
    public var clickhouseUser: String?
    public var clickhousePassword: String?
    public var clickhouseDatabase: String?
    /// The events table (`<table>_retention` beside it).
    public var clickhouseTable = "tapio_events"
    /// Day partitions older than this are dropped; nil keeps everything.
    public var retention: Duration? = .seconds(7 * 86_400)
    /// How often retention looks for old days.
    public var retentionInterval: Duration = .seconds(3600)
    /// This replica's name (logs, the NATS connection).
    public var holder: String

    public init(nats: NATSIngestConfiguration, holder: String) {
        self.nats = nats
        self.holder = holder
    }

    var clickhouse: ClickHouseConfiguration {
        var c = ClickHouseConfiguration(host: clickhouseHost, port: clickhousePort)
        c.tls = clickhouseTLS
        if let user = clickhouseUser { c.credentials = .headers(user: user, password: clickhousePassword ?? "") }
        c.database = clickhouseDatabase
        return c
    }
}

/// `tapio-server --role query`: writes every batch of the stream to
/// ClickHouse and answers operators' queries, `events` from ClickHouse and
/// the incident methods from the incident bucket the correlate leader fills
/// (mirrored as a correlate standby mirrors it). All query replicas share
/// one durable JetStream consumer, so each batch is written by one of them;
/// a message is acknowledged only after ClickHouse accepted the INSERT that
/// holds it, and one not acknowledged (its replica died, ClickHouse refused)
/// is delivered again, to any replica. A batch written twice is stored once:
/// the table's ReplacingMergeTree key ends in (node, epoch, sequence, idx)
/// and every read uses FINAL (docs/clickhouse.md).
public final class QueryReplica: Sendable {
    public let configuration: ServerConfiguration
    public let settings: NATSQueryConfiguration
    public let metrics: ServerMetrics
    public let operations: ServerConfiguration.Operations
    let correlation: CorrelationService
    let board = IncidentBoard()
    let pods = PodDirectory(restoring: [])
    let store: ClickHouseEventStore
    private let subscriptions = QuerySubscriptions()
    private let admission: ConnectionAdmission
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let queries = NIOThreadPool(numberOfThreads: 1)
    private let state = Mutex(RunState())

    private struct RunState {
        var phase = CorrelateReplica.Phase.starting
        var client: NATSClient?
        /// What stands in the way of serving, for /readyz ("" when nothing).
        var problem = "connecting to NATS"
        var tableReady = false
        var consumerReady = false
        var mirrorCaughtUp = false
        /// The last ClickHouse failure of the writer, "" after a success.
        var writeProblem = ""
        var tasks: [Task<Void, Never>] = []
        var http: Channel?
        var query: Channel?
        var tls: TLSReloader?
    }

    public struct BoundAddresses: Sendable {
        public var query: SocketAddress
        public var metrics: SocketAddress?
    }

    /// The metric families of this role (docs/operations.md, "Metrics of the query role").
    static let families: [String: MetricsCatalog.Family] = [
        "tapio_query_batches_written_total": .init(kind: .counter, help: "Batches of the stream written to ClickHouse and acknowledged (a batch delivered again is counted again).", unlabelled: true),
        "tapio_query_events_written_total": .init(kind: .counter, help: "Events written to ClickHouse (rows of accepted INSERTs).", unlabelled: true),
        "tapio_query_insert_failures_total": .init(kind: .counter, help: "INSERTs ClickHouse did not accept: their messages were not acknowledged and come again.", unlabelled: true),
        "tapio_query_malformed_messages_total": .init(kind: .counter, help: "Messages of the stream (or the incident bucket) that could not be read: counted, logged, acknowledged and skipped.", unlabelled: true),
        "tapio_query_consumer_restarts_total": .init(kind: .counter, help: "Times a fetch from the stream or the incident bucket failed and its consumer was taken up again.", unlabelled: true),
        "tapio_query_stream_pending": .init(kind: .gauge, help: "Messages of the stream not yet delivered to any query replica, as the shared consumer last said.", unlabelled: true),
        "tapio_query_incidents": .init(kind: .gauge, help: "Incidents this replica mirrors from the incident bucket.", unlabelled: true),
        "tapio_query_clickhouse_failures_total": .init(kind: .counter, help: "Queries and retention passes ClickHouse failed, by operation.", unlabelled: false,
                                                       initial: ["{operation=\"events\"}", "{operation=\"retention\"}"]),
        "tapio_query_retention_partitions_dropped_total": .init(kind: .counter, help: "Day partitions retention dropped from ClickHouse.", unlabelled: true),
        "tapio_query_retention_events_dropped_total": .init(kind: .counter, help: "Events in the day partitions retention dropped.", unlabelled: true),
        "tapio_server_ready": .init(kind: .gauge, help: "1 while /readyz answers 200 (NATS connected, the table and the consumer made, the incident bucket read).", unlabelled: true),
        "tapio_server_healthy": .init(kind: .gauge, help: "1 while /healthz answers 200 (the replica runs).", unlabelled: true),
        "tapio_server_nats_connected": .init(kind: .gauge, help: "1 while the replica has a NATS connection.", unlabelled: true),
        "tapio_server_nats_reconnects_total": .init(kind: .counter, help: "NATS connections made after the first (another server of the list, or the same again).", unlabelled: true),
    ]

    public init(configuration: ServerConfiguration, settings: NATSQueryConfiguration, operations: ServerConfiguration.Operations = .init(),
                logger: Logger) throws {
        self.configuration = configuration
        self.settings = settings
        self.logger = logger
        self.operations = operations
        let metrics = ServerMetrics()
        self.metrics = metrics
        self.admission = ConnectionAdmission(metrics: metrics)
        var engine = configuration.correlation
        engine.checkpointPath = nil
        // Never started: it answers incidents from the board, as a standby's does.
        self.correlation = CorrelationService(configuration: engine, archive: board, logger: logger)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, System.coreCount))
        var chLogger = logger
        chLogger[metadataKey: "clickhouse"] = "\(settings.clickhouse.scheme)://\(settings.clickhouseHost):\(settings.clickhousePort)"
        self.store = try ClickHouseEventStore(client: ClickHouseClient(configuration: settings.clickhouse, group: group, logger: chLogger),
                                              table: settings.clickhouseTable)
    }

    // MARK: - Start and stop

    /// Binds /metrics and the query listener, then works in the background:
    /// creates the table, connects to NATS, mirrors the incidents, writes
    /// the stream to ClickHouse, drops old days.
    public func start() throws -> BoundAddresses {
        let closeGrace = configuration.limits.closeGrace
        let tls = try TLSReloader(files: configuration.tls, metrics: metrics, logger: logger) {
            try TapioServer.makeTLSContext($0, closeGrace: closeGrace)
        }
        state.withLock { $0.tls = tls }
        for (name, family) in Self.families where family.unlabelled && (family.kind == .counter) { metrics.add(name, 0) }
        for (name, family) in Self.families { for labels in family.initial { metrics.add(name + labels, 0) } }
        metrics.add("tapio_server_connection_errors_total", 0)
        for reason in MetricsCatalog.rejectReasons { metrics.add("tapio_server_connections_rejected_total{reason=\"\(reason)\"}", 0) }
        for method in MetricsCatalog.queryMethods { metrics.add("tapio_server_queries_total{method=\"\(method)\"}", 0) }
        queries.start()
        var metricsAddress: SocketAddress?
        do {
            if configuration.metricsHost != nil {
                let http = try MetricsHTTPHandler.bind(group: group, configuration: configuration, admission: admission, metrics: metrics, source: self)
                state.withLock { $0.http = http }
                metricsAddress = http.localAddress
            }
            let query = try bindQuery(tls: tls)
            state.withLock {
                $0.query = query
                $0.phase = .running
            }
            if let interval = operations.tlsReloadInterval { tls.start(interval: interval) }
            let task = Task { [self] in await run() }
            state.withLock { $0.tasks.append(task) }
            logger.info("tapio-server query replica listening", metadata: [
                "role": "query", "holder": "\(settings.holder)", "query": "\(query.localAddress!)",
                "metrics": "\(metricsAddress.map { "\($0)" } ?? "off")", "stream": "\(settings.nats.stream)",
                "clickhouse": "\(settings.clickhouse.scheme)://\(settings.clickhouseHost):\(settings.clickhousePort)", "table": "\(settings.clickhouseTable)",
                "nats": "\(settings.nats.servers.map { "\($0)" }.joined(separator: ","))",
            ])
            return BoundAddresses(query: query.localAddress!, metrics: metricsAddress)
        } catch {
            let channels = state.withLock { s in [s.query, s.http].compactMap { $0 } }
            for c in channels { try? c.close().wait() }
            throw error
        }
    }

    private func bindQuery(tls: TLSReloader) throws -> Channel {
        let limits = configuration.limits
        let logger = self.logger
        let policy = ConnectionPolicy(listener: .query, role: PeerIdentity.operatorRole, action: "query", limits: limits) { code, message in
            Frame(type: .queryResponse, payload: QueryResponse(status: code.rawValue, error: message).encoded())
        }
        let store = self.store
        let metrics = self.metrics
        let context = QueryContext(configuration: configuration, correlation: correlation, pods: pods, metrics: metrics, logger: logger,
                                   store: nil, registry: nil, role: "query",
                                   engineInactive: { "role query runs no correlation engine; ask the active correlate replica, which holds the service map and the pods" },
                                   eventSource: { query, attribute in
                                       do {
                                           return try Self.wait(seconds: 120) { try await store.answer(query, attribute: attribute) }
                                       } catch {
                                           metrics.add("tapio_query_clickhouse_failures_total{operation=\"events\"}")
                                           throw WireError(.storageFailed, "events from ClickHouse: \(error)")
                                       }
                                   })
        let subscriptions = self.subscriptions
        return try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 256)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self, metrics, queries] channel in
                guard admission.admit(channel, listener: .query, maxConnections: limits.maxQueryConnections, drain: true) else { return channel.close() }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([
                        NIOSSLServerHandler(context: tls.context),
                        ConnectionGuard(policy: policy, metrics: metrics, logger: logger),
                        ByteToMessageHandler(FrameDecoder(maximumPayload: min(limits.maxQueryFrameBytes, limits.maxFrameBytes))),
                        MessageToByteHandler(FrameEncoder()),
                        QueryHandler(server: context, queries: queries, subscriptions: subscriptions),
                    ])
                }
            }
            .bind(host: configuration.queryHost, port: configuration.queryPort).wait()
    }

    /// The answer of async work, on a thread that may block (the query
    /// thread); the attribution closure is used before it returns.
    private static func wait<T: Sendable>(seconds: Double, _ body: @escaping @Sendable () async throws -> T) throws -> T {
        let result = Mutex<Result<T, any Error>?>(nil)
        let done = DispatchSemaphore(value: 0)
        let task = Task {
            let r: Result<T, any Error>
            do { r = .success(try await body()) } catch { r = .failure(error) }
            result.withLock { $0 = r }
            done.signal()
        }
        guard done.wait(timeout: .now() + seconds) == .success else {
            task.cancel()
            throw WireError(.storageFailed, "no answer within \(Int(seconds)) s")
        }
        return try result.withLock { $0 }!.get()
    }

    /// Stops fetching (what was fetched and not acknowledged comes again to
    /// another replica), closes NATS, ClickHouse and the listeners.
    public func shutdown() {
        let (query, http, tls, tasks, phase) = state.withLock { s in
            let before = s.phase
            if s.phase != .stopped { s.phase = .shuttingDown }
            return (s.query, s.http, s.tls, s.tasks, before)
        }
        guard phase != .stopped else { return }
        _ = admission.stopAccepting()
        tls?.stop()
        try? query?.close().wait()
        for t in tasks { t.cancel() }
        let client = state.withLock { $0.client }
        let store = self.store
        _ = try? Self.wait(seconds: 15) {
            for t in tasks { await t.value }
            if let client { await client.close() }
            try? await store.client.shutdown()
        }
        try? queries.syncShutdownGracefully()
        try? http?.close().wait()
        try? group.syncShutdownGracefully()
        state.withLock { $0.phase = .stopped }
        logger.info("tapio-server query replica stopped")
    }

    private var stopping: Bool { state.withLock { $0.phase != .running } || Task.isCancelled }

    // MARK: - The background work

    private func note(_ problem: String, _ lastLogged: inout String) {
        state.withLock { $0.problem = problem }
        if problem != lastLogged {
            logger.warning("query replica not ready; retrying every second", metadata: ["reason": "\(problem)"])
            lastLogged = problem
        }
    }

    private func run() async {
        var lastLogged = ""
        while !state.withLock({ $0.tableReady }) {
            if stopping { return }
            do {
                try await store.createIfMissing()
                state.withLock { $0.tableReady = true }
                logger.info("ClickHouse table ready", metadata: ["table": "\(settings.clickhouseTable)"])
            } catch {
                note("clickhouse: cannot create table \(settings.clickhouseTable): \(error)", &lastLogged)
                try? await Task.sleep(for: .seconds(1))
            }
        }
        var client: NATSClient?
        while client == nil {
            if stopping { return }
            do {
                var c = settings.nats.clientConfiguration
                c.name = "tapio-server query \(settings.holder)"
                client = try await NATSClient.connect(c, logger: logger)
            } catch {
                note("nats: cannot connect to NATS: \(error)", &lastLogged)
                try? await Task.sleep(for: .seconds(1))
            }
        }
        guard let client else { return }
        state.withLock {
            $0.client = client
            $0.problem = ""
        }
        let js = JetStream(client: client, timeout: settings.nats.publishTimeout)
        await ensureIncidentBucket(js)
        let mirror = IncidentMirror(bucket: settings.incidentBucket, board: board, metrics: metrics, logger: logger,
                                    malformedMetric: "tapio_query_malformed_messages_total", restartMetric: "tapio_query_consumer_restarts_total")
        let subscriptions = self.subscriptions
        let tasks = [
            Task { [self] in
                await mirror.run(js, stopping: { [self] in stopping }, caughtUp: { [self] in state.withLock { $0.mirrorCaughtUp = true } }) { incident, isNew in
                    subscriptions.publish([(try QueryIncident(stored: incident).summary, isNew, incident.status == "resolved")])
                }
            },
            Task { [self] in await followInventories(js) },
            Task { [self] in await retentionLoop() },
        ]
        state.withLock { $0.tasks += tasks }
        await write(js)
    }

    /// The incident bucket, made when no correlate replica made it yet (as
    /// that role makes it: `--nats-replicas`), so a query replica serves an
    /// empty incident list instead of waiting; an existing one is left as it is.
    private func ensureIncidentBucket(_ js: JetStream) async {
        do {
            _ = try await js.streamInfo("KV_\(settings.incidentBucket)")
            return
        } catch let e as JetStreamError where e.errorCode == 10059 || e.code == 404 {
        } catch {
            return  // the mirror retries and says why
        }
        var c = KeyValueConfiguration(bucket: settings.incidentBucket)
        c.replicas = settings.nats.replicas
        do {
            _ = try await js.createKeyValue(c)
            logger.info("incident bucket created (no correlate replica had made it yet)", metadata: ["bucket": "\(settings.incidentBucket)"])
        } catch {
            logger.warning("cannot create the incident bucket; waiting for a correlate replica to make it", metadata: ["bucket": "\(settings.incidentBucket)", "error": "\(error)"])
        }
    }

    // MARK: Writing the stream to ClickHouse

    /// Fetches batches through the shared durable consumer, writes each
    /// fetch's batches in one INSERT, and acknowledges them after ClickHouse
    /// accepted it. When ClickHouse refuses, the messages are not
    /// acknowledged (nak: delivered again at once, to any replica) and the
    /// writer waits a second. A message that cannot be read is counted,
    /// logged and acknowledged (it would never read better).
    private func write(_ js: JetStream) async {
        let stream = settings.nats.stream
        let durable = settings.durableName
        var created = false
        var lastError = ""
        while !stopping {
            if !created {
                do {
                    var c = ConsumerConfiguration(durableName: durable)
                    c.ackPolicy = .explicit
                    c.ackWait = settings.ackWait
                    c.deliverPolicy = .all
                    c.filterSubject = StreamedBatch.subjectPrefix + ".>"
                    c.maxAckPending = 20_000
                    try await js.createConsumer(stream: stream, c)
                    created = true
                    lastError = ""
                    state.withLock { $0.consumerReady = true }
                    logger.info("writing the stream to ClickHouse", metadata: ["stream": "\(stream)", "consumer": "\(durable)"])
                } catch {
                    if "\(error)" != lastError {
                        logger.warning("cannot consume the stream; retrying every second", metadata: ["stream": "\(stream)", "consumer": "\(durable)", "error": "\(error)"])
                        lastError = "\(error)"
                    }
                    state.withLock { $0.problem = "nats: cannot consume stream \(stream) (consumer \(durable)): \(error)" }
                    try? await Task.sleep(for: .seconds(1))
                    continue
                }
                state.withLock { $0.problem = "" }
            }
            let messages: [JetStreamMessage]
            do {
                messages = try await js.fetch(stream: stream, consumer: durable, batch: settings.fetchBatch, expires: .milliseconds(500))
            } catch {
                if stopping { return }
                metrics.add("tapio_query_consumer_restarts_total")
                logger.warning("fetching from the stream failed; taking the consumer up again", metadata: ["error": "\(error)"])
                created = false
                try? await Task.sleep(for: .milliseconds(250))
                continue
            }
            guard !messages.isEmpty else { continue }
            metrics.set("tapio_query_stream_pending", Int64(clamping: messages.last!.pending))
            var batches: [ClickHouseEventStore.Batch] = []
            var good: [JetStreamMessage] = []
            for m in messages {
                do {
                    let (message, batch) = try StreamedBatch.read(headers: m.headers ?? NATSHeaders(), payload: Array(m.payload.readableBytesView),
                                                                   maxEvents: configuration.limits.maxBatchEvents)
                    guard m.subject == message.subject else { throw WireError(.malformed, "a batch of node \(message.node) on subject \(m.subject)") }
                    batches.append(ClickHouseEventStore.Batch(batch, clock: message.clock))
                    good.append(m)
                } catch {
                    metrics.add("tapio_query_malformed_messages_total")
                    logger.warning("a message of the stream cannot be read; acknowledged and skipped", metadata: [
                        "subject": "\(m.subject)", "stream_sequence": "\(m.streamSequence)", "error": "\(error)"])
                    try? await js.ack(m, confirm: false)
                }
            }
            guard !good.isEmpty else { continue }
            do {
                let rows = try await store.write(batches)
                for m in good { try? await js.ack(m, confirm: false) }
                try? await js.client.flush()
                metrics.add("tapio_query_batches_written_total", Int64(good.count))
                metrics.add("tapio_query_events_written_total", Int64(rows))
                if !state.withLock({ $0.writeProblem.isEmpty }) {
                    logger.notice("ClickHouse accepts inserts again")
                    state.withLock { $0.writeProblem = "" }
                }
            } catch {
                metrics.add("tapio_query_insert_failures_total")
                let first = state.withLock { s -> Bool in
                    defer { s.writeProblem = "\(error)" }
                    return s.writeProblem != "\(error)"
                }
                if first {
                    logger.error("ClickHouse did not accept an insert; the batches are not acknowledged and come again", metadata: [
                        "batches": "\(good.count)", "error": "\(error)"])
                }
                for m in good { try? await js.nak(m) }
                try? await Task.sleep(for: .seconds(1))
            }
        }
    }

    // MARK: Inventories (for the events' peers and the service filter)

    /// Every node's newest pod inventory, then new ones: an ephemeral
    /// consumer of this replica's own over `tapio.inventory.>`, starting at
    /// the last message of every subject.
    private func followInventories(_ js: JetStream) async {
        let stream = settings.nats.stream
        let prefix = StreamedBatch.inventoryPrefix + "."
        var from = ConsumerConfiguration.DeliverPolicy.lastPerSubject
        var consumer: String?
        while !stopping {
            do {
                if consumer == nil {
                    consumer = try await js.createEphemeralConsumer(stream: stream, .ephemeral(deliver: from, ack: .none, filterSubject: prefix + ">",
                                                                                                   inactiveThreshold: .seconds(60))).name
                }
                for m in try await js.fetch(stream: stream, consumer: consumer!, batch: 256, expires: .milliseconds(500)) {
                    from = .startSequence(m.streamSequence + 1)
                    do {
                        guard let node = String(m.subject.dropFirst(prefix.count)).removingPercentEncoding, !node.isEmpty else {
                            throw WireError(.malformed, "no node in subject \(m.subject)")
                        }
                        let pods = try Inventory.decode(Array(m.payload.readableBytesView)).pods.map { p -> PodInfo in
                            var p = p
                            p.node = node
                            return p
                        }
                        _ = self.pods.replace(node: node, pods: pods)
                    } catch {
                        metrics.add("tapio_query_malformed_messages_total")
                        logger.warning("an inventory of the stream cannot be read; skipped", metadata: [
                            "subject": "\(m.subject)", "stream_sequence": "\(m.streamSequence)", "error": "\(error)"])
                    }
                }
            } catch {
                if stopping { return }
                metrics.add("tapio_query_consumer_restarts_total")
                logger.warning("reading the inventories failed; reading again from the next one", metadata: ["error": "\(error)"])
                consumer = nil
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
    }

    // MARK: Retention

    private func retentionLoop() async {
        guard let retention = settings.retention else { return }
        while !stopping {
            do {
                let dropped = try await store.dropDays(olderThan: retention, nowNs: wallClockNs())
                for day in dropped {
                    logger.notice("retention dropped a day of events from ClickHouse", metadata: ["day": "\(day.day)", "events": "\(day.events)"])
                    metrics.add("tapio_query_retention_partitions_dropped_total")
                    metrics.add("tapio_query_retention_events_dropped_total", day.events)
                }
            } catch {
                metrics.add("tapio_query_clickhouse_failures_total{operation=\"retention\"}")
                logger.warning("retention could not drop old days from ClickHouse; tried again at the next interval", metadata: ["error": "\(error)"])
            }
            try? await Task.sleep(for: settings.retentionInterval)
        }
    }

    // MARK: - Health

    /// Why the replica should not answer queries now, nil when it should.
    public var notReadyReason: String? {
        state.withLock { s -> String? in
            if s.phase != .running { return s.phase.rawValue }
            if !s.tableReady { return s.problem }
            guard let client = s.client else { return s.problem }
            if client.connectedServer == nil { return "nats: reconnecting\(client.lastError.map { " (lost: \($0))" } ?? "")" }
            if !s.consumerReady { return s.problem.isEmpty ? "nats: making the stream's consumer" : s.problem }
            if !s.mirrorCaughtUp { return "reading the incident bucket \(settings.incidentBucket)" }
            return nil
        }
    }

    private var roleLine: String {
        "role: query (\(settings.holder)), stream \(settings.nats.stream) consumer \(settings.durableName), clickhouse \(settings.clickhouse.scheme)://\(settings.clickhouseHost):\(settings.clickhousePort) table \(settings.clickhouseTable)"
    }
}

extension QueryReplica: HTTPStatusSource {
    func healthReport() -> ServerHealth.Report {
        let (phase, client, problem, writeProblem) = state.withLock { ($0.phase, $0.client, $0.problem, $0.writeProblem) }
        let nats = client?.connectedServer.map { "nats: ok (\($0))" } ?? "nats: not connected"
        let clickhouse = writeProblem.isEmpty ? "clickhouse: ok" : "clickhouse: the last insert failed: \(writeProblem)"
        return ServerHealth.Report(ok: phase == .running || phase == .shuttingDown, lines: [roleLine, nats, clickhouse] + (problem.isEmpty ? [] : [problem]))
    }

    /// Ready (a Service may send operators' queries here) once the table
    /// exists, NATS is connected, the consumer is made and the incident
    /// bucket was read to its end.
    func readinessReport() -> ServerHealth.Report {
        if let why = notReadyReason { return ServerHealth.Report(ok: false, lines: [roleLine, why]) }
        return ServerHealth.Report(ok: true, lines: [roleLine])
    }

    public func metricsText() -> String {
        var byName: [String: [MetricsText.Sample]] = [:]
        for (key, value) in metrics.all() {
            let name = key.split(separator: "{", maxSplits: 1).first.map(String.init) ?? key
            byName[name, default: []].append(.init(rawLabels: String(key.dropFirst(name.count)), value))
        }
        let client = state.withLock { $0.client }
        byName["tapio_query_incidents"] = [.init([], Int64(board.count))]
        if byName["tapio_query_stream_pending"] == nil { byName["tapio_query_stream_pending"] = [.init([], 0)] }
        let open = admission.openByListener
        byName["tapio_server_connections"] = [.init([], admission.drainingCount)]
        byName["tapio_server_listener_connections"] = [Listener.query, .metrics].map { .init([("listener", $0.rawValue)], open[$0] ?? 0) }
        byName["tapio_server_healthy"] = [.init([], healthReport().ok ? 1 : 0)]
        byName["tapio_server_ready"] = [.init([], readinessReport().ok ? 1 : 0)]
        byName["tapio_server_build_info"] = [.init([("version", TapioServer.version)], 1)]
        byName["tapio_server_nats_connected"] = [.init([], client?.connectedServer == nil ? 0 : 1)]
        byName["tapio_server_nats_reconnects_total"] = [.init([], client?.reconnectCount ?? 0)]
        var text = MetricsText()
        for name in byName.keys.sorted() {
            let family = Self.families[name] ?? MetricsCatalog.family(name)
            let samples = (byName[name] ?? []).sorted { $0.rawLabels + $0.labels.map { $0.1 }.joined() < $1.rawLabels + $1.labels.map { $0.1 }.joined() }
            text.add(name, family.kind, family.help, samples, unlabelled: family.unlabelled)
        }
        text.add("tapio_server_query_seconds", "Time to answer one query on the query thread.", histogram: metrics.histograms.query)
        text.addProcessMetrics()
        return text.text
    }
}
