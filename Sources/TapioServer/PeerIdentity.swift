import CTapioTLS
import NIOCore
import NIOSSL

/// Who is on the other end of a mutually authenticated connection: the
/// subject CN and O of its (already verified) client certificate. The O is
/// the role: `tapio-node` for agents, `tapio-operator` for the CLI.
///
/// A certificate names no one when it is a CA (basicConstraints CA:TRUE or
/// keyUsage keyCertSign), or its subject has no CN, several CNs or several O
/// values: which of two names or roles is meant would be a guess.
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

    /// Why a certificate names no peer.
    public struct Refusal: Error, Sendable, Equatable, CustomStringConvertible {
        public enum Reason: String, Sendable {
            case noCertificate = "no_certificate"
            case unparsable
            case certificateAuthority = "ca_certificate"
            case commonName = "common_name"
            case organization
            case badValue = "bad_value"
        }

        public var reason: Reason
        public var message: String
        public var description: String { message }
    }

    /// Parses a DER leaf certificate; nil when it names no peer.
    public init?(der: [UInt8]) {
        guard case .success(let identity) = Self.parse(der: der) else { return nil }
        self = identity
    }

    /// Parses a DER leaf certificate, saying why it names no peer.
    public static func parse(der: [UInt8]) -> Result<PeerIdentity, Refusal> {
        var cn = [CChar](repeating: 0, count: 256)
        var org = [CChar](repeating: 0, count: 256)
        var err = [CChar](repeating: 0, count: 256)
        let rc = der.withUnsafeBufferPointer { buf in
            tapio_cert_peer_identity(buf.baseAddress, buf.count, &cn, cn.count, &org, org.count, &err, err.count)
        }
        let message = String(decoding: err.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        switch Int(rc) {
        case Int(TAPIO_IDENTITY_OK):
            let commonName = String(decoding: cn.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            guard !commonName.isEmpty else { return .failure(Refusal(reason: .commonName, message: "the subject CN is empty")) }
            return .success(PeerIdentity(commonName: commonName, role: String(decoding: org.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)))
        case Int(TAPIO_IDENTITY_CA): return .failure(Refusal(reason: .certificateAuthority, message: message))
        case Int(TAPIO_IDENTITY_CN): return .failure(Refusal(reason: .commonName, message: message))
        case Int(TAPIO_IDENTITY_O): return .failure(Refusal(reason: .organization, message: message))
        case Int(TAPIO_IDENTITY_BAD_VALUE): return .failure(Refusal(reason: .badValue, message: message))
        default: return .failure(Refusal(reason: .unparsable, message: message))
        }
    }

    /// The verified peer of a channel whose TLS handshake has completed.
    static func of(_ context: ChannelHandlerContext) -> PeerIdentity? {
        try? verified(context).get()
    }

    /// The verified peer of a channel whose TLS handshake has completed, or why
    /// its certificate names no one.
    static func verified(_ context: ChannelHandlerContext) -> Result<PeerIdentity, Refusal> {
        guard let certificate = try? context.pipeline.syncOperations.nioSSL_peerCertificate(),
              let der = try? certificate.toDERBytes()
        else { return .failure(Refusal(reason: .noCertificate, message: "no verified client certificate")) }
        return parse(der: der)
    }
}
