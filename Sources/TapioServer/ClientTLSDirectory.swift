import Foundation
import NIOSSL

/// TLS towards a server this process is the client of (NATS, ClickHouse),
/// from a directory in the cert-manager layout: `ca.crt` verifies the
/// servers; `tls.crt` and `tls.key`, when both are there, are the client
/// certificate for servers that verify clients.
public enum ClientTLSDirectory {
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// TLS verified with the system's trust store, no client certificate.
    public static var systemTrust: TLSConfiguration { TLSConfiguration.makeClientConfiguration() }

    /// `servers` names whose certificates `ca.crt` must have signed, for the error ("the NATS servers").
    public static func configuration(directory: String, servers: String) throws -> TLSConfiguration {
        var config = TLSConfiguration.makeClientConfiguration()
        let ca = directory + "/ca.crt", cert = directory + "/tls.crt", key = directory + "/tls.key"
        guard FileManager.default.isReadableFile(atPath: ca) else {
            throw Failure(description: "cannot read \(ca): the TLS directory needs the CA that signed \(servers)' certificates")
        }
        config.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca))
        switch (FileManager.default.isReadableFile(atPath: cert), FileManager.default.isReadableFile(atPath: key)) {
        case (true, true):
            config.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
            config.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        case (false, false):
            break
        default:
            throw Failure(description: "\(directory) has only one of tls.crt and tls.key: give both for a client certificate, or neither")
        }
        return config
    }
}
