import Foundation
import Synchronization
import TapioWire

extension ServerConfiguration {
    /// How the server watches itself: health checks and certificate reloads.
    /// Defaults are documented in docs/operations.md.
    public struct Operations: Sendable {
        /// How often the store is proved writable: a small file in the data
        /// directory is written and fsynced on the storage thread, in line with
        /// the batches being stored.
        public var storeCheckInterval: TimeAmount = .seconds(5)
        /// The store is unhealthy when no write check has completed for this
        /// long (the storage thread is stuck behind a write that does not end).
        public var storeCheckStaleAfter: TimeAmount = .seconds(20)
        /// The engine is unhealthy when its last tick ended longer ago than this.
        public var engineStallAfter: TimeAmount = .seconds(5)
        /// How often tls.crt, tls.key and ca.crt are read again; a changed,
        /// valid set is used for new connections. nil: never.
        public var tlsReloadInterval: TimeAmount? = .seconds(5)

        public init() {}
    }
}

/// What /healthz and /readyz report: the server's own view of whether it works
/// (the store takes writes, the engine advances) and whether it should get
/// traffic (listening, restored, not shutting down).
///
/// Probes only read this; the checks that feed it run on their own schedule,
/// so a probe costs no write and no lock on the store.
public final class ServerHealth: Sendable {
    public enum Phase: String, Sendable {
        case starting = "starting: the listeners are not bound yet"
        case restoring = "restoring: replaying the stored log into the correlation engine"
        case ready = "ready"
        case shuttingDown = "shutting down: draining connections"
        case stopped = "stopped"
    }

    public struct Report: Sendable, Equatable {
        public var ok: Bool
        /// One line per check, e.g. "store: ok (last write check 1.2 s ago)".
        public var lines: [String]
        public var text: String { ([ok ? "ok" : "unhealthy"] + lines).joined(separator: "\n") + "\n" }
    }

    private struct State {
        var phase = Phase.starting
        /// Monotonic ns: when the engine last finished a tick, or when it started running.
        var engineTickNs: Int64?
        var engineTicks = 0
        var storeCheckNs: Int64?
        var storeCheckError: String?
        var storeCheckErrorNs: Int64?
        /// Batch commits (stored or duplicate) and failures seen at the last check.
        var commits: Int64 = 0
        var commitFailures: Int64 = 0
        var commitError: String?
    }

    private let state = Mutex(State())
    let operations: ServerConfiguration.Operations

    public init(operations: ServerConfiguration.Operations) {
        self.operations = operations
    }

    public var phase: Phase { state.withLock { $0.phase } }

    func set(_ phase: Phase, nowNs: Int64 = monotonicNs()) {
        state.withLock { s in
            s.phase = phase
            // The engine's clock starts when it starts running.
            if phase == .ready, s.engineTickNs == nil { s.engineTickNs = nowNs }
            if phase == .ready, s.storeCheckNs == nil { s.storeCheckNs = nowNs }
        }
    }

    func engineTicked(nowNs: Int64 = monotonicNs()) {
        state.withLock {
            $0.engineTickNs = nowNs
            $0.engineTicks += 1
        }
    }

    /// The outcome of one write check of the store.
    func storeChecked(error: String?, nowNs: Int64 = monotonicNs()) {
        state.withLock { s in
            if let error {
                s.storeCheckError = error
                s.storeCheckErrorNs = nowNs
            } else {
                s.storeCheckError = nil
                s.storeCheckNs = nowNs
            }
        }
    }

    /// Batch commits as counted so far: when failures grew since the last
    /// call and successes did not, the store is failing the batches it is given.
    func commitsObserved(succeeded: Int64, failed: Int64) {
        state.withLock { s in
            if failed > s.commitFailures, succeeded == s.commits {
                s.commitError = "\(failed - s.commitFailures) batch commit(s) failed since the last check and none succeeded"
            } else if succeeded > s.commits {
                s.commitError = nil
            }
            s.commits = succeeded
            s.commitFailures = failed
        }
    }

    /// /healthz: the store takes writes and the engine advances.
    public func health(nowNs: Int64 = monotonicNs()) -> Report {
        let s = state.withLock { $0 }
        func ago(_ ns: Int64) -> String { String(format: "%.1f s ago", Double(nowNs - ns) / 1e9) }
        var ok = true
        var lines: [String] = []
        switch s.phase {
        case .starting, .restoring:
            return Report(ok: false, lines: ["server: \(s.phase.rawValue)"])
        case .stopped:
            return Report(ok: false, lines: ["server: stopped"])
        case .ready, .shuttingDown:
            break
        }

        if let error = s.storeCheckError, let at = s.storeCheckErrorNs {
            ok = false
            lines.append("store: not writable: the write check \(ago(at)) failed: \(error)")
        } else if let error = s.commitError {
            ok = false
            lines.append("store: \(error)")
        } else if let at = s.storeCheckNs, nowNs - at > operations.storeCheckStaleAfter.nanoseconds {
            ok = false
            lines.append("store: no write check has completed for \(ago(at).dropLast(4)) s (storage stuck?)")
        } else {
            lines.append("store: ok (last write check \(s.storeCheckNs.map(ago) ?? "pending"))")
        }

        if s.phase == .shuttingDown {
            lines.append("engine: stopping (shutting down)")
        } else if let at = s.engineTickNs, nowNs - at > operations.engineStallAfter.nanoseconds {
            ok = false
            lines.append("engine: not advancing: last tick \(ago(at))")
        } else {
            lines.append(s.engineTicks == 0 ? "engine: ok (started \(s.engineTickNs.map(ago) ?? "now"), first tick pending)"
                                             : "engine: ok (last tick \(s.engineTickNs.map(ago) ?? "?"))")
        }
        return Report(ok: ok, lines: lines)
    }

    /// /readyz: listening, restored, not shutting down.
    public func readiness() -> Report {
        let phase = self.phase
        return Report(ok: phase == .ready, lines: [phase == .ready ? "listening, restored" : phase.rawValue])
    }

    /// Writes and fsyncs `<dir>/health` through a new file renamed into place,
    /// so a full disk or a read-only or failing file system shows up here.
    /// Returns nil, or what failed.
    static func writeCheck(directory: String) -> String? {
        let path = (directory as NSString).appendingPathComponent("health")
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return "open \(temporary): \(String(cString: strerror(errno)))" }
        let text = "tapio-server write check, pid \(getpid()), unix time \(Int(Date().timeIntervalSince1970))\n"
        let written = text.withCString { write(fd, $0, strlen($0)) }
        if written != text.utf8.count {
            let e = written < 0 ? String(cString: strerror(errno)) : "short write"
            close(fd)
            unlink(temporary)
            return "write \(temporary): \(e)"
        }
        if fsync(fd) != 0 {
            let e = String(cString: strerror(errno))
            close(fd)
            unlink(temporary)
            return "fsync \(temporary): \(e)"
        }
        close(fd)
        if rename(temporary, path) != 0 {
            let e = String(cString: strerror(errno))
            unlink(temporary)
            return "rename \(temporary): \(e)"
        }
        return nil
    }
}
