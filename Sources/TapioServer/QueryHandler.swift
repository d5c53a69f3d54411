import Logging
import NIOCore
import NIOPosix
import TapioStore
import TapioWire

/// Answers the CLI on the query listener. Only certificates with the operator
/// role may ask (checked as the TLS handshake completes, by `ConnectionGuard`,
/// and again here at the first frame); each request is one `query` frame
/// answered by one `query_response` frame carrying a JSON document
/// (docs/protocol.md).
final class QueryHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private let server: ServerContext
    private let queries: NIOThreadPool
    private var authorized: Bool?

    init(server: ServerContext, queries: NIOThreadPool) {
        self.server = server
        self.queries = queries
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
        let server = self.server
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        queries.runIfActive(eventLoop: context.eventLoop) {
            try server.metrics.histograms.query.time { try QueryExecutor(server: server).execute(request) }
        }.whenComplete { result in
            let (handler, context) = loopBound.value
            switch result {
            case .success(let json):
                handler.respond(context: context, QueryResponse(json: Array(json.serialized().utf8)), close: false)
            case .failure(let error as WireError):
                handler.respond(context: context, QueryResponse(status: error.code, error: error.message), close: false)
            case .failure(let error):
                handler.respond(context: context, QueryResponse(status: WireErrorCode.storageFailed.rawValue, error: "\(error)"), close: false)
            }
        }
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
            context.close(promise: nil)
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

/// The query methods, free of I/O but for the store (so they are tested directly).
struct QueryExecutor {
    let server: ServerContext

    func execute(_ request: QueryRequest) throws -> JSONValue {
        switch request.method {
        case "events": return try events(request.params)
        case "nodes": return try nodes()
        case "pods": return pods()
        case "incidents":
            if let status = request.params["status"], !["open", "resolved", "all"].contains(status) {
                throw WireError(.badRequest, "status must be open, resolved or all")
            }
            let status = request.params["status"] == "all" ? nil : request.params["status"]
            return try server.correlation.incidentsJSON(status: status, sinceNs: request.params["since_ns"].flatMap { Int64($0) })
        case "timeline", "explain":
            guard let id = request.params["id"] else { throw WireError(.badRequest, "\(request.method) needs an incident id") }
            guard let doc = try server.correlation.incidentJSON(id: id, explain: request.method == "explain") else {
                throw WireError(.badRequest, "no incident \(id)")
            }
            return doc
        case "services": return server.correlation.servicesJSON()
        default: throw WireError(.badRequest, "unknown query method \(request.method)")
        }
    }

    private func events(_ params: [String: String]) throws -> JSONValue {
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
        let events = try Self.filtered(query, store: server.store, scanLimit: server.configuration.limits.maxQueryEvents)
        var answer: [String: JSONValue] = ["events": .array(events.map { peerAttributed($0.json) }), "count": .int(Int64(events.count))]
        // Time retention has deleted is said, not answered with silently less.
        if let horizon = try server.store.retainedFromNs(), (query.sinceNs ?? .min) <= horizon {
            answer["retention"] = .object([
                "deleted_before": .string(rfc3339(ns: horizon)), "deleted_before_ns": .int(horizon),
                "note": .string("events up to \(rfc3339(ns: horizon)) were deleted by retention (--retention, --max-disk)"),
            ])
        }
        return .object(answer)
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
    private func peerAttributed(_ event: JSONValue) -> JSONValue {
        guard case .object(var o) = event else { return event }
        for (field, prefix) in [("dst_ip", "dst"), ("src_ip", "src"), ("server", "server")] {
            guard let ip = o[field]?.stringValue, let pod = server.pods.pod(ip: ip) else { continue }
            o[prefix + "_pod"] = .string(pod.name)
            o[prefix + "_namespace"] = .string(pod.namespace)
            if !pod.service.isEmpty { o[prefix + "_service"] = .string(pod.service) }
            o[prefix + "_node"] = .string(pod.node)
        }
        return .object(o)
    }

    private func pods() -> JSONValue {
        .object(["pods": .array(server.pods.all().map { p in
            .object([
                "uid": .string(p.uid), "name": .string(p.name), "namespace": .string(p.namespace), "node": .string(p.node),
                "ips": .array(p.ips.map { .string($0) }), "service": .string(p.service),
                "owner_kind": .string(p.ownerKind), "owner_name": .string(p.ownerName),
                "labels": .object(p.labels.mapValues { .string($0) }), "container_ids": .array(p.containerIds.map { .string($0) }),
            ])
        })])
    }

    private func nodes() throws -> JSONValue {
        let now = wallClockNs()
        var out: [JSONValue] = []
        for snap in server.registry.snapshot() {
            let r = snap.record
            let drops = try server.store.drops(node: r.node)
            var dropObject: [String: JSONValue] = [:]
            var total: Int64 = 0
            for d in drops {
                // Counts are reported saturated at Int64.max, never wrapped or trapped.
                let count = Int64(clamping: d.count)
                dropObject["\(d.kind.name)/\(d.reason)"] = .int(count)
                let (sum, overflow) = total.addingReportingOverflow(count)
                total = overflow ? .max : sum
            }
            out.append(.object([
                "node": .string(r.node),
                "connected": .bool(snap.connected),
                "agent_version": .string(r.agentVersion),
                "boot_id": .string(r.bootId),
                "capabilities": .array(r.capabilities.map { .string($0) }),
                "degraded": .array(r.degraded.map { .string($0) }),
                "first_seen": .string(rfc3339(ns: r.firstSeenNs)),
                "last_seen": .string(rfc3339(ns: r.lastSeenNs)),
                "last_seen_age_s": .double(Double(now - r.lastSeenNs) / 1e9),
                "clock_offset_ns": .int(r.clockOffsetNs),
                "clock_error_ns": .int(r.clockErrorNs),
                "clock_samples": .int(Int64(snap.clockSamples)),
                "events_received": .int(r.eventsReceived),
                "batches_received": .int(r.batchesReceived),
                "duplicate_batches": .int(r.duplicateBatches),
                "drops": .object(dropObject),
                "drops_total": .int(total),
            ]))
        }
        return .object(["nodes": .array(out)])
    }
}
