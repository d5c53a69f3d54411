import Foundation

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`.
/// cgroup v2 is the line `0::/path`; v1 lines name their controllers
/// (`4:memory:/kubepods/…`, `1:name=systemd:/…`).
public struct ProcCgroupEntry: Sendable, Equatable {
    public var hierarchyID: Int
    public var controllers: [String]
    public var path: String

    public init(hierarchyID: Int, controllers: [String], path: String) {
        self.hierarchyID = hierarchyID
        self.controllers = controllers
        self.path = path
    }

    /// The cgroup v2 (unified) line.
    public var isUnified: Bool { hierarchyID == 0 && controllers.isEmpty }
}

/// Reading a process's cgroups from procfs.
public enum ProcCgroup {
    /// Parses the text of `/proc/<pid>/cgroup`; malformed lines are skipped.
    public static func parse(_ text: String) -> [ProcCgroupEntry] {
        var entries: [ProcCgroupEntry] = []
        for line in text.split(separator: "\n") {
            // The path may itself contain ':'; only the first two separate fields.
            let fields = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            guard fields.count == 3, let id = Int(fields[0]) else { continue }
            let controllers = fields[1].isEmpty ? [] : fields[1].split(separator: ",").map(String.init)
            entries.append(ProcCgroupEntry(hierarchyID: id, controllers: controllers, path: String(fields[2])))
        }
        return entries
    }

    /// The entries of a live process, nil if it is gone (or procfs is not readable).
    public static func read(pid: Int32, procRoot: String = "/proc") -> [ProcCgroupEntry]? {
        guard let text = ProcFile.text("\(procRoot)/\(pid)/cgroup") else { return nil }
        return parse(text)
    }

    /// What the process's cgroups say about it. The v2 line is tried first,
    /// then `name=systemd`, then the v1 controllers in order: on a hybrid host
    /// the v2 path can be `/` while v1 hierarchies hold the container path.
    public static func identify(_ entries: [ProcCgroupEntry]) -> (path: String, info: CgroupPathInfo)? {
        let ordered = entries.filter(\.isUnified)
            + entries.filter { $0.controllers.contains("name=systemd") }
            + entries.filter { !$0.isUnified && !$0.controllers.contains("name=systemd") }
        var fallback: (String, CgroupPathInfo)?
        for entry in ordered {
            let info = CgroupPathInfo.parse(entry.path)
            if info.containerId != nil { return (entry.path, info) }
            if fallback == nil || (fallback!.1.isHost && !info.isHost) { fallback = (entry.path, info) }
        }
        return fallback
    }
}

/// Where the cgroup v2 hierarchy is mounted.
public enum CgroupMount {
    /// The mount point of the first `cgroup2` filesystem in a mountinfo text
    /// (`/proc/self/mountinfo`), with octal escapes (`\040`) decoded.
    public static func cgroup2MountPoint(mountinfo: String) -> String? {
        for line in mountinfo.split(separator: "\n") {
            // id parent major:minor root mountpoint options [optional…] - fstype source superoptions
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let dash = fields.firstIndex(of: "-"), dash >= 5, dash + 1 < fields.count else { continue }
            if fields[dash + 1] == "cgroup2" { return unescape(String(fields[4])) }
        }
        return nil
    }

    /// The cgroup2 mount point of this process's mount namespace.
    public static func cgroup2MountPoint() -> String? {
        guard let text = ProcFile.text("/proc/self/mountinfo") else { return nil }
        return cgroup2MountPoint(mountinfo: text)
    }

    static func unescape(_ s: String) -> String {
        guard s.contains("\\") else { return s }
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 4 <= b.count,
               let v = UInt8(String(decoding: b[(i + 1)..<(i + 4)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }
}
