import Foundation
import NIOSSL
@testable import TapioClickHouse
import TapioQueryAPI
import TapioStore
import TapioTestSupport
import XCTest

/// HTTPS to Debian's real clickhouse-server, with certificates of the
/// development PKI (`tapio certs init`; the server's names 127.0.0.1): the
/// client verifies the server, offers its own certificate where the server
/// asks for one, and says in words why a connection was refused.
final class ClickHouseTLSTests: XCTestCase {
    private var server: ClickHouseTestServer?
    private var clients: [ClickHouseClient] = []
    private var directory = ""

    override func setUpWithError() throws {
        directory = try TestSupport.temporaryDirectory("tapio-clickhouse-tls")
    }

    override func tearDown() async throws {
        for c in clients { try? await c.shutdown() }
        clients = []
        server?.stop()
        server = nil
        try? FileManager.default.removeItem(atPath: directory)
    }

    private func client(port: Int, tls: TLSConfiguration?) -> ClickHouseClient {
        var c = ClickHouseConfiguration(port: port, connectTimeout: .seconds(5), requestTimeout: .seconds(30))
        c.tls = tls
        let client = ClickHouseClient(configuration: c)
        clients.append(client)
        return client
    }

    private static func trusting(_ ca: String) -> TLSConfiguration {
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(ca)
        return tls
    }

    /// The error a statement fails with, in words (or a failure if it succeeded).
    private func refusal(_ client: ClickHouseClient, file: StaticString = #filePath, line: UInt = #line) async -> String {
        do {
            _ = try await client.execute("SELECT 1 FORMAT TabSeparated")
            XCTFail("the statement ran", file: file, line: line)
            return ""
        } catch {
            return "\(error)"
        }
    }

    func testStatementsAndEventsTravelOverHTTPSAndAnUntrustedServerIsRefused() async throws {
        let pki = try TestSupport.makePKI(in: directory, nodes: ["n1"])
        let s = try ClickHouseTestServer(tlsDirectory: pki + "/server")
        server = s
        let httpsPort = try XCTUnwrap(s.httpsPort)

        let secure = client(port: httpsPort, tls: Self.trusting(pki + "/server/ca.crt"))
        let sum = try await secure.rows("SELECT 1 + 1 FORMAT TabSeparated", columns: 1)
        XCTAssertEqual(sum, [["2"]])
        // The events table works the same over HTTPS.
        let store = try ClickHouseEventStore(client: secure, table: "events_tls")
        try await store.createIfMissing()
        let written = try await store.write(ClickHouseEventStoreTests.batches())
        XCTAssertEqual(written, 162)
        let read = try await store.events(EventQuery(limit: 100_000))
        XCTAssertEqual(read.count, 162)
        // Statements reuse the connection as over plain HTTP.
        XCTAssertLessThanOrEqual(secure.connectionsOpened, 2, "at least five statements ran")

        // A CA that did not sign the server's certificate: refused at the handshake.
        let otherPKI = try TestSupport.makePKI(in: directory + "/other", nodes: ["n1"])
        let untrusting = await refusal(client(port: httpsPort, tls: Self.trusting(otherPKI + "/server/ca.crt")))
        XCTAssertTrue(untrusting.contains("cannot connect to ClickHouse at 127.0.0.1:\(httpsPort): TLS"), untrusting)
        XCTAssertTrue(untrusting.uppercased().contains("CERTIFICATE"), untrusting)

        // HTTPS to the plain port, and plain HTTP to the HTTPS port: errors, not hangs.
        let tlsToPlain = await refusal(client(port: s.httpPort, tls: Self.trusting(pki + "/server/ca.crt")))
        XCTAssertTrue(tlsToPlain.contains("TLS"), tlsToPlain)
        let plainToTLS = await refusal(client(port: httpsPort, tls: nil))
        XCTAssertTrue(plainToTLS.contains("ClickHouse"), plainToTLS)
    }

    func testAServerThatVerifiesClientsServesTheClientsCertificateAndRefusesNone() async throws {
        let pki = try TestSupport.makePKI(in: directory, nodes: ["n1"])
        let s = try ClickHouseTestServer(tlsDirectory: pki + "/server", verifyClients: true)
        server = s
        let httpsPort = try XCTUnwrap(s.httpsPort)

        var withCertificate = Self.trusting(pki + "/server/ca.crt")
        withCertificate.certificateChain = try NIOSSLCertificate.fromPEMFile(pki + "/nodes/n1/tls.crt").map { .certificate($0) }
        withCertificate.privateKey = .privateKey(try NIOSSLPrivateKey(file: pki + "/nodes/n1/tls.key", format: .pem))
        let seven = try await client(port: httpsPort, tls: withCertificate).rows("SELECT 7 FORMAT TabSeparated", columns: 1)
        XCTAssertEqual(seven, [["7"]])

        let anonymous = await refusal(client(port: httpsPort, tls: Self.trusting(pki + "/server/ca.crt")))
        XCTAssertTrue(anonymous.contains("ClickHouse at 127.0.0.1:\(httpsPort)") || anonymous.contains("closed the connection"), anonymous)
    }

    func testTLSSettingsThatCannotBeUsedAreEveryStatementsErrorInWords() async throws {
        // Trust roots that cannot be read cannot make a context.
        var broken = TLSConfiguration.makeClientConfiguration()
        broken.trustRoots = .file(directory + "/no-such-ca.crt")
        let c = client(port: TestSupport.freePort(), tls: broken)
        let text = await refusal(c)
        XCTAssertTrue(text.contains("TLS settings for ClickHouse cannot be used"), text)
    }
}
