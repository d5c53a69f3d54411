// Every failure of the NATS client as one error type whose description is a
// sentence an operator can act on: what went wrong, with which server or
// subject, and the limit or the server's own words where there are some.

/// An error of the NATS client or of the server it talks to.
public enum NATSError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The bytes from the server are not the NATS protocol; the connection was closed.
    case protocolViolation(String)
    /// The server sent `-ERR` with this text (e.g. "Authorization Violation").
    case serverError(String)
    /// No server of the list could be reached; one reason per server tried.
    case cannotConnect([String])
    /// The server requires TLS and the client has none configured, or the reverse.
    case tlsMismatch(String)
    /// The connection was lost while the operation waited; it may or may not have happened.
    case connectionLost
    /// The socket failed (reset, refused, unreachable), with the system's words.
    case connectionFailed(String)
    /// The client was closed by its owner.
    case closed
    /// No reply (or no connection) within the time allowed.
    case timeout(String)
    /// A request was published, but nothing subscribes to its subject (status 503).
    case noResponders(subject: String)
    /// A message is larger than the server's `max_payload` (bytes, headers included).
    case payloadTooLarge(bytes: Int, limit: Int)
    /// The server does not accept headers (it did not say `headers: true` in INFO).
    case headersNotSupported
    /// A subject, queue group, key or bucket name that NATS would refuse.
    case invalidName(String)

    public var description: String {
        switch self {
        case .protocolViolation(let why): return "NATS protocol violation: \(why)"
        case .serverError(let text): return "the NATS server reported an error: \(text)"
        case .cannotConnect(let reasons): return "cannot connect to any NATS server: \(reasons.joined(separator: "; "))"
        case .tlsMismatch(let why): return "TLS: \(why)"
        case .connectionLost: return "the connection to the NATS server was lost before the operation completed"
        case .connectionFailed(let why): return why
        case .closed: return "the NATS client is closed"
        case .timeout(let what): return "timed out: \(what)"
        case .noResponders(let subject): return "no responders: nothing subscribes to '\(subject)'"
        case .payloadTooLarge(let bytes, let limit):
            return "message of \(bytes) bytes exceeds the server's max_payload of \(limit) bytes"
        case .headersNotSupported: return "the NATS server does not support message headers"
        case .invalidName(let why): return why
        }
    }
}

/// An error answer of the JetStream API (`{"error": {"code", "err_code", "description"}}`).
public struct JetStreamError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The HTTP-like status (400, 404, 503 …).
    public var code: Int
    /// JetStream's own error number (e.g. 10071 for a wrong last sequence), 0 when absent.
    public var errorCode: Int
    public var text: String

    public init(code: Int, errorCode: Int, text: String) {
        self.code = code
        self.errorCode = errorCode
        self.text = text
    }

    /// 10058: a stream of that name exists with a different configuration.
    public static let streamNameInUse = 10058
    /// 10071: `Nats-Expected-Last-Subject-Sequence` did not match (a stale revision).
    public static let wrongLastSequence = 10071
    /// 10059: no stream of that name.
    public static let streamNotFound = 10059
    /// 10037: no message matched a get.
    public static let noMessageFound = 10037

    public var description: String {
        "JetStream error \(code)\(errorCode == 0 ? "" : " (\(errorCode))"): \(text)"
    }
}
