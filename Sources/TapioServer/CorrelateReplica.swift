import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import TapioAlerting
import TapioCorrelation
import TapioNATS
import TapioQueryAPI
import TapioStore
import TapioWire

/// Where a correlate replica works (`tapio-server --role correlate`,
/// docs/scaling.md): the stream it consumes, the buckets of its lease, its
/// checkpoints and its incidents, and the timing of the lease.
public struct NATSCorrelateConfiguration: Sendable {
    /// The NATS servers, credentials, TLS, the events stream, and the
    /// replicas of the buckets this role creates (as of the stream).
    public var nats: NATSIngestConfiguration
    /// The lease: one key, the holder's name, renewed by compare-and-set.
    public var leaderBucket = "TAPIO_LEADER"
    public var leaseKey = "engine"
    /// The newest engine checkpoint (a manifest and its chunks).
    public var checkpointBucket = "TAPIO_ENGINE"
    /// The incidents as data, one key per incident id.
    public var incidentBucket = "TAPIO_INCIDENTS"
    /// A lease whose revision has not changed for this long (on the
    /// standby's own clock) is taken over; a leader that could not renew for
    /// this long stops.
    public var leaseTimeout: Duration = .seconds(5)
    /// How often the leader renews and a standby looks at the lease.
    public var renewInterval: Duration = .seconds(1)
    /// How often the leader writes a checkpoint (when the engine has moved).
    public var checkpointInterval: Duration = .seconds(10)
    /// This replica's name in the lease (unique per process).
    public var holder: String
    /// Checkpoint chunk size: below NATS's default `max_payload` (1 MiB).
    public var checkpointChunkBytes = 256 << 10

    public init(nats: NATSIngestConfiguration, holder: String) {
        self.nats = nats
        self.holder = holder
    }
}

/// The incidents a correlate replica knows, as the documents the engine
/// stores (`IncidentArchive`): on the leader, what its engine saved (each
/// save is also published to the incident bucket); on every replica, what it
/// read from the bucket. Queries read incidents the engine does not hold
/// (all of them on a standby) from here.
final class IncidentBoard: IncidentArchive {
    private let entries = Mutex<[String: StoredIncident]>([:])
    private let onSave = Mutex<(@Sendable (StoredIncident) -> Void)?>(nil)

    func saveIncident(_ incident: StoredIncident) throws {
        entries.withLock { $0[incident.id] = incident }
        onSave.withLock { $0 }?(incident)
    }

    func incidents() throws -> [StoredIncident] {
        entries.withLock { Array($0.values) }.sorted { ($0.openedNs, $0.id) < ($1.openedNs, $1.id) }
    }

    /// Every save from now on is handed to `body` too (the leader's publisher).
    func publishSaves(_ body: @escaping @Sendable (StoredIncident) -> Void) {
        onSave.withLock { $0 = body }
    }

    /// An incident read from the bucket; an older version than the board's
    /// (or the same) is ignored. Says whether it changed the board and
    /// whether the incident was new to it.
    @discardableResult
    func mirror(_ incident: StoredIncident) -> (changed: Bool, isNew: Bool) {
        entries.withLock { e in
            let have = e[incident.id]
            if let have, have.updatedNs >= incident.updatedNs { return (false, false) }
            e[incident.id] = incident
            return (true, have == nil)
        }
    }

    var count: Int { entries.withLock { $0.count } }

    /// The bucket's value: the stored document with its id, status and times.
    static func encode(_ i: StoredIncident) -> [UInt8] {
        let document = (try? JSONValue.parse(Array(i.json.utf8))) ?? .string(i.json)
        return Array(JSONValue.object(["id": .string(i.id), "status": .string(i.status), "opened_ns": .int(i.openedNs),
                                       "updated_ns": .int(i.updatedNs), "incident": document]).serialized().utf8)
    }

    static func decode(_ bytes: [UInt8]) throws -> StoredIncident {
        let v = try JSONValue.parse(bytes)
        guard let id = v["id"]?.stringValue, let status = v["status"]?.stringValue, let opened = v["opened_ns"]?.intValue,
              let updated = v["updated_ns"]?.intValue, let document = v["incident"] else {
            throw WireError(.malformed, "an incident in the bucket without id, status, opened_ns, updated_ns and incident")
        }
        return StoredIncident(id: id, status: status, openedNs: opened, updatedNs: updated, json: document.stringValue ?? document.serialized())
    }
}

/// (node, epoch, sequence) of the batches the engine took, so a batch the
/// stream holds twice (resent after the duplicate window) is taken once:
/// per (node, epoch) the contiguous prefix and the sequences above it.
struct SeenBatches {
    private var seen: [String: (floor: UInt64, above: Set<UInt64>)] = [:]

    /// False when the batch was seen before.
    mutating func insert(node: String, epoch: UInt64, sequence: UInt64) -> Bool {
        let key = "\(node)/\(epoch)"
        var s = seen[key] ?? (0, [])
        if sequence <= s.floor || s.above.contains(sequence) { return false }
        s.above.insert(sequence)
        while s.above.remove(s.floor + 1) != nil { s.floor += 1 }
        seen[key] = s
        return true
    }
}

/// `tapio-server --role correlate`: the correlation engine on the JetStream
/// stream the ingest replicas fill. One replica is active (it holds the
/// lease in the KV bucket `TAPIO_LEADER`), the others stand by. The active
/// one loads the newest checkpoint, consumes the stream from the sequence
/// after it, decodes each message into the events role `all` gives its
/// engine (`StreamedBatch.read`, `CorrelationService.observed`), runs the
/// engine, writes a checkpoint with the stream sequence it covers every
/// `checkpointInterval`, and publishes every incident the engine saves to
/// the KV bucket `TAPIO_INCIDENTS`. Every replica mirrors that bucket and
/// answers queries: the active one from its engine, a standby from the
/// mirror. A standby takes the lease when it has not been renewed for
/// `leaseTimeout`. A leader whose renewal is refused (another holder) stops
/// the process (`onLostLease`; the Deployment starts it again as a
/// standby); one that cannot renew (NATS unreachable) publishes no incident
/// and writes no checkpoint past the lease timeout until a renewal goes
/// through, so a replaced leader does not overwrite its successor.
public final class CorrelateReplica: Sendable {
    public let configuration: ServerConfiguration
    public let settings: NATSCorrelateConfiguration
    public let metrics: ServerMetrics
    public let operations: ServerConfiguration.Operations
    let correlation: CorrelationService
    let board = IncidentBoard()
    let pods = PodDirectory(restoring: [])
    /// Query connections that subscribed: told the engine's changes on the
    /// leader, the incident bucket's on a standby.
    private let subscriptions = QuerySubscriptions()
    private let admission: ConnectionAdmission
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let queries = NIOThreadPool(numberOfThreads: 1)
    private let state = Mutex(RunState())
    /// Incidents saved by the engine and not yet in the bucket, by id.
    private let unpublished = Mutex<[String: StoredIncident]>([:])
    private let onLostLease: @Sendable (String) -> Void
    /// Incident notifications (`--alertmanager`, `--webhook`,
    /// `--otlp-endpoint`): sent by the leader only, made when it takes the lease.
    private let alerts = Mutex<AlertNotifier?>(nil)

    private struct RunState {
        var phase = Phase.starting
        var client: NATSClient?
        /// What stands in the way of serving, for /readyz ("" when nothing).
        var problem = "connecting to NATS"
        var bucketsReady = false
        var leader = false
        var leaderSinceNs: Int64 = 0
        var leaseRevision: UInt64 = 0
        /// Monotonic ns until which the lease is surely this replica's: the
        /// start of its last successful write plus the lease timeout (a
        /// standby starts counting later than that). Past it, the leader
        /// publishes no incident and writes no checkpoint.
        var leaseValidUntilNs: Int64 = 0
        /// The holder of the lease as a standby last saw it.
        var otherHolder: String?
        var mirrorCaughtUp = false
        var engineRunning = false
        var checkpointSequence: Int64 = 0
        var nextSlot = "a"
        var tasks: [Task<Void, Never>] = []
        var http: Channel?
        var query: Channel?
        var tls: TLSReloader?
    }

    enum Phase: String {
        case starting = "starting"
        case running = "running"
        case shuttingDown = "shutting down"
        case stopped = "stopped"
    }

    public struct BoundAddresses: Sendable {
        public var query: SocketAddress
        public var metrics: SocketAddress?
    }

    /// The metric families of this role (docs/operations.md, "Metrics of the correlate role").
    static let families: [String: MetricsCatalog.Family] = [
        "tapio_correlate_leader": .init(kind: .gauge, help: "1 while this replica holds the engine lease and runs the engine; 0 while it stands by.", unlabelled: true),
        "tapio_correlate_leases_taken_total": .init(kind: .counter, help: "Times this replica took the engine lease (created it, or took it from a holder that released it or stopped renewing).", unlabelled: true),
        "tapio_correlate_stream_sequence": .init(kind: .gauge, help: "Stream sequence of the last message the engine took (0 on a standby).", unlabelled: true),
        "tapio_correlate_stream_pending": .init(kind: .gauge, help: "Messages of the stream after the last one fetched, as the consumer last said.", unlabelled: true),
        "tapio_correlate_batches_total": .init(kind: .counter, help: "Batches taken from the stream and given to the engine.", unlabelled: true),
        "tapio_correlate_duplicate_batches_total": .init(kind: .counter, help: "Batches the stream held again (resent after its duplicate window), skipped.", unlabelled: true),
        "tapio_correlate_events_total": .init(kind: .counter, help: "Events given to the engine.", unlabelled: true),
        "tapio_correlate_events_future_total": .init(kind: .counter, help: "Events dated more than the allowed skew after their batch arrived: not correlated.", unlabelled: true),
        "tapio_correlate_malformed_messages_total": .init(kind: .counter, help: "Messages of the stream that could not be read as a batch or an inventory: counted, logged and skipped.", unlabelled: true),
        "tapio_correlate_consumer_restarts_total": .init(kind: .counter, help: "Times a consumer (of the stream or of the incident bucket) was made again: a fetch failed, or messages were lost on the way.", unlabelled: true),
        "tapio_correlate_checkpoints_total": .init(kind: .counter, help: "Engine checkpoints written to JetStream, by result.", unlabelled: false,
                                                  initial: ["{result=\"written\"}", "{result=\"failed\"}"]),
        "tapio_correlate_checkpoint_sequence": .init(kind: .gauge, help: "Stream sequence the newest checkpoint this replica wrote or loaded covers.", unlabelled: true),
        "tapio_correlate_checkpoint_bytes": .init(kind: .gauge, help: "Size of the newest checkpoint this replica wrote or loaded.", unlabelled: true),
        "tapio_correlate_incidents": .init(kind: .gauge, help: "Incidents this replica knows (its engine's saves and the incident bucket).", unlabelled: true),
        "tapio_correlate_incident_publish_failures_total": .init(kind: .counter, help: "Incident publishes to the incident bucket that failed (retried).", unlabelled: true),
        "tapio_server_ready": .init(kind: .gauge, help: "1 while /readyz answers 200 (NATS connected, buckets ready; the engine running, or the incident mirror caught up).", unlabelled: true),
        "tapio_server_healthy": .init(kind: .gauge, help: "1 while /healthz answers 200 (the replica runs).", unlabelled: true),
        "tapio_server_nats_connected": .init(kind: .gauge, help: "1 while the replica has a NATS connection.", unlabelled: true),
        "tapio_server_nats_reconnects_total": .init(kind: .counter, help: "NATS connections made after the first (another server of the list, or the same again).", unlabelled: true),
    ]

    public init(configuration: ServerConfiguration, settings: NATSCorrelateConfiguration, operations: ServerConfiguration.Operations = .init(),
                logger: Logger, onLostLease: @escaping @Sendable (String) -> Void) {
        self.configuration = configuration
        self.settings = settings
        self.logger = logger
        self.onLostLease = onLostLease
        self.operations = operations
        let metrics = ServerMetrics()
        self.metrics = metrics
        self.admission = ConnectionAdmission(metrics: metrics)
        var engine = configuration.correlation
        engine.checkpointPath = nil  // checkpoints go to JetStream
        self.correlation = CorrelationService(configuration: engine, archive: board, logger: logger)
        self.group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, System.coreCount))
    }

    // MARK: - Start and stop

    /// Binds /metrics and the query listener, then works in the background:
    /// connects to NATS, sets up the buckets, mirrors the incidents, and
    /// stands by or leads.
    public func start() throws -> BoundAddresses {
        let closeGrace = configuration.limits.closeGrace
        let tls = try TLSReloader(files: configuration.tls, metrics: metrics, logger: logger) {
            try TapioServer.makeTLSContext($0, closeGrace: closeGrace)
        }
        state.withLock { $0.tls = tls }
        for (name, family) in Self.families where family.unlabelled && (family.kind == .counter) { metrics.add(name, 0) }
        for (name, family) in Self.families { for labels in family.initial { metrics.add(name + labels, 0) } }
        for name in ["tapio_server_connection_errors_total"] { metrics.add(name, 0) }
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
            logger.info("tapio-server correlate replica listening", metadata: [
                "role": "correlate", "holder": "\(settings.holder)", "query": "\(query.localAddress!)",
                "metrics": "\(metricsAddress.map { "\($0)" } ?? "off")", "stream": "\(settings.nats.stream)",
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
        let holder = settings.holder
        let context = QueryContext(configuration: configuration, correlation: correlation, pods: pods, metrics: metrics, logger: logger,
                                   store: nil, registry: nil, role: "correlate") { [self] in
            let (leader, other) = state.withLock { ($0.leader, $0.otherHolder) }
            return leader ? nil : "\(holder) is a standby; ask the active engine (\(other ?? "none seen yet")), which holds the service map and the pods"
        }
        let subscriptions = self.subscriptions
        correlation.observeChanges { subscriptions.publish($0) }
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

    /// Stops consuming; a leader lets its engine make a last pass, writes a
    /// last checkpoint, publishes what is left and releases the lease (a
    /// standby takes over at once); then closes NATS and the listeners.
    public func shutdown() {
        let (query, http, tls, tasks, wasLeader, phase) = state.withLock { s in
            let before = s.phase
            if s.phase != .stopped { s.phase = .shuttingDown }
            return (s.query, s.http, s.tls, s.tasks, s.leader, before)
        }
        guard phase != .stopped else { return }
        _ = admission.stopAccepting()
        tls?.stop()
        try? query?.close().wait()
        for t in tasks { t.cancel() }
        for t in tasks { waitFor { await t.value } }
        if wasLeader {
            correlation.stop()
            // After the engine's last pass, so its notifications are queued.
            alerts.withLock { $0 }?.shutdown()
            waitFor { [self] in
                await writeCheckpoint(final: true)
                await publishPending()
                await releaseLease()
            }
        }
        if let client = state.withLock({ $0.client }) { waitFor { await client.close() } }
        try? queries.syncShutdownGracefully()
        try? http?.close().wait()
        try? group.syncShutdownGracefully()
        state.withLock { $0.phase = .stopped }
        logger.info("tapio-server correlate replica stopped")
    }

    private func waitFor(seconds: Double = 10, _ body: @escaping @Sendable () async -> Void) {
        let done = DispatchSemaphore(value: 0)
        Task {
            await body()
            done.signal()
        }
        _ = done.wait(timeout: .now() + seconds)
    }

    private var stopping: Bool { state.withLock { $0.phase != .running } || Task.isCancelled }

    // MARK: - The background work

    private func note(_ problem: String, _ lastLogged: inout String) {
        state.withLock { $0.problem = problem }
        if problem != lastLogged {
            logger.warning("correlate replica not ready; retrying every second", metadata: ["reason": "\(problem)"])
            lastLogged = problem
        }
    }

    private func run() async {
        var lastLogged = ""
        var client: NATSClient?
        while client == nil {
            if stopping { return }
            do {
                var c = settings.nats.clientConfiguration
                c.name = "tapio-server correlate \(settings.holder)"
                client = try await NATSClient.connect(c, logger: logger)
            } catch {
                note("cannot connect to NATS: \(error)", &lastLogged)
                try? await Task.sleep(for: .seconds(1))
            }
        }
        guard let client else { return }
        state.withLock { $0.client = client }
        let js = JetStream(client: client, timeout: settings.nats.publishTimeout)
        var buckets: (lease: KeyValue, checkpoints: KeyValue, incidents: KeyValue)?
        while buckets == nil {
            if stopping { return }
            do {
                func bucket(_ name: String) async throws -> KeyValue {
                    var c = KeyValueConfiguration(bucket: name)
                    c.replicas = settings.nats.replicas
                    return try await js.createKeyValue(c)
                }
                buckets = (try await bucket(settings.leaderBucket), try await bucket(settings.checkpointBucket), try await bucket(settings.incidentBucket))
            } catch {
                note("cannot create the buckets \(settings.leaderBucket), \(settings.checkpointBucket), \(settings.incidentBucket): \(error)", &lastLogged)
                try? await Task.sleep(for: .seconds(1))
            }
        }
        guard let buckets else { return }
        state.withLock {
            $0.bucketsReady = true
            $0.problem = ""
        }
        logger.info("JetStream buckets ready", metadata: ["lease": "\(settings.leaderBucket)", "checkpoints": "\(settings.checkpointBucket)",
                                                         "incidents": "\(settings.incidentBucket)"])
        let mirror = Task { [self] in await mirrorIncidents(js) }
        state.withLock { $0.tasks.append(mirror) }
        await holdLease(buckets.lease, js: js, checkpoints: buckets.checkpoints, incidents: buckets.incidents)
    }

    /// The lease's value: who holds it, where it answers queries, when it was renewed.
    private func leaseValue(released: Bool = false) -> [UInt8] {
        Array(JSONValue.object([
            "holder": .string(released ? "" : settings.holder), "released_by": released ? .string(settings.holder) : .null,
            "query": .string("\(configuration.queryHost):\(configuration.queryPort)"), "renewed_at": .string(rfc3339(ns: wallClockNs())),
        ]).serialized().utf8)
    }

    /// Standby until the lease is free or expired, then leader; renews
    /// every `renewInterval` while leading.
    private func holdLease(_ lease: KeyValue, js: JetStream, checkpoints: KeyValue, incidents: KeyValue) async {
        let key = settings.leaseKey
        let timeoutNs = settings.leaseTimeout.nanosecondsValue
        var seenRevision: UInt64 = 0
        var seenSinceNs = monotonicNs()
        var lastError = ""
        func take(_ revision: UInt64, sentNs: Int64, _ why: String) {
            state.withLock { $0.leaseValidUntilNs = sentNs + timeoutNs }
            lead(revision: revision, took: why, js: js, checkpoints: checkpoints, incidents: incidents)
        }
        while !stopping {
            let (leader, revision) = state.withLock { ($0.leader, $0.leaseRevision) }
            let sentNs = monotonicNs()
            do {
                if leader {
                    let next = try await lease.update(key, leaseValue(), revision: revision)
                    state.withLock {
                        $0.leaseRevision = next
                        $0.leaseValidUntilNs = sentNs + timeoutNs
                    }
                } else if let entry = try await lease.get(key) {
                    let holder = (try? JSONValue.parse(entry.value))?["holder"]?.stringValue ?? ""
                    if holder == settings.holder {
                        // A takeover whose answer was lost had landed.
                        take(entry.revision, sentNs: sentNs, "this replica's own write was found in the lease")
                    } else {
                        if entry.revision != seenRevision {
                            seenRevision = entry.revision
                            seenSinceNs = monotonicNs()
                            state.withLock { $0.otherHolder = holder.isEmpty ? nil : holder }
                        }
                        // Released by a leader that stopped, or not renewed in time: take it.
                        if holder.isEmpty || monotonicNs() - seenSinceNs >= timeoutNs {
                            let taken = try await lease.update(key, leaseValue(), revision: entry.revision)
                            take(taken, sentNs: sentNs, holder.isEmpty ? "released" : "not renewed for \(settings.leaseTimeout) by \(holder)")
                        }
                    }
                } else {
                    let taken = try await lease.create(key, leaseValue())
                    take(taken, sentNs: sentNs, "no holder")
                }
                lastError = ""
            } catch let e as JetStreamError where e.errorCode == JetStreamError.wrongLastSequence {
                // A standby: another came first; it watches the new holder.
                // A leader: a renewal whose answer was lost may have landed, then the lease is still its own.
                if !leader {
                } else if let entry = try? await lease.get(key), (try? JSONValue.parse(entry.value))?["holder"]?.stringValue == settings.holder {
                    state.withLock {
                        $0.leaseRevision = entry.revision
                        $0.leaseValidUntilNs = sentNs + timeoutNs
                    }
                } else {
                    lost("another replica holds the engine lease now (renewal refused: \(e))")
                    return
                }
            } catch {
                if "\(error)" != lastError {
                    logger.warning(leader ? "engine lease not renewed: NATS did not answer; past the lease timeout nothing is published until it is"
                                          : "engine lease not read: NATS did not answer", metadata: ["error": "\(error)"])
                    lastError = "\(error)"
                }
                // A standby counts only time in which it saw the lease unchanged.
                if !leader { seenSinceNs = monotonicNs() }
            }
            try? await Task.sleep(for: settings.renewInterval)
        }
    }

    /// Whether this replica surely holds the lease now (see `leaseValidUntilNs`).
    private var leaseValid: Bool { state.withLock { $0.leader && monotonicNs() < $0.leaseValidUntilNs } }

    private func lost(_ why: String) {
        logger.critical("engine lease lost; stopping this replica so one engine runs (it starts again as a standby)", metadata: ["reason": "\(why)"])
        state.withLock { $0.leader = false }
        onLostLease(why)
    }

    /// Took the lease: the engine starts from the newest checkpoint and
    /// consumes the stream after it; checkpoints and incident publishes run
    /// beside it. In the background, so the lease is renewed meanwhile.
    private func lead(revision: UInt64, took why: String, js: JetStream, checkpoints: KeyValue, incidents: KeyValue) {
        state.withLock {
            $0.leader = true
            $0.leaseRevision = revision
            $0.leaderSinceNs = wallClockNs()
            $0.otherHolder = nil
        }
        metrics.add("tapio_correlate_leases_taken_total")
        logger.notice("took the engine lease; starting the engine", metadata: ["holder": "\(settings.holder)", "why": "\(why)", "revision": "\(revision)"])
        let task = Task { [self] in
            // The incidents published so far, so the engine's first pass
            // republishes none that has not changed (bounded: a mirror that
            // cannot catch up delays no takeover past 3 s).
            let deadline = monotonicNs() + 3_000_000_000
            while !state.withLock({ $0.mirrorCaughtUp }), monotonicNs() < deadline { try? await Task.sleep(for: .milliseconds(50)) }
            let started = monotonicNs()
            var from: ConsumerConfiguration.DeliverPolicy
            var loaded: (bytes: [UInt8], slot: String)?
            for attempt in 1...5 {
                do {
                    loaded = try await loadCheckpoint(checkpoints)
                    break
                } catch {
                    logger.warning("reading the engine checkpoint failed", metadata: ["attempt": "\(attempt)", "error": "\(error)"])
                    if attempt < 5 { try? await Task.sleep(for: .milliseconds(500)) }
                }
            }
            let replay = configuration.correlation.replayWindowNs
            if let loaded {
                do {
                    let position = try correlation.adopt(checkpoint: loaded.bytes, nowNs: wallClockNs())
                    from = .startSequence(UInt64(max(0, position)) + 1)
                    metrics.set("tapio_correlate_checkpoint_sequence", position)
                    metrics.set("tapio_correlate_checkpoint_bytes", Int64(loaded.bytes.count))
                    state.withLock {
                        $0.checkpointSequence = position
                        $0.nextSlot = loaded.slot == "a" ? "b" : "a"
                    }
                    logger.notice("engine restored from the checkpoint in JetStream", metadata: [
                        "stream_sequence": "\(position)", "bytes": "\(loaded.bytes.count)", "seconds": "\(Double(monotonicNs() - started) / 1e9)"])
                } catch {
                    logger.error("the engine checkpoint cannot be used; consuming the stream's last hour instead", metadata: ["error": "\(error)"])
                    try? correlation.restore(nowNs: wallClockNs())
                    from = .startTime(Date(timeIntervalSince1970: Double(wallClockNs() - replay) / 1e9))
                }
            } else {
                logger.notice("no engine checkpoint in JetStream; consuming the stream's last hour", metadata: ["bucket": "\(settings.checkpointBucket)"])
                try? correlation.restore(nowNs: wallClockNs())
                from = .startTime(Date(timeIntervalSince1970: Double(wallClockNs() - replay) / 1e9))
            }
            board.publishSaves { [self] incident in unpublished.withLock { $0[incident.id] = incident } }
            startAlerts()
            correlation.start()
            state.withLock { $0.engineRunning = true }
            let start = from
            await withTaskGroup(of: Void.self) { g in
                g.addTask { await self.consume(js, from: start) }
                g.addTask { await self.checkpointLoop(checkpoints) }
                g.addTask { await self.publishLoop(incidents) }
            }
        }
        state.withLock { $0.tasks.append(task) }
    }

    /// The leader's notifier, when receivers are configured. Incidents open
    /// in the adopted engine and in the bucket count as announced (the
    /// previous leader published each to the bucket in the pass that
    /// notified it), so a takeover notifies only what changes after it.
    private func startAlerts() {
        guard configuration.alerting.isEnabled else { return }
        do {
            let metrics = self.metrics
            let notifier = try AlertNotifier(configuration: configuration.alerting, logger: logger) { metrics.add($0, $1) }
            var open: [String: JSONValue] = [:]
            for s in (try? board.incidents()) ?? [] where s.status == "open" {
                if let json = try? JSONValue.parse(Array(s.json.utf8)) { open[s.id] = json }
            }
            for json in correlation.openIncidentsJSON() {
                if let id = json["id"]?.stringValue { open[id] = json }
            }
            notifier.start(restoring: Array(open.values))
            correlation.observeIncidents { notifier.incidentsChanged($0) }
            alerts.withLock { $0 = notifier }
        } catch {
            logger.error("incident notifications cannot start; the engine runs without them", metadata: ["error": "\(error)"])
        }
    }

    // MARK: Consuming the stream

    /// Fetches the stream from `from` through an ephemeral consumer without
    /// acknowledgements (the checkpoint is the durable position) and hands
    /// each message to the engine in stream order, each sequence once.
    ///
    /// Without acks, a message the server delivered to a pull request whose
    /// answer never arrived (the connection moved to another NATS server
    /// meanwhile) is not delivered again. So the order is checked: after the
    /// first message of a consumer, each must follow the one before; on a
    /// gap, or when the consumer says it delivered more than arrived, or when
    /// a fetch fails (its server went, it idled out), the consumer is made
    /// again from the first sequence not taken. A gap the stream really has
    /// (messages deleted) costs one such restart.
    private func consume(_ js: JetStream, from start: ConsumerConfiguration.DeliverPolicy) async {
        let stream = settings.nats.stream
        var from = start
        var consumer: String?
        var seen = SeenBatches()
        var lastError = ""
        var taken: UInt64 = 0
        if case .startSequence(let s) = start { taken = s > 0 ? s - 1 : 0 }
        var fresh = true
        var lastCheckNs = monotonicNs()
        func again(_ why: String, _ error: String = "") {
            metrics.add("tapio_correlate_consumer_restarts_total")
            logger.warning("consuming the stream again from the first sequence not taken", metadata: [
                "stream": "\(stream)", "from": "\(from)", "why": "\(why)", "error": "\(error)"])
            consumer = nil
            fresh = true
        }
        while !stopping {
            if consumer == nil {
                do {
                    // A minute without a pull before the server drops it: the engine's
                    // backpressure may hold the next fetch back for a while.
                    consumer = try await js.createEphemeralConsumer(stream: stream, .ephemeral(deliver: from, ack: .none, inactiveThreshold: .seconds(60))).name
                    logger.info("consuming the stream", metadata: ["stream": "\(stream)", "from": "\(from)", "consumer": "\(consumer!)"])
                    lastError = ""
                    lastCheckNs = monotonicNs()
                } catch {
                    if "\(error)" != lastError {
                        logger.warning("cannot consume the stream; retrying every second", metadata: ["stream": "\(stream)", "error": "\(error)"])
                        lastError = "\(error)"
                    }
                    state.withLock { $0.problem = "cannot consume stream \(stream): \(error)" }
                    try? await Task.sleep(for: .seconds(1))
                    continue
                }
                state.withLock { $0.problem = "" }
            }
            do {
                let messages = try await js.fetch(stream: stream, consumer: consumer!, batch: 256, expires: .milliseconds(500))
                for m in messages {
                    if !fresh, m.streamSequence != taken + 1 {
                        if m.streamSequence <= taken { continue }
                        again("sequence \(m.streamSequence) arrived after \(taken): the messages between were delivered to a pull request that was lost, or deleted")
                        break
                    }
                    fresh = false
                    await take(m, seen: &seen)
                    taken = m.streamSequence
                    from = .startSequence(taken + 1)
                }
                if let last = messages.last { metrics.set("tapio_correlate_stream_pending", Int64(clamping: last.pending)) }
                if consumer != nil, messages.isEmpty, monotonicNs() - lastCheckNs > 2_000_000_000 {
                    lastCheckNs = monotonicNs()
                    let info = try await js.consumerInfo(stream: stream, consumer: consumer!)
                    if info.delivered.streamSequence > taken {
                        again("the consumer delivered up to \(info.delivered.streamSequence), \(taken) arrived")
                    }
                }
            } catch {
                if stopping { return }
                again("a fetch failed", "\(error)")
                try? await Task.sleep(for: .milliseconds(250))
            }
        }
    }

    /// One message: a batch becomes the events role `all` gives its engine
    /// (placed with the clock correction of its headers, future events left
    /// out); an inventory replaces the node's pods. A message that cannot be
    /// read is counted, logged and skipped; the engine's position moves past
    /// it either way.
    private func take(_ m: JetStreamMessage, seen: inout SeenBatches) async {
        let sequence = Int64(clamping: m.streamSequence)
        let payload = Array(m.payload.readableBytesView)
        var events: [ObservedEvent] = []
        if m.subject.hasPrefix(StreamedBatch.subjectPrefix + ".") {
            do {
                let (message, batch) = try StreamedBatch.read(headers: m.headers ?? NATSHeaders(), payload: payload,
                                                               maxEvents: configuration.limits.maxBatchEvents)
                guard m.subject == message.subject else {
                    throw WireError(.malformed, "a batch of node \(message.node) on subject \(m.subject)")
                }
                if seen.insert(node: message.node, epoch: message.epoch, sequence: message.sequence) {
                    let (observed, future) = CorrelationService.observed(batch, clock: message.clock, receivedNs: message.receivedNs,
                                                                         maxFutureSkewNs: configuration.limits.maxFutureSkew.nanoseconds)
                    events = observed
                    metrics.add("tapio_correlate_batches_total")
                    metrics.add("tapio_correlate_events_total", Int64(observed.count))
                    if future > 0 { metrics.add("tapio_correlate_events_future_total", Int64(future)) }
                } else {
                    metrics.add("tapio_correlate_duplicate_batches_total")
                }
            } catch {
                malformed(m, error)
            }
        } else if m.subject.hasPrefix(StreamedBatch.inventoryPrefix + ".") {
            do {
                let token = String(m.subject.dropFirst(StreamedBatch.inventoryPrefix.count + 1))
                guard let node = token.removingPercentEncoding, !node.isEmpty else { throw WireError(.malformed, "no node in subject \(m.subject)") }
                let pods = try Inventory.decode(payload).pods.map { p -> PodInfo in
                    var p = p
                    p.node = node
                    return p
                }
                _ = self.pods.replace(node: node, pods: pods)
                correlation.updateInventory(node: node, pods: pods)
            } catch {
                malformed(m, error)
            }
            return
        } else {
            return
        }
        if !correlation.submit(events, batchId: max(1, sequence)) {
            await withCheckedContinuation { (c: CheckedContinuation<Void, Never>) in correlation.whenRoom { c.resume() } }
        }
    }

    private func malformed(_ m: JetStreamMessage, _ error: any Error) {
        metrics.add("tapio_correlate_malformed_messages_total")
        logger.warning("a message of the stream cannot be read; skipped", metadata: [
            "subject": "\(m.subject)", "stream_sequence": "\(m.streamSequence)", "error": "\(error)"])
    }

    // MARK: Checkpoints

    private func checkpointLoop(_ bucket: KeyValue) async {
        while !stopping {
            try? await Task.sleep(for: settings.checkpointInterval)
            if stopping { return }
            await writeCheckpoint(final: false, bucket: bucket)
        }
    }

    /// The engine's state with the stream sequence it covers, in chunks
    /// (`checkpoint-<slot>.<n>`), then the manifest (`checkpoint`) naming
    /// them: the manifest always names a complete set, as the two slots take
    /// turns. Skipped when the engine has not moved since the last one.
    private func writeCheckpoint(final: Bool, bucket: KeyValue? = nil) async {
        guard let kv = bucket ?? checkpointBucket() else { return }
        guard leaseValid else {
            logger.warning("engine checkpoint not written: the lease is not surely this replica's (not renewed within the lease timeout)")
            return
        }
        do {
            let (position, bytes) = try await correlation.checkpointBytes()
            let (last, slot) = state.withLock { ($0.checkpointSequence, $0.nextSlot) }
            guard position > last || (final && position > 0 && position != last) else { return }
            let started = monotonicNs()
            let size = settings.checkpointChunkBytes
            var chunks = 0
            for offset in stride(from: 0, to: bytes.count, by: size) {
                try await kv.put("checkpoint-\(slot).\(chunks)", bytes[offset..<min(bytes.count, offset + size)])
                chunks += 1
            }
            let manifest = JSONValue.object([
                "slot": .string(slot), "chunks": .int(Int64(chunks)), "bytes": .int(Int64(bytes.count)), "checksum": .string(Self.checksum(bytes)),
                "stream": .string(settings.nats.stream), "stream_sequence": .int(position), "holder": .string(settings.holder),
                "written_at": .string(rfc3339(ns: wallClockNs())),
            ])
            try await kv.put("checkpoint", Array(manifest.serialized().utf8))
            state.withLock {
                $0.checkpointSequence = position
                $0.nextSlot = slot == "a" ? "b" : "a"
            }
            metrics.add("tapio_correlate_checkpoints_total{result=\"written\"}")
            metrics.set("tapio_correlate_checkpoint_sequence", position)
            metrics.set("tapio_correlate_checkpoint_bytes", Int64(bytes.count))
            logger.info("engine checkpoint written to JetStream", metadata: [
                "stream_sequence": "\(position)", "bytes": "\(bytes.count)", "chunks": "\(chunks)", "slot": "\(slot)",
                "seconds": "\(Double(monotonicNs() - started) / 1e9)"])
        } catch {
            metrics.add("tapio_correlate_checkpoints_total{result=\"failed\"}")
            logger.error("engine checkpoint to JetStream failed; the next one is tried at the next interval", metadata: ["error": "\(error)"])
        }
    }

    private func checkpointBucket() -> KeyValue? {
        guard let client = state.withLock({ $0.client }) else { return nil }
        return try? KeyValue(jetStream: JetStream(client: client, timeout: settings.nats.publishTimeout), bucket: settings.checkpointBucket)
    }

    /// The newest checkpoint and the slot it is in; nil when none was written.
    private func loadCheckpoint(_ kv: KeyValue) async throws -> (bytes: [UInt8], slot: String)? {
        guard let entry = try await kv.get("checkpoint") else { return nil }
        let m = try JSONValue.parse(entry.value)
        guard let slot = m["slot"]?.stringValue, let chunks = m["chunks"]?.intValue, let size = m["bytes"]?.intValue,
              let checksum = m["checksum"]?.stringValue, chunks >= 0 else {
            throw WireError(.malformed, "checkpoint manifest without slot, chunks, bytes and checksum: \(String(decoding: entry.value.prefix(200), as: UTF8.self))")
        }
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Int(clamping: size))
        for n in 0..<Int(chunks) {
            guard let chunk = try await kv.get("checkpoint-\(slot).\(n)") else { throw WireError(.malformed, "checkpoint chunk \(slot).\(n) is missing") }
            bytes += chunk.value
        }
        guard bytes.count == size, Self.checksum(bytes) == checksum else {
            throw WireError(.malformed, "checkpoint chunks of slot \(slot) do not match their manifest (\(bytes.count) of \(size) bytes, or another checksum)")
        }
        return (bytes, slot)
    }

    /// FNV-1a, 64 bits, in hex: says the chunks are the ones the manifest was written with.
    static func checksum(_ bytes: [UInt8]) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes {
            h ^= UInt64(b)
            h = h &* 0x100_0000_01b3
        }
        return String(h, radix: 16)
    }

    // MARK: Incidents

    /// Publishes what the engine saved to the incident bucket, newest
    /// version of each incident only; a failed put is counted and retried.
    private func publishLoop(_ kv: KeyValue) async {
        while !stopping {
            if await publishPending(kv) == 0 { try? await Task.sleep(for: .milliseconds(100)) }
        }
    }

    @discardableResult
    private func publishPending(_ bucket: KeyValue? = nil) async -> Int {
        guard let kv = bucket ?? incidentBucketHandle(), leaseValid else { return 0 }
        let batch = unpublished.withLock { u -> [StoredIncident] in
            defer { u.removeAll() }
            return Array(u.values)
        }
        for incident in batch {
            do {
                try await kv.put(incident.id, IncidentBoard.encode(incident))
            } catch {
                metrics.add("tapio_correlate_incident_publish_failures_total")
                logger.warning("publishing an incident to the bucket failed; retried", metadata: ["incident": "\(incident.id)", "error": "\(error)"])
                unpublished.withLock { u in if u[incident.id] == nil { u[incident.id] = incident } }
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
        return batch.count
    }

    private func incidentBucketHandle() -> KeyValue? {
        guard let client = state.withLock({ $0.client }) else { return nil }
        return try? KeyValue(jetStream: JetStream(client: client, timeout: settings.nats.publishTimeout), bucket: settings.incidentBucket)
    }

    /// Reads the incident bucket into the board (`IncidentMirror`); a
    /// standby's subscribers hear each incident that arrives new or changed
    /// (the leader's hear its engine).
    private func mirrorIncidents(_ js: JetStream) async {
        let mirror = IncidentMirror(bucket: settings.incidentBucket, board: board, metrics: metrics, logger: logger,
                                    malformedMetric: "tapio_correlate_malformed_messages_total", restartMetric: "tapio_correlate_consumer_restarts_total")
        await mirror.run(js, stopping: { [self] in stopping }, caughtUp: { [self] in state.withLock { $0.mirrorCaughtUp = true } }) { [self] incident, isNew in
            guard !state.withLock({ $0.leader }) else { return }
            subscriptions.publish([(try QueryIncident(stored: incident).summary, isNew, incident.status == "resolved")])
        }
    }

    /// A leader that stops hands the lease on at once: a standby that sees
    /// no holder takes it without waiting for the lease to expire.
    private func releaseLease() async {
        guard let client = state.withLock({ $0.client }) else { return }
        let revision = state.withLock { $0.leaseRevision }
        do {
            let kv = try KeyValue(jetStream: JetStream(client: client, timeout: settings.nats.publishTimeout), bucket: settings.leaderBucket)
            try await kv.update(settings.leaseKey, leaseValue(released: true), revision: revision)
            logger.notice("engine lease released", metadata: ["holder": "\(settings.holder)"])
        } catch {
            logger.warning("engine lease not released (a standby takes it when it expires)", metadata: ["error": "\(error)"])
        }
        state.withLock { $0.leader = false }
    }

    // MARK: - Health

    public var isLeader: Bool { state.withLock { $0.leader } }

    /// Why the replica should not answer queries now, nil when it should.
    public var notReadyReason: String? {
        state.withLock { s -> String? in
            if s.phase != .running { return s.phase.rawValue }
            guard let client = s.client, s.bucketsReady else { return "nats: \(s.problem)" }
            if client.connectedServer == nil { return "nats: reconnecting\(client.lastError.map { " (lost: \($0))" } ?? "")" }
            if s.leader, !s.engineRunning { return "leader: restoring the engine from its checkpoint" }
            if !s.leader, !s.mirrorCaughtUp { return "standby: reading the incident bucket" }
            return nil
        }
    }

    private var roleLine: String {
        state.withLock { s in
            s.leader
                ? "role: correlate, leader (\(settings.holder), since \(rfc3339(ns: s.leaderSinceNs))), stream \(settings.nats.stream) at sequence \(correlation.logPosition)"
                : "role: correlate, standby (\(settings.holder); leader: \(s.otherHolder ?? "none seen yet"))"
        }
    }
}

extension CorrelateReplica: HTTPStatusSource {
    func healthReport() -> ServerHealth.Report {
        let (phase, client, problem) = state.withLock { ($0.phase, $0.client, $0.problem) }
        let nats = client?.connectedServer.map { "nats: ok (\($0))" } ?? "nats: not connected"
        return ServerHealth.Report(ok: phase == .running || phase == .shuttingDown, lines: [roleLine, nats] + (problem.isEmpty ? [] : [problem]))
    }

    /// Ready (a Service may send operators' queries here) while connected
    /// and either leading with the engine running or standing by with the
    /// incident mirror caught up.
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
        let (leader, client) = state.withLock { ($0.leader, $0.client) }
        byName["tapio_correlate_leader"] = [.init([], leader ? 1 : 0)]
        byName["tapio_correlate_stream_sequence"] = [.init([], leader ? correlation.logPosition : 0)]
        byName["tapio_correlate_incidents"] = [.init([], Int64(board.count))]
        for name in ["tapio_correlate_stream_pending", "tapio_correlate_checkpoint_sequence", "tapio_correlate_checkpoint_bytes"] where byName[name] == nil {
            byName[name] = [.init([], 0)]
        }
        let open = admission.openByListener
        byName["tapio_server_connections"] = [.init([], admission.drainingCount)]
        byName["tapio_server_listener_connections"] = [Listener.query, .metrics].map { .init([("listener", $0.rawValue)], open[$0] ?? 0) }
        byName["tapio_server_healthy"] = [.init([], healthReport().ok ? 1 : 0)]
        byName["tapio_server_ready"] = [.init([], readinessReport().ok ? 1 : 0)]
        byName["tapio_server_build_info"] = [.init([("version", TapioServer.version)], 1)]
        byName["tapio_server_nats_connected"] = [.init([], client?.connectedServer == nil ? 0 : 1)]
        byName["tapio_server_nats_reconnects_total"] = [.init([], client?.reconnectCount ?? 0)]
        let causes = correlation.openIncidentsByRootCause
        byName["tapio_server_incidents_open"] = (CauseKind.allCases.map(\.rawValue) + ["unknown"]).map { .init([("root_cause_kind", $0)], causes[$0] ?? 0) }
        for (name, value) in correlation.metricValues { byName[name] = [.init([], value)] }
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

extension Duration {
    var nanosecondsValue: Int64 {
        let (s, a) = components
        return s * 1_000_000_000 + a / 1_000_000_000
    }
}
