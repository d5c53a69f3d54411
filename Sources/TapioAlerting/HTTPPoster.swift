import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// One HTTP/1.1 POST per connection (`Connection: close`) on the notifier's
/// event loop: connect, TLS for https (the system's trust store, the host
/// name verified), send, read the status and at most 4 KiB of the body.
/// Every attempt ends within `timeout`, answered or not.
struct HTTPPoster: Sendable {
    struct Response: Sendable {
        var status: Int
        /// The start of the body, for the log.
        var body: String
    }

    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    let tls: NIOSSLContext?

    /// - Parameter trustRootsFile: PEM CA certificates to verify https
    ///   receivers with, instead of the system's trust store.
    ///   Without `needsTLS` (no https receiver) no TLS context is made, so a
    ///   system without a trust store runs http receivers.
    init(needsTLS: Bool, trustRootsFile: String? = nil) throws {
        guard needsTLS else {
            tls = nil
            return
        }
        var config = TLSConfiguration.makeClientConfiguration()
        if let trustRootsFile {
            do {
                config.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(trustRootsFile))
            } catch {
                throw Failure(description: "cannot read CA certificates from \(trustRootsFile): \(error)")
            }
        }
        tls = try NIOSSLContext(configuration: config)
    }

    func post(_ target: AlertTarget, contentType: String = "application/json", headers extra: [(String, String)], body: [UInt8],
              timeout: TimeAmount, on loop: EventLoop) -> EventLoopFuture<Response> {
        let promise = loop.makePromise(of: Response.self)
        let tls = self.tls
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if target.isTLS {
                        guard let tls else { throw Failure(description: "https receiver without a TLS context") }
                        let name = target.host.contains(":") || target.host.allSatisfy({ $0.isNumber || $0 == "." }) ? nil : target.host
                        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: tls, serverHostname: name))
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ResponseCollector(promise: promise))
                }
            }
        let deadline = loop.scheduleTask(in: timeout) {
            promise.fail(Failure(description: "no answer within \(timeout.nanoseconds / 1_000_000) ms"))
        }
        bootstrap.connect(host: target.host, port: target.port).whenComplete { result in
            switch result {
            case .failure(let error):
                promise.fail(Failure(description: "cannot connect to \(target.authority): \(HTTPPoster.describe(error))"))
            case .success(let channel):
                promise.futureResult.whenComplete { _ in channel.close(promise: nil) }
                var headers = HTTPHeaders()
                headers.add(name: "Host", value: target.authority)
                headers.add(name: "Content-Type", value: contentType)
                headers.add(name: "Content-Length", value: "\(body.count)")
                headers.add(name: "Connection", value: "close")
                headers.add(name: "User-Agent", value: "tapio-server")
                for (name, value) in extra { headers.add(name: name, value: value) }
                let head = HTTPRequestHead(version: .http1_1, method: .POST, uri: target.path, headers: headers)
                channel.write(HTTPClientRequestPart.head(head), promise: nil)
                channel.write(HTTPClientRequestPart.body(.byteBuffer(channel.allocator.buffer(bytes: body))), promise: nil)
                channel.writeAndFlush(HTTPClientRequestPart.end(nil)).whenFailure { error in
                    promise.fail(Failure(description: "sending to \(target.authority) failed: \(error)"))
                }
            }
        }
        promise.futureResult.whenComplete { _ in deadline.cancel() }
        return promise.futureResult
    }
}

extension HTTPPoster {
    /// An error in words for the log, without the TLS library's source paths.
    static func describe(_ error: Error) -> String {
        let text = "\(error)"
        if text.contains("CERTIFICATE_VERIFY_FAILED") {
            return "TLS: the receiver's certificate is not trusted (checked against the system's trust store, or --alert-tls-ca)"
        }
        if let e = error as? NIOSSLExtraError, e == .failedToValidateHostname {
            return "TLS: the receiver's certificate does not name the host of the URL"
        }
        if case NIOSSLError.handshakeFailed = error { return "TLS handshake failed" }
        if text.contains("Connection refused") { return "connection refused" }
        if error is ChannelError, case .connectTimeout = error as! ChannelError { return "connect timed out" }
        return text
    }
}

/// Collects one response; fails the promise if the connection ends first.
private final class ResponseCollector: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPClientResponsePart

    private let promise: EventLoopPromise<HTTPPoster.Response>
    private var status: Int?
    private var body: [UInt8] = []

    init(promise: EventLoopPromise<HTTPPoster.Response>) {
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            status = Int(head.status.code)
        case .body(var buffer):
            if body.count < 4096, let bytes = buffer.readBytes(length: min(buffer.readableBytes, 4096 - body.count)) {
                body.append(contentsOf: bytes)
            }
        case .end:
            promise.succeed(.init(status: status ?? 0, body: String(decoding: body, as: UTF8.self)))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(HTTPPoster.Failure(description: "connection closed before a complete response"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(HTTPPoster.Failure(description: HTTPPoster.describe(error)))
        context.close(promise: nil)
    }
}
