import Foundation
import NIOCore
import NIOPosix
import TapioQueryAPI
import TapioWire

/// One method per query, answering the query API's types
/// (docs/protocol.md, "Queries"). An answer that does not decode into its
/// type is a `QueryError` of kind `.other` naming the field.
extension QueryClient {
    /// The answer of `method`, decoded as `T`.
    public func answer<T: Decodable>(_ type: T.Type, _ method: QueryMethod, _ params: [String: String] = [:], timeoutSeconds: Int64 = 30) throws -> T {
        let bytes = try document(method.rawValue, params, timeoutSeconds: timeoutSeconds)
        do {
            return try QueryCoding.decode(type, from: bytes)
        } catch let error as QueryDecodingError {
            throw QueryError(.other, error.description)
        }
    }

    /// `events`: `params` as docs/protocol.md lists them (`since_ns`, `until_ns`, `node`, `kind`, `pid`, `pod`,
    /// `pod_prefix`, `service`, `namespace`, `limit`).
    public func events(_ params: [String: String] = [:], timeoutSeconds: Int64 = 30) throws -> EventsAnswer {
        try answer(EventsAnswer.self, .events, params, timeoutSeconds: timeoutSeconds)
    }

    public func nodes(timeoutSeconds: Int64 = 30) throws -> NodesAnswer {
        try answer(NodesAnswer.self, .nodes, timeoutSeconds: timeoutSeconds)
    }

    public func pods(timeoutSeconds: Int64 = 30) throws -> PodsAnswer {
        try answer(PodsAnswer.self, .pods, timeoutSeconds: timeoutSeconds)
    }

    /// `status`: `open`, `resolved` or `all`; `sinceNs`: only incidents updated since.
    public func incidents(status: String = "all", sinceNs: Int64? = nil, timeoutSeconds: Int64 = 30) throws -> IncidentsAnswer {
        var params = ["status": status]
        if let sinceNs { params["since_ns"] = String(sinceNs) }
        return try answer(IncidentsAnswer.self, .incidents, params, timeoutSeconds: timeoutSeconds)
    }

    /// One incident with its timeline.
    public func timeline(id: String, timeoutSeconds: Int64 = 30) throws -> QueryIncident {
        try answer(QueryIncident.self, .timeline, ["id": id], timeoutSeconds: timeoutSeconds)
    }

    /// One incident with its timeline, links, weights and model.
    public func explain(id: String, timeoutSeconds: Int64 = 30) throws -> QueryIncident {
        try answer(QueryIncident.self, .explain, ["id": id], timeoutSeconds: timeoutSeconds)
    }

    public func services(timeoutSeconds: Int64 = 30) throws -> ServicesAnswer {
        try answer(ServicesAnswer.self, .services, timeoutSeconds: timeoutSeconds)
    }

    /// The answer's JSON bytes, throwing on an error status.
    func document(_ method: String, _ params: [String: String], timeoutSeconds: Int64 = 30) throws -> [UInt8] {
        try checked(try query(QueryRequest(method: method, params: params), timeoutSeconds: timeoutSeconds)).json
    }

    /// The response, or its error status as a `QueryError` in words.
    func checked(_ response: QueryResponse) throws -> QueryResponse {
        guard response.status != 0 else { return response }
        switch WireErrorCode(rawValue: response.status) {
        case .forbidden:
            let who = (try? DevelopmentPKI.identity(ofCertificateFile: certificateFile)).map { "CN=\($0.commonName), O=\($0.role)" } ?? "?"
            throw QueryError(.forbidden, "the server refused the certificate \(certificateFile) (\(who)): \(response.error)")
        case .shuttingDown:
            throw QueryError(.connectionClosed, "the server is shutting down: \(response.error)")
        default:
            throw QueryError(.refused, "server refused the query: \(response.error) (code \(response.status))")
        }
    }

    /// Subscribes to incident changes (docs/protocol.md, "Subscriptions")
    /// and calls `onMessage` with each message as it arrives — the snapshot
    /// first — on the calling thread, until it returns false (then this
    /// returns normally). Throws a `QueryError` when the connection ends:
    /// `.connectionClosed` when the server closed it (a restart), `.timeout`
    /// when nothing, not even a keepalive, came for `silenceSeconds`
    /// (default three keepalive intervals, at least 5 s), or what the server
    /// refused. At `until` it returns normally, whatever is under way.
    public func subscribe(keepaliveMs: Int64 = 5_000, silenceSeconds: Double? = nil, until: Date? = nil,
                          onMessage: (SubscriptionMessage) throws -> Bool) throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let inbox = Inbox()
        let diagnosis = HandshakeDiagnosis(client: self)
        let channel = try connect(group: group, diagnosis: diagnosis) { StreamHandler(inbox: inbox, diagnosis: diagnosis) }
        defer { channel.close(promise: nil) }
        let request = QueryRequest(method: QueryMethod.subscribe.rawValue, params: ["keepalive_ms": String(keepaliveMs)])
        channel.writeAndFlush(ByteBuffer(bytes: Frame(type: .query, payload: request.encoded()).encoded()), promise: nil)
        let silence = silenceSeconds ?? max(5, 3 * Double(keepaliveMs) / 1000)
        while true {
            let left = until.map { $0.timeIntervalSinceNow } ?? .infinity
            if left <= 0 { return }
            guard let next = inbox.take(timeoutSeconds: min(silence, left)) else {
                if left <= silence { return }
                throw QueryError(.timeout, "no message from \(host):\(port) within \(Int(silence.rounded())) s (the server sends a keepalive every \(keepaliveMs) ms)")
            }
            let response = try checked(try next.get())
            let message: SubscriptionMessage
            do {
                message = try QueryCoding.decode(SubscriptionMessage.self, from: response.json)
            } catch let error as QueryDecodingError {
                throw QueryError(.other, error.description)
            }
            guard try onMessage(message) else { return }
        }
    }
}

/// Frames (or the failure that ended the connection) from the event loop to the calling thread.
final class Inbox: @unchecked Sendable {
    private let condition = NSCondition()
    private var items: [Result<QueryResponse, QueryError>] = []
    private var ended = false

    func push(_ item: Result<QueryResponse, QueryError>) {
        condition.lock()
        defer { condition.unlock() }
        guard !ended else { return }
        if case .failure = item { ended = true }
        items.append(item)
        condition.signal()
    }

    /// The next item; nil when none came in time.
    func take(timeoutSeconds: Double) -> Result<QueryResponse, QueryError>? {
        condition.lock()
        defer { condition.unlock() }
        let deadline = Date(timeIntervalSinceNow: timeoutSeconds)
        while items.isEmpty {
            if !condition.wait(until: deadline) && items.isEmpty { return nil }
        }
        return items.removeFirst()
    }
}

final class StreamHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    private let inbox: Inbox
    private let diagnosis: HandshakeDiagnosis

    init(inbox: Inbox, diagnosis: HandshakeDiagnosis) {
        self.inbox = inbox
        self.diagnosis = diagnosis
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        switch frame.type {
        case .queryResponse:
            do { inbox.push(.success(try QueryResponse.decode(frame.payload))) } catch { inbox.push(.failure(QueryError(.other, "the server's answer cannot be decoded"))) }
        case .goodbye:
            inbox.push(.failure(QueryError(.connectionClosed, "the server at \(diagnosis.address) is shutting down")))
        case .error:
            let message = (try? WireError.decode(frame.payload).message) ?? "unreadable error frame"
            inbox.push(.failure(QueryError(.refused, "server error: \(message)")))
        default:
            inbox.push(.failure(QueryError(.other, "unexpected \(frame.type) frame")))
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        inbox.push(.failure(QueryError(.connectionClosed, "the server at \(diagnosis.address) closed the connection")))
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if error is FrameError || error is ByteToMessageDecoderError {
            inbox.push(.failure(QueryError(.other, "the server sent a malformed frame: is \(diagnosis.address) tapio-server's query port?")))
        } else {
            inbox.push(.failure(diagnosis.explain(error)))
        }
        context.close(promise: nil)
    }
}
