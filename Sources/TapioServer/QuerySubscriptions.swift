import NIOCore
import Synchronization
import TapioCorrelation
import TapioQueryAPI
import TapioWire

/// The connections that asked `subscribe` (docs/protocol.md,
/// "Subscriptions"), and the incident changes the engine hands them. The
/// engine's thread publishes each pass's changes once, encoded once; each
/// subscriber writes them on its own event loop, behind its snapshot. A
/// subscriber whose socket stops taking data (its client does not read) is
/// closed rather than buffered without bound: the client reconnects and
/// starts again from a snapshot.
final class QuerySubscriptions: Sendable {
    /// Bounds of the `keepalive_ms` parameter, and its default.
    static let keepaliveRange: ClosedRange<Int64> = 100...60_000
    static let defaultKeepaliveMs: Int64 = 5_000
    /// Frames waiting behind a snapshot, or unwritable, before a subscriber is closed.
    static let maximumPending = 1_024

    private let subscribers = Mutex<[ObjectIdentifier: Subscriber]>([:])

    /// The keepalive interval a `subscribe` asks for.
    static func keepalive(_ params: [String: String]) throws -> TimeAmount {
        for key in params.keys where key != "keepalive_ms" {
            throw WireError(.badRequest, "subscribe takes keepalive_ms only, not \(key)")
        }
        guard let text = params["keepalive_ms"] else { return .milliseconds(defaultKeepaliveMs) }
        guard let ms = Int64(text), keepaliveRange.contains(ms) else {
            throw WireError(.badRequest, "keepalive_ms must be an integer from \(keepaliveRange.lowerBound) to \(keepaliveRange.upperBound), got \(text)")
        }
        return .milliseconds(ms)
    }

    func add(channel: Channel, keepalive: TimeAmount) -> Subscriber {
        let s = Subscriber(channel: channel, keepalive: keepalive)
        subscribers.withLock { $0[ObjectIdentifier(s)] = s }
        return s
    }

    func remove(_ s: Subscriber) {
        _ = subscribers.withLock { $0.removeValue(forKey: ObjectIdentifier(s)) }
        s.stop()
    }

    var count: Int { subscribers.withLock { $0.count } }

    /// The incidents a pass changed, to every subscriber. On the engine's
    /// thread: encodes and hands over, never waits for a socket.
    func publish(_ changes: [CorrelationService.IncidentChange]) {
        guard subscribers.withLock({ !$0.isEmpty }) else { return }
        publish(changes.map { (QueryIncident($0.incident), $0.isNew, $0.incident.status == .resolved) })
    }

    /// Incidents as the list has them, each with whether it is new here and
    /// resolved: what the engine changed in a pass, or (on a correlate
    /// standby) what arrived from the incident bucket.
    func publish(_ changes: [(incident: QueryIncident, isNew: Bool, resolved: Bool)]) {
        let targets = subscribers.withLock { Array($0.values) }
        guard !targets.isEmpty else { return }
        let now = rfc3339(ns: wallClockNs())
        // A new incident is announced as opened; one that is new and already
        // resolved (it ended within one pass) as opened, then resolved.
        let frames = changes.flatMap { c -> [[UInt8]] in
            let kinds: [SubscriptionMessage.Change] = c.isNew ? (c.resolved ? [.opened, .resolved] : [.opened]) : [c.resolved ? .resolved : .updated]
            return kinds.compactMap { try? QueryCoding.encode(SubscriptionMessage(type: .change, time: now, change: $0, incident: c.incident)) }
        }
        for s in targets { s.deliver(frames) }
    }

    /// One subscribed connection. State lives on its event loop.
    final class Subscriber: Sendable {
        private let channel: Channel
        private let keepalive: TimeAmount
        private struct State {
            var started = false
            var stopped = false
            var pending: [[UInt8]] = []
            var lastSent = NIODeadline.now()
            var timer: RepeatedTask?
            var unwritableWrites = 0
        }
        private let state: NIOLoopBoundBox<State>

        init(channel: Channel, keepalive: TimeAmount) {
            self.channel = channel
            self.keepalive = keepalive
            state = NIOLoopBoundBox(State(), eventLoop: channel.eventLoop)
        }

        /// The snapshot goes out first, then what waited behind it, then
        /// keepalives. On the channel's event loop.
        func started(snapshot: [UInt8]) {
            guard !state.value.stopped else { return }
            write(snapshot)
            let waiting = state.value.pending
            state.value.pending = []
            state.value.started = true
            for f in waiting { write(f) }
            let interval = keepalive
            state.value.timer = channel.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { [self] _ in
                guard !state.value.stopped, NIODeadline.now() - state.value.lastSent >= interval else { return }
                if let bytes = try? QueryCoding.encode(SubscriptionMessage(type: .keepalive, time: rfc3339(ns: wallClockNs()))) { write(bytes) }
            }
        }

        /// From any thread.
        func deliver(_ frames: [[UInt8]]) {
            guard !frames.isEmpty else { return }
            channel.eventLoop.execute { [self] in
                guard !state.value.stopped else { return }
                if !state.value.started {
                    state.value.pending += frames
                    if state.value.pending.count > QuerySubscriptions.maximumPending { close() }
                    return
                }
                for f in frames { write(f) }
            }
        }

        func stop() {
            channel.eventLoop.execute { [self] in
                state.value.stopped = true
                state.value.timer?.cancel()
                state.value.timer = nil
            }
        }

        private func write(_ json: [UInt8]) {
            guard channel.isActive else { return }
            // Past the channel's high-water mark (a large snapshot on its
            // way), a bounded number of frames more; beyond that the client
            // is not reading what it subscribed to.
            if channel.isWritable {
                state.value.unwritableWrites = 0
            } else {
                state.value.unwritableWrites += 1
                if state.value.unwritableWrites > QuerySubscriptions.maximumPending {
                    close()
                    return
                }
            }
            state.value.lastSent = .now()
            channel.writeAndFlush(Frame(type: .queryResponse, payload: QueryResponse(json: json).encoded()), promise: nil)
        }

        private func close() {
            state.value.stopped = true
            channel.close(promise: nil)
        }
    }
}
