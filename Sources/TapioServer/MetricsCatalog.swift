import Glibc
import TapioCorrelation
import TapioStore
import TapioWire

/// Every metric family the server exposes: its type, its help text (what
/// `# HELP` says; docs/operations.md has the same table, and a test holds the
/// two together), whether it has an unlabelled series that exists from the
/// start (a counter at 0 before its first increment), and the label sets a
/// labelled counter is written with from the start. `TapioServer.metricsText()`
/// writes only families listed here; a name missing from the catalog is
/// written with a help text saying so, and a test fails on it.
enum MetricsCatalog {
    struct Family {
        var kind: MetricsText.Kind
        var help: String
        var unlabelled: Bool
        /// Label sets written at 0 until counted, as `ServerMetrics` keys them (`{reason="idle"}`).
        var initial: [String] = []
    }

    /// Why the server closes a connection (`tapio_server_connections_rejected_total{reason}`).
    static let rejectReasons = ["bad_header", "forbidden", "frame_timeout", "handshake_timeout", "hello_timeout", "identity", "idle",
                                "malformed", "metrics_timeout", "peer_limit", "protocol", "storage", "too_large"]
    /// Query methods answered today (a method added later appears at its first query).
    static let queryMethods = ["events", "explain", "incidents", "nodes", "pods", "services", "timeline"]

    static let families: [String: Family] = [
        "tapio_server_hellos_total": .init(kind: .counter, help: "Agent hellos accepted.", unlabelled: true),
        "tapio_server_batches_total": .init(kind: .counter, help: "Batches stored and acknowledged.", unlabelled: true),
        "tapio_server_duplicate_batches_total": .init(kind: .counter, help: "Batches received again (already stored) and acknowledged.", unlabelled: true),
        "tapio_server_events_total": .init(kind: .counter, help: "Events stored.", unlabelled: true),
        "tapio_server_events_future_total": .init(kind: .counter, help: "Events dated more than the allowed skew after their batch arrived: stored, not correlated.", unlabelled: true),
        "tapio_server_engine_backpressure_total": .init(kind: .counter, help: "Times a connection stopped being read because the correlation engine's queue was full.", unlabelled: true),
        "tapio_server_pod_address_conflicts": .init(kind: .gauge, help: "Pod addresses that pods of more than one node claim, left unattributed.", unlabelled: true),
        "tapio_server_queries_total": .init(kind: .counter, help: "Queries answered, by method.", unlabelled: false,
                                            initial: queryMethods.map { "{method=\"\($0)\"}" }),
        "tapio_server_connection_errors_total": .init(kind: .counter, help: "Connections closed by a TLS or socket error.", unlabelled: true),
        "tapio_server_connections_rejected_total": .init(kind: .counter, help: "Connections the server closed, by reason (and listener for the connection limit).", unlabelled: false,
                                                         initial: rejectReasons.map { "{reason=\"\($0)\"}" } + Listener.allCases.map { "{reason=\"limit\",listener=\"\($0.rawValue)\"}" }),
        "tapio_server_connections": .init(kind: .gauge, help: "Connections open, all listeners.", unlabelled: true),
        "tapio_server_listener_connections": .init(kind: .gauge, help: "Connections open, by listener.", unlabelled: false),
        "tapio_server_tls_reloads_total": .init(kind: .counter, help: "Renewed TLS file sets applied or refused, by result.", unlabelled: false,
                                                initial: ["{result=\"applied\"}", "{result=\"refused\"}"]),
        "tapio_server_tls_certificate_not_after_seconds": .init(kind: .gauge, help: "Expiry (Unix time) of the server certificate new connections get.", unlabelled: true),
        "tapio_server_incidents_open": .init(kind: .gauge, help: "Open incidents, by the kind of their leading root cause (unknown: no candidate yet).", unlabelled: false),
        "tapio_server_healthy": .init(kind: .gauge, help: "1 while /healthz answers 200 (the store takes writes, the engine advances).", unlabelled: true),
        "tapio_server_ready": .init(kind: .gauge, help: "1 while /readyz answers 200 (listening, restored, not shutting down).", unlabelled: true),
        "tapio_server_data_free_bytes": .init(kind: .gauge, help: "Bytes available to the server on the file system of its data directory.", unlabelled: false),
        "tapio_server_build_info": .init(kind: .gauge, help: "Always 1; the version of the running server in its label.", unlabelled: false),
        "tapio_server_store_segments": .init(kind: .gauge, help: "Segment files of the event store, the active one included.", unlabelled: true),
        "tapio_server_store_bytes": .init(kind: .gauge, help: "Bytes the event store takes on disk, by part (segments; index: the SQLite database with its WAL).", unlabelled: false),
        "tapio_server_store_payload_bytes_total": .init(kind: .counter, help: "Bytes of the batches stored, as received (before compression).", unlabelled: true),
        "tapio_server_store_record_bytes_total": .init(kind: .counter, help: "Bytes written to segments for the batches stored (compressed, with record headers).", unlabelled: true),
        "tapio_server_store_deleted_segments_total": .init(kind: .counter, help: "Segments deleted by retention, by reason (retention: --retention; max_disk: --max-disk).", unlabelled: false,
                                                           initial: RetentionDeletion.Reason.allCases.map { "{reason=\"\($0.rawValue)\"}" }),
        "tapio_server_store_deleted_events_total": .init(kind: .counter, help: "Events deleted with their segments, by reason.", unlabelled: false,
                                                         initial: RetentionDeletion.Reason.allCases.map { "{reason=\"\($0.rawValue)\"}" }),
        "tapio_server_store_deleted_bytes_total": .init(kind: .counter, help: "Bytes of the segments deleted, by reason.", unlabelled: false,
                                                        initial: RetentionDeletion.Reason.allCases.map { "{reason=\"\($0.rawValue)\"}" }),
        "tapio_server_store_retained_from_seconds": .init(kind: .gauge, help: "Newest event time (Unix) retention has deleted: queries reaching before it are told so; 0 while nothing was deleted.", unlabelled: true),
        "tapio_correlation_events_processed_total": .init(kind: .counter, help: "Events the correlation engine has processed.", unlabelled: true),
        "tapio_correlation_late_events_total": .init(kind: .counter, help: "Events that arrived after their rate bucket was decided: kept as causes and topology, not counted in rates.", unlabelled: true),
        "tapio_correlation_pending_events": .init(kind: .gauge, help: "Events buffered until the watermark passes them.", unlabelled: true),
        "tapio_correlation_series": .init(kind: .gauge, help: "Rate series kept (entity x symptom kind x peer).", unlabelled: true),
        "tapio_correlation_restarts_suppressed_total": .init(kind: .counter, help: "Incidents never shown because a restart explained them.", unlabelled: true),
        "tapio_correlation_client_aborts_total": .init(kind: .counter, help: "TCP resets from the client end of a connection (a client or proxy that hung up), as either end reported them: aborts, not failures, so no symptom.", unlabelled: true),
        "tapio_correlation_dns_retries_answered_total": .init(kind: .counter, help: "DNS queries that went unanswered while the same client asked again for the same name and was answered (a DNS server restarting, a lost datagram): retried lookups, not DNS errors, so no symptom.", unlabelled: true),
        "tapio_correlation_queue_events": .init(kind: .gauge, help: "Events waiting in the correlation engine's queue.", unlabelled: true),
        "tapio_correlation_queue_capacity_events": .init(kind: .gauge, help: "Capacity of the correlation engine's queue, in events.", unlabelled: true),
        "tapio_node_connected": .init(kind: .gauge, help: "1 while the node's agent is connected.", unlabelled: false),
        "tapio_node_events_received_total": .init(kind: .counter, help: "Events received from the node.", unlabelled: false),
        "tapio_node_clock_offset_seconds": .init(kind: .gauge, help: "Estimated clock offset of the node, agent minus server.", unlabelled: false),
        "tapio_node_clock_error_seconds": .init(kind: .gauge, help: "Uncertainty of the node's clock offset (half the round-trip delay of the best recent sample).", unlabelled: false),
        "tapio_node_dropped_events_total": .init(kind: .counter, help: "Events the node's agent could not deliver, summed over its runs, by kind and reason.", unlabelled: false),
        "tapio_alerts_sent_total": .init(kind: .counter, help: "Incident notifications a receiver accepted (2xx), by receiver and endpoint.", unlabelled: false),
        "tapio_alerts_failed_total": .init(kind: .counter, help: "Notification attempts that failed (no answer, or not 2xx), by receiver and endpoint; retried unless dropped.", unlabelled: false),
        "tapio_alerts_dropped_total": .init(kind: .counter, help: "Incident notifications given up, by receiver, endpoint and reason.", unlabelled: false),
    ]

    /// The histograms, in seconds (`ServerHistograms`), written after the families above.
    static let histograms: [(name: String, help: String, histogram: @Sendable (ServerHistograms) -> MetricsHistogram)] = [
        ("tapio_server_ingest_lag_seconds",
         "Time from the oldest event of a batch (its kernel time on the server's corrected clock) to the batch being durable; one observation per stored batch.",
         { $0.ingestLag }),
        ("tapio_server_batch_commit_seconds", "Duration of one group commit on the storage thread (one segment append and fdatasync, one index transaction, for every batch waiting).", { $0.batchCommit }),
        ("tapio_server_query_seconds", "Time to answer one query on the query thread.", { $0.query }),
    ]

    static let unknownHelp = "Not in the server's metrics catalog (MetricsCatalog.swift)."

    static func family(_ name: String) -> Family {
        families[name] ?? Family(kind: name.hasSuffix("_total") ? .counter : .gauge, help: unknownHelp, unlabelled: false)
    }
}

/// The server's histograms, observed where the work happens: ingest lag and
/// commit time by the group commit on the storage thread, query time on the
/// query thread. Bounds in seconds.
public final class ServerHistograms: Sendable {
    /// Kernel time to durable: the agent's batching (up to its seal interval)
    /// and any time spent in its spool while disconnected show up here.
    public let ingestLag = MetricsHistogram(bounds: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900])
    public let batchCommit = MetricsHistogram(bounds: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5])
    public let query = MetricsHistogram(bounds: MetricsHistogram.secondsBounds)

    public init() {}

    /// One group commit (`body`): its duration, and per batch stored (not a
    /// duplicate) the lag of its oldest event, placed on the server's clock
    /// with the batch's correction. A failed commit is not observed.
    func commit(_ appends: [BatchAppend], _ body: () throws -> [Int64?]) rethrows -> [Int64?] {
        let started = monotonicNs()
        let stored = try body()
        batchCommit.observe(nanoseconds: monotonicNs() - started)
        let now = wallClockNs()
        for (append, id) in zip(appends, stored) where id != nil {
            guard let oldest = append.batch.events.lazy.map(\.timeNs).min() else { continue }
            ingestLag.observe(nanoseconds: max(0, now - (oldest &- append.clock.offsetNs)))
        }
        return stored
    }
}

extension TapioServer {
    /// Prometheus text exposition: every family of the catalog with HELP and
    /// TYPE (unlabelled series and the known label sets of counters from the
    /// start), the histograms, build_info and the process families.
    public func metricsText() -> String {
        var byName: [String: [MetricsText.Sample]] = [:]
        for (key, value) in metrics.all() {
            let name = key.split(separator: "{", maxSplits: 1).first.map(String.init) ?? key
            byName[name, default: []].append(.init(rawLabels: String(key.dropFirst(name.count)), value))
        }
        for (name, family) in MetricsCatalog.families where !family.initial.isEmpty {
            let present = Set((byName[name] ?? []).map(\.rawLabels))
            byName[name, default: []] += family.initial.filter { !present.contains($0) }.map { .init(rawLabels: $0, 0) }
        }
        byName["tapio_server_connections"] = [.init([], connectionCount)]
        byName["tapio_server_listener_connections"] = Listener.allCases.map { .init([("listener", $0.rawValue)], openConnections(on: $0)) }
        let open = correlation.openIncidentsByRootCause
        byName["tapio_server_incidents_open"] = (CauseKind.allCases.map(\.rawValue) + ["unknown"]).map {
            .init([("root_cause_kind", $0)], open[$0] ?? 0)
        }
        byName["tapio_server_healthy"] = [.init([], health.health().ok ? 1 : 0)]
        byName["tapio_server_ready"] = [.init([], health.readiness().ok ? 1 : 0)]
        var fs = statvfs()
        if statvfs(configuration.dataDirectory, &fs) == 0 {
            byName["tapio_server_data_free_bytes"] = [.init([], UInt64(fs.f_bavail) * UInt64(fs.f_frsize))]
        }
        byName["tapio_server_build_info"] = [.init([("version", Self.version)], 1)]
        let st = store.statistics()
        byName["tapio_server_store_segments"] = [.init([], Int64(st.segments))]
        byName["tapio_server_store_bytes"] = [.init([("part", "index")], st.indexBytes), .init([("part", "segments")], st.segmentBytes)]
        byName["tapio_server_store_payload_bytes_total"] = [.init([], st.payloadBytesAppended)]
        byName["tapio_server_store_record_bytes_total"] = [.init([], st.recordBytesAppended)]
        for (name, values) in [("tapio_server_store_deleted_segments_total", st.deletedSegments), ("tapio_server_store_deleted_events_total", st.deletedEvents),
                               ("tapio_server_store_deleted_bytes_total", st.deletedBytes)] {
            byName[name] = RetentionDeletion.Reason.allCases.map { .init([("reason", $0.rawValue)], values[$0] ?? 0) }
        }
        let horizonNs = (try? store.retainedFromNs()).flatMap { $0 }
        byName["tapio_server_store_retained_from_seconds"] = [.init([], horizonNs.map { Double($0) / 1e9 } ?? 0.0)]
        for (name, value) in correlation.metricValues { byName[name] = [.init([], value)] }
        let snaps = registry.snapshot()
        func perNode(_ value: (NodeRegistry.Snapshot) -> String) -> [MetricsText.Sample] {
            snaps.map { s in
                var sample = MetricsText.Sample([("node", s.record.node)], 0)
                sample.value = value(s)
                return sample
            }
        }
        byName["tapio_node_connected"] = perNode { $0.connected ? "1" : "0" }
        byName["tapio_node_events_received_total"] = perNode { "\($0.record.eventsReceived)" }
        byName["tapio_node_clock_offset_seconds"] = perNode { "\(Double($0.record.clockOffsetNs) / 1e9)" }
        byName["tapio_node_clock_error_seconds"] = perNode { "\(Double($0.record.clockErrorNs) / 1e9)" }
        byName["tapio_node_dropped_events_total"] = snaps.flatMap { s in
            ((try? store.drops(node: s.record.node)) ?? []).map { d in
                MetricsText.Sample([("node", s.record.node), ("kind", d.kind.name), ("reason", d.reason)], d.count)
            }
        }
        var text = MetricsText()
        for name in Set(byName.keys).union(MetricsCatalog.families.keys).sorted() {
            let family = MetricsCatalog.family(name)
            let samples = (byName[name] ?? []).sorted { $0.rawLabels + $0.labels.map { $0.1 }.joined() < $1.rawLabels + $1.labels.map { $0.1 }.joined() }
            text.add(name, family.kind, family.help, samples, unlabelled: family.unlabelled)
        }
        for h in MetricsCatalog.histograms {
            text.add(h.name, h.help, histogram: h.histogram(metrics.histograms))
        }
        text.addProcessMetrics()
        return text.text
    }
}

extension CorrelationService {
    /// The engine's `tapio_correlation_*` samples, one value each: the same
    /// families in role all and in a correlate replica.
    var metricValues: [(name: String, value: Int64)] {
        let c = statistics
        return [("tapio_correlation_events_processed_total", Int64(c.processed)),
                ("tapio_correlation_late_events_total", Int64(c.late)),
                ("tapio_correlation_pending_events", Int64(c.pending)),
                ("tapio_correlation_series", Int64(c.series)),
                ("tapio_correlation_restarts_suppressed_total", Int64(c.restartsSuppressed)),
                ("tapio_correlation_client_aborts_total", Int64(c.clientAborts)),
                ("tapio_correlation_dns_retries_answered_total", Int64(c.dnsRetriesAnswered)),
                ("tapio_correlation_queue_events", Int64(queueDepth)),
                ("tapio_correlation_queue_capacity_events", Int64(configuration.queueEvents))]
    }
}
