// A small ClickHouse client over its HTTP interface (plain or HTTPS), on
// NIOHTTP1 and NIOSSL: every statement is a POST, answers are bytes (the statement names the format),
// and ClickHouse's own error text comes back as a typed error. It speaks
// only what ClickHouse 18.16 (Debian 12) and current servers both accept
// (docs/clickhouse.md).
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import NIOTLS
import Synchronization

/// How the client reaches and talks to one ClickHouse server.
public struct ClickHouseConfiguration: Sendable {
    /// Who the client is to ClickHouse; `.none` is the server's `default` user.
    public enum Credentials: Sendable, Equatable {
        case none
        /// `X-ClickHouse-User` / `X-ClickHouse-Key` headers.
        case headers(user: String, password: String)
        /// HTTP basic authentication.
        case basic(user: String, password: String)
    }

    public var host: String
    /// The HTTP interface's port (`http_port`, 8123 by default; `https_port`,
    /// 8443 by default, with `tls`).
    public var port: Int
    /// HTTPS: TLS on every connection with these settings (trust roots,
    /// client certificate); nil is plain HTTP.
    public var tls: TLSConfiguration?
    /// The name the server's certificate is checked against (and SNI); nil:
    /// `host` when it is a name. An IP entry of the certificate for the
    /// address connected to is accepted too (NIOSSL's rule).
    public var tlsServerHostname: String?
    public var credentials: Credentials
    /// The database statements run in; nil: the user's default.
    public var database: String?
    /// Connecting, including the TCP handshake.
    public var connectTimeout: Duration
    /// One statement, from sending it to the last byte of the answer.
    public var requestTimeout: Duration
    /// The largest answer body read; a larger one fails the statement
    /// before it is buffered (by its Content-Length) or as it arrives.
    public var maxResponseBytes: Int
    /// Open connections kept for reuse between statements.
    public var maxIdleConnections: Int
    /// An idle connection older than this is closed instead of reused;
    /// below ClickHouse's own `keep_alive_timeout` (3 s by default), so the
    /// client does not write to a connection the server is closing.
    public var idleTimeout: Duration
    /// The longest statement text sent; the rows of an INSERT do not count.
    /// A longer one is refused before it is sent; one above ClickHouse's
    /// default `max_query_size` (256 KiB) raises it to this for itself.
    public var maxStatementBytes: Int

    public init(host: String = "127.0.0.1", port: Int = 8123, credentials: Credentials = .none, database: String? = nil,
                connectTimeout: Duration = .seconds(5), requestTimeout: Duration = .seconds(60), maxResponseBytes: Int = 256 << 20,
                maxIdleConnections: Int = 4, idleTimeout: Duration = .seconds(2), maxStatementBytes: Int = 4 << 20) {
        (self.host, self.port, self.credentials, self.database) = (host, port, credentials, database)
        (self.connectTimeout, self.requestTimeout, self.maxResponseBytes) = (connectTimeout, requestTimeout, maxResponseBytes)
        (self.maxIdleConnections, self.idleTimeout, self.maxStatementBytes) = (maxIdleConnections, idleTimeout, maxStatementBytes)
    }

    /// `http` or `https`, as an operator reads it in logs.
    public var scheme: String { tls == nil ? "http" : "https" }
}

/// What can go wrong talking to ClickHouse, said in words.
public enum ClickHouseError: Error, CustomStringConvertible, Equatable {
    /// ClickHouse refused or failed the statement: its error code and message.
    case server(status: Int, code: Int?, message: String, statement: String)
    case connect(host: String, port: Int, reason: String)
    /// The TLS settings cannot be used (a key that does not match its certificate, …).
    case tlsConfiguration(String)
    case timedOut(after: Duration, statement: String)
    case responseTooLarge(limit: Int, statement: String)
    case statementTooLarge(bytes: Int, limit: Int, statement: String)
    case connectionClosed(statement: String)
    case malformedAnswer(String)

    public var description: String {
        switch self {
        case .server(let status, let code, let message, let statement):
            let what = code.map { "ClickHouse error \($0)" } ?? "ClickHouse answered HTTP \(status)"
            return "\(what): \(message) (statement: \(Self.short(statement)))"
        case .connect(let host, let port, let reason): return "cannot connect to ClickHouse at \(host):\(port): \(reason)"
        case .tlsConfiguration(let why): return "the TLS settings for ClickHouse cannot be used: \(why)"
        case .timedOut(let after, let statement): return "ClickHouse did not answer within \(after) (statement: \(Self.short(statement)))"
        case .responseTooLarge(let limit, let statement):
            return "ClickHouse's answer is larger than the limit of \(limit) bytes (statement: \(Self.short(statement)))"
        case .statementTooLarge(let bytes, let limit, let statement):
            return "the statement is \(bytes) bytes, above the limit of \(limit) (statement: \(Self.short(statement)))"
        case .connectionClosed(let statement): return "ClickHouse closed the connection before answering (statement: \(Self.short(statement)))"
        case .malformedAnswer(let why): return "ClickHouse's answer cannot be read: \(why)"
        }
    }

    static func short(_ statement: String) -> String {
        let line = statement.split(whereSeparator: \.isNewline).joined(separator: " ")
        return line.count <= 200 ? line : String(line.prefix(200)) + "…"
    }

    /// The code and message in an error body. ClickHouse 18.16 writes
    /// `Code: 60, e.displayText() = DB::Exception: Table x doesn't exist., e.what() = DB::Exception`,
    /// current servers `Code: 60. DB::Exception: Table x does not exist. (UNKNOWN_TABLE) (version 23.8.1.1)`.
    static func parse(body: String) -> (code: Int?, message: String) {
        var text = body.trimmingCharacters(in: .whitespacesAndNewlines)
        var code: Int?
        if text.hasPrefix("Code: ") {
            let digits = text.dropFirst(6).prefix(while: \.isNumber)
            code = Int(digits)
            text = String(text.dropFirst(6 + digits.count).drop { $0 == "," || $0 == "." || $0 == " " })
        }
        if let r = text.range(of: "e.displayText() = ") { text = String(text[r.upperBound...]) }
        if let r = text.range(of: ", e.what() = ", options: .backwards) { text = String(text[..<r.lowerBound]) }
        if let r = text.range(of: " (version ", options: .backwards) { text = String(text[..<r.lowerBound]) }
        if text.hasPrefix("DB::Exception: ") { text = String(text.dropFirst(15)) }
        return (code, text.isEmpty ? "(no message)" : text)
    }
}

/// A ClickHouse HTTP client with a small pool of reused connections.
/// Thread-safe; share one per server.
public final class ClickHouseClient: Sendable {
    public let configuration: ClickHouseConfiguration
    private let group: EventLoopGroup
    private let ownsGroup: Bool
    private let logger: Logger
    private let idle = Mutex<[(channel: Channel, since: ContinuousClock.Instant)]>([])
    /// Made once from `configuration.tls`; a failure is every statement's error.
    private let sslContext: Result<NIOSSLContext, ClickHouseError>?
    private let opened = Atomic<Int>(0)

    /// Connections opened so far (the rest of the statements reused one).
    public var connectionsOpened: Int { opened.load(ordering: .relaxed) }

    /// `group`: the event loops to run on; nil creates (and `shutdown` stops) one thread.
    public init(configuration: ClickHouseConfiguration, group: EventLoopGroup? = nil, logger: Logger = Logger(label: "tapio.clickhouse")) {
        self.configuration = configuration
        self.group = group ?? MultiThreadedEventLoopGroup(numberOfThreads: 1)
        self.ownsGroup = group == nil
        self.logger = logger
        self.sslContext = configuration.tls.map { tls in
            Result { try NIOSSLContext(configuration: tls) }.mapError { ClickHouseError.tlsConfiguration("\($0)") }
        }
    }

    /// Closes idle connections and, if the client made it, its event loop.
    public func shutdown() async throws {
        let channels = idle.withLock { all in defer { all.removeAll() }; return all.map(\.channel) }
        for c in channels { try? await c.close() }
        if ownsGroup { try await group.shutdownGracefully() }
    }

    /// Runs one statement and returns the answer's body (in the format the
    /// statement names). `data`, when given, is the input of an INSERT:
    /// the statement then travels in the URL and the rows in the body.
    @discardableResult
    public func execute(_ statement: String, data: [UInt8]? = nil) async throws -> [UInt8] {
        guard statement.utf8.count <= configuration.maxStatementBytes else {
            throw ClickHouseError.statementTooLarge(bytes: statement.utf8.count, limit: configuration.maxStatementBytes, statement: statement)
        }
        // Errors come as a status, not after a 200 and half an answer.
        var query = [("wait_end_of_query", "1")]
        // Only a statement above ClickHouse's default max_query_size raises
        // it: a readonly user may not change settings, and answers the
        // default for everything shorter.
        if statement.utf8.count > Self.defaultMaxQuerySize { query.append(("max_query_size", String(configuration.maxStatementBytes))) }
        if let db = configuration.database { query.append(("database", db)) }
        if data != nil { query.append(("query", statement)) }
        let uri = "/?" + query.map { "\($0.0)=\(Self.percentEncoded($0.1))" }.joined(separator: "&")
        let body = data ?? Array(statement.utf8)
        var head = HTTPRequestHead(version: .http1_1, method: .POST, uri: uri)
        head.headers.add(name: "Host", value: "\(configuration.host):\(configuration.port)")
        head.headers.add(name: "Content-Length", value: String(body.count))
        head.headers.add(name: "Content-Type", value: "text/plain; charset=utf-8")
        switch configuration.credentials {
        case .none: break
        case .headers(let user, let password):
            head.headers.add(name: "X-ClickHouse-User", value: user)
            head.headers.add(name: "X-ClickHouse-Key", value: password)
        case .basic(let user, let password):
            head.headers.add(name: "Authorization", value: "Basic " + Data("\(user):\(password)".utf8).base64EncodedString())
        }

        // A reused connection the server closed meanwhile fails before any
        // answer: then the statement is sent once more on a new connection.
        // Every statement Tapio sends may run twice (docs/clickhouse.md).
        var (channel, reused) = try await connection()
        var response: Response
        do {
            response = try await send(head: head, body: body, on: channel, statement: statement)
        } catch ResponseHandler.Failure.closedBeforeAnswer where reused {
            logger.debug("a reused ClickHouse connection was closed before answering; sending again on a new one",
                         metadata: ["host": "\(configuration.host)", "port": "\(configuration.port)"])
            (channel, reused) = try await connection(fresh: true)
            do {
                response = try await send(head: head, body: body, on: channel, statement: statement)
            } catch ResponseHandler.Failure.closedBeforeAnswer {
                throw ClickHouseError.connectionClosed(statement: statement)
            }
        } catch ResponseHandler.Failure.closedBeforeAnswer {
            throw ClickHouseError.connectionClosed(statement: statement)
        }
        if response.keepAlive { release(channel) } else { channel.close(promise: nil) }
        guard response.status == 200 else {
            let (code, message) = ClickHouseError.parse(body: String(decoding: response.body, as: UTF8.self))
            throw ClickHouseError.server(status: response.status, code: code, message: message, statement: statement)
        }
        return response.body
    }

    /// Runs a statement and reads its TabSeparated answer (the statement
    /// must end in `FORMAT TabSeparated`).
    public func rows(_ statement: String, columns: Int) async throws -> [[String]] {
        let body = try await execute(statement)
        do {
            return try TabSeparated.rows(body, columns: columns)
        } catch let e as TabSeparated.Malformed {
            throw ClickHouseError.malformedAnswer("\(e) (statement: \(ClickHouseError.short(statement)))")
        }
    }

    struct Response: Sendable {
        var status: Int
        var keepAlive: Bool
        var body: [UInt8]
    }

    private func send(head: HTTPRequestHead, body: [UInt8], on channel: Channel, statement: String) async throws -> Response {
        let promise = channel.eventLoop.makePromise(of: Response.self)
        let timeout = Self.timeAmount(configuration.requestTimeout)
        let request = ResponseHandler.Request(head: head, body: body, limit: configuration.maxResponseBytes, promise: promise)
        channel.writeAndFlush(request).cascadeFailure(to: promise)
        // Failing the promise is enough: the catch below closes the connection.
        let timer = channel.eventLoop.scheduleTask(in: timeout) { promise.fail(ResponseHandler.Failure.timedOut) }
        defer { timer.cancel() }
        do {
            return try await promise.futureResult.get()
        } catch let failure as ResponseHandler.Failure {
            channel.close(promise: nil)
            switch failure {
            case .closedBeforeAnswer: throw failure
            case .closed: throw ClickHouseError.connectionClosed(statement: statement)
            case .timedOut: throw ClickHouseError.timedOut(after: configuration.requestTimeout, statement: statement)
            case .tooLarge: throw ClickHouseError.responseTooLarge(limit: configuration.maxResponseBytes, statement: statement)
            case .tls(let why): throw ClickHouseError.connect(host: configuration.host, port: configuration.port, reason: "TLS: \(why)")
            }
        } catch let error as ClickHouseError {
            channel.close(promise: nil)
            throw error
        } catch {
            channel.close(promise: nil)
            let tls = error is NIOSSLError || error is BoringSSLError
            throw ClickHouseError.connect(host: configuration.host, port: configuration.port, reason: tls ? "TLS: \(error)" : "\(error)")
        }
    }

    /// An idle connection young enough to reuse, else a new one.
    private func connection(fresh: Bool = false) async throws -> (Channel, reused: Bool) {
        if !fresh {
            let now = ContinuousClock.now
            var stale: [Channel] = []
            let reusable: Channel? = idle.withLock { all in
                while let last = all.popLast() {
                    if now - last.since < configuration.idleTimeout, last.channel.isActive { return last.channel }
                    stale.append(last.channel)
                }
                return nil
            }
            for c in stale { c.close(promise: nil) }
            if let reusable { return (reusable, true) }
        }
        let timeout = configuration.connectTimeout
        let context = try sslContext?.get()
        let serverHostname = configuration.tlsServerHostname ?? (Self.isIPAddress(configuration.host) ? nil : configuration.host)
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(Self.timeAmount(timeout))
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let context {
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: serverHostname))
                        try channel.pipeline.syncOperations.addHandler(TLSHandshakeWaiter(promise: channel.eventLoop.makePromise()))
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ResponseHandler())
                }
            }
        let channel: Channel
        do {
            channel = try await bootstrap.connect(host: configuration.host, port: configuration.port).get()
        } catch {
            throw ClickHouseError.connect(host: configuration.host, port: configuration.port, reason: "\(error)")
        }
        if context != nil {
            // A refused certificate is this connection's error, in TLS's words,
            // not a write on a channel the handshake already closed.
            let handshake = try await channel.eventLoop.submit {
                try channel.pipeline.syncOperations.handler(type: TLSHandshakeWaiter.self).promise.futureResult
            }.get()
            let timer = channel.eventLoop.scheduleTask(in: Self.timeAmount(timeout)) {
                channel.close(promise: nil)
            }
            defer { timer.cancel() }
            do {
                try await handshake.get()
            } catch {
                channel.close(promise: nil)
                throw ClickHouseError.connect(host: configuration.host, port: configuration.port, reason: "TLS: \(error)")
            }
        }
        opened.add(1, ordering: .relaxed)
        return (channel, false)
    }

    private func release(_ channel: Channel) {
        let kept = idle.withLock { all in
            guard all.count < configuration.maxIdleConnections else { return false }
            all.append((channel, ContinuousClock.now))
            return true
        }
        if !kept { channel.close(promise: nil) }
    }

    static func timeAmount(_ d: Duration) -> TimeAmount {
        .nanoseconds(Int64(d.components.seconds) * 1_000_000_000 + d.components.attoseconds / 1_000_000_000)
    }

    /// An IPv4 or IPv6 literal (no SNI for those; the certificate is checked
    /// against the address).
    static func isIPAddress(_ host: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }

    /// ClickHouse's own `max_query_size` (256 KiB).
    static let defaultMaxQuerySize = 262_144

    /// RFC 3986 unreserved characters stay, every other byte is %XX.
    static func percentEncoded(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
                 UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
                out.unicodeScalars.append(Unicode.Scalar(b))
            default:
                let hex = Array("0123456789ABCDEF".utf8)
                out.unicodeScalars.append("%")
                out.unicodeScalars.append(Unicode.Scalar(hex[Int(b >> 4)]))
                out.unicodeScalars.append(Unicode.Scalar(hex[Int(b & 0xF)]))
            }
        }
        return out
    }
}

/// Completes its promise when the TLS handshake in front of it has
/// completed, or fails it with the handshake's error (or a close before it).
final class TLSHandshakeWaiter: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<Void>

    init(promise: EventLoopPromise<Void>) {
        self.promise = promise
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls { promise.succeed(()) }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(error)
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(ChannelError.eof)
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        promise.fail(ChannelError.ioOnClosedChannel)
    }
}

/// One request at a time on a connection: writes it, gathers the answer
/// within the size limit, completes the request's promise.
final class ResponseHandler: ChannelDuplexHandler {
    typealias InboundIn = HTTPClientResponsePart
    typealias OutboundIn = Request
    typealias OutboundOut = HTTPClientRequestPart

    struct Request: Sendable {
        var head: HTTPRequestHead
        var body: [UInt8]
        var limit: Int
        var promise: EventLoopPromise<ClickHouseClient.Response>
    }

    enum Failure: Error {
        /// The connection ended before any byte of an answer.
        case closedBeforeAnswer
        /// It ended in the middle of one.
        case closed
        case timedOut
        case tooLarge
        /// The TLS handshake or a TLS record failed: NIOSSL's words.
        case tls(String)
    }

    private var pending: Request?
    private var status = 0
    private var keepAlive = true
    private var body: [UInt8] = []
    private var answered = false

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let request = unwrapOutboundIn(data)
        precondition(pending == nil, "one request at a time per connection")
        pending = request
        (status, keepAlive, answered) = (0, true, false)
        body.removeAll(keepingCapacity: false)
        context.write(wrapOutboundOut(.head(request.head)), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(bytes: request.body)))), promise: nil)
        context.write(wrapOutboundOut(.end(nil)), promise: promise)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard let request = pending else { return }
        switch unwrapInboundIn(data) {
        case .head(let head):
            answered = true
            status = Int(head.status.code)
            keepAlive = head.isKeepAlive
            if let length = head.headers.first(name: "Content-Length").flatMap(Int.init), length > request.limit {
                fail(.tooLarge, context: context)
                return
            }
        case .body(var buffer):
            guard body.count + buffer.readableBytes <= request.limit else {
                fail(.tooLarge, context: context)
                return
            }
            body += buffer.readBytes(length: buffer.readableBytes) ?? []
        case .end:
            pending = nil
            request.promise.succeed(.init(status: status, keepAlive: keepAlive, body: body))
            body = []
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(answered ? .closed : .closedBeforeAnswer, context: context)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if let request = pending {
            pending = nil
            if error is NIOSSLError || error is BoringSSLError {
                request.promise.fail(Failure.tls("\(error)"))
            } else {
                // A reset before any answer is what a closed keep-alive connection gives.
                request.promise.fail(answered ? Failure.closed : Failure.closedBeforeAnswer)
            }
        }
        context.close(promise: nil)
    }

    private func fail(_ failure: Failure, context: ChannelHandlerContext) {
        guard let request = pending else { return }
        pending = nil
        body = []
        request.promise.fail(failure)
        context.close(promise: nil)
    }
}
