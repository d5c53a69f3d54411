import Foundation
import NIOCore

/// Where incident notifications go and how hard the server tries: the
/// receivers (Alertmanager, a webhook, an OTLP collector), the paging rule's confidence floor, the Alertmanager re-send
/// period and the webhook's retries. Defaults are documented in docs/alerts.md.
public struct AlertingConfiguration: Sendable {
    /// Alertmanager instances by base URL (`http://alertmanager:9093`; a path
    /// prefix is kept): alerts go to `<base>/api/v2/alerts`. Every one gets
    /// every alert (Alertmanager deduplicates across a cluster; do not
    /// load-balance in front of it).
    public var alertmanagers: [AlertTarget] = []
    /// The generic webhook, nil for none.
    public var webhook: AlertTarget?
    /// An OpenTelemetry collector's OTLP/HTTP endpoint (`http://collector:4318`):
    /// notifications go to `<endpoint>/v1/logs` as OTLP logs (a URL that
    /// already ends in `/v1/logs` is used as it is); nil for none.
    public var otlp: AlertTarget?
    /// The HMAC-SHA256 key that signs webhook deliveries; nil sends them unsigned.
    public var webhookSecret: [UInt8]?
    /// PEM file of the CA certificates that https receivers' certificates
    /// must chain to, instead of the system's trust store; nil: the system's.
    public var trustRootsFile: String?
    /// The link in every alert is this followed by the incident id; nil for no link.
    public var linkBase: String?
    /// An incident pages only when its top root cause has at least this
    /// confidence (0…1). 0: every incident that pages.
    public var minimumConfidence: Double = 0
    /// Open alerts are posted to Alertmanager again this often, each with
    /// `endsAt` four periods ahead: Alertmanager resolves an alert nobody
    /// re-sends, so a server that has stopped does not leave pages firing forever.
    public var resendInterval: TimeAmount = .seconds(60)
    public var delivery = Delivery()

    /// Retries, queue bound and timeouts of every receiver.
    public struct Delivery: Sendable {
        /// Notifications waiting per receiver; a new one that finds the queue
        /// full is dropped and counted (`reason="queue_full"`).
        public var queueCapacity: Int = 1024
        /// Attempts per notification, the first included; then it is dropped
        /// and counted (`reason="retries_exhausted"`).
        public var maxAttempts: Int = 10
        /// The wait after the first failed attempt, doubled after every
        /// further failure up to `maximumBackoff`.
        public var initialBackoff: TimeAmount = .seconds(1)
        public var maximumBackoff: TimeAmount = .seconds(60)
        /// One attempt, connect to response, must complete within this.
        public var requestTimeout: TimeAmount = .seconds(10)
        /// At shutdown, how long queued notifications may still take.
        public var shutdownGrace: TimeAmount = .seconds(3)

        public init() {}
    }

    public init() {}

    /// Whether any receiver is configured.
    public var isEnabled: Bool { !alertmanagers.isEmpty || webhook != nil || otlp != nil }
}

/// An `http://` or `https://` URL notifications are POSTed to.
public struct AlertTarget: Sendable, Equatable, CustomStringConvertible {
    public var isTLS: Bool
    public var host: String
    public var port: Int
    /// Path and query, starting with `/`.
    public var path: String

    public struct Invalid: Error, CustomStringConvertible {
        public var description: String
    }

    /// Parses `http[s]://host[:port][/path][?query]`. Credentials in the URL
    /// are refused (they would show in logs and metrics).
    public init(url: String) throws {
        guard let c = URLComponents(string: url), let scheme = c.scheme?.lowercased(), scheme == "http" || scheme == "https" else {
            throw Invalid(description: "\(url.debugDescription) is not an http:// or https:// URL")
        }
        guard let host = c.host, !host.isEmpty else { throw Invalid(description: "\(url.debugDescription) has no host") }
        guard c.user == nil, c.password == nil else { throw Invalid(description: "\(url.debugDescription): credentials in the URL are not supported") }
        if let p = c.port, !(1...65535).contains(p) { throw Invalid(description: "\(url.debugDescription): port out of range") }
        isTLS = scheme == "https"
        self.host = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        port = c.port ?? (isTLS ? 443 : 80)
        var p = c.percentEncodedPath
        if p.isEmpty { p = "/" }
        if let q = c.percentEncodedQuery { p += "?" + q }
        path = p
    }

    /// This target with `suffix` added to its path (before any query).
    public func appending(path suffix: String) -> AlertTarget {
        var t = self
        let parts = path.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        var p = String(parts[0])
        while p.hasSuffix("/") { p.removeLast() }
        t.path = p + suffix + (parts.count > 1 ? "?" + parts[1] : "")
        return t
    }

    /// `host:port`, an IPv6 literal in brackets: the Host header and the
    /// `endpoint` label of the metrics.
    public var authority: String { (host.contains(":") ? "[\(host)]" : host) + ":\(port)" }
    public var description: String { (isTLS ? "https://" : "http://") + authority + path }
}
