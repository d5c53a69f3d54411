/// The container runtime a cgroup path or a Kubernetes container id names.
public enum ContainerRuntime: String, Sendable, Equatable, Codable {
    case containerd
    case crio = "cri-o"
    case docker
    case podman
    case unknown
}

/// What a cgroup path says about the process in it: the container, the pod,
/// the QoS class and, for host processes, the systemd unit.
///
/// Parsing looks at each path component on its own, so the same rules cover
/// cgroup v1 and v2, the cgroupfs and systemd drivers, nested layouts (kind,
/// k3s in a container, CI runners) and a full filesystem path such as
/// `/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/pod<uid>/<id>/cpu.cfs_quota_us`.
/// When several components match, the deepest wins.
public struct CgroupPathInfo: Sendable, Equatable {
    /// The 64-hex container id, nil outside a container (or in a runtime's
    /// helper cgroup such as CRI-O's `crio-conmon-<id>.scope`).
    public var containerId: String?
    /// The runtime the path names (`cri-containerd-`, `crio-`, `docker-`,
    /// `/docker/<id>`, `libpod-`); nil for a bare id, which containerd and
    /// Docker both use under kubepods with the cgroupfs driver.
    public var runtime: ContainerRuntime?
    /// The pod UID in its API form (dashes). For a static pod this is the
    /// kubelet's config hash (32 hex digits), which the API server shows as the
    /// mirror pod's `kubernetes.io/config.mirror` annotation.
    public var podUID: String?
    /// `Guaranteed`, `Burstable` or `BestEffort`, from the kubepods hierarchy.
    public var qosClass: String?
    /// True under a `kubepods` hierarchy.
    public var isKubernetes: Bool
    /// The deepest systemd `.service` or `.scope` that is not a container
    /// (e.g. `kubelet.service`, `session-3.scope`): names host processes.
    public var systemdUnit: String?

    public init(containerId: String? = nil, runtime: ContainerRuntime? = nil, podUID: String? = nil, qosClass: String? = nil,
                isKubernetes: Bool = false, systemdUnit: String? = nil) {
        self.containerId = containerId
        self.runtime = runtime
        self.podUID = podUID
        self.qosClass = qosClass
        self.isKubernetes = isKubernetes
        self.systemdUnit = systemdUnit
    }

    /// True when the path names neither a container nor a pod.
    public var isHost: Bool { containerId == nil && podUID == nil }

    /// Parses a cgroup path (v1 or v2, relative to the hierarchy's root or a
    /// full filesystem path).
    public static func parse(_ path: String) -> CgroupPathInfo {
        var info = CgroupPathInfo()
        var previous = ""
        for component in path.split(separator: "/", omittingEmptySubsequences: true) {
            let segment = String(component)
            var name = segment
            var unitSuffix: String?
            for suffix in [".scope", ".slice", ".service"] where name.hasSuffix(suffix) {
                name.removeLast(suffix.count)
                unitSuffix = suffix
                break
            }

            if name == "kubepods" || name.hasPrefix("kubepods-") || name.hasSuffix("-kubepods") {
                info.isKubernetes = true
            }
            if let qos = qosClass(of: name) {
                info.qosClass = qos
            }
            if let uid = podUID(of: name, systemd: unitSuffix == ".slice") {
                info.podUID = uid
                info.containerId = nil
                info.runtime = nil
                continue
            }
            if let (id, runtime) = container(of: name, parent: previous) {
                if let id {
                    info.containerId = id
                    info.runtime = runtime
                }
                previous = segment
                continue
            }
            if unitSuffix == ".service" || unitSuffix == ".scope" {
                info.systemdUnit = segment
            }
            previous = segment
        }
        if info.isKubernetes, info.podUID != nil, info.qosClass == nil {
            // The kubelet puts Guaranteed pods directly under kubepods.
            info.qosClass = "Guaranteed"
        }
        if info.containerId != nil || info.podUID != nil {
            info.systemdUnit = nil
        }
        return info
    }

    private static func qosClass(of name: String) -> String? {
        // `burstable` (cgroupfs), `kubepods-burstable` (systemd), `kubelet-kubepods-burstable` (kind).
        if name == "burstable" || name.hasSuffix("kubepods-burstable") { return "Burstable" }
        if name == "besteffort" || name.hasSuffix("kubepods-besteffort") { return "BestEffort" }
        return nil
    }

    /// `pod<uid>` (cgroupfs) or `…-pod<uid_with_underscores>` (systemd slice).
    private static func podUID(of name: String, systemd: Bool) -> String? {
        var candidate: Substring?
        if name.hasPrefix("pod") {
            candidate = name.dropFirst(3)
        } else if systemd, let range = name.range(of: "-pod", options: .backwards) {
            candidate = name[range.upperBound...]
        }
        guard let raw = candidate else { return nil }
        let uid = raw.replacingOccurrences(of: "_", with: "-")
        return isPodUID(uid) ? uid : nil
    }

    /// A container cgroup: `(id, runtime)`, or `(nil, runtime)` for a runtime
    /// helper cgroup (conmon) that is not the container itself; nil if the
    /// component names no container.
    private static func container(of name: String, parent: String) -> (String?, ContainerRuntime?)? {
        let prefixes: [(String, ContainerRuntime?)] = [
            ("cri-containerd-", .containerd), ("crio-conmon-", nil), ("crio-", .crio),
            ("docker-", .docker), ("libpod-conmon-", nil), ("libpod-", .podman),
        ]
        for (prefix, runtime) in prefixes where name.hasPrefix(prefix) {
            let id = String(name.dropFirst(prefix.count))
            guard isContainerID(id) else { continue }
            if runtime == nil { return (nil, prefix.hasPrefix("crio") ? .crio : .podman) }
            return (id, runtime)
        }
        if isContainerID(name) {
            return (name, parent == "docker" ? .docker : nil)
        }
        return nil
    }

    /// 64 lowercase hex digits, the form every OCI runtime here uses.
    public static func isContainerID<S: StringProtocol>(_ s: S) -> Bool {
        s.utf8.count == 64 && s.utf8.allSatisfy(isLowerHex)
    }

    /// A UUID (8-4-4-4-12 hex) or a static pod's 32-hex config hash.
    public static func isPodUID<S: StringProtocol>(_ s: S) -> Bool {
        let bytes = Array(s.utf8)
        if bytes.count == 32 { return bytes.allSatisfy(isLowerHex) }
        guard bytes.count == 36 else { return false }
        for (i, b) in bytes.enumerated() {
            if i == 8 || i == 13 || i == 18 || i == 23 {
                if b != UInt8(ascii: "-") { return false }
            } else if !isHex(b) {
                return false
            }
        }
        return true
    }

    private static func isLowerHex(_ b: UInt8) -> Bool {
        (b >= 0x30 && b <= 0x39) || (b >= 0x61 && b <= 0x66)
    }

    private static func isHex(_ b: UInt8) -> Bool {
        isLowerHex(b) || (b >= 0x41 && b <= 0x46)
    }
}
