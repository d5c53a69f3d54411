import Foundation
import Logging
import NIOCore
import NIOSSL
import Synchronization
import TapioClient
@testable import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

/// A connection that fails its TLS handshake is logged with the reason in
/// words (which certificate, whose CA); the TLS library's own text, with
/// the source paths it was built from, only at debug level.
final class ConnectionErrorLogTests: XCTestCase {
    private var dir = ""
    private var pki = ""
    private var server: TapioServer?
    private let capture = LogLines()
    private var ingestPort = 0
    private var queryPort = 0

    override func setUpWithError() throws {
        dir = try TestSupport.temporaryDirectory("tapio-connection-log")
        pki = try TestSupport.makePKI(in: dir, nodes: ["node-a"], operators: ["alice"])
        var config = ServerConfiguration(dataDirectory: dir + "/data", tls: TLSFiles(directory: pki + "/server"))
        config.ingestPort = 0
        config.queryPort = 0
        config.metricsHost = nil
        config.shutdownGrace = .seconds(1)
        let capture = self.capture
        var logger = Logger(label: "tapio-server-test") { _ in LogLines.Handler(store: capture) }
        logger.logLevel = .debug
        let server = try TapioServer(configuration: config, logger: logger)
        let addresses = try server.start()
        ingestPort = addresses.ingest.port!
        queryPort = addresses.query.port!
        self.server = server
    }

    override func tearDown() {
        server?.shutdown()
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    /// Another PKI's operator, alice of a CA the server does not know.
    private func otherPKI() throws -> String {
        try TestSupport.makePKI(in: dir + "/other", nodes: ["node-a"], operators: ["alice"])
    }

    /// The notice the server logged for the failed connection, once it has.
    private func notice(_ message: String, file: StaticString = #filePath, line: UInt = #line) throws -> LogLines.Line {
        XCTAssertTrue(eventually { self.capture.lines.contains { $0.level == .notice && $0.message == message } },
                      "logged: \(capture.lines)", file: file, line: line)
        return try XCTUnwrap(capture.lines.first { $0.level == .notice && $0.message == message }, file: file, line: line)
    }

    private func assertInWordsWithTheLibraryTextAtDebug(_ message: String, raw: String, file: StaticString = #filePath, line: UInt = #line) {
        for l in capture.lines where l.level > .debug {
            for text in [l.message] + l.metadata.values {
                XCTAssertFalse(text.contains("OPENSSL_internal") || text.contains("BoringSSL") || text.contains("/.build/") || text.contains("checkouts"),
                               "library text above debug: \(l)", file: file, line: line)
            }
        }
        // Logged right after the notice, maybe not yet when the notice was seen.
        XCTAssertTrue(eventually { self.capture.lines.contains { $0.level == .debug && $0.message.hasPrefix(message) && ($0.metadata["error"] ?? "").contains(raw) } },
                      "the library's own text is kept at debug: \(capture.lines)", file: file, line: line)
    }

    func testAClientCertificateFromAnotherCAIsLoggedInWords() throws {
        let other = try otherPKI()
        // Trusts the real server, presents a certificate the server's CA did not sign.
        let client = try QueryClient(host: "127.0.0.1", port: queryPort, ca: pki + "/operators/alice/ca.crt",
                                     certificate: other + "/operators/alice/tls.crt", key: other + "/operators/alice/tls.key")
        XCTAssertThrowsError(try client.json("nodes"))
        let logged = try notice("query connection error")
        XCTAssertEqual(logged.metadata["reason"],
                       "the client's certificate did not verify: it is not signed by the server's CA (tls.crt from another PKI), or it has expired or is not valid yet")
        XCTAssertTrue(logged.metadata["peer"]?.contains("127.0.0.1") ?? false, "\(logged)")
        assertInWordsWithTheLibraryTextAtDebug("query connection error", raw: "CERTIFICATE_VERIFY_FAILED")
    }

    func testAClientThatDoesNotTrustTheServersCertificateIsLoggedInWords() throws {
        let other = try otherPKI()
        // A valid operator certificate, but the CA file of another PKI: the client refuses the server.
        let client = try QueryClient(host: "127.0.0.1", port: queryPort, ca: other + "/operators/alice/ca.crt",
                                     certificate: pki + "/operators/alice/tls.crt", key: pki + "/operators/alice/tls.key")
        XCTAssertThrowsError(try client.json("nodes"))
        let logged = try notice("query connection error")
        XCTAssertEqual(logged.metadata["reason"], "the client does not trust the server's certificate: its ca.crt is not the CA that signed the server's")
        assertInWordsWithTheLibraryTextAtDebug("query connection error", raw: "TLSV1_ALERT_UNKNOWN_CA")
    }

    func testAnAgentWithoutACertificateIsLoggedInWords() throws {
        // The independent Python peer, trusting the server and presenting nothing.
        let r = try TestSupport.run(TestSupport.systemPython, [TestSupport.interopScript, "probe", "heartbeat", "127.0.0.1", String(ingestPort),
                                                               pki + "/ca/ca.crt"], timeout: 30)
        XCTAssertEqual(r.status, 0, r.stderr)
        XCTAssertEqual(try JSONValue.parse(Array(r.stdout.utf8))["outcome"], .string("refused"), r.stdout)
        let logged = try notice("connection error")
        XCTAssertEqual(logged.metadata["reason"], "the client sent no certificate; every client needs one signed by the server's CA")
        XCTAssertTrue(logged.metadata["peer"]?.contains("127.0.0.1") ?? false, "\(logged)")
        assertInWordsWithTheLibraryTextAtDebug("connection error", raw: "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    }

    func testConnectionsThatEndWithoutATLSReasonAreWorded() {
        XCTAssertEqual(ConnectionFailure.describe(IOError(errnoCode: ECONNRESET, reason: "read(descriptor:pointer:size:)")),
                       "the client reset the connection")
        XCTAssertEqual(ConnectionFailure.describe(NIOSSLError.uncleanShutdown),
                       "the client closed the connection without ending TLS (it went away mid-connection)")
        XCTAssertEqual(ConnectionFailure.describe(ChannelError.eof), "the client closed the connection")
        XCTAssertEqual(ConnectionFailure.reason(IOError(errnoCode: EPIPE, reason: "write")), "")
    }
}

/// Log lines kept with their level, message and metadata as text.
private final class LogLines: Sendable {
    struct Line: CustomStringConvertible, Sendable {
        var level: Logger.Level
        var message: String
        var metadata: [String: String]
        var description: String { "\(level) \(message) \(metadata.sorted { $0.key < $1.key })" }
    }

    /// One per logger (metadata is the logger's own), all writing here.
    struct Handler: LogHandler {
        let store: LogLines
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug
        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            record(level: event.level, message: event.message, metadata: event.metadata)
        }

        private func record(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?) {
            let all = self.metadata.merging(metadata ?? [:]) { $1 }.mapValues { "\($0)" }
            store.stored.withLock { $0.append(Line(level: level, message: "\(message)", metadata: all)) }
        }
    }

    fileprivate let stored = Mutex<[Line]>([])
    var lines: [Line] { stored.withLock { $0 } }
}
