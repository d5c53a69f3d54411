import Foundation
import TapioAlerting
import TapioStore
import TapioWire

/// Where a server listens and the limits it enforces. Defaults are documented
/// in docs/operations.md.
public struct ServerConfiguration: Sendable {
    public struct Limits: Sendable {
        /// Largest frame payload accepted, checked before buffering (4 MiB).
        public var maxFrameBytes: UInt32 = FrameHeader.defaultMaximumPayload
        /// Unacknowledged batches an agent may have in flight; the server stops
        /// reading a connection that has this many batches waiting for storage.
        public var windowBatches: UInt32 = 32
        /// Agent connections open at once on the ingest listener; more are
        /// closed on accept. Each listener has its own limit, so abuse of one
        /// port cannot keep agents, operators or scrapers off another.
        public var maxConnections: Int = 4096
        /// A connection with no complete frame for this long is closed.
        public var idleTimeout: TimeAmount = .seconds(60)
        /// Hello must arrive within this time after the TCP accept.
        public var helloTimeout: TimeAmount = .seconds(10)
        /// At most this many events in one `events` query answer.
        public var maxQueryEvents: Int = 100_000
        /// Events one batch may hold (the agent seals at 512); counted from the
        /// encoded batch before decoding allocates anything.
        public var maxBatchEvents: Int = 8192
        /// How far ahead of the server's clock (after the node's clock
        /// correction) an event may be dated. Later events are stored but not
        /// correlated, and counted per node as dropped with reason `future_time`.
        public var maxFutureSkew: TimeAmount = .seconds(300)
        /// Connections one certificate name (a node, an operator) may have
        /// open at once on one listener. An agent needs one (two briefly,
        /// while the server notices a dead one); the cap keeps one valid
        /// certificate from taking a listener or holding thousands of
        /// partial frames.
        public var maxConnectionsPerPeer: Int = 16
        /// Operator connections open at once on the query listener.
        public var maxQueryConnections: Int = 64
        /// Connections open at once on the HTTP /metrics listener.
        public var maxMetricsConnections: Int = 64
        /// The TLS handshake must complete within this time after the TCP
        /// accept; the client certificate's role is checked right then.
        public var handshakeTimeout: TimeAmount = .seconds(10)
        /// A frame whose first byte has arrived must be complete within this
        /// time (bytes trickled one at a time do not keep a connection open).
        public var frameTimeout: TimeAmount = .seconds(30)
        /// Largest frame payload on the query listener (a query is a few
        /// parameters; answers are not limited by this).
        public var maxQueryFrameBytes: UInt32 = 64 << 10
        /// An HTTP /metrics connection is closed this long after its accept,
        /// answered or not.
        public var metricsTimeout: TimeAmount = .seconds(10)
        /// After the server decides to close a connection (a refusal, a
        /// deadline), how long a last message to the peer may take before the
        /// connection is closed without it.
        public var closeGrace: TimeAmount = .seconds(2)

        public init() {}
    }

    /// A span of time in ns (kept free of NIO so the value type stays plain).
    public struct TimeAmount: Sendable, Equatable {
        public var nanoseconds: Int64
        public static func seconds(_ s: Int64) -> TimeAmount { TimeAmount(nanoseconds: s * 1_000_000_000) }
        public static func milliseconds(_ ms: Int64) -> TimeAmount { TimeAmount(nanoseconds: ms * 1_000_000) }
    }

    public var dataDirectory: String
    public var tls: TLSFiles
    public var ingestHost: String = "127.0.0.1"
    public var ingestPort: Int = 7400
    public var queryHost: String = "127.0.0.1"
    public var queryPort: Int = 7401
    /// nil turns the HTTP endpoint (/metrics, /healthz) off.
    public var metricsHost: String? = "127.0.0.1"
    public var metricsPort: Int = 9400
    /// Time-sync exchanges per connection: a quick burst after hello, then this period.
    public var timeSyncInterval: TimeAmount = .seconds(2)
    public var limits = Limits()
    /// How long a graceful shutdown waits for in-flight batches before closing.
    public var shutdownGrace: TimeAmount = .seconds(5)
    public var correlation = CorrelationService.Configuration()
    /// Incident notifications to Alertmanager and a webhook (docs/alerts.md); none by default.
    public var alerting = AlertingConfiguration()
    /// Segment size, retention and the disk limit of the event log
    /// (`--retention`, `--max-disk`; docs/storage.md).
    public var storage = SegmentEventStore.Configuration()

    public init(dataDirectory: String, tls: TLSFiles) {
        self.dataDirectory = dataDirectory
        self.tls = tls
    }
}

/// PEM files of one identity in the cert-manager secret layout.
public struct TLSFiles: Sendable, Equatable {
    public var ca: String
    public var certificate: String
    public var key: String

    public init(ca: String, certificate: String, key: String) {
        self.ca = ca
        self.certificate = certificate
        self.key = key
    }

    /// `dir/ca.crt`, `dir/tls.crt`, `dir/tls.key`.
    public init(directory: String) {
        self.init(ca: directory + "/ca.crt", certificate: directory + "/tls.crt", key: directory + "/tls.key")
    }
}
