import Foundation
import NIOCore
import NIOSSL

/// Why a connection ended in an error, in words an operator can act on.
/// The server logs these at notice; the TLS library's own text, which
/// carries the source paths it was built from, only at debug.
///
/// The BoringSSL reason code is read the way the CLI reads it
/// (`HandshakeDiagnosis` in TapioClient); the words are the server's side of
/// the handshake: its CA judges the client's certificate, and an alert comes
/// from the client about the server's. TapioServer does not depend on the
/// operator's client library, hence the copy of the few lines that read the
/// reason.
enum ConnectionFailure {
    /// What went wrong on a connection, in words.
    static func describe(_ error: Error) -> String {
        let reason = reason(error)
        switch reason {
        case "CERTIFICATE_VERIFY_FAILED":
            return "the client's certificate did not verify: it is not signed by the server's CA (tls.crt from another PKI), or it has expired or is not valid yet"
        case "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client sent no certificate; every client needs one signed by the server's CA"
        case "TLSV1_ALERT_UNKNOWN_CA":
            return "the client does not trust the server's certificate: its ca.crt is not the CA that signed the server's"
        case "SSLV3_ALERT_CERTIFICATE_EXPIRED":
            return "the client says the server's certificate has expired (or is not valid yet)"
        case "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
             "SSLV3_ALERT_CERTIFICATE_REVOKED", "TLSV1_ALERT_ACCESS_DENIED", "TLSV1_ALERT_DECRYPT_ERROR":
            return "the client refused the server's certificate (\(words(reason)))"
        case "HTTP_REQUEST", "HTTPS_PROXY_REQUEST":
            return "the client sent plain HTTP, not TLS: is it pointed at the right port?"
        case "WRONG_VERSION_NUMBER", "UNSUPPORTED_PROTOCOL", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_SHARED_CIPHER", "NO_SHARED_GROUP":
            return "the client does not speak TLS 1.3 (\(words(reason))): is it a tapio agent or CLI, pointed at the right port?"
        case "":
            break
        default:
            return "the TLS handshake failed: \(words(reason))"
        }
        switch error {
        case NIOSSLError.uncleanShutdown:
            return "the client closed the connection without ending TLS (it went away mid-connection)"
        case NIOSSLError.handshakeFailed, NIOSSLError.shutdownFailed, is BoringSSLError:
            return "the TLS handshake failed without a reason from the TLS library"
        case let e as IOError where e.errnoCode == ECONNRESET:
            return "the client reset the connection"
        case let e as IOError where e.errnoCode == EPIPE:
            return "the client closed the connection while the server was writing to it"
        case let e as IOError:
            return "the connection failed: \(String(cString: strerror(e.errnoCode)).lowercased())"
        case ChannelError.eof:
            return "the client closed the connection"
        default:
            return String(describing: error)
        }
    }

    /// BoringSSL's reason code of an error ("CERTIFICATE_VERIFY_FAILED"),
    /// taken from its error string without the source path it carries; ""
    /// when the error is not BoringSSL's or names no reason.
    static func reason(_ error: Error) -> String {
        let boring: BoringSSLError
        switch error {
        case NIOSSLError.handshakeFailed(let inner), NIOSSLError.shutdownFailed(let inner): boring = inner
        case let inner as BoringSSLError: boring = inner
        default: return ""
        }
        let stack: [BoringSSLInternalError]
        switch boring {
        case .sslError(let s), .unknownError(let s): stack = s
        default: return ""
        }
        for entry in stack {
            // "Error: 268435581 error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED at /…"
            let text = entry.description
            guard let colon = text.range(of: "OPENSSL_internal:") else { continue }
            return String(text[colon.upperBound...].prefix { $0 != " " })
        }
        return ""
    }

    /// "TLSV1_ALERT_UNKNOWN_CA" → "tlsv1 alert unknown ca".
    static func words(_ reason: String) -> String {
        reason.lowercased().replacingOccurrences(of: "_", with: " ")
    }
}
