import Foundation
import Synchronization

/// Opens a byte stream to an endpoint. For `https` endpoints the stream must
/// be TLS that verifies the server against `caFile` (the service account's
/// `ca.crt`); this module has no TLS of its own, so the agent supplies one.
public typealias StreamConnector = @Sendable (_ endpoint: HTTPEndpoint, _ caFile: String?, _ timeoutMs: Int32) throws -> any ByteStream

/// How to reach the Kubernetes API. Everything is injectable so tests can
/// point it at a local server.
public struct KubernetesAPIConfiguration: Sendable {
    /// `https://host:port` of the API server.
    public var endpoint: HTTPEndpoint
    /// Only this node's pods are listed and watched (`spec.nodeName`).
    public var nodeName: String
    /// A file with the bearer token, read before every request: projected
    /// service account tokens are rotated (hourly) by the kubelet.
    public var tokenFile: String?
    /// A fixed bearer token, used when there is no `tokenFile`.
    public var token: String?
    /// PEM CA bundle for the API server's certificate (handed to `connector`).
    public var caFile: String?
    /// Opens connections; the default speaks plain TCP and refuses `https`.
    public var connector: StreamConnector
    /// Seconds the API server keeps one watch open (`timeoutSeconds`); the
    /// source then watches again from the last resourceVersion. Default 300.
    public var watchTimeoutSeconds: Int
    /// Seconds without a byte before a list fails. Default 30. A watch
    /// waits `watchTimeoutSeconds + 30`.
    public var requestTimeout: Double
    /// First and largest delay (seconds) between retries after failures. Defaults 0.5 and 30.
    public var retryDelay: Double
    public var maximumRetryDelay: Double
    /// The largest list body and the longest watch line accepted (bytes). Defaults 512 MiB, 16 MiB.
    public var maximumListBytes: Int
    public var maximumObjectBytes: Int

    public init(endpoint: HTTPEndpoint, nodeName: String, tokenFile: String? = nil, token: String? = nil, caFile: String? = nil,
                connector: StreamConnector? = nil) {
        self.endpoint = endpoint
        self.nodeName = nodeName
        self.tokenFile = tokenFile
        self.token = token
        self.caFile = caFile
        self.connector = connector ?? KubernetesAPIConfiguration.plainConnector
        watchTimeoutSeconds = 300
        requestTimeout = 30
        retryDelay = 0.5
        maximumRetryDelay = 30
        maximumListBytes = 512 << 20
        maximumObjectBytes = 16 << 20
    }

    /// The in-cluster configuration: `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT`, with the token and CA of the pod's service
    /// account in `serviceAccountDirectory`.
    public static func inCluster(nodeName: String, connector: StreamConnector? = nil,
                                 environment: [String: String] = ProcessInfo.processInfo.environment,
                                 serviceAccountDirectory: String = "/var/run/secrets/kubernetes.io/serviceaccount") throws -> KubernetesAPIConfiguration {
        guard let host = environment["KUBERNETES_SERVICE_HOST"], !host.isEmpty else {
            throw AttributionError("KUBERNETES_SERVICE_HOST is not set: not running in a Kubernetes pod (use --metadata-file)")
        }
        let portText = environment["KUBERNETES_SERVICE_PORT"] ?? "443"
        guard let port = UInt16(portText) else { throw AttributionError("KUBERNETES_SERVICE_PORT \(portText) is not a port") }
        let tokenFile = serviceAccountDirectory + "/token"
        guard FileManager.default.isReadableFile(atPath: tokenFile) else { throw AttributionError("no service account token at \(tokenFile)") }
        return KubernetesAPIConfiguration(endpoint: HTTPEndpoint(isTLS: true, host: host, port: port), nodeName: nodeName,
                                          tokenFile: tokenFile, caFile: serviceAccountDirectory + "/ca.crt", connector: connector)
    }

    /// Plain TCP; `https` needs a TLS connector.
    public static let plainConnector: StreamConnector = { endpoint, _, timeoutMs in
        if endpoint.isTLS {
            throw AttributionError("\(endpoint) needs TLS: pass a TLS connector in KubernetesAPIConfiguration.connector")
        }
        return try TCPByteStream.connect(host: endpoint.host, port: endpoint.port, timeoutMs: timeoutMs)
    }
}

/// Pod metadata from the Kubernetes API: list this node's pods, then watch
/// them, applying ADDED / MODIFIED / DELETED to the index as they stream in.
///
/// A watch that ends (the server's `timeoutSeconds`, a dropped connection) is
/// resumed from the last resourceVersion seen, bookmarks included. When that
/// version is too old — `410 Gone`, as an HTTP status or as an `ERROR` event
/// carrying a Status with code 410 — the source lists again, and the fresh
/// list replaces the index (pods deleted meanwhile disappear). Other failures
/// are retried with exponential backoff.
public final class KubernetesAPISource: Sendable {
    public let configuration: KubernetesAPIConfiguration
    public let index: PodIndex

    /// What the source has done, for /metrics, logs and tests.
    public struct Status: Sendable, Equatable {
        public var lists: UInt64 = 0
        public var watches: UInt64 = 0
        public var events: UInt64 = 0
        /// Lists caused by 410 Gone.
        public var relists: UInt64 = 0
        public var failures: UInt64 = 0
        public var resourceVersion: String?
        public var lastError: String?
        /// True once a list has been applied.
        public var synced = false
    }

    /// How one watch ended.
    public enum WatchEnd: Sendable, Equatable {
        /// The stream ended normally; watch again from this version.
        case closed(resourceVersion: String)
        /// The version is gone (410): list again.
        case expired
    }

    private struct State {
        var status = Status()
        var stopping = false
        var running = false
    }

    private let state = Mutex(State())

    public init(configuration: KubernetesAPIConfiguration, index: PodIndex) {
        self.configuration = configuration
        self.index = index
    }

    public var status: Status { state.withLock { $0.status } }

    /// Lists this node's pods and replaces the index; returns the list's resourceVersion.
    @discardableResult
    public func list() throws -> String {
        let response = try request(path: "/api/v1/pods?fieldSelector=" + fieldSelector, idleTimeout: configuration.requestTimeout)
        let body = try response.body(limit: configuration.maximumListBytes)
        guard response.status == 200 else { throw Self.failure(response.status, body) }
        let (pods, version) = try KubeDocument.pods(from: Data(body))
        index.replaceAll(pods.compactMap(PodInfo.init))
        let rv = version ?? ""
        state.withLock { s in
            s.status.lists += 1
            s.status.synced = true
            s.status.resourceVersion = rv
        }
        return rv
    }

    /// Watches from `resourceVersion` until the stream ends, applying each event.
    public func watch(from resourceVersion: String) throws -> WatchEnd {
        var path = "/api/v1/pods?fieldSelector=" + fieldSelector + "&watch=1&allowWatchBookmarks=true"
        path += "&timeoutSeconds=\(configuration.watchTimeoutSeconds)"
        if !resourceVersion.isEmpty { path += "&resourceVersion=" + Self.escape(resourceVersion) }
        let response = try request(path: path, idleTimeout: Double(configuration.watchTimeoutSeconds) + 30)
        if response.status == 410 { return .expired }
        guard response.status == 200 else { throw Self.failure(response.status, try response.body(limit: 1 << 20)) }
        state.withLock { $0.status.watches += 1 }
        var version = resourceVersion
        let decoder = JSONDecoder()
        while let line = try response.nextLine() {
            if line.allSatisfy({ $0 == 32 || $0 == 9 }) { continue }
            let event: KubeWatchEvent
            do {
                event = try decoder.decode(KubeWatchEvent.self, from: Data(line))
            } catch {
                throw AttributionError("bad watch event: \(KubeDocument.describe(error))")
            }
            switch (event.type, event.object) {
            case (.error, .status(let status)):
                if status.code == 410 { return .expired }
                throw HTTPError(status: status.code, "watch error: \(status.reason ?? "") \(status.message ?? "")")
            case (.added, .pod(let pod)), (.modified, .pod(let pod)):
                if let info = PodInfo(pod) { index.upsert(info) }
                version = pod.metadata?.resourceVersion ?? version
            case (.deleted, .pod(let pod)):
                if let uid = pod.metadata?.uid { index.remove(uid: uid) }
                version = pod.metadata?.resourceVersion ?? version
            case (.bookmark, .pod(let pod)):
                version = pod.metadata?.resourceVersion ?? version
            default:
                continue
            }
            state.withLock { s in
                s.status.events += 1
                s.status.resourceVersion = version
            }
        }
        return .closed(resourceVersion: version)
    }

    /// List, then watch for ever (until `stop()`), relisting on 410 and
    /// backing off after failures. Blocks the calling thread.
    public func run() {
        var delay = configuration.retryDelay
        var version: String?
        while !stopping {
            do {
                let from = try version ?? list()
                version = from
                switch try watch(from: from) {
                case .closed(let rv):
                    version = rv
                case .expired:
                    version = nil
                    state.withLock { $0.status.relists += 1 }
                }
                delay = configuration.retryDelay
            } catch {
                if stopping { break }
                state.withLock { s in
                    s.status.failures += 1
                    s.status.lastError = "\(error)"
                }
                if (error as? HTTPError)?.status == 410 { version = nil }
                sleep(seconds: delay)
                delay = min(delay * 2, configuration.maximumRetryDelay)
            }
        }
        state.withLock { $0.running = false }
    }

    /// Runs `run()` on a background thread.
    public func start() {
        let shouldStart = state.withLock { s -> Bool in
            if s.running { return false }
            s.running = true
            s.stopping = false
            return true
        }
        guard shouldStart else { return }
        let thread = Thread { [self] in run() }
        thread.name = "tapio-kube-watch"
        thread.start()
    }

    /// Ends `run()` within about 200 ms (an open watch is abandoned).
    public func stop() {
        state.withLock { $0.stopping = true }
    }

    /// True once a list has been applied.
    public var isSynced: Bool { state.withLock { $0.status.synced } }

    private var stopping: Bool { state.withLock { $0.stopping } }

    private var fieldSelector: String { Self.escape("spec.nodeName=" + configuration.nodeName) }

    private func request(path: String, idleTimeout: Double) throws -> HTTPResponse {
        var headers = [("Accept", "application/json"), ("User-Agent", "tapio-agent")]
        if let token = try bearerToken() { headers.append(("Authorization", "Bearer " + token)) }
        let stream = try configuration.connector(configuration.endpoint, configuration.caFile, milliseconds(configuration.requestTimeout))
        do {
            return try HTTPResponse.get(path, headers: headers, endpoint: configuration.endpoint, stream: stream, idleTimeout: idleTimeout,
                                        maximumLineLength: configuration.maximumObjectBytes, shouldStop: { [self] in stopping })
        } catch {
            stream.close()
            throw error
        }
    }

    private func bearerToken() throws -> String? {
        if let file = configuration.tokenFile {
            guard let data = FileManager.default.contents(atPath: file) else { throw AttributionError("cannot read token \(file)") }
            return String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        }
        return configuration.token
    }

    private func sleep(seconds: Double) {
        let until = ContinuousClock.now + .milliseconds(Int64(milliseconds(seconds)))
        while ContinuousClock.now < until && !stopping { Thread.sleep(forTimeInterval: 0.05) }
    }

    private static func failure(_ status: Int, _ body: [UInt8]) -> HTTPError {
        let message = (try? JSONDecoder().decode(KubeStatus.self, from: Data(body)))?.message ?? String(decoding: body.prefix(200), as: UTF8.self)
        return HTTPError(status: status, message)
    }

    /// Percent-encodes a query value (RFC 3986 unreserved characters kept).
    static func escape(_ s: String) -> String {
        var out = ""
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.append(Character(Unicode.Scalar(b)))
            default:
                out += String(format: "%%%02X", b)
            }
        }
        return out
    }
}
