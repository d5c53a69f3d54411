import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
import TapioWire

/// The web UI's HTTP server (docs/ui.md): plain HTTP/1.1 on a local address,
/// pages rendered from the query API, and `/api/fragment` for the page's
/// live updates. It holds no data of its own: every request asks
/// tapio-server through `query`, which runs on a small thread pool because
/// the query client blocks.
///
/// Access: with a `token`, a request must carry it once as `?token=…` (the
/// URL `tapio ui` prints); the answer sets it as a cookie for this port and
/// redirects to the same page without it, so it does not stay in the
/// address bar or history. Without the token or the cookie the answer is 401.
public final class UIServer: Sendable {
    public struct Configuration: Sendable {
        /// Where to listen; loopback by default, since whoever reaches the
        /// port reads what the operator certificate may read.
        public var host = "127.0.0.1"
        public var port = 7480
        /// Required once per browser (see above); nil: no check.
        public var token: String?
        /// Threads that wait for the server's answers.
        public var queryThreads = 2

        public init() {}
    }

    public let configuration: Configuration
    private let query: UIQueries
    private let feed: IncidentFeed?
    private let group: MultiThreadedEventLoopGroup
    private let pool: NIOThreadPool
    private let channel = Mutex<Channel?>(nil)

    /// `feed`: incident changes pushed by the server, for `/api/changes`
    /// (nil: pages only poll).
    public init(configuration: Configuration, query: UIQueries, feed: IncidentFeed? = nil) {
        self.configuration = configuration
        self.query = query
        self.feed = feed
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        pool = NIOThreadPool(numberOfThreads: max(1, configuration.queryThreads))
    }

    /// Binds and starts serving; returns the bound address (port 0 picks one).
    public func start() throws -> SocketAddress {
        pool.start()
        let router = Router(configuration: configuration, query: query)
        let pool = self.pool
        let feed = self.feed
        let bound: Channel
        do {
            bound = try ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 64)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelInitializer { channel in
                    channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true).flatMapThrowing {
                        try channel.pipeline.syncOperations.addHandler(UIHTTPHandler(router: router, pool: pool, feed: feed))
                    }
                }
                .bind(host: configuration.host, port: configuration.port).wait()
        } catch let error as IOError {
            throw UIServerError("cannot listen on \(configuration.host):\(configuration.port): \(String(cString: strerror(error.errnoCode)).lowercased())")
        } catch is SocketAddressError {
            throw UIServerError("cannot listen on \(configuration.host):\(configuration.port): not an address of this machine")
        } catch {
            throw UIServerError("cannot listen on \(configuration.host):\(configuration.port) (\(type(of: error)))")
        }
        channel.withLock { $0 = bound }
        return bound.localAddress!
    }

    /// Waits until the server is shut down.
    public func wait() throws {
        try channel.withLock { $0 }?.closeFuture.wait()
    }

    public func shutdown() {
        try? channel.withLock { $0 }?.close().wait()
        try? group.syncShutdownGracefully()
        try? pool.syncShutdownGracefully()
    }
}

/// Why the UI cannot serve, in words.
public struct UIServerError: Error, CustomStringConvertible {
    public var description: String
    init(_ description: String) { self.description = description }
}

/// An answer: status, content type, body, extra headers.
struct Response: Sendable {
    var status: HTTPResponseStatus
    var contentType: String
    var body: String
    var headers: [(String, String)] = []

    static func html(_ status: HTTPResponseStatus, _ body: String) -> Response {
        Response(status: status, contentType: "text/html; charset=utf-8", body: body)
    }

    static func json(_ doc: JSONValue) -> Response {
        Response(status: .ok, contentType: "application/json", body: doc.serialized())
    }
}

/// From a request's method, target and cookies to an answer; free of NIO's
/// channel so it is tested directly.
struct Router: Sendable {
    let configuration: UIServer.Configuration
    let query: UIQueries

    var cookieName: String { "tapio_ui_\(configuration.port)" }

    func respond(method: HTTPMethod, target: String, cookie: String?) -> Response {
        guard method == .GET || method == .HEAD else {
            return Response(status: .methodNotAllowed, contentType: "text/plain; charset=utf-8", body: "the UI only reads: GET\n", headers: [("Allow", "GET, HEAD")])
        }
        let (path, params) = Self.split(target)
        if let refusal = refusal(path: path, params: params, cookie: cookie) { return refusal }
        return route(path: path, params: params)
    }

    /// The answer when the request may not be served as it is: the token's
    /// redirect, or the refusal without it; nil when it may.
    func refusal(path: String, params: [String: String], cookie: String?) -> Response? {
        if let token = configuration.token {
            if let given = params["token"] {
                guard Self.same(given, token) else { return denied() }
                var rest = params
                rest["token"] = nil
                // Only ever a path of this UI ("//host" would leave it).
                let local = path.hasPrefix("/") && !path.hasPrefix("//") ? path : "/"
                let location = local + (rest.isEmpty ? "" : "?" + rest.keys.sorted().map { "\(urlEncode($0))=\(urlEncode(rest[$0]!))" }.joined(separator: "&"))
                return Response(status: .seeOther, contentType: "text/plain; charset=utf-8", body: "", headers: [
                    ("Location", location), ("Set-Cookie", "\(cookieName)=\(token); Path=/; HttpOnly; SameSite=Strict"),
                ])
            }
            guard let value = Self.cookie(cookieName, in: cookie), Self.same(value, token) else { return denied() }
        }
        return nil
    }

    func route(path: String, params: [String: String]) -> Response {
        switch path {
        case "/ui.js": return Response(status: .ok, contentType: "text/javascript; charset=utf-8", body: liveScript)
        case "/favicon.ico": return Response(status: .noContent, contentType: "text/plain", body: "")
        case "/api/fragment":
            // The page the script is on, rendered again; an error keeps the old one on screen.
            let (pagePath, pageParams) = Self.split(params["path"] ?? "/")
            do {
                let rendered = try Pages.render(path: pagePath, params: pageParams, query: query)
                return .json(.object(["html": .string(rendered.fragment), "title": .string(rendered.title)]))
            } catch {
                return .json(.object(["error": .string("\(error)")]))
            }
        default:
            do {
                let rendered = try Pages.render(path: path, params: params, query: query)
                return .html(.ok, page(title: rendered.title, active: rendered.tab, fragment: rendered.fragment))
            } catch let error as NotFound {
                return .html(.notFound, page(title: "Not found", active: "", fragment: "<div class=\"error-box\">\(esc(error.description))</div>", live: false))
            } catch {
                // The query failed: the reason in words, and the page polls on until it works.
                let text = "\(error)"
                let status: HTTPResponseStatus = text.hasPrefix("server refused the query: no incident") ? .notFound : .badGateway
                return .html(status, page(title: "Cannot ask tapio-server", active: "", fragment: "<h1>Cannot ask tapio-server</h1><div class=\"error-box\">\(esc(text))</div>"))
            }
        }
    }

    func denied() -> Response {
        .html(.unauthorized, page(title: "Token needed", active: "", fragment: """
            <h1>Token needed</h1><div class="error-box">This UI shows what an operator certificate may read, so it wants the token \
            that <code>tapio ui</code> printed when it started: open the URL it printed (…/?token=…) once in this browser.</div>
            """, live: false))
    }

    /// Path and decoded query parameters of a request target.
    static func split(_ target: String) -> (String, [String: String]) {
        let parts = target.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false)
        let rawPath = String(parts.first ?? "/")
        let path = rawPath.removingPercentEncoding ?? rawPath
        var params: [String: String] = [:]
        if parts.count == 2 {
            for pair in parts[1].split(separator: "&") {
                let kv = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                func decode(_ s: Substring) -> String { String(s).replacingOccurrences(of: "+", with: " ").removingPercentEncoding ?? String(s) }
                guard let k = kv.first.map(decode), !k.isEmpty else { continue }
                params[k] = kv.count == 2 ? decode(kv[1]) : ""
            }
        }
        return (path.isEmpty ? "/" : path, params)
    }

    static func cookie(_ name: String, in header: String?) -> String? {
        for part in (header ?? "").split(separator: ";") {
            let kv = part.trimmingCharacters(in: .whitespaces).split(separator: "=", maxSplits: 1)
            if kv.count == 2, kv[0] == name { return String(kv[1]) }
        }
        return nil
    }

    /// Compares without stopping at the first difference.
    static func same(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var diff: UInt8 = 0
        for i in x.indices { diff |= x[i] ^ y[i] }
        return diff == 0
    }
}

/// One request at a time per connection: the head, then at `.end` the
/// router's answer computed on the thread pool and written back on the
/// channel's event loop; the connection is closed after each answer.
final class UIHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let router: Router
    private let pool: NIOThreadPool
    private let feed: IncidentFeed?
    private var head: HTTPRequestHead?

    init(router: Router, pool: NIOThreadPool, feed: IncidentFeed?) {
        self.router = router
        self.pool = pool
        self.feed = feed
    }

    /// Headers on every answer: no caching of cluster data, scripts only from
    /// this origin, no framing, no referrer carrying a token elsewhere.
    static let securityHeaders: [(String, String)] = [
        ("Cache-Control", "no-store"),
        ("Content-Security-Policy", "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    ]

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            let router = self.router
            let cookie = head.headers["Cookie"].joined(separator: "; ")
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            if let feed, head.method == .GET, head.uri.hasPrefix("/api/changes") {
                // A long-poll waits on the event loop, not on a query thread.
                let (path, params) = Router.split(head.uri)
                if path == "/api/changes" {
                    if let refusal = router.refusal(path: path, params: params, cookie: cookie.isEmpty ? nil : cookie) {
                        write(context: context, refusal, headOnly: false, version: head.version)
                        return
                    }
                    let after = params["after"].flatMap { Int($0) } ?? -1
                    let wait = params["wait_s"].flatMap { Int64($0) } ?? IncidentFeed.maximumWaitSeconds
                    feed.next(after: after, on: context.eventLoop, waitSeconds: wait).whenSuccess { generation in
                        let (handler, context) = bound.value
                        handler.write(context: context, .json(.object(["generation": .int(Int64(generation))])), headOnly: false, version: head.version)
                    }
                    return
                }
            }
            pool.runIfActive(eventLoop: context.eventLoop) {
                router.respond(method: head.method, target: head.uri, cookie: cookie.isEmpty ? nil : cookie)
            }.whenComplete { result in
                let (handler, context) = bound.value
                let response = (try? result.get()) ?? .html(.internalServerError, "the UI is shutting down")
                handler.write(context: context, response, headOnly: head.method == .HEAD, version: head.version)
            }
        }
    }

    private func write(context: ChannelHandlerContext, _ response: Response, headOnly: Bool, version: HTTPVersion) {
        guard context.channel.isActive else { return }
        let body = ByteBuffer(string: response.body)
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Connection", value: "close")
        for (k, v) in Self.securityHeaders + response.headers { headers.add(name: k, value: v) }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: version, status: response.status, headers: headers))), promise: nil)
        if !headOnly { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in bound.value.close(promise: nil) }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}
