import Foundation
import Synchronization
import TapioWire

/// Who an event belongs to. Empty strings mean unknown: a host process, or a
/// container whose pod the metadata does not (yet) know.
public struct Attribution: Sendable, Equatable {
    /// The bare 64-hex container id.
    public var containerId: String = ""
    public var containerName: String = ""
    public var pod: String = ""
    public var namespace: String = ""
    public var podUID: String = ""
    /// See `PodInfo.serviceName`; for a host process, its systemd unit.
    public var service: String = ""
    /// The cgroup path (relative to the hierarchy root), "" if unknown.
    public var cgroupPath: String = ""

    public init(containerId: String = "", containerName: String = "", pod: String = "", namespace: String = "", podUID: String = "",
                service: String = "", cgroupPath: String = "") {
        self.containerId = containerId
        self.containerName = containerName
        self.pod = pod
        self.namespace = namespace
        self.podUID = podUID
        self.service = service
        self.cgroupPath = cgroupPath
    }

    /// True when neither a container nor a pod is known.
    public var isHost: Bool { containerId.isEmpty && podUID.isEmpty }
}

/// Attributes kernel events to containers and pods.
///
/// The cgroup id is the primary key: it is resolved to a path once
/// (`CgroupIDResolver`), the path is parsed once (`CgroupPathInfo`), and both
/// are cached by id. When the v2 id names no container — 0, unresolvable, or a
/// host cgroup such as the root on a hybrid v1/v2 host where containers live in
/// the v1 hierarchies — the kernel's v1 memory-controller cgroup id (the inode
/// of the task's directory in the host's v1 memory mount) is resolved the same
/// way by `memoryResolver`, cached apart (ids of different hierarchies may
/// coincide); when it resolves, its answer is final, host or not. Only when
/// no memory id resolves and the v2 id names no container is the pid's
/// `/proc/<pid>/cgroup` read instead and
/// cached by pid until `processExited(pid:)` or `sweep()` finds the process
/// gone (a host answer only for `hostPidTTL` seconds). The pod itself is
/// looked up in the `PodIndex` on every call (by container id, else by pod
/// UID), so metadata that arrives after a container's first event still
/// attributes its later events.
public final class Attributor: Sendable {
    public struct Configuration: Sendable {
        /// procfs of the host's PID namespace: /proc on the host, the host's
        /// /proc mounted at /host/proc in the DaemonSet (no hostPID).
        public var procRoot: String
        /// Whether `procRoot` may be read at all. False when the agent sees
        /// only its own PID namespace's procfs: kernel pids would name the
        /// wrong processes there.
        public var readsProc: Bool = true
        /// Bounds on the caches; when full they are cleared (then refilled on demand). Defaults 65 536.
        public var maximumCgroupEntries: Int
        public var maximumPidEntries: Int
        /// Seconds a pid found outside any container is remembered as such, so
        /// a host process's events do not each read procfs, yet a process that
        /// then moves into a container (a runtime's init) is seen there soon. Default 2.
        public var hostPidTTL: Double
        /// Seconds a process's container stays known by its pid after its
        /// `process_exit`: records of other ring buffers (network, DNS), which
        /// carry no v1 memory cgroup id, may be read after the exit, when
        /// /proc has nothing left to say. Default 1.
        public var exitedPidGrace: Double

        public init(procRoot: String = "/proc", maximumCgroupEntries: Int = 65_536, maximumPidEntries: Int = 65_536, hostPidTTL: Double = 2,
                    exitedPidGrace: Double = 1) {
            self.procRoot = procRoot
            self.maximumCgroupEntries = maximumCgroupEntries
            self.maximumPidEntries = maximumPidEntries
            self.hostPidTTL = hostPidTTL
            self.exitedPidGrace = exitedPidGrace
        }
    }

    private struct Identity: Sendable {
        var path: String
        var info: CgroupPathInfo
    }

    private struct State {
        var byCgroup: [UInt64: Identity] = [:]
        /// v1 memory-controller ids: another kernfs root, so another key space.
        var byMemoryCgroup: [UInt64: Identity] = [:]
        /// A pid's identity, and for a host result when to read procfs again.
        var byPid: [UInt32: (identity: Identity, expires: ContinuousClock.Instant?)] = [:]
    }

    public let index: PodIndex
    public let resolver: CgroupIDResolver?
    /// Resolves v1 memory-controller cgroup ids against the host's v1 memory
    /// mount; nil on a cgroup-v2-only host or when the kernel gives no such id.
    public let memoryResolver: CgroupIDResolver?
    public let configuration: Configuration
    private let state = Mutex(State())
    private let procReadCount = Atomic<UInt64>(0)
    /// Bumped whenever a cached entry is dropped or a pid's entry set to
    /// expire: an `AttributionMemo` entry made before is not used after.
    /// (Adding entries changes no answer the memo holds: it holds only
    /// answers the kernel's cgroup ids decided, made after their pid was
    /// remembered.)
    private let changes = Atomic<UInt64>(0)

    /// Times a pid's `/proc/<pid>/cgroup` was read: only when no cgroup id
    /// named a record's container and the pid was not cached. Stays far below
    /// the events attributed (the kernel's ids answer); on /metrics.
    public var procReads: UInt64 { procReadCount.load(ordering: .relaxed) }

    /// - Parameters:
    ///   - resolver: v2 ids; nil on a host without cgroup v2 (pids are used then).
    ///   - memoryResolver: v1 memory-controller ids (see `memoryResolver`).
    public init(index: PodIndex, resolver: CgroupIDResolver?, memoryResolver: CgroupIDResolver? = nil,
                configuration: Configuration = Configuration()) {
        self.index = index
        self.resolver = resolver
        self.memoryResolver = memoryResolver
        self.configuration = configuration
    }

    /// The container and pod of a process, from its cgroup id and/or pid (0 when unknown).
    public func attribute(cgroupId: UInt64, pid: UInt32) -> Attribution {
        attribute(cgroupId: cgroupId, memoryCgroupId: 0, pid: pid)
    }

    /// The container and pod of a process from its v2 cgroup id, its v1 memory
    /// cgroup id (both 0 when unknown) and, only when neither names a
    /// container, its pid's `/proc/<pid>/cgroup`.
    public func attribute(cgroupId: UInt64, memoryCgroupId: UInt64, pid: UInt32) -> Attribution {
        resolve(cgroupId: cgroupId, memoryCgroupId: memoryCgroupId, pid: pid).attribution
    }

    /// The attribution, and whether the kernel's cgroup ids alone decided
    /// it (then the same ids, pid and caches give the same answer again:
    /// no pid lookup with an expiry was involved).
    private func resolve(cgroupId: UInt64, memoryCgroupId: UInt64, pid: UInt32) -> (attribution: Attribution, byIds: Bool) {
        var identity = cgroupId == 0 ? nil : cachedIdentity(cgroupId, memory: false)
        if identity == nil || identity!.info.isHost, memoryCgroupId != 0, let memory = cachedIdentity(memoryCgroupId, memory: true) {
            // The kernel's memory cgroup of the task is authoritative where the
            // v2 id says nothing (a hybrid host): a host answer here is final.
            if pid != 0, !memory.info.isHost { remember(pid, memory) }
            // An unresolved v2 id may resolve later and then decide instead.
            return (attribution(for: memory), cgroupId == 0 || identity != nil)
        }
        if pid != 0, let known = identity, !known.info.isHost { remember(pid, known) }
        if let known = identity, !known.info.isHost { return (attribution(for: known), true) }
        if identity == nil || identity!.info.isHost, pid != 0, let byPid = pidIdentity(pid) {
            if identity == nil || !byPid.info.isHost { identity = byPid }
        }
        guard let identity else { return (Attribution(), false) }
        return (attribution(for: identity), false)
    }

    /// `attribute(_:memoryCgroupId:)` through a memo of recent answers: an
    /// event of a process seen just before (same cgroup ids and pid, no cache
    /// or pod metadata changed since) costs two atomic loads instead of the
    /// caches' locks and lookups. The ring-buffer reader keeps one memo.
    public func attribute(_ event: inout TapioEvent, memoryCgroupId: UInt64, memo: AttributionMemo) {
        guard event.pod.isEmpty && event.containerId.isEmpty else { return }
        let stamp = AttributionMemo.Stamp(attributor: changes.load(ordering: .acquiring), pods: index.generation)
        let slot = AttributionMemo.slot(cgroupId: event.cgroupId, memoryCgroupId: memoryCgroupId, pid: event.pid)
        if let hit = memo.entries[slot], hit.stamp == stamp, hit.cgroupId == event.cgroupId, hit.memoryCgroupId == memoryCgroupId, hit.pid == event.pid {
            memo.hits &+= 1
            event.containerId = hit.containerId
            event.pod = hit.pod
            event.namespace = hit.namespace
            return
        }
        // Counters read from cgroup files (pid 0) take the path below.
        guard event.pid != 0 else {
            attribute(&event, memoryCgroupId: memoryCgroupId)
            return
        }
        let (a, byIds) = resolve(cgroupId: event.cgroupId, memoryCgroupId: memoryCgroupId, pid: event.pid)
        event.containerId = a.containerId
        event.pod = a.pod
        event.namespace = a.namespace
        if byIds {
            memo.entries[slot] = .init(cgroupId: event.cgroupId, memoryCgroupId: memoryCgroupId, pid: event.pid, stamp: stamp,
                                       containerId: a.containerId, pod: a.pod, namespace: a.namespace)
        }
    }

    /// Fills `containerId`, `pod` and `namespace` of an event that has none.
    public func attribute(_ event: inout TapioEvent) {
        attribute(&event, memoryCgroupId: 0)
    }

    /// Fills `containerId`, `pod` and `namespace` of an event that has none,
    /// using the kernel's v1 memory cgroup id of the task (0 when unknown)
    /// where the v2 id names no container.
    public func attribute(_ event: inout TapioEvent, memoryCgroupId: UInt64) {
        guard event.pod.isEmpty && event.containerId.isEmpty else { return }
        var a = attribute(cgroupId: event.cgroupId, memoryCgroupId: memoryCgroupId, pid: event.pid)
        // Counters read from cgroup files name their cgroup by path: on a v1 host
        // it has no v2 id, and the path itself says whose it is.
        if a.isHost, event.pid == 0 {
            switch event.detail {
            case .cpuThrottle(_, _, _, _, let path, _), .memoryPressure(_, _, _, _, _, _, let path):
                let byPath = attribute(cgroupPath: path)
                if !byPath.isHost { a = byPath }
            default:
                break
            }
        }
        event.containerId = a.containerId
        event.pod = a.pod
        event.namespace = a.namespace
    }

    private func cachedIdentity(_ id: UInt64, memory: Bool) -> Identity? {
        if let hit = state.withLock({ memory ? $0.byMemoryCgroup[id] : $0.byCgroup[id] }) { return hit }
        guard let path = (memory ? memoryResolver : resolver)?.path(for: id) else { return nil }
        let found = Identity(path: path, info: CgroupPathInfo.parse(path))
        state.withLock { s in
            if memory {
                if s.byMemoryCgroup.count >= configuration.maximumCgroupEntries {
                    s.byMemoryCgroup.removeAll(keepingCapacity: true)
                    changes.add(1, ordering: .releasing)
                }
                s.byMemoryCgroup[id] = found
            } else {
                if s.byCgroup.count >= configuration.maximumCgroupEntries {
                    s.byCgroup.removeAll(keepingCapacity: true)
                    changes.add(1, ordering: .releasing)
                }
                s.byCgroup[id] = found
            }
        }
        return found
    }

    /// The attribution of a cgroup path, as a pid's `/proc/<pid>/cgroup` or a
    /// resolver gives it.
    public func attribute(cgroupPath: String) -> Attribution {
        attribution(for: Identity(path: cgroupPath, info: CgroupPathInfo.parse(cgroupPath)))
    }

    /// The live pod that owns a pod IP (for the peer side of a connection).
    public func pod(ip: IPAddress) -> PodInfo? { index.pod(ip: ip.description) }
    public func pod(ip: String) -> PodInfo? { index.pod(ip: ip) }

    /// Forgets a pid (on its `process_exit`; the number may be reused): a
    /// host answer at once, a container after `exitedPidGrace`.
    public func processExited(pid: UInt32) {
        state.withLock { s in
            guard let entry = s.byPid[pid] else { return }
            let expires = ContinuousClock.now + .milliseconds(Int64(milliseconds(configuration.exitedPidGrace)))
            if entry.identity.info.isHost || configuration.exitedPidGrace <= 0 {
                s.byPid[pid] = nil
                changes.add(1, ordering: .releasing)
            } else if entry.expires == nil || entry.expires! > expires {
                s.byPid[pid] = (entry.identity, expires)
                changes.add(1, ordering: .releasing)
            }
        }
    }

    /// Remembers the container a kernel cgroup id named for a pid, so the
    /// process's records that carry no usable id (network, DNS on a v1
    /// host) find it without a /proc read — also just after it exited.
    private func remember(_ pid: UInt32, _ identity: Identity) {
        state.withLock { s in
            if let known = s.byPid[pid], known.identity.path == identity.path { return }
            if s.byPid.count >= configuration.maximumPidEntries {
                s.byPid.removeAll(keepingCapacity: true)
                changes.add(1, ordering: .releasing)
            }
            s.byPid[pid] = (identity, nil)
        }
    }

    /// Drops cached pids whose process is gone and cgroup ids whose directory
    /// is gone, and deleted pods past their retention. Call it every few seconds.
    public func sweep() {
        let now = ContinuousClock.now
        // Expired entries go; a process gone from /proc without its exit seen goes too (an
        // exited one keeps its grace). Without a host /proc, only expiry forgets.
        let (pids, expired, cgroups, memoryCgroups) = state.withLock {
            ($0.byPid.filter { $0.value.expires == nil }.map(\.key), $0.byPid.filter { $0.value.expires.map { $0 <= now } ?? false }.map(\.key),
             $0.byCgroup.map { ($0.key, $0.value.path) }, $0.byMemoryCgroup.map { ($0.key, $0.value.path) })
        }
        var deadPids = configuration.readsProc ? pids.filter { !FileManager.default.fileExists(atPath: "\(configuration.procRoot)/\($0)") } : []
        deadPids += expired
        func dead(_ entries: [(UInt64, String)], _ resolver: CgroupIDResolver?) -> [UInt64] {
            guard let resolver else { return [] }
            defer { resolver.forgetRemoved() }
            return entries.filter { CgroupIDResolver.inode(of: resolver.absolute($0.1)) != $0.0 }.map(\.0)
        }
        let deadCgroups = dead(cgroups, resolver)
        let deadMemoryCgroups = dead(memoryCgroups, memoryResolver)
        state.withLock { s in
            for pid in deadPids { s.byPid[pid] = nil }
            for id in deadCgroups { s.byCgroup[id] = nil }
            for id in deadMemoryCgroups { s.byMemoryCgroup[id] = nil }
        }
        if !deadPids.isEmpty || !deadCgroups.isEmpty || !deadMemoryCgroups.isEmpty { changes.add(1, ordering: .releasing) }
        index.sweep()
    }

    /// Cache sizes, for /metrics and tests.
    public var cachedEntries: (cgroups: Int, pids: Int) { state.withLock { ($0.byCgroup.count + $0.byMemoryCgroup.count, $0.byPid.count) } }

    private func pidIdentity(_ pid: UInt32) -> Identity? {
        let now = ContinuousClock.now
        if let cached = state.withLock({ $0.byPid[pid] }), cached.expires.map({ $0 > now }) ?? true { return cached.identity }
        guard configuration.readsProc else { return nil }
        procReadCount.add(1, ordering: .relaxed)
        guard let entries = ProcCgroup.read(pid: Int32(bitPattern: pid), procRoot: configuration.procRoot),
              let (path, info) = ProcCgroup.identify(entries) else { return nil }
        let found = Identity(path: path, info: info)
        // A host result expires soon: the process may be a runtime's init
        // about to move into its container's cgroup.
        let expires: ContinuousClock.Instant? = info.isHost ? now + .milliseconds(Int64(milliseconds(configuration.hostPidTTL))) : nil
        state.withLock { s in
            if s.byPid.count >= configuration.maximumPidEntries {
                s.byPid.removeAll(keepingCapacity: true)
                changes.add(1, ordering: .releasing)
            }
            s.byPid[pid] = (found, expires)
        }
        return found
    }

    private func attribution(for identity: Identity) -> Attribution {
        let info = identity.info
        var a = Attribution(containerId: info.containerId ?? "", podUID: info.podUID ?? "", cgroupPath: identity.path)
        var pod: PodInfo?
        if let id = info.containerId, let found = index.pod(containerId: id) {
            pod = found.pod
            a.containerName = found.container.name
        } else if let uid = info.podUID {
            pod = index.pod(uid: uid)
        }
        if let pod {
            a.pod = pod.name
            a.namespace = pod.namespace
            a.podUID = pod.uid
            a.service = pod.service
        } else if info.isHost, let unit = info.systemdUnit {
            a.service = unit
        }
        return a
    }
}

/// Recent answers of `Attributor.attribute(_:memoryCgroupId:memo:)`, for one
/// thread (the agent's ring-buffer reader): 256 slots by cgroup ids and pid,
/// each valid only while neither the attributor's caches nor the pod
/// metadata changed since it was made.
public final class AttributionMemo: @unchecked Sendable {
    struct Stamp: Equatable {
        var attributor: UInt64
        var pods: UInt64
    }

    struct Entry {
        var cgroupId: UInt64
        var memoryCgroupId: UInt64
        var pid: UInt32
        var stamp: Stamp
        var containerId: String
        var pod: String
        var namespace: String
    }

    static let slots = 256
    var entries = [Entry?](repeating: nil, count: AttributionMemo.slots)
    /// Events answered from the memo.
    public internal(set) var hits: UInt64 = 0

    public init() {}

    static func slot(cgroupId: UInt64, memoryCgroupId: UInt64, pid: UInt32) -> Int {
        let mixed = (cgroupId ^ (memoryCgroupId &<< 21) ^ (UInt64(pid) &<< 42)) &* 0x9E37_79B9_7F4A_7C15
        return Int(truncatingIfNeeded: mixed >> 56)
    }
}
