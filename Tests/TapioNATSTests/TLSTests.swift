import Foundation
import NIOCore
import NIOSSL
import TapioNATS
import TapioTestSupport
import XCTest

/// TLS to a real nats-server with a certificate made here (the development
/// PKI of `tapio certs init`, whose server certificate names 127.0.0.1): the
/// client reads INFO in plain text and then upgrades, as the protocol has it.
final class TLSTests: NATSTestCase {
    func testTheClientUpgradesToTLSAfterInfoAndVerifiesTheServersCertificate() async throws {
        let pki = try TestSupport.makePKI(in: directory, nodes: ["n1"])
        let server = try startServer(jetStream: false, tlsDirectory: pki + "/server")

        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(pki + "/server/ca.crt")
        tls.minimumTLSVersion = .tlsv12
        let client = try await connect([server]) { $0.tls = tls }
        XCTAssertEqual(client.serverInfo?.tlsRequired, true)
        let subscription = try client.subscribe("secure.>")
        try await client.flush()
        try await client.publish("secure.hello", string: "over TLS", headers: NATSHeaders([("A", "b")]))
        let message = await receive(1, from: subscription).first
        XCTAssertEqual(message?.string, "over TLS")
        XCTAssertEqual(message?.headers?["A"], "b")

        // Without TLS configured: refused in words, before CONNECT is sent.
        do {
            _ = try await connect([server])
            XCTFail("a plain-text client connected to a TLS server")
        } catch NATSError.cannotConnect(let reasons) {
            XCTAssertTrue(reasons.joined().contains("requires TLS"), "\(reasons)")
        }
        // A CA that did not sign the server's certificate: the handshake fails.
        let otherPKI = try TestSupport.makePKI(in: directory + "/other", nodes: ["n1"])
        var wrongCA = TLSConfiguration.makeClientConfiguration()
        wrongCA.trustRoots = .file(otherPKI + "/server/ca.crt")
        do {
            _ = try await connect([server]) { $0.tls = wrongCA }
            XCTFail("the client accepted a certificate from a CA it does not trust")
        } catch NATSError.cannotConnect(let reasons) {
            XCTAssertTrue(reasons.joined().contains("TLS"), "\(reasons)")
        }
    }

    func testAServerThatVerifiesClientsAcceptsTheClientsCertificateAndRefusesNone() async throws {
        let pki = try TestSupport.makePKI(in: directory, nodes: ["n1"])
        let server = try startServer(jetStream: false, tlsDirectory: pki + "/server", extraTLS: ["verify: true"])
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.trustRoots = .file(pki + "/server/ca.crt")
        tls.certificateChain = try NIOSSLCertificate.fromPEMFile(pki + "/nodes/n1/tls.crt").map { .certificate($0) }
        tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: pki + "/nodes/n1/tls.key", format: .pem))
        let client = try await connect([server]) { $0.tls = tls }
        try await client.flush()
        XCTAssertNil(client.lastError)

        var anonymous = TLSConfiguration.makeClientConfiguration()
        anonymous.trustRoots = .file(pki + "/server/ca.crt")
        do {
            _ = try await connect([server]) { $0.tls = anonymous }
            XCTFail("a client without a certificate was served by a server that verifies clients")
        } catch NATSError.cannotConnect(let reasons) {
            let text = reasons.joined()
            XCTAssertTrue(text.contains("TLS with 127.0.0.1:\(server.port) failed"), text)
            XCTAssertTrue(text.uppercased().contains("CERTIFICATE"), text)
        }
    }
}
