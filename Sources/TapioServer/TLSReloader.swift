import Dispatch
import Foundation
import Logging
import NIOSSL
import Synchronization
import TapioWire

/// The server's TLS context, renewed from its files while it runs.
///
/// Every `interval` the reloader reads tls.crt, tls.key and ca.crt (a few kB:
/// comparing contents, unlike modification times, also sees a kubelet's
/// symlink swap and a rewrite within the same second). A changed set that
/// builds a context (certificates and key parse, the key belongs to the
/// certificate, the certificate has not expired, the CA file holds at least
/// one certificate) becomes the context of every NEW connection; connections
/// already open keep the context they were accepted with.
///
/// A changed set that does not build is refused once it has read the same
/// twice in a row (a set being rewritten file by file is not mistaken for a
/// bad one): an error log line, `tapio_server_tls_reloads_total{result="refused"}`,
/// and the current context stays. The same refused set is not reported again.
final class TLSReloader: Sendable {
    struct Contents: Equatable, Sendable {
        var certificate: [UInt8]
        var key: [UInt8]
        var ca: [UInt8]
    }

    private struct State {
        var context: NIOSSLContext
        var applied: Contents
        /// A changed set that did not build, seen once (refused if seen again unchanged).
        var unsettled: Contents?
        var refused: Contents?
    }

    private let files: TLSFiles
    private let build: @Sendable (Contents) throws -> NIOSSLContext
    private let metrics: ServerMetrics
    private let logger: Logger
    private let state: Mutex<State>
    private let timer = Mutex<Timer?>(nil)

    /// The dispatch timer (used only under the mutex).
    private final class Timer: @unchecked Sendable {
        let source: DispatchSourceTimer
        init(_ source: DispatchSourceTimer) { self.source = source }
    }

    /// Reads the files and builds the first context (a failure here is the server's start failing).
    init(files: TLSFiles, metrics: ServerMetrics, logger: Logger, build: @escaping @Sendable (Contents) throws -> NIOSSLContext) throws {
        self.files = files
        self.build = build
        self.metrics = metrics
        self.logger = logger
        let contents = try Self.read(files)
        let context = try Self.validated(contents, files: files, build: build)
        state = Mutex(State(context: context, applied: contents))
        metrics.set("tapio_server_tls_certificate_not_after_seconds", Self.notAfter(contents) ?? 0)
    }

    /// The context for a connection accepted now.
    var context: NIOSSLContext { state.withLock { $0.context } }

    func start(interval: ServerConfiguration.TimeAmount) {
        let source = DispatchSource.makeTimerSource(queue: DispatchQueue(label: "tapio-server.tls-reload"))
        let ns = Int(max(interval.nanoseconds, 1_000_000))
        source.schedule(deadline: .now() + .nanoseconds(ns), repeating: .nanoseconds(ns), leeway: .nanoseconds(ns / 10))
        source.setEventHandler { [weak self] in self?.check() }
        source.resume()
        let box = Timer(source)
        timer.withLock { $0 = box }
    }

    func stop() {
        timer.withLock { t in
            t?.source.cancel()
            t = nil
        }
    }

    /// One look at the files (the timer calls this; tests may too).
    func check() {
        let contents: Contents
        do {
            contents = try Self.read(files)
        } catch {
            consider(nil, error: error)
            return
        }
        let (applied, refused) = state.withLock { ($0.applied, $0.refused) }
        guard contents != applied, contents != refused else {
            state.withLock { $0.unsettled = nil }
            return
        }
        do {
            let context = try Self.validated(contents, files: files, build: build)
            state.withLock { s in
                s.context = context
                s.applied = contents
                s.unsettled = nil
                s.refused = nil
            }
            metrics.add("tapio_server_tls_reloads_total{result=\"applied\"}")
            let notAfter = Self.notAfter(contents) ?? 0
            metrics.set("tapio_server_tls_certificate_not_after_seconds", notAfter)
            logger.notice("TLS files changed: new connections use the new certificate; open connections keep theirs", metadata: [
                "certificate": "\(files.certificate)", "ca": "\(files.ca)",
                "not_after": "\(ISO8601DateFormatter().string(from: Date(timeIntervalSince1970: TimeInterval(notAfter))))",
            ])
        } catch {
            consider(contents, error: error)
        }
    }

    /// A set that does not build: wait for it to settle (the same on two
    /// looks in a row), then refuse it once. Unreadable files count as the
    /// empty set.
    private func consider(_ contents: Contents?, error: Error) {
        let seen = contents ?? Contents(certificate: [], key: [], ca: [])
        let refuse = state.withLock { s -> Bool in
            guard s.refused != seen else { return false }
            guard s.unsettled == seen else {
                s.unsettled = seen
                return false
            }
            s.unsettled = nil
            s.refused = seen
            return true
        }
        guard refuse else { return }
        metrics.add("tapio_server_tls_reloads_total{result=\"refused\"}")
        logger.error("TLS files changed but cannot be used: keeping the current certificate for new connections", metadata: [
            "certificate": "\(files.certificate)", "key": "\(files.key)", "ca": "\(files.ca)", "error": "\(error)",
        ])
    }

    struct Invalid: Error, CustomStringConvertible {
        var description: String
    }

    static func read(_ files: TLSFiles) throws -> Contents {
        func bytes(_ path: String) throws -> [UInt8] {
            guard let data = FileManager.default.contents(atPath: path) else {
                throw Invalid(description: "cannot read \(path)")
            }
            return Array(data)
        }
        return Contents(certificate: try bytes(files.certificate), key: try bytes(files.key), ca: try bytes(files.ca))
    }

    /// Builds a context from a set, or says what is wrong with it.
    static func validated(_ c: Contents, files: TLSFiles, build: (Contents) throws -> NIOSSLContext) throws -> NIOSSLContext {
        let chain: [NIOSSLCertificate]
        do { chain = try NIOSSLCertificate.fromPEMBytes(c.certificate) } catch {
            throw Invalid(description: "\(files.certificate): not a PEM certificate (\(error))")
        }
        guard let leaf = chain.first else { throw Invalid(description: "\(files.certificate): no certificate") }
        do { _ = try NIOSSLPrivateKey(bytes: c.key, format: .pem) } catch {
            throw Invalid(description: "\(files.key): not a PEM private key (\(error))")
        }
        let cas: [NIOSSLCertificate]
        do { cas = try NIOSSLCertificate.fromPEMBytes(c.ca) } catch {
            throw Invalid(description: "\(files.ca): not a PEM certificate bundle (\(error))")
        }
        guard !cas.isEmpty else { throw Invalid(description: "\(files.ca): no certificate") }
        let now = time(nil)
        guard leaf.notValidAfter > now else {
            throw Invalid(description: "\(files.certificate): expired at \(Date(timeIntervalSince1970: TimeInterval(leaf.notValidAfter)))")
        }
        do { return try build(c) } catch {
            // BoringSSL refuses a key that does not belong to the certificate here.
            throw Invalid(description: "\(files.certificate) with \(files.key): \(error) (does the key belong to the certificate?)")
        }
    }

    static func notAfter(_ c: Contents) -> Int64? {
        guard let leaf = (try? NIOSSLCertificate.fromPEMBytes(c.certificate))?.first else { return nil }
        return Int64(leaf.notValidAfter)
    }
}
