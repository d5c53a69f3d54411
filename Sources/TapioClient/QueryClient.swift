import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
import TapioWire

/// Why a query failed, in words an operator can act on: the description
/// says what happened and names the file or address involved, never a TLS
/// library's internal error string. `kind` lets a program decide what to do
/// (the CLI adds the flag that fixes it; `watch` retries only what a server
/// restart explains).
public struct QueryError: Error, CustomStringConvertible, Sendable {
    public enum Kind: Sendable, Equatable {
        /// A CA, certificate or key file is missing or unreadable.
        case files
        /// Nothing accepted the connection (refused, no route, name not resolved, no answer to the connect).
        case unreachable
        /// The server's certificate has expired (or is not valid yet).
        case serverCertificateExpired
        /// The server's certificate is not signed by the CA the client trusts.
        case serverCertificateUntrusted
        /// The server's certificate does not name the host the client connected to.
        case serverNameMismatch
        /// The client's own certificate has expired (or is not valid yet).
        case clientCertificateExpired
        /// The server refused the client's certificate during the handshake (another CA, or revoked).
        case clientCertificateRejected
        /// The certificate is valid but its role may not query (not an operator).
        case forbidden
        /// The server answered the query with an error (bad request, unknown incident, storage failure).
        case refused
        /// The server is shutting down, or closed the connection before answering.
        case connectionClosed
        /// No answer in time.
        case timeout
        /// Anything else (an unreadable answer, an unexpected frame).
        case other
    }

    public var kind: Kind
    public var description: String

    public init(_ description: String) {
        self.init(.other, description)
    }

    public init(_ kind: Kind, _ description: String) {
        self.kind = kind
        self.description = description
    }

    /// Failures a server restart explains: worth retrying for a long-running
    /// command (`watch`, `events --follow`); the others need the operator.
    public var isTransient: Bool {
        switch kind {
        case .unreachable, .connectionClosed, .timeout: return true
        default: return false
        }
    }
}

/// The operator's connection to the query listener: mutual TLS with an
/// operator certificate, one `query` frame, one `query_response` frame.
public final class QueryClient: Sendable {
    public let host: String
    public let port: Int
    public let caFile: String
    public let certificateFile: String
    private let sslContext: NIOSSLContext
    private let serverHostname: String?

    /// `ca`, `certificate`, `key` are PEM files. The server's certificate must
    /// name `host` (a DNS name or an IP address in its SAN). Throws a
    /// `QueryError` when a file is missing or unreadable, or when the
    /// certificate has expired (the server would refuse it anyway, with less
    /// to say about why).
    public init(host: String, port: Int, ca: String, certificate: String, key: String) throws {
        self.host = host
        self.port = port
        caFile = ca
        certificateFile = certificate
        for (path, what) in [(ca, "CA certificate"), (certificate, "certificate"), (key, "private key")] {
            guard FileManager.default.isReadableFile(atPath: path) else {
                let exists = FileManager.default.fileExists(atPath: path)
                throw QueryError(.files, "cannot read the \(what) \(path): \(exists ? "permission denied" : "no such file")")
            }
        }
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.trustRoots = .file(ca)
        let chain: [NIOSSLCertificate]
        do {
            chain = try NIOSSLCertificate.fromPEMFile(certificate)
            guard !chain.isEmpty else { throw QueryError(.files, "") }
        } catch {
            throw QueryError(.files, "\(certificate) holds no PEM certificate")
        }
        do {
            let roots = try NIOSSLCertificate.fromPEMFile(ca)
            guard !roots.isEmpty else { throw QueryError(.files, "") }
        } catch {
            throw QueryError(.files, "\(ca) holds no PEM CA certificate")
        }
        let now = time(nil)
        if chain[0].notValidAfter < now {
            throw QueryError(.clientCertificateExpired, "the certificate \(certificate) expired at \(Self.date(chain[0].notValidAfter))")
        }
        if chain[0].notValidBefore > now {
            throw QueryError(.clientCertificateExpired, "the certificate \(certificate) is not valid before \(Self.date(chain[0].notValidBefore)) (is this machine's clock right?)")
        }
        config.certificateChain = chain.map { .certificate($0) }
        // NIOSSL guesses the format from the extension and takes .key for DER.
        do {
            config.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        } catch {
            throw QueryError(.files, "\(key) holds no PEM private key")
        }
        config.certificateVerification = .fullVerification
        do {
            sslContext = try NIOSSLContext(configuration: config)
        } catch {
            throw QueryError(.files, "the private key \(key) does not belong to the certificate \(certificate), or \(ca) is not a CA certificate")
        }
        // SNI must be a name; for an IP literal the SAN IP is still verified.
        serverHostname = (try? SocketAddress(ipAddress: host, port: 0)) == nil ? host : nil
    }

    /// Sends one request and waits for its answer.
    public func query(_ request: QueryRequest, timeoutSeconds: Int64 = 30) throws -> QueryResponse {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let promise = group.next().makePromise(of: QueryResponse.self)
        let diagnosis = HandshakeDiagnosis(client: self)
        let channel: Channel
        do {
            channel = try connect(group: group, diagnosis: diagnosis) { ResponseHandler(promise: promise, diagnosis: diagnosis) }
        } catch {
            // Every promise must be completed, or NIO reports it as leaked.
            promise.fail(error)
            throw error
        }
        defer { channel.close(promise: nil) }
        let frame = Frame(type: .query, payload: request.encoded()).encoded()
        channel.writeAndFlush(ByteBuffer(bytes: frame), promise: nil)
        let timeout = group.next().scheduleTask(in: .seconds(timeoutSeconds)) {
            promise.fail(QueryError(.timeout, "no answer from \(self.host):\(self.port) within \(timeoutSeconds) s"))
        }
        defer { timeout.cancel() }
        return try promise.futureResult.wait()
    }

    /// A connection to the query port: TLS, the frame decoder, then `handler`.
    func connect(group: EventLoopGroup, diagnosis: HandshakeDiagnosis, handler: @escaping @Sendable () -> ChannelHandler) throws -> Channel {
        let sslContext = self.sslContext
        let serverHostname = self.serverHostname
        do {
            return try ClientBootstrap(group: group)
                .connectTimeout(.seconds(10))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let tls = try diagnosis.makeHandler(context: sslContext, serverHostname: serverHostname)
                        try channel.pipeline.syncOperations.addHandlers([
                            tls,
                            ByteToMessageHandler(ClientFrameDecoder(maximumPayload: 256 << 20)),
                            handler(),
                        ])
                    }
                }
                .connect(host: host, port: port).wait()
        } catch {
            throw QueryError(.unreachable, "cannot connect to \(host):\(port): \(Self.connectFailure(error))")
        }
    }

    /// The answer as a JSON value, for tools and tests that want the
    /// document as it came; programs use the typed methods (`incidents()`, …).
    public func json(_ method: String, _ params: [String: String] = [:]) throws -> JSONValue {
        let bytes = try document(method, params)
        do {
            return try JSONValue.parse(bytes)
        } catch {
            throw QueryError(.other, "the server's answer is not JSON")
        }
    }

    /// Why a connect failed, as the system says it ("connection refused").
    static func connectFailure(_ error: Error) -> String {
        if let e = error as? NIOConnectionError {
            if let first = e.connectionErrors.first { return connectFailure(first.error) }
            if e.dnsAError != nil || e.dnsAAAAError != nil { return "cannot resolve the name \(e.host)" }
            return "no address to connect to"
        }
        if let e = error as? IOError { return String(cString: strerror(e.errnoCode)).lowercased() }
        if let e = error as? ChannelError, case .connectTimeout = e { return "no answer to the connection within 10 s" }
        if error is SocketAddressError { return "cannot resolve the address" }
        return "\(type(of: error))"
    }

    static func date(_ t: time_t) -> String {
        rfc3339(ns: Int64(t) * 1_000_000_000).replacingOccurrences(of: ".000000000Z", with: "Z")
    }
}

/// What went wrong in a TLS handshake: the certificates BoringSSL refused
/// while verifying the server (seen by the verification callback, which
/// returns BoringSSL's own verdict unchanged) and the reason it reported.
final class HandshakeDiagnosis: Sendable {
    private let refused = Mutex<[NIOSSLCertificate]>([])
    private let host: String
    private let port: Int
    private let caFile: String
    private let certificateFile: String

    var address: String { "\(host):\(port)" }

    init(client: QueryClient) {
        host = client.host
        port = client.port
        caFile = client.caFile
        certificateFile = client.certificateFile
    }

    func makeHandler(context: NIOSSLContext, serverHostname: String?) throws -> NIOSSLClientHandler {
        // The observing callback (deprecated in NIOSSL in favour of callbacks
        // that replace verification altogether) is reached through a protocol,
        // so this file keeps NIOSSL's own verification and builds without warnings.
        try (ObservingHandlerFactory() as HandlerFactory).make(context: context, serverHostname: serverHostname) { [self] result, certificate in
            if result == .failed { refused.withLock { $0.append(certificate) } }
            return result
        }
    }

    /// A TLS error in words.
    func explain(_ error: Error) -> QueryError {
        if let extra = error as? NIOSSLExtraError, extra == .failedToValidateHostname {
            return QueryError(.serverNameMismatch, "the server's certificate does not name \(host), the host connected to")
        }
        let reason = Self.reason(error)
        let now = time(nil)
        if let bad = refused.withLock({ $0.first }) {
            if bad.notValidAfter < now {
                return QueryError(.serverCertificateExpired, "the server's certificate expired at \(QueryClient.date(bad.notValidAfter))")
            }
            if bad.notValidBefore > now {
                return QueryError(.serverCertificateExpired, "the server's certificate is not valid before \(QueryClient.date(bad.notValidBefore)) (is this machine's clock right?)")
            }
            return QueryError(.serverCertificateUntrusted, "the server's certificate is not signed by the CA in \(caFile)")
        }
        switch reason {
        case "CERTIFICATE_VERIFY_FAILED":
            return QueryError(.serverCertificateUntrusted, "the server's certificate is not signed by the CA in \(caFile)")
        case "SSLV3_ALERT_CERTIFICATE_EXPIRED":
            return QueryError(.clientCertificateExpired, "the server says the certificate \(certificateFile) has expired")
        case "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "TLSV1_ALERT_DECRYPT_ERROR",
             "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_REVOKED", "TLSV1_ALERT_ACCESS_DENIED":
            return QueryError(.clientCertificateRejected, "the server does not accept the certificate \(certificateFile): it is not signed by the server's CA (\(Self.words(reason)))")
        case "TLSV1_CERTIFICATE_REQUIRED", "TLSV1_ALERT_CERTIFICATE_REQUIRED":
            return QueryError(.clientCertificateRejected, "the server wants a client certificate and got none")
        case "WRONG_VERSION_NUMBER", "TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL":
            return QueryError(.other, "\(host):\(port) does not speak TLS 1.3: is it tapio-server's query port?")
        case "":
            if let e = error as? NIOSSLError, case .uncleanShutdown = e {
                return QueryError(.connectionClosed, "the server closed the connection before answering")
            }
            if let e = error as? IOError { return QueryError(.connectionClosed, "the connection to \(host):\(port) failed: \(String(cString: strerror(e.errnoCode)).lowercased())") }
            return QueryError(.other, "the connection to \(host):\(port) failed (\(type(of: error)))")
        default:
            return QueryError(.other, "TLS with \(host):\(port) failed: \(Self.words(reason))")
        }
    }

    /// BoringSSL's reason code of an error ("CERTIFICATE_VERIFY_FAILED"),
    /// taken from its error string without the source path it carries.
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
            let rest = text[colon.upperBound...]
            return String(rest.prefix { $0 != " " })
        }
        return ""
    }

    /// "TLSV1_ALERT_UNKNOWN_CA" → "tlsv1 alert unknown ca".
    static func words(_ reason: String) -> String {
        reason.lowercased().replacingOccurrences(of: "_", with: " ")
    }
}

private protocol HandlerFactory {
    func make(context: NIOSSLContext, serverHostname: String?, observe: @escaping NIOSSLVerificationCallback) throws -> NIOSSLClientHandler
}

private struct ObservingHandlerFactory: HandlerFactory {
    @available(*, deprecated)
    func make(context: NIOSSLContext, serverHostname: String?, observe: @escaping NIOSSLVerificationCallback) throws -> NIOSSLClientHandler {
        try NIOSSLClientHandler(context: context, serverHostname: serverHostname, verificationCallback: observe)
    }
}

struct ClientFrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = Frame
    let maximumPayload: UInt32

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard buffer.readableBytes >= FrameHeader.size, let head = buffer.getBytes(at: buffer.readerIndex, length: FrameHeader.size) else { return .needMoreData }
        let header = try FrameHeader.parse(head, maximumPayload: maximumPayload)
        guard buffer.readableBytes >= FrameHeader.size + Int(header.length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: FrameHeader.size)
        context.fireChannelRead(wrapInboundOut(Frame(type: header.type, payload: buffer.readBytes(length: Int(header.length))!)))
        return .continue
    }
}

final class ResponseHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    private let promise: EventLoopPromise<QueryResponse>
    private let diagnosis: HandshakeDiagnosis

    init(promise: EventLoopPromise<QueryResponse>, diagnosis: HandshakeDiagnosis) {
        self.promise = promise
        self.diagnosis = diagnosis
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.type {
        case .queryResponse:
            do { promise.succeed(try QueryResponse.decode(frame.payload)) } catch { promise.fail(QueryError(.other, "the server's answer cannot be decoded")) }
        case .error:
            let message = (try? WireError.decode(frame.payload).message) ?? "unreadable error frame"
            promise.fail(QueryError(.refused, "server error: \(message)"))
        default:
            promise.fail(QueryError(.other, "unexpected \(frame.type) frame"))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(QueryError(.connectionClosed, "connection closed before an answer"))
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if error is FrameError || error is ByteToMessageDecoderError {
            promise.fail(QueryError(.other, "the server sent a malformed frame: is \(diagnosis.address) tapio-server's query port?"))
        } else {
            promise.fail(diagnosis.explain(error))
        }
        context.close(promise: nil)
    }
}
