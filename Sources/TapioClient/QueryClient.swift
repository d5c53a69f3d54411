import NIOCore
import NIOPosix
import NIOSSL
import TapioWire

public struct QueryError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The operator's connection to the query listener: mutual TLS with an
/// operator certificate, one `query` frame, one `query_response` frame.
public final class QueryClient: Sendable {
    public let host: String
    public let port: Int
    private let sslContext: NIOSSLContext
    private let serverHostname: String?

    /// `ca`, `certificate`, `key` are PEM files. The server's certificate must
    /// name `host` (a DNS name or an IP address in its SAN).
    public init(host: String, port: Int, ca: String, certificate: String, key: String) throws {
        self.host = host
        self.port = port
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.trustRoots = .file(ca)
        config.certificateChain = try NIOSSLCertificate.fromPEMFile(certificate).map { .certificate($0) }
        // NIOSSL guesses the format from the extension and takes .key for DER.
        config.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
        config.certificateVerification = .fullVerification
        sslContext = try NIOSSLContext(configuration: config)
        // SNI must be a name; for an IP literal the SAN IP is still verified.
        serverHostname = (try? SocketAddress(ipAddress: host, port: 0)) == nil ? host : nil
    }

    /// Sends one request and waits for its answer.
    public func query(_ request: QueryRequest, timeoutSeconds: Int64 = 30) throws -> QueryResponse {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let promise = group.next().makePromise(of: QueryResponse.self)
        let sslContext = self.sslContext
        let serverHostname = self.serverHostname
        let channel: Channel
        do {
            channel = try ClientBootstrap(group: group)
                .connectTimeout(.seconds(10))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let tls = try NIOSSLClientHandler(context: sslContext, serverHostname: serverHostname)
                        try channel.pipeline.syncOperations.addHandlers([
                            tls,
                            ByteToMessageHandler(ClientFrameDecoder(maximumPayload: 256 << 20)),
                            ResponseHandler(promise: promise),
                        ])
                    }
                }
                .connect(host: host, port: port).wait()
        } catch {
            // Every promise must be completed, or NIO reports it as leaked.
            let failure = QueryError("cannot connect to \(host):\(port): \(error)")
            promise.fail(failure)
            throw failure
        }
        defer { channel.close(promise: nil) }
        let frame = Frame(type: .query, payload: request.encoded()).encoded()
        channel.writeAndFlush(ByteBuffer(bytes: frame), promise: nil)
        let timeout = group.next().scheduleTask(in: .seconds(timeoutSeconds)) {
            promise.fail(QueryError("no answer from \(self.host):\(self.port) within \(timeoutSeconds) s"))
        }
        defer { timeout.cancel() }
        return try promise.futureResult.wait()
    }

    /// Sends a request and returns the JSON document, throwing on an error status.
    public func json(_ method: String, _ params: [String: String] = [:]) throws -> JSONValue {
        let response = try query(QueryRequest(method: method, params: params))
        guard response.status == 0 else { throw QueryError("server refused the query: \(response.error) (code \(response.status))") }
        return try JSONValue.parse(response.json)
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

    init(promise: EventLoopPromise<QueryResponse>) {
        self.promise = promise
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.type {
        case .queryResponse:
            do { promise.succeed(try QueryResponse.decode(frame.payload)) } catch { promise.fail(error) }
        case .error:
            let message = (try? WireError.decode(frame.payload).message) ?? "unreadable error frame"
            promise.fail(QueryError("server error: \(message)"))
        default:
            promise.fail(QueryError("unexpected \(frame.type) frame"))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        promise.fail(QueryError("connection closed before an answer"))
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        promise.fail(QueryError("\(error)"))
        context.close(promise: nil)
    }
}
