import Foundation

/// Where the HOST's cgroup hierarchies are, as seen from the agent.
///
/// Cgroup ids from the kernel are kernfs ids of the host's hierarchies, so they
/// must be resolved against mounts of the host's hierarchy roots — never
/// against the agent's own namespaced view. In the DaemonSet the agent has its
/// own mount and cgroup namespaces; its /sys/fs/cgroup shows only its own
/// cgroup, so the manifest bind-mounts the host's /sys/fs/cgroup (hostPath)
/// at `/host/sys/fs/cgroup` (`defaultHostMount`). A bind mount of a cgroupfs
/// shows the hierarchy from its root whatever the reader's cgroup namespace,
/// and the runtime binds recursively, so on a v1/hybrid host the controller
/// mounts below it come along.
///
/// On a cgroup v2 host `unified` is the root itself; on a hybrid host it is
/// its `unified` child (empty when systemd runs in hybrid mode) and the
/// containers live in the v1 `memory`, `cpu` and `cpuacct` hierarchies.
public struct HostCgroups: Sendable, Equatable, CustomStringConvertible {
    /// The cgroupfs root the hierarchies were found under (`/sys/fs/cgroup` on the host).
    public var root: String
    /// The cgroup2 mount: the root of v2 ids and of the cgroup_skb attach point.
    public var unified: String?
    /// The v1 memory controller's mount: the root of v1 memory cgroup ids.
    public var memory: String?
    /// The v1 cpu controller's mount (cfs quota and throttling counters).
    public var cpu: String?
    /// The v1 cpuacct controller's mount (usage); often the same as `cpu`.
    public var cpuacct: String?

    public init(root: String, unified: String? = nil, memory: String? = nil, cpu: String? = nil, cpuacct: String? = nil) {
        self.root = root
        self.unified = unified
        self.memory = memory
        self.cpu = cpu
        self.cpuacct = cpuacct
    }

    /// Where the DaemonSet mounts the host's /sys/fs/cgroup.
    public static let defaultHostMount = "/host/sys/fs/cgroup"

    /// True when no hierarchy was found.
    public var isEmpty: Bool { unified == nil && memory == nil && cpu == nil && cpuacct == nil }

    public var description: String {
        "root=\(root) unified=\(unified ?? "-") memory=\(memory ?? "-") cpu=\(cpu ?? "-") cpuacct=\(cpuacct ?? "-")"
    }

    /// The host's hierarchies: under `configured` when given (`--host-cgroupfs`),
    /// else under `defaultHostMount` when it holds a cgroup hierarchy (the agent
    /// runs in a pod), else this mount namespace's first cgroup mounts (the agent
    /// runs on the host).
    public static func detect(configured: String? = nil, mountinfo: String? = nil) -> HostCgroups {
        let text = mountinfo ?? ProcFile.text("/proc/self/mountinfo") ?? ""
        let mounts = parse(text)
        if let configured { return at(configured, mounts: mounts) }
        let inPod = at(defaultHostMount, mounts: mounts)
        if !inPod.isEmpty { return inPod }
        var found = HostCgroups(root: "/sys/fs/cgroup")
        for m in mounts {
            if m.type == "cgroup2", found.unified == nil { found.unified = m.point }
            if m.type == "cgroup" {
                if m.controllers.contains("memory"), found.memory == nil { found.memory = m.point }
                if m.controllers.contains("cpu"), found.cpu == nil { found.cpu = m.point }
                if m.controllers.contains("cpuacct"), found.cpuacct == nil { found.cpuacct = m.point }
            }
        }
        if let v1 = found.memory ?? found.cpu ?? found.cpuacct {
            found.root = parent(v1)
        } else if let v2 = found.unified {
            found.root = v2
        }
        return found
    }

    /// The hierarchies mounted at a cgroupfs root directory or directly below
    /// it, from mountinfo: the root itself when it is a cgroup2 mount (a v2
    /// host), else a cgroup2 mount below it (`unified` on a hybrid host) and the
    /// v1 controller mounts below it (`memory`, `cpu,cpuacct`, ...).
    public static func at(_ root: String, mountinfo: String? = nil) -> HostCgroups {
        let text = mountinfo ?? ProcFile.text("/proc/self/mountinfo") ?? ""
        return at(root, mounts: parse(text))
    }

    private static func at(_ root: String, mounts: [Mount]) -> HostCgroups {
        var r = root
        while r.count > 1 && r.hasSuffix("/") { r.removeLast() }
        var found = HostCgroups(root: r)
        // A later mount over the same point hides an earlier one: the last wins.
        for m in mounts where m.point == r || parent(m.point) == r {
            if m.type == "cgroup2" {
                if m.point == r || found.unified != r { found.unified = m.point }
            } else if m.type == "cgroup", m.point != r {
                if m.controllers.contains("memory") { found.memory = m.point }
                if m.controllers.contains("cpu") { found.cpu = m.point }
                if m.controllers.contains("cpuacct") { found.cpuacct = m.point }
            }
        }
        if found.unified == r { found.memory = nil; found.cpu = nil; found.cpuacct = nil }
        return found
    }

    struct Mount {
        var point: String
        var type: String
        var controllers: Set<String>
    }

    static func parse(_ mountinfo: String) -> [Mount] {
        var mounts: [Mount] = []
        for line in mountinfo.split(separator: "\n") {
            // id parent major:minor root mountpoint options [optional…] - fstype source superoptions
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let dash = fields.firstIndex(of: "-"), dash >= 5, dash + 1 < fields.count else { continue }
            let type = String(fields[dash + 1])
            guard type == "cgroup" || type == "cgroup2" else { continue }
            let options = dash + 3 < fields.count ? Set(fields[dash + 3].split(separator: ",").map(String.init)) : []
            mounts.append(Mount(point: CgroupMount.unescape(String(fields[4])), type: type, controllers: options))
        }
        return mounts
    }

    private static func parent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return path }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
