import Logging
import NIOCore
import NIOPosix
import TapioCorrelation
import TapioStore
import TapioWire

/// Everything a connection handler needs from the server, shared and thread-safe.
final class ServerContext: Sendable {
    let configuration: ServerConfiguration
    let store: any EventStore
    let registry: NodeRegistry
    let metrics: ServerMetrics
    /// One thread: batches are stored in arrival order, so acknowledgements
    /// leave in order and a cumulative ack is honest.
    let storage: NIOThreadPool
    let logger: Logger
    let version: String
    let pods: PodDirectory
    let correlation: CorrelationService
    /// Batch appends, committed in groups on the storage thread.
    let commits: GroupCommit
    /// What the agent connections use: the same registry and metrics, the local log as sink.
    let ingest: IngestContext
    /// What the query listener answers from: the engine, the store, the registry.
    let query: QueryContext

    init(configuration: ServerConfiguration, store: any EventStore, registry: NodeRegistry, pods: PodDirectory, correlation: CorrelationService,
         metrics: ServerMetrics, storage: NIOThreadPool, logger: Logger, version: String) {
        self.correlation = correlation
        self.configuration = configuration
        self.store = store
        self.registry = registry
        self.pods = pods
        self.metrics = metrics
        self.storage = storage
        let commits = GroupCommit(store: store, storage: storage, histograms: metrics.histograms, correlation: correlation)
        self.commits = commits
        self.logger = logger
        self.version = version
        self.query = QueryContext(configuration: configuration, correlation: correlation, pods: pods, metrics: metrics, logger: logger,
                                  store: store, registry: registry, role: "all")
        self.ingest = IngestContext(configuration: configuration, registry: registry, pods: pods, metrics: metrics, logger: logger, version: version,
                                    sink: LocalBatchSink(store: store, storage: storage, commits: commits, correlation: correlation))
    }
}

/// What an agent connection needs, in every role: limits, the live node
/// registry and pod directory, metrics, and the sink that makes batches durable.
final class IngestContext: Sendable {
    let configuration: ServerConfiguration
    let registry: NodeRegistry
    let pods: PodDirectory
    let metrics: ServerMetrics
    let logger: Logger
    let version: String
    let sink: any BatchSink

    init(configuration: ServerConfiguration, registry: NodeRegistry, pods: PodDirectory, metrics: ServerMetrics, logger: Logger, version: String, sink: any BatchSink) {
        self.configuration = configuration
        self.registry = registry
        self.pods = pods
        self.metrics = metrics
        self.logger = logger
        self.version = version
        self.sink = sink
    }
}

/// The agent side of the protocol on one connection: hello (identity checked
/// against the client certificate), then batches made durable by the sink
/// (the local log, or a JetStream stream in the ingest role) before each
/// ack, time-sync exchanges, goodbye. Any violation closes this connection
/// only.
///
/// Acknowledgements (protocol 2, docs/protocol.md): an `Ack` names exactly
/// the one batch that is durable; the hello-ack's `acked_sequence` is the
/// contiguous durable prefix of the hello's epoch. Neither ever claims a batch
/// that is not stored, whatever gaps, store errors or epochs came before.
final class IngestHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = Frame

    private enum State {
        case awaitingHello
        case streaming(node: String, epoch: UInt64)
        case closing
    }

    private let server: IngestContext
    private var logger: Logger
    private var state = State.awaitingHello
    /// Batches handed to storage and not yet acknowledged.
    private var pendingStores = 0
    private var readsPaused = false
    /// Reading stopped because the engine's queue was full; the generation
    /// tells a stale "room again" call from the current one.
    private var waitingForEngine = false
    private var engineWaitGeneration = 0
    /// The node this connection registered in the registry (after a valid
    /// hello), unregistered when the connection ends however it ends.
    private var registeredNode: String?
    private var helloTimeout: Scheduled<Void>?
    private var timeSyncTask: RepeatedTask?
    private var nextSyncID: UInt64 = 1
    private var outstandingSyncs: [UInt64: Int64] = [:]
    private var shutdownRequested = false

    init(server: IngestContext) {
        self.server = server
        self.logger = server.logger
    }

    func channelActive(context: ChannelHandlerContext) {
        logger[metadataKey: "peer"] = "\(context.remoteAddress.map { "\($0)" } ?? "?")"
        let timeout = server.configuration.limits.helloTimeout.nanoseconds
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        helloTimeout = context.eventLoop.scheduleTask(in: .nanoseconds(timeout)) {
            let (handler, context) = loopBound.value
            guard case .awaitingHello = handler.state else { return }
            handler.reject(context: context, .unexpectedFrame, "no hello within \(timeout / 1_000_000) ms", metric: "hello_timeout")
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        helloTimeout?.cancel()
        timeSyncTask?.cancel()
        if let node = registeredNode {
            registeredNode = nil
            if let record = server.registry.disconnected(node: node, nowNs: wallClockNs()) { persist(record) }
            logger.info("agent disconnected", metadata: ["node": "\(node)"])
        }
        state = .closing
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        do {
            switch (state, frame.type) {
            case (.awaitingHello, .hello):
                try handleHello(context: context, hello: Hello.decode(frame.payload))
            case (.streaming(let node, _), .eventBatch):
                try handleBatch(context: context, node: node, batch: EventBatch.decode(frame.payload, maxEvents: server.configuration.limits.maxBatchEvents),
                                payload: frame.payload)
            case (.streaming(let node, _), .inventory):
                try handleInventory(node: node, inventory: Inventory.decode(frame.payload))
            case (.streaming(let node, _), .timeSync):
                let t4 = wallClockNs()
                let sync = try TimeSync.decode(frame.payload)
                if let t1 = outstandingSyncs.removeValue(forKey: sync.id) {
                    guard t1 == sync.t1 else { throw WireError(.malformed, "time sync \(sync.id) answered for another t1") }
                    server.registry.addClockSample(node: node, t1: t1, t2: sync.t2, t3: sync.t3, t4: t4)
                } else if sync.id == 0 || sync.id >= nextSyncID {
                    throw WireError(.malformed, "time sync \(sync.id) was not asked for")
                }
                // Else asked for and given up on (the reply came after many
                // newer ones were sent, e.g. behind a backlog): too late to
                // measure the clock with, and no fault of the agent's.
            case (.streaming, .heartbeat):
                _ = try Heartbeat.decode(frame.payload)
            case (.streaming(let node, _), .goodbye):
                let bye = try Goodbye.decode(frame.payload)
                logger.info("agent said goodbye", metadata: ["node": "\(node)", "reason": "\(bye.reason)", "last_sequence": "\(bye.lastSequence)"])
                state = .closing
                closeWhenDrained(context: context)
            case (.closing, _):
                break
            default:
                throw WireError(.unexpectedFrame, "unexpected \(frame.type) frame")
            }
        } catch let error as WireError {
            reject(context: context, WireErrorCode(rawValue: error.code) ?? .malformed, error.message, metric: "protocol")
        } catch {
            reject(context: context, .malformed, "\(error)", metric: "malformed")
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A malformed frame header, a TLS failure or a reset: this connection only.
        if let frameError = error as? FrameError {
            let reason: String
            if case .tooLarge = frameError { reason = "too_large" } else { reason = "bad_header" }
            reject(context: context, .malformed, frameError.description, metric: reason)
        } else {
            server.metrics.add("tapio_server_connection_errors_total")
            logger.notice("connection error", metadata: ["reason": "\(ConnectionFailure.describe(error))"])
            logger.debug("connection error as the library reported it", metadata: ["error": "\(error)"])
            context.close(promise: nil)
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            reject(context: context, .unexpectedFrame, "idle for too long", metric: "idle")
            return
        }
        if event is ServerShutdownEvent {
            shutdownRequested = true
            closeWhenDrained(context: context)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    // MARK: - Protocol steps

    private func handleHello(context: ChannelHandlerContext, hello: Hello) throws {
        helloTimeout?.cancel()
        guard let peer = PeerIdentity.of(context) else {
            throw WireError(.identityMismatch, "no verified client certificate")
        }
        guard peer.role == PeerIdentity.nodeRole else {
            throw WireError(.forbidden, "certificate role \(peer.role) may not send events (needs \(PeerIdentity.nodeRole))")
        }
        guard peer.commonName == hello.node else {
            throw WireError(.identityMismatch, "certificate names node \(peer.commonName) but hello says \(hello.node)")
        }
        guard hello.protocolVersion == Hello.currentProtocolVersion else {
            throw WireError(.unexpectedFrame, "protocol version \(hello.protocolVersion) is not supported (this server speaks \(Hello.currentProtocolVersion); upgrade the agent)")
        }
        logger[metadataKey: "node"] = "\(hello.node)"
        state = .streaming(node: hello.node, epoch: hello.streamEpoch)
        // Stop reading until the ack state is known, so no batch overtakes the hello-ack.
        pauseReads(context: context)

        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        server.sink.durablePrefix(node: hello.node, epoch: hello.streamEpoch, eventLoop: context.eventLoop).whenComplete { result in
            let (handler, context) = loopBound.value
            // The peer may have gone while the store answered.
            guard context.channel.isActive, case .streaming = handler.state else { return }
            switch result {
            case .success(let acked):
                let record = handler.server.registry.connected(hello: hello, nowNs: wallClockNs())
                handler.registeredNode = hello.node
                handler.persist(record)
                handler.server.metrics.add("tapio_server_hellos_total")
                handler.logger.info("agent connected", metadata: [
                    "epoch": "\(hello.streamEpoch)", "acked": "\(acked)",
                    "capabilities": "\(hello.capabilities.joined(separator: ","))",
                    "degraded": "\(hello.degraded.joined(separator: ","))",
                ])
                let limits = handler.server.configuration.limits
                let ack = HelloAck(maxFrameBytes: limits.maxFrameBytes, windowBatches: limits.windowBatches, ackedSequence: acked, serverVersion: handler.server.version,
                                   maxBatchEvents: UInt32(clamping: limits.maxBatchEvents))
                context.writeAndFlush(handler.wrapOutboundOut(Frame(type: .helloAck, payload: ack.encoded())), promise: nil)
                handler.startTimeSync(context: context)
                handler.resumeReads(context: context)
            case .failure(let error):
                handler.reject(context: context, .storageFailed, "cannot read stream state: \(error)", metric: "storage")
            }
        }
    }

    private func handleInventory(node: String, inventory: Inventory) throws {
        // Pods belong to the node that reports them.
        let pods = inventory.pods.map { p -> PodInfo in
            var p = p
            p.node = node
            return p
        }
        let conflicts = server.pods.replace(node: node, pods: pods)
        server.metrics.set("tapio_server_pod_address_conflicts", Int64(conflicts.count))
        if !conflicts.isEmpty {
            logger.warning("pod addresses claimed by more than one node are left unattributed", metadata: ["addresses": "\(conflicts.sorted().prefix(8).joined(separator: ","))"])
        }
        server.sink.savePods(node: node, pods: pods, logger: logger)
    }

    /// The largest sequence a batch may carry: sequences are stored as
    /// SQLite integers and the durable prefix looks at sequence + 1.
    static let maximumSequence = UInt64(Int64.max) - 1

    private func handleBatch(context: ChannelHandlerContext, node: String, batch: EventBatch, payload: [UInt8]) throws {
        guard batch.node == node else {
            throw WireError(.identityMismatch, "batch for node \(batch.node) on the connection of \(node)")
        }
        guard batch.sequence > 0, batch.sequence <= Self.maximumSequence else {
            throw WireError(.malformed, "batch sequence \(batch.sequence) outside 1...\(Self.maximumSequence)")
        }
        pendingStores += 1
        if pendingStores >= Int(server.configuration.limits.windowBatches) {
            pauseReads(context: context)
        }
        let correction = server.registry.correction(node: node) ?? ClockCorrection(offsetNs: 0, errorNs: -1)
        let receivedNs = wallClockNs()
        // Placed on the server's clock once, here, for the engine; events
        // dated too far ahead are counted with the batch and not correlated.
        let (observed, future) = CorrelationService.observed(batch, clock: correction, receivedNs: receivedNs,
                                                             maxFutureSkewNs: server.configuration.limits.maxFutureSkew.nanoseconds)
        let serverDrops = future == 0 ? [] : [DropCount(kind: .unspecified, reason: CorrelationService.futureDropReason, count: UInt64(future))]
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        // What the answer needs of the batch, so that its events are let go
        // of where the sink is done with them, not kept for the ack.
        let (epoch, sequence, count, drops) = (batch.epoch, batch.sequence, batch.events.count, batch.drops)
        server.sink.append(BatchAppend(batch: batch, payload: payload, clock: correction, receivedNs: receivedNs, serverDrops: serverDrops),
                           observed: observed, eventLoop: context.eventLoop).whenComplete { result in
            let (handler, context) = loopBound.value
            handler.pendingStores -= 1
            switch result {
            case .success(let outcome):
                let stored = outcome.stored
                handler.server.metrics.add(stored ? "tapio_server_batches_total" : "tapio_server_duplicate_batches_total")
                if stored {
                    handler.server.metrics.add("tapio_server_events_total", Int64(count))
                    if future > 0 { handler.server.metrics.add("tapio_server_events_future_total", Int64(future)) }
                    if !outcome.room { handler.waitForEngine(context: context) }
                }
                // The store counted the batch in the node's row; this is the live view.
                if let record = handler.server.registry.received(node: node, events: count, duplicate: !stored,
                                                                               epoch: epoch, drops: drops, nowNs: wallClockNs()),
                   record.batchesReceived % 64 == 1 {
                    handler.persist(record)
                }
                // Exactly this batch is durable (stored now or before).
                if context.channel.isActive {
                    let ack = Ack(epoch: epoch, sequence: sequence)
                    context.writeAndFlush(handler.wrapOutboundOut(Frame(type: .ack, payload: ack.encoded())), promise: nil)
                }
                if handler.pendingStores < Int(handler.server.configuration.limits.windowBatches) {
                    handler.resumeReads(context: context)
                }
                handler.closeIfDrainedAndClosing(context: context)
            case .failure(let error):
                // Not acknowledged: the agent keeps the batch and resends it;
                // the hello-ack after reconnecting ends before it.
                handler.logger.error("storing a batch failed", metadata: ["error": "\(error)", "epoch": "\(epoch)", "sequence": "\(sequence)"])
                handler.reject(context: context, .storageFailed, "storage failed; resend later", metric: "storage")
            }
        }
    }

    /// The engine's queue was full when this connection's batch joined it
    /// (the batch is durable and acknowledged all the same): stop reading
    /// until the engine has taken the queue below half.
    private func waitForEngine(context: ChannelHandlerContext) {
        engineWaitGeneration += 1
        let generation = engineWaitGeneration
        waitingForEngine = true
        server.metrics.add("tapio_server_engine_backpressure_total")
        pauseReads(context: context)
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        let loop = context.eventLoop
        server.sink.whenRoom {
            loop.execute {
                let (handler, context) = loopBound.value
                guard handler.waitingForEngine, handler.engineWaitGeneration == generation else { return }
                handler.waitingForEngine = false
                if handler.pendingStores < Int(handler.server.configuration.limits.windowBatches) {
                    handler.resumeReads(context: context)
                }
            }
        }
    }

    private func startTimeSync(context: ChannelHandlerContext) {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        // A quick burst so the first batches are already placed well, then the steady period.
        for i in 0..<4 {
            context.eventLoop.scheduleTask(in: .milliseconds(Int64(i) * 50)) {
                let (handler, context) = loopBound.value
                handler.sendTimeSync(context: context)
            }
        }
        let period = TimeAmount.nanoseconds(server.configuration.timeSyncInterval.nanoseconds)
        timeSyncTask = context.eventLoop.scheduleRepeatedTask(initialDelay: period, delay: period) { _ in
            let (handler, context) = loopBound.value
            handler.sendTimeSync(context: context)
        }
    }

    private func sendTimeSync(context: ChannelHandlerContext) {
        // Not while reads are paused: the reply would wait behind the
        // backlog, and a round trip that long measures nothing.
        guard context.channel.isActive, case .streaming = state, !readsPaused else { return }
        let id = nextSyncID
        nextSyncID += 1
        // Unanswered exchanges do not pile up: the oldest is given up on.
        if outstandingSyncs.count >= 16, let oldest = outstandingSyncs.keys.min() { outstandingSyncs[oldest] = nil }
        let t1 = wallClockNs()
        outstandingSyncs[id] = t1
        context.writeAndFlush(wrapOutboundOut(Frame(type: .timeSync, payload: TimeSync(id: id, t1: t1).encoded())), promise: nil)
    }

    // MARK: - Flow control and closing

    private func pauseReads(context: ChannelHandlerContext) {
        guard !readsPaused else { return }
        readsPaused = true
        context.channel.setOption(ChannelOptions.autoRead, value: false).whenFailure { _ in }
    }

    private func resumeReads(context: ChannelHandlerContext) {
        guard readsPaused, !shutdownRequested, !waitingForEngine else { return }
        readsPaused = false
        context.channel.setOption(ChannelOptions.autoRead, value: true).whenFailure { _ in }
        context.read()
    }

    /// Graceful end: stop reading, let every accepted batch be stored and
    /// acknowledged, say goodbye, close.
    private func closeWhenDrained(context: ChannelHandlerContext) {
        pauseReads(context: context)
        if case .streaming = state { state = .closing }
        closeIfDrainedAndClosing(context: context)
    }

    private func closeIfDrainedAndClosing(context: ChannelHandlerContext) {
        guard case .closing = state, pendingStores == 0, context.channel.isActive else { return }
        let reason = shutdownRequested ? "server shutting down" : "goodbye"
        writeThenClose(context: context, Frame(type: .goodbye, payload: Goodbye(reason: reason, lastSequence: 0).encoded()))
    }

    private func reject(context: ChannelHandlerContext, _ code: WireErrorCode, _ message: String, metric: String) {
        server.metrics.add("tapio_server_connections_rejected_total{reason=\"\(metric)\"}")
        logger.warning("closing connection", metadata: ["reason": "\(message)"])
        state = .closing
        guard context.channel.isActive else { return }
        writeThenClose(context: context, Frame(type: .error, payload: WireError(code, message).encoded()))
    }

    /// Writes a last frame, then closes; closes anyway after `closeGrace` if
    /// the write never completes (a peer that never finished its TLS
    /// handshake, or stopped reading).
    private func writeThenClose(context: ChannelHandlerContext, _ frame: Frame) {
        let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
        let channel = context.channel
        let grace = TimeAmount.nanoseconds(server.configuration.limits.closeGrace.nanoseconds)
        let deadline = context.eventLoop.scheduleTask(in: grace) { channel.close(promise: nil) }
        context.writeAndFlush(wrapOutboundOut(frame)).whenComplete { _ in
            deadline.cancel()
            bound.value.close(promise: nil)
        }
    }

    private func persist(_ record: NodeRecord) {
        server.sink.saveNode(record, logger: logger)
    }
}

/// Sent down every connection's pipeline when the server begins a graceful shutdown.
struct ServerShutdownEvent: Sendable {}
