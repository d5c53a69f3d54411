import Foundation
import Synchronization

/// The pods a node knows, indexed for attribution: by UID (and a static pod's
/// config hash), by container id (current and last terminated run), by pod IP,
/// and by namespace/name. Thread-safe: the sources write while the agent reads.
///
/// A deleted pod is kept for `retention` seconds: the kernel's last events about
/// a pod (its exit, an OOM kill) often arrive after the API has deleted it.
public final class PodIndex: Sendable {
    private struct State {
        var pods: [String: PodInfo] = [:]
        var byContainer: [String: String] = [:]
        var byIP: [String: String] = [:]
        var byName: [String: String] = [:]
        var byConfigHash: [String: String] = [:]
        /// Deleted pods by uid, with the time they may be forgotten.
        var tombstones: [String: (pod: PodInfo, until: ContinuousClock.Instant)] = [:]
        var generation: UInt64 = 0
    }

    /// Seconds a deleted pod is still answered for. Default 120.
    public let retention: Double
    private let state = Mutex(State())
    /// `State.generation`, readable without the lock (the ring-buffer
    /// reader checks it on every event).
    private let published = Atomic<UInt64>(0)

    public init(retention: Double = 120) {
        self.retention = retention
    }

    /// Bumped on every change, so readers can tell whether to look again.
    public var generation: UInt64 { published.load(ordering: .acquiring) }
    public var count: Int { state.withLock { $0.pods.count } }
    public var allPods: [PodInfo] { state.withLock { Array($0.pods.values) }.sorted { ($0.namespace, $0.name) < ($1.namespace, $1.name) } }

    /// Replaces everything with `pods` (a fresh list); pods missing from it are
    /// treated as deleted.
    public func replaceAll(_ pods: [PodInfo]) {
        state.withLock { s in
            let keep = Set(pods.map(\.uid))
            for uid in s.pods.keys where !keep.contains(uid) { Self.remove(uid: uid, from: &s, retention: retention) }
            for pod in pods { Self.upsert(pod, into: &s) }
            s.generation += 1
            published.store(s.generation, ordering: .releasing)
        }
    }

    /// Adds or updates one pod (watch ADDED / MODIFIED).
    public func upsert(_ pod: PodInfo) {
        state.withLock { s in
            Self.upsert(pod, into: &s)
            s.generation += 1
            published.store(s.generation, ordering: .releasing)
        }
    }

    /// Removes one pod (watch DELETED); it stays answerable for `retention`.
    public func remove(uid: String) {
        state.withLock { s in
            Self.remove(uid: uid, from: &s, retention: retention)
            s.generation += 1
            published.store(s.generation, ordering: .releasing)
        }
    }

    /// Forgets deleted pods whose retention has passed.
    public func sweep(now: ContinuousClock.Instant = .now) {
        state.withLock { s in
            let before = s.tombstones.count
            s.tombstones = s.tombstones.filter { $0.value.until > now }
            // A forgotten pod no longer answers: attributions cached from it are stale.
            if s.tombstones.count != before {
                s.generation += 1
                published.store(s.generation, ordering: .releasing)
            }
        }
    }

    public func pod(uid: String) -> PodInfo? {
        state.withLock { s in
            if let p = s.pods[uid] { return p }
            if let p = s.byConfigHash[uid].flatMap({ s.pods[$0] }) { return p }
            return s.tombstones[uid]?.pod ?? s.tombstones.values.first { $0.pod.configHash == uid }?.pod
        }
    }

    /// The pod and container of a container id (bare, without `containerd://`).
    public func pod(containerId: String) -> (pod: PodInfo, container: ContainerInfo)? {
        state.withLock { s in
            if let uid = s.byContainer[containerId], let p = s.pods[uid], let c = p.container(id: containerId) { return (p, c) }
            for t in s.tombstones.values {
                if let c = t.pod.container(id: containerId) { return (t.pod, c) }
            }
            return nil
        }
    }

    /// The live pod that has this IP (host-network and finished pods excluded).
    public func pod(ip: String) -> PodInfo? {
        state.withLock { s in s.byIP[ip].flatMap { s.pods[$0] } }
    }

    public func pod(namespace: String, name: String) -> PodInfo? {
        state.withLock { s in s.byName[namespace + "/" + name].flatMap { s.pods[$0] } }
    }

    private static func upsert(_ pod: PodInfo, into s: inout State) {
        if let old = s.pods[pod.uid] { unindex(old, from: &s) }
        s.tombstones[pod.uid] = nil
        s.pods[pod.uid] = pod
        for c in pod.containers {
            if let id = c.id { s.byContainer[id] = pod.uid }
            if let id = c.lastTermination?.containerId { s.byContainer[id] = pod.uid }
        }
        if !pod.hostNetwork && !pod.isFinished {
            for ip in pod.ips { s.byIP[ip] = pod.uid }
        }
        s.byName[pod.namespace + "/" + pod.name] = pod.uid
        if let hash = pod.configHash { s.byConfigHash[hash] = pod.uid }
    }

    private static func remove(uid: String, from s: inout State, retention: Double) {
        guard let old = s.pods.removeValue(forKey: uid) else { return }
        unindex(old, from: &s)
        s.tombstones[uid] = (old, .now + .milliseconds(Int64(milliseconds(retention))))
    }

    /// Removes `pod`'s index entries, only those that still point at it (an IP
    /// or a name may have moved on to a newer pod).
    private static func unindex(_ pod: PodInfo, from s: inout State) {
        for c in pod.containers {
            for id in [c.id, c.lastTermination?.containerId].compactMap({ $0 }) where s.byContainer[id] == pod.uid {
                s.byContainer[id] = nil
            }
        }
        for ip in pod.ips where s.byIP[ip] == pod.uid { s.byIP[ip] = nil }
        let key = pod.namespace + "/" + pod.name
        if s.byName[key] == pod.uid { s.byName[key] = nil }
        if let hash = pod.configHash, s.byConfigHash[hash] == pod.uid { s.byConfigHash[hash] = nil }
    }
}
