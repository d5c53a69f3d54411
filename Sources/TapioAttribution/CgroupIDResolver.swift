import Foundation
import Synchronization

/// Resolves a cgroup v2 id — what `bpf_get_current_cgroup_id()` returns, the
/// inode number of the cgroup's directory in the cgroup2 filesystem — to the
/// cgroup's path.
///
/// It walks the cgroup2 mount once and keeps inode → path. A miss walks
/// again, at most once per `minimumRefreshInterval` (a burst of events from a
/// new container costs one walk, not one per event). A hit is checked with one
/// `stat` and dropped if the directory is gone or now has another inode, so the
/// cache never answers with a removed cgroup; each walk also forgets every
/// directory that disappeared since the last one.
///
/// Paths are relative to the mount point and start with `/`, as in
/// `/proc/<pid>/cgroup` (`/` is the root cgroup).
public final class CgroupIDResolver: Sendable {
    public struct Configuration: Sendable {
        /// Where cgroup2 is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
        public var mountPoint: String
        /// Only this subtree is walked (a path relative to the mount, `/` for
        /// all): the agent's `--cgroup-root`.
        public var scope: String
        /// Seconds between walks caused by misses. Default 1.
        public var minimumRefreshInterval: Double
        /// Walks stop at this depth below `scope`. Default 32.
        public var maximumDepth: Int

        public init(mountPoint: String, scope: String = "/", minimumRefreshInterval: Double = 1, maximumDepth: Int = 32) {
            self.mountPoint = mountPoint
            self.scope = scope
            self.minimumRefreshInterval = minimumRefreshInterval
            self.maximumDepth = maximumDepth
        }
    }

    /// Counters for /metrics and tests.
    public struct Statistics: Sendable, Equatable {
        public var walks: UInt64 = 0
        public var hits: UInt64 = 0
        public var misses: UInt64 = 0
        public var stale: UInt64 = 0
        public var entries: Int = 0
    }

    private struct State {
        var paths: [UInt64: String] = [:]
        var lastWalk: ContinuousClock.Instant?
        var statistics = Statistics()
    }

    public let configuration: Configuration
    private let state = Mutex(State())

    public init(configuration: Configuration) {
        var c = configuration
        while c.mountPoint.count > 1 && c.mountPoint.hasSuffix("/") { c.mountPoint.removeLast() }
        c.scope = CgroupIDResolver.normalize(c.scope)
        self.configuration = c
    }

    /// A resolver for the host's cgroup2 mount (`HostCgroups.detect`: the
    /// host's tree mounted in a pod at /host/sys/fs/cgroup, else this mount
    /// namespace's cgroup2 mount), never a pod's own namespaced view.
    public convenience init(scope: String = "/", hostCgroupfs: String? = nil) throws {
        guard let mount = HostCgroups.detect(configured: hostCgroupfs).unified else {
            throw AttributionError("no cgroup2 filesystem found for the host (give the host's cgroupfs root)")
        }
        self.init(configuration: Configuration(mountPoint: mount, scope: scope))
    }

    public var statistics: Statistics {
        state.withLock { s in
            var stats = s.statistics
            stats.entries = s.paths.count
            return stats
        }
    }

    /// The path of cgroup `id`, or nil if no directory in scope has that inode.
    public func path(for id: UInt64) -> String? {
        if let cached = state.withLock({ $0.paths[id] }) {
            if Self.inode(of: absolute(cached)) == id {
                state.withLock { $0.statistics.hits += 1 }
                return cached
            }
            state.withLock { s in
                if s.paths[id] == cached { s.paths[id] = nil }
                s.statistics.stale += 1
            }
        }
        let mayWalk = state.withLock { s -> Bool in
            s.statistics.misses += 1
            guard let last = s.lastWalk else { return true }
            return ContinuousClock.now - last >= .milliseconds(Int64(milliseconds(configuration.minimumRefreshInterval)))
        }
        guard mayWalk else { return nil }
        refresh()
        return state.withLock { $0.paths[id] }
    }

    /// Walks the scope now and replaces the cache.
    public func refresh() {
        state.withLock { $0.lastWalk = ContinuousClock.now }
        var found: [UInt64: String] = [:]
        walk(relative: configuration.scope, depth: 0, into: &found)
        state.withLock { s in
            s.paths = found
            s.statistics.walks += 1
        }
    }

    /// Drops cached entries whose directory is gone, without walking.
    public func forgetRemoved() {
        let snapshot = state.withLock { $0.paths }
        let gone = snapshot.filter { Self.inode(of: absolute($0.value)) != $0.key }.map(\.key)
        guard !gone.isEmpty else { return }
        state.withLock { s in for id in gone { s.paths[id] = nil } }
    }

    /// The filesystem path of a cgroup path relative to the mount.
    public func absolute(_ relative: String) -> String {
        relative == "/" ? configuration.mountPoint : configuration.mountPoint + relative
    }

    /// The cgroup id of a cgroup2 directory: its inode number.
    public static func inode(of path: String) -> UInt64? {
        var st = stat()
        guard lstat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFDIR else { return nil }
        return UInt64(st.st_ino)
    }

    private func walk(relative: String, depth: Int, into found: inout [UInt64: String]) {
        let path = absolute(relative)
        guard let id = Self.inode(of: path) else { return }
        found[id] = relative
        guard depth < configuration.maximumDepth, let dir = opendir(path) else { return }
        defer { closedir(dir) }
        var children: [String] = []
        while let entry = readdir(dir) {
            let type = entry.pointee.d_type
            guard type == UInt8(DT_DIR) || type == UInt8(DT_UNKNOWN) else { continue }
            let name = withUnsafeBytes(of: entry.pointee.d_name) { raw in
                String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name == "." || name == ".." { continue }
            children.append(name)
        }
        for name in children {
            walk(relative: relative == "/" ? "/" + name : relative + "/" + name, depth: depth + 1, into: &found)
        }
    }

    static func normalize(_ path: String) -> String {
        let parts = path.split(separator: "/", omittingEmptySubsequences: true)
        return "/" + parts.joined(separator: "/")
    }
}

/// A failure in attribution's sources, with what went wrong in words.
public struct AttributionError: Error, CustomStringConvertible, Equatable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
