import CTapioTLS
import NIOCore
import NIOSSL

/// Who is on the other end of a mutually authenticated connection: the
/// subject CN and O of its (already verified) client certificate. The O is
/// the role: `tapio-node` for agents, `tapio-operator` for the CLI.
public struct PeerIdentity: Sendable, Equatable {
    public static let nodeRole = "tapio-node"
    public static let operatorRole = "tapio-operator"
    public static let serverRole = "tapio-server"

    public var commonName: String
    public var role: String

    public init(commonName: String, role: String) {
        self.commonName = commonName
        self.role = role
    }

    /// Parses a DER certificate; nil when it has no CN.
    public init?(der: [UInt8]) {
        var cn = [CChar](repeating: 0, count: 256)
        var org = [CChar](repeating: 0, count: 256)
        let rc = der.withUnsafeBufferPointer { buf in
            tapio_cert_identity(buf.baseAddress, buf.count, &cn, cn.count, &org, org.count)
        }
        guard rc == 0 else { return nil }
        let commonName = String(cString: cn)
        guard !commonName.isEmpty else { return nil }
        self.init(commonName: commonName, role: String(cString: org))
    }

    /// The verified peer of a channel whose TLS handshake has completed.
    static func of(_ context: ChannelHandlerContext) -> PeerIdentity? {
        guard let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate(),
              let der = try? certificate.toDERBytes()
        else { return nil }
        return PeerIdentity(der: der)
    }
}
