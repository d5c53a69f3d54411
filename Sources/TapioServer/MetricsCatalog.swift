import TapioWire

/// Every metric family the server exposes: its type, its help text (what
/// `# HELP` says; docs/operations.md has the same table), and whether it has
/// an unlabelled series that exists from the start (a counter at 0 before
/// its first increment). `Server.metricsText()` writes only families listed
/// here; a name missing from the catalog is written with a help text saying
/// so, and a test fails on it.
enum MetricsCatalog {
    struct Family {
        var kind: MetricsText.Kind
        var help: String
        var unlabelled: Bool
    }

    static let families: [String: Family] = [
        "tapio_server_hellos_total": .init(kind: .counter, help: "Agent hellos accepted.", unlabelled: true),
        "tapio_server_batches_total": .init(kind: .counter, help: "Batches stored and acknowledged.", unlabelled: true),
        "tapio_server_duplicate_batches_total": .init(kind: .counter, help: "Batches received again (already stored) and acknowledged.", unlabelled: true),
        "tapio_server_events_total": .init(kind: .counter, help: "Events stored.", unlabelled: true),
        "tapio_server_events_future_total": .init(kind: .counter, help: "Events dated more than the allowed skew after their batch arrived: stored, not correlated.", unlabelled: true),
        "tapio_server_engine_backpressure_total": .init(kind: .counter, help: "Times a connection stopped being read because the correlation engine's queue was full.", unlabelled: true),
        "tapio_server_pod_address_conflicts": .init(kind: .gauge, help: "Pod addresses that pods of more than one node claim, left unattributed.", unlabelled: true),
        "tapio_server_queries_total": .init(kind: .counter, help: "Queries answered, by method.", unlabelled: false),
        "tapio_server_connection_errors_total": .init(kind: .counter, help: "Connections closed by a TLS or socket error.", unlabelled: true),
        "tapio_server_connections_rejected_total": .init(kind: .counter, help: "Connections the server closed, by reason (and listener for the connection limit).", unlabelled: false),
        "tapio_server_connections": .init(kind: .gauge, help: "Connections open, all listeners.", unlabelled: true),
        "tapio_server_listener_connections": .init(kind: .gauge, help: "Connections open, by listener.", unlabelled: false),
        "tapio_server_tls_reloads_total": .init(kind: .counter, help: "Renewed TLS file sets applied or refused, by result.", unlabelled: false),
        "tapio_server_tls_certificate_not_after_seconds": .init(kind: .gauge, help: "Expiry (Unix time) of the server certificate new connections get.", unlabelled: true),
        "tapio_correlation_events_processed_total": .init(kind: .counter, help: "Events the correlation engine has processed.", unlabelled: true),
        "tapio_correlation_late_events_total": .init(kind: .counter, help: "Events that arrived after their rate bucket was decided: kept as causes and topology, not counted in rates.", unlabelled: true),
        "tapio_correlation_pending_events": .init(kind: .gauge, help: "Events buffered until the watermark passes them.", unlabelled: true),
        "tapio_correlation_series": .init(kind: .gauge, help: "Rate series kept (entity x symptom kind x peer).", unlabelled: true),
        "tapio_correlation_restarts_suppressed_total": .init(kind: .counter, help: "Incidents never shown because a restart explained them.", unlabelled: true),
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

    static let unknownHelp = "Not in the server's metrics catalog (MetricsCatalog.swift)."

    static func family(_ name: String) -> Family {
        families[name] ?? Family(kind: name.hasSuffix("_total") ? .counter : .gauge, help: unknownHelp, unlabelled: false)
    }
}
