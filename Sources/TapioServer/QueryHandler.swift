import Logging
import NIOCore
import NIOPosix
import TapioCorrelation
import TapioQueryAPI
import TapioStore
import TapioWire

/// Answers the CLI on the query listener. Only certificates with the operator
/// role may ask (checked as the TLS handshake completes, by `ConnectionGuard`,
/// and again here at the first frame); each request is one `query` frame
/// answered by one `query_response` frame carrying a JSON document of the
/// query API's types (docs/protocol.md). A `subscribe` query turns the
/// connection into a stream of `query_response` frames: a snapshot, then
/// incident changes as the engine makes them, and keepalives
/// (`QuerySubscriptions`).
final class QueryHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private let server: QueryContext
    private let queries: NIOThreadPool
    private let subscriptions: QuerySubscriptions
    private var authorized: Bool?
    /// Set once the connection subscribed: it carries nothing else then.
    private var subscription: QuerySubscriptions.Subscriber?

    init(server: QueryContext, queries: NIOThreadPool, subscriptions: QuerySubscriptions) {
        self.server = server
        self.queries = queries
        self.subscriptions = subscriptions
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if authorized == nil {
            let peer = PeerIdentity.of(context)
            authorized = peer?.role == PeerIdentity.operatorRole
            if authorized == false {
                server.metrics.add("tapio_server_connections_rejected_total{reason=\"forbidden\"}")
                respond(context: context, QueryResponse(status: WireErrorCode.forbidden.rawValue, error: "certificate role \(peer?.role ?? "none") may not query (needs \(PeerIdentity.operatorRole))"), close: true)
                return
            }
        }
        guard subscription == nil else {
            respond(context: context, QueryResponse(status: WireErrorCode.unexpectedFrame.rawValue, error: "this connection carries a subscription; query on another connection"), close: true)
            return
        }
        guard frame.type == .query else {
            respond(context: context, QueryResponse(status: WireErrorCode.unexpectedFrame.rawValue, error: "expected a query frame, got \(frame.type)"), close: true)
            return
        }
        let request: QueryRequest
        do {
            request = try QueryRequest.decode(frame.payload)
        } catch {
            respond(context: context, QueryResponse(status: WireErrorCode.malformed.rawValue, error: "\(error)"), close: true)
            return
        }
        server.metrics.add("tapio_server_queries_total{method=\"\(labelValue(request.method))\"}")
        if request.method == QueryMethod.subscribe.rawValue {
            subscribe(context: context, request)
            return
        }
        let server = self.server
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        queries.runIfActive(eventLoop: context.eventLoop) {
            try server.metrics.histograms.query.time { try QueryExecutor(server: server).execute(request) }
        }.whenComplete { result in
            let (handler, context) = loopBound.value
            switch result {
            case .success(let json):
                handler.respond(context: context, QueryResponse(json: json), close: false)
            case .failure(let error as WireError):
                handler.respond(context: context, QueryResponse(status: error.code, error: error.message), close: false)
            case .failure(let error):
                handler.respond(context: context, QueryResponse(status: WireErrorCode.storageFailed.rawValue, error: "\(error)"), close: false)
            }
        }
    }

    /// Registers the connection for changes first, then sends the snapshot
    /// (changes that arrive meanwhile wait behind it), then keepalives.
    private func subscribe(context: ChannelHandlerContext, _ request: QueryRequest) {
        let keepalive: TimeAmount
        do {
            keepalive = try QuerySubscriptions.keepalive(request.params)
        } catch let error as WireError {
            respond(context: context, QueryResponse(status: error.code, error: error.message), close: false)
            return
        } catch {
            return
        }
        let subscriber = subscriptions.add(channel: context.channel, keepalive: keepalive)
        subscription = subscriber
        let server = self.server
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        queries.runIfActive(eventLoop: context.eventLoop) {
            try QueryCoding.encode(SubscriptionMessage(type: .snapshot, time: rfc3339(ns: wallClockNs()),
                                                       incidents: try QueryExecutor(server: server).incidents(status: nil, sinceNs: nil).incidents))
        }.whenComplete { result in
            let (handler, context) = loopBound.value
            switch result {
            case .success(let json):
                subscriber.started(snapshot: json)
            case .failure(let error):
                handler.subscriptions.remove(subscriber)
                handler.respond(context: context, QueryResponse(status: WireErrorCode.storageFailed.rawValue, error: "\(error)"), close: true)
            }
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        if let subscription { subscriptions.remove(subscription) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        server.metrics.add("tapio_server_connection_errors_total")
        let peer = "\(context.remoteAddress.map { "\($0)" } ?? "?")"
        server.logger.notice("query connection error", metadata: ["peer": "\(peer)", "reason": "\(ConnectionFailure.describe(error))"])
        server.logger.debug("query connection error as the library reported it", metadata: ["peer": "\(peer)", "error": "\(error)"])
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            // A subscriber sends nothing after its query; the keepalives it
            // is sent find out whether it is still there.
            if subscription == nil { context.close(promise: nil) }
            return
        }
        if event is ServerShutdownEvent {
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func respond(context: ChannelHandlerContext, _ response: QueryResponse, close: Bool) {
        guard context.channel.isActive else { return }
        let write = context.writeAndFlush(wrapOutboundOut(Frame(type: .queryResponse, payload: response.encoded())))
        if close {
            let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
            write.whenComplete { _ in bound.value.close(promise: nil) }
        }
    }
}

/// What the query listener answers from, in every role that has one: the
/// engine (live incidents, then the incident archive) always; the event
/// store and the node registry only in role `all` (a correlate replica has
/// neither: it says so instead of answering with nothing).
final class QueryContext: Sendable {
    let configuration: ServerConfiguration
    let correlation: CorrelationService
    let pods: PodDirectory
    let metrics: ServerMetrics
    let logger: Logger
    let store: (any EventStore)?
    let registry: NodeRegistry?
    /// The role, named in refusals (`all`, `correlate`).
    let role: String
    /// Why the engine here holds no live state (a standby), nil while it
    /// does: `services` and `pods` (what the engine learned from the
    /// stream) are refused then rather than answered empty.
    let engineInactive: @Sendable () -> String?
    /// Where `events` is answered from when there is no local store (role
    /// query: ClickHouse): the parsed query and the peer attribution in,
    /// the typed answer out. Nil where events are not kept.
    let eventSource: (@Sendable (EventQuery, _ attribute: @escaping @Sendable ([String: JSONValue]) -> [String: JSONValue]) throws -> EventsAnswer)?

    init(configuration: ServerConfiguration, correlation: CorrelationService, pods: PodDirectory, metrics: ServerMetrics, logger: Logger,
         store: (any EventStore)?, registry: NodeRegistry?, role: String, engineInactive: @escaping @Sendable () -> String? = { nil },
         eventSource: (@Sendable (EventQuery, _ attribute: @escaping @Sendable ([String: JSONValue]) -> [String: JSONValue]) throws -> EventsAnswer)? = nil) {
        self.eventSource = eventSource
        self.configuration = configuration
        self.correlation = correlation
        self.pods = pods
        self.metrics = metrics
        self.logger = logger
        self.store = store
        self.registry = registry
        self.role = role
        self.engineInactive = engineInactive
    }
}

/// The query methods, free of I/O but for the store (so they are tested directly).
struct QueryExecutor {
    let server: QueryContext

    /// The answer to `request`, encoded (sorted keys).
    func execute(_ request: QueryRequest) throws -> [UInt8] {
        switch QueryMethod(rawValue: request.method) {
        case .events: return try QueryCoding.encode(events(request.params))
        case .nodes: return try QueryCoding.encode(nodes())
        case .pods:
            if let why = server.engineInactive() { throw WireError(.badRequest, "pods: \(why)") }
            return try QueryCoding.encode(pods())
        case .incidents:
            let status = request.params["status"] ?? "all"
            guard ["open", "resolved", "all"].contains(status) else {
                throw WireError(.badRequest, "status must be open, resolved or all")
            }
            var sinceNs: Int64?
            if let text = request.params["since_ns"] {
                guard let v = Int64(text) else { throw WireError(.badRequest, "since_ns must be an integer, got \(text)") }
                sinceNs = v
            }
            return try QueryCoding.encode(incidents(status: status == "all" ? nil : Incident.Status(rawValue: status), sinceNs: sinceNs))
        case .timeline, .explain:
            guard let id = request.params["id"] else { throw WireError(.badRequest, "\(request.method) needs an incident id") }
            guard let incident = try incident(id: id, explain: request.method == "explain") else { throw WireError(.badRequest, "no incident \(id)") }
            return try QueryCoding.encode(incident)
        case .services:
            if let why = server.engineInactive() { throw WireError(.badRequest, "services: \(why)") }
            return try QueryCoding.encode(ServicesAnswer(server.correlation.graph))
        case .subscribe: throw WireError(.badRequest, "subscribe is answered on its own connection")
        case nil: throw WireError(.badRequest, "unknown query method \(request.method); one of: \(QueryMethod.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    /// Live incidents from the engine, then stored ones it no longer holds
    /// (older than the replay window), as the list has them.
    func incidents(status: Incident.Status?, sinceNs: Int64?) throws -> IncidentsAnswer {
        let (live, stored) = try server.correlation.incidentModels(status: status, sinceNs: sinceNs)
        var out = live.map { QueryIncident($0) }
        for s in stored {
            do {
                out.append(try QueryIncident(stored: s).summary)
            } catch {
                server.logger.error("a stored incident cannot be read", metadata: ["incident": "\(s.id)", "error": "\(error)"])
            }
        }
        return IncidentsAnswer(incidents: out)
    }

    /// One incident with its timeline (`explain`: also every link's factors and the weights).
    func incident(id: String, explain: Bool) throws -> QueryIncident? {
        let (live, stored) = try server.correlation.incidentModel(id: id)
        if let live {
            return QueryIncident(live, timeline: true, explainWith: explain ? server.correlation.configuration.engine.weights : nil)
        }
        guard let stored else { return nil }
        var i = try QueryIncident(stored: stored)
        // The store keeps the explain document; timeline answers without the explanation.
        if !explain { (i.links, i.weights, i.model) = (nil, nil, nil) }
        return i
    }

    private func events(_ params: [String: String]) throws -> EventsAnswer {
        guard let store = server.store else {
            if let source = server.eventSource {
                // The store applies every filter itself (ClickHouse: in SQL).
                return try source(try eventQuery(params)) { peerAttributed(.object($0)) }
            }
            throw WireError(.badRequest, "events are not kept in role \(server.role) (the stream holds them; docs/scaling.md): ask a server in role all or query")
        }
        let query = try eventQuery(params)
        let events = try Self.filtered(query, store: store, scanLimit: server.configuration.limits.maxQueryEvents)
        var answer = EventsAnswer(events: try events.map { try QueryEvent(fields: peerAttributed($0.json)) })
        // Time retention has deleted is said, not answered with silently less.
        if let horizon = try store.retainedFromNs(), (query.sinceNs ?? .min) <= horizon {
            answer.retention = RetentionNotice(deletedBefore: rfc3339(ns: horizon), deletedBeforeNs: horizon,
                                               note: "events up to \(rfc3339(ns: horizon)) were deleted by retention (--retention, --max-disk)")
        }
        return answer
    }

    /// The `events` parameters as the store's query; refused in words when one is wrong.
    private func eventQuery(_ params: [String: String]) throws -> EventQuery {
        var query = EventQuery()
        func int64(_ key: String) throws -> Int64? {
            guard let text = params[key] else { return nil }
            guard let v = Int64(text) else { throw WireError(.badRequest, "\(key) must be an integer, got \(text)") }
            return v
        }
        query.sinceNs = try int64("since_ns")
        query.untilNs = try int64("until_ns")
        query.node = params["node"]
        if let kindName = params["kind"] {
            guard let kind = EventKind(name: kindName) else { throw WireError(.badRequest, "unknown event kind \(kindName)") }
            query.kind = kind
        }
        if let pid = try int64("pid") { query.pid = UInt32(truncatingIfNeeded: pid) }
        query.pod = params["pod"]
        query.namespace = params["namespace"]
        if let prefix = params["pod_prefix"] {
            guard !prefix.isEmpty else { throw WireError(.badRequest, "pod_prefix must not be empty") }
            query.podPrefix = prefix
        }
        if let service = params["service"] {
            // A service is the pods whose inventory entry names it (docs/protocol.md, "Queries").
            let pods = server.pods.all().filter { $0.service == service && (query.namespace == nil || $0.namespace == query.namespace) }
            guard !pods.isEmpty else {
                let scope = query.namespace.map { " in namespace \($0)" } ?? ""
                throw WireError(.badRequest, "no pod of service \(service)\(scope) in any node's inventory (tapio pods lists them)")
            }
            query.pods = Array(Set(pods.map(\.name))).sorted()
        }
        if let limit = try int64("limit") {
            guard limit > 0 else { throw WireError(.badRequest, "limit must be positive") }
            query.limit = Int(min(limit, Int64(server.configuration.limits.maxQueryEvents)))
        }
        return query
    }

    /// The store's answer to `query`, filtered again with `EventQuery.matches`
    /// when the query has filters a store may not apply itself (`pods`,
    /// `podPrefix`): then the store is asked page by page, newest first, until
    /// `limit` events match or `scanLimit` events were read. Stores that do
    /// apply them answer in the first page; the second filter is a no-op then.
    static func filtered(_ query: EventQuery, store: EventStore, scanLimit: Int, pageSize: Int = 10_000) throws -> [StoredEvent] {
        guard query.pods != nil || query.podPrefix != nil else { return try store.events(query) }
        if query.pods?.isEmpty == true { return [] }
        let page = min(max(query.limit, pageSize), EventQuery.maximumLimit)
        var out: [StoredEvent] = []  // newest first
        var window = query
        window.limit = page
        var scanned = 0
        while out.count < query.limit, scanned < max(scanLimit, query.limit) {
            var batch = try store.events(window)  // oldest first
            scanned += batch.count
            guard let oldest = batch.first?.timeNs else { break }
            let full = batch.count >= page
            if full, batch.last!.timeNs == oldest {
                // One time fills the page: read every event at that time.
                var run = window
                run.sinceNs = max(query.sinceNs ?? .min, oldest)
                run.untilNs = oldest + 1
                run.limit = EventQuery.maximumLimit
                batch = try store.events(run)
                scanned += batch.count
                window.untilNs = oldest
            } else if full {
                // Events at the oldest time may continue beyond the page:
                // they are read with the next window (until is exclusive).
                batch.removeAll { $0.timeNs == oldest }
                window.untilNs = oldest + 1
            }
            for e in batch.reversed() where query.matches(e) {
                out.append(e)
                if out.count == query.limit { break }
            }
            guard full else { break }
        }
        return out.reversed()
    }

    /// Adds the pod, namespace and service behind `src_ip`/`dst_ip` (and a DNS
    /// server) from the cluster-wide inventory: the other end of a connection
    /// is usually on another node.
    private func peerAttributed(_ event: JSONValue) -> [String: JSONValue] {
        guard case .object(var o) = event else { return [:] }
        for (field, prefix) in [("dst_ip", "dst"), ("src_ip", "src"), ("server", "server")] {
            guard let ip = o[field]?.stringValue, let pod = server.pods.pod(ip: ip) else { continue }
            o[prefix + "_pod"] = .string(pod.name)
            o[prefix + "_namespace"] = .string(pod.namespace)
            if !pod.service.isEmpty { o[prefix + "_service"] = .string(pod.service) }
            o[prefix + "_node"] = .string(pod.node)
        }
        return o
    }

    private func pods() -> PodsAnswer {
        PodsAnswer(pods: server.pods.all().map { p in
            QueryPod(uid: p.uid, name: p.name, namespace: p.namespace, node: p.node, ips: p.ips, service: p.service,
                     ownerKind: p.ownerKind, ownerName: p.ownerName, labels: p.labels, containerIds: p.containerIds)
        })
    }

    private func nodes() throws -> NodesAnswer {
        guard let store = server.store, let registry = server.registry else {
            throw WireError(.badRequest, "nodes are known to the ingest replicas their agents use (each one's /metrics), not in role \(server.role) (docs/scaling.md)")
        }
        let now = wallClockNs()
        var out: [QueryNode] = []
        for snap in registry.snapshot() {
            let r = snap.record
            var drops: [String: Int64] = [:]
            var total: Int64 = 0
            for d in try store.drops(node: r.node) {
                // Counts are reported saturated at Int64.max, never wrapped or trapped.
                let count = Int64(clamping: d.count)
                drops["\(d.kind.name)/\(d.reason)"] = count
                let (sum, overflow) = total.addingReportingOverflow(count)
                total = overflow ? .max : sum
            }
            out.append(QueryNode(node: r.node, connected: snap.connected, agentVersion: r.agentVersion, bootId: r.bootId,
                                 capabilities: r.capabilities, degraded: r.degraded, firstSeen: rfc3339(ns: r.firstSeenNs),
                                 lastSeen: rfc3339(ns: r.lastSeenNs), lastSeenAgeS: Double(now - r.lastSeenNs) / 1e9,
                                 clockOffsetNs: r.clockOffsetNs, clockErrorNs: r.clockErrorNs, clockSamples: Int64(snap.clockSamples),
                                 eventsReceived: r.eventsReceived, batchesReceived: r.batchesReceived, duplicateBatches: r.duplicateBatches,
                                 drops: drops, dropsTotal: total))
        }
        return NodesAnswer(nodes: out)
    }
}
