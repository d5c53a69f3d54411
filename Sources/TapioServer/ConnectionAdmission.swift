import NIOCore
import Synchronization

/// The connections a process's listeners have open: each listener's count
/// against its own limit, and the connections to drain on shutdown. Shared
/// by the server and the ingest replica, so both admit and drain alike.
final class ConnectionAdmission: Sendable {
    private struct State {
        var open: [Listener: Int] = [:]
        /// Connections asked to finish their work on shutdown.
        var draining: [ObjectIdentifier: Channel] = [:]
        var accepting = true
    }

    private let state = Mutex(State())
    private let metrics: ServerMetrics

    init(metrics: ServerMetrics) {
        self.metrics = metrics
    }

    /// Counts a new connection against its listener's limit, or refuses it
    /// (counted as `limit`). Once `stopAccepting()` ran only /metrics is
    /// admitted: /metrics, /healthz and /readyz answer until the drain ends.
    /// `drain`: the connection is asked to finish its work on shutdown.
    func admit(_ channel: Channel, listener: Listener, maxConnections: Int, drain: Bool) -> Bool {
        let admitted = state.withLock { s -> Bool in
            guard s.accepting || listener == .metrics, s.open[listener, default: 0] < maxConnections else { return false }
            s.open[listener, default: 0] += 1
            if drain { s.draining[ObjectIdentifier(channel)] = channel }
            return true
        }
        guard admitted else {
            metrics.add("tapio_server_connections_rejected_total{reason=\"limit\",listener=\"\(listener.rawValue)\"}")
            return false
        }
        channel.closeFuture.whenComplete { _ in
            self.state.withLock { s in
                s.open[listener, default: 1] -= 1
                if drain { s.draining.removeValue(forKey: ObjectIdentifier(channel)) }
            }
        }
        return true
    }

    /// Refuses every later connection but /metrics; the connections to drain.
    func stopAccepting() -> [Channel] {
        state.withLock { s in
            s.accepting = false
            return Array(s.draining.values)
        }
    }

    /// Open connections on one listener.
    func open(on listener: Listener) -> Int { state.withLock { $0.open[listener, default: 0] } }

    /// Open connections per listener.
    var openByListener: [Listener: Int] { state.withLock { $0.open } }

    /// Connections that would be drained (ingest and query).
    var drainingCount: Int { state.withLock { $0.draining.count } }
}
