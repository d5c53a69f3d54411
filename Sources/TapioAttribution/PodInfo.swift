/// A pod as attribution needs it, flattened from a `KubePod`.
public struct PodInfo: Sendable, Equatable {
    public var uid: String
    public var name: String
    public var namespace: String
    /// `spec.nodeName`, "" before scheduling.
    public var node: String
    /// `status.podIPs` (falling back to `status.podIP`), IPv4 and/or IPv6.
    public var ips: [String]
    public var hostIP: String?
    /// Host-network pods share the node's IP; they are never indexed by IP.
    public var hostNetwork: Bool
    /// `Pending`, `Running`, `Succeeded`, `Failed`, `Unknown` or "".
    public var phase: String
    public var labels: [String: String]
    /// The controlling owner as the API names it (e.g. ReplicaSet `web-7d4b9c8f6d`).
    public var owner: Owner?
    /// The workload: the owner, except that a ReplicaSet created by a
    /// Deployment becomes that Deployment (see `workload(owner:labels:)`).
    public var workload: Owner?
    /// The service name events are grouped by (see `serviceName`).
    public var service: String
    /// `Guaranteed`, `Burstable` or `BestEffort`; nil if the status has none.
    public var qosClass: String?
    /// For a static (mirror) pod, the kubelet's config hash: the UID its cgroup is named by.
    public var configHash: String?
    public var containers: [ContainerInfo]
    public var resourceVersion: String?

    public struct Owner: Sendable, Equatable, Hashable {
        public var kind: String
        public var name: String

        public init(kind: String, name: String) {
            self.kind = kind
            self.name = name
        }
    }

    public init(uid: String, name: String, namespace: String, node: String = "", ips: [String] = [], hostIP: String? = nil,
                hostNetwork: Bool = false, phase: String = "Running", labels: [String: String] = [:], owner: Owner? = nil,
                qosClass: String? = nil, configHash: String? = nil, containers: [ContainerInfo] = [], resourceVersion: String? = nil) {
        self.uid = uid
        self.name = name
        self.namespace = namespace
        self.node = node
        self.ips = ips
        self.hostIP = hostIP
        self.hostNetwork = hostNetwork
        self.phase = phase
        self.labels = labels
        self.owner = owner
        self.workload = PodInfo.workload(owner: owner, labels: labels)
        self.service = PodInfo.serviceName(labels: labels, workload: workload, podName: name)
        self.qosClass = qosClass
        self.configHash = configHash
        self.containers = containers
        self.resourceVersion = resourceVersion
    }

    /// Flattens an API object; nil without a uid or a name (nothing to key it by).
    public init?(_ pod: KubePod) {
        guard let meta = pod.metadata, let uid = meta.uid, !uid.isEmpty, let name = meta.name, !name.isEmpty else { return nil }
        let status = pod.status
        var ips = (status?.podIPs ?? []).compactMap(\.ip).filter { !$0.isEmpty }
        if ips.isEmpty, let ip = status?.podIP, !ip.isEmpty { ips = [ip] }
        let refs = meta.ownerReferences ?? []
        let ref = refs.first { $0.controller == true } ?? refs.first
        let owner = ref.flatMap { r in r.kind.flatMap { k in r.name.map { Owner(kind: k, name: $0) } } }
        var containers: [ContainerInfo] = []
        for (kind, list) in [(ContainerInfo.Kind.regular, status?.containerStatuses), (.initContainer, status?.initContainerStatuses),
                             (.ephemeral, status?.ephemeralContainerStatuses)] {
            containers += (list ?? []).map { ContainerInfo($0, kind: kind) }
        }
        // Containers the status does not list yet (just scheduled) still have names.
        let known = Set(containers.map(\.name))
        for name in (pod.spec?.containers ?? []).compactMap(\.name) where !known.contains(name) {
            containers.append(ContainerInfo(name: name, id: nil, runtime: nil))
        }
        self.init(uid: uid, name: name, namespace: meta.namespace ?? "default", node: pod.spec?.nodeName ?? "", ips: ips,
                  hostIP: status?.hostIP, hostNetwork: pod.spec?.hostNetwork ?? false, phase: status?.phase ?? "",
                  labels: meta.labels ?? [:], owner: owner, qosClass: status?.qosClass,
                  configHash: meta.annotations?["kubernetes.io/config.mirror"] ?? meta.annotations?["kubernetes.io/config.hash"],
                  containers: containers, resourceVersion: meta.resourceVersion)
    }

    /// True when the pod's processes are gone for good (its IP may be reused).
    public var isFinished: Bool { phase == "Succeeded" || phase == "Failed" }

    /// The container with this (prefix-free) id, current or last terminated.
    public func container(id: String) -> ContainerInfo? {
        containers.first { $0.id == id || $0.lastTermination?.containerId == id }
    }

    /// The workload a pod belongs to. A ReplicaSet owned by a Deployment is
    /// named `<deployment>-<pod-template-hash>` and the pod carries the hash in
    /// its `pod-template-hash` label: when both agree the workload is
    /// `Deployment <deployment>`. A ReplicaSet without that label (created on
    /// its own) stays a ReplicaSet. Other owners (StatefulSet, DaemonSet, Job,
    /// Node for static pods) are the workload as they are.
    public static func workload(owner: Owner?, labels: [String: String]) -> Owner? {
        guard let owner else { return nil }
        if owner.kind == "ReplicaSet", let hash = labels["pod-template-hash"], !hash.isEmpty,
           owner.name.hasSuffix("-" + hash), owner.name.count > hash.count + 1 {
            return Owner(kind: "Deployment", name: String(owner.name.dropLast(hash.count + 1)))
        }
        return owner
    }

    /// The service name, first of: label `app.kubernetes.io/name`, label
    /// `app`, label `k8s-app` (what kube-system add-ons such as CoreDNS use),
    /// the workload's name (a Deployment's, not its ReplicaSet's), and the pod's
    /// own name for a bare pod. A static pod's owner is its Node, so it falls
    /// through to the pod name rather than being named after the node.
    public static func serviceName(labels: [String: String], workload: Owner?, podName: String) -> String {
        for key in ["app.kubernetes.io/name", "app", "k8s-app"] {
            if let v = labels[key], !v.isEmpty { return v }
        }
        if let workload, workload.kind != "Node" { return workload.name }
        return podName
    }
}

/// One container of a pod.
public struct ContainerInfo: Sendable, Equatable {
    public enum Kind: String, Sendable, Equatable {
        case regular, initContainer = "init", ephemeral
    }

    public var name: String
    /// The runtime's id without its `containerd://` / `docker://` / `cri-o://`
    /// prefix, nil until the container is created.
    public var id: String?
    public var runtime: ContainerRuntime?
    public var kind: Kind
    public var image: String?
    public var ready: Bool
    public var restartCount: Int
    /// `running`, `waiting` or `terminated`, nil if the status has no state.
    public var state: String?
    /// Why it is waiting or terminated now (e.g. `CrashLoopBackOff`).
    public var stateReason: String?
    /// The current state when terminated (a finished Job, an init container).
    public var termination: Termination?
    /// The previous run's end: `OOMKilled`, `Error`, `StartError`, exit code.
    public var lastTermination: Termination?

    public init(name: String, id: String?, runtime: ContainerRuntime?, kind: Kind = .regular, image: String? = nil, ready: Bool = false,
                restartCount: Int = 0, state: String? = nil, stateReason: String? = nil, termination: Termination? = nil,
                lastTermination: Termination? = nil) {
        self.name = name
        self.id = id
        self.runtime = runtime
        self.kind = kind
        self.image = image
        self.ready = ready
        self.restartCount = restartCount
        self.state = state
        self.stateReason = stateReason
        self.termination = termination
        self.lastTermination = lastTermination
    }

    init(_ s: KubeContainerStatus, kind: Kind) {
        let (runtime, id) = ContainerInfo.splitID(s.containerID)
        var state: String?
        var reason: String?
        if s.state?.running != nil { state = "running" }
        if let w = s.state?.waiting { state = "waiting"; reason = w.reason }
        if let t = s.state?.terminated { state = "terminated"; reason = t.reason }
        self.init(name: s.name ?? "", id: id, runtime: runtime, kind: kind, image: s.image, ready: s.ready ?? false,
                  restartCount: s.restartCount ?? 0, state: state, stateReason: reason,
                  termination: s.state?.terminated.map(Termination.init), lastTermination: s.lastState?.terminated.map(Termination.init))
    }

    /// Splits `containerd://<id>` into the runtime and the bare id; an id
    /// without a scheme is returned as is with runtime `.unknown`.
    public static func splitID(_ raw: String?) -> (ContainerRuntime?, String?) {
        guard let raw, !raw.isEmpty else { return (nil, nil) }
        guard let sep = raw.range(of: "://") else { return (.unknown, raw) }
        let id = String(raw[sep.upperBound...])
        switch raw[..<sep.lowerBound] {
        case "containerd": return (.containerd, id)
        case "docker": return (.docker, id)
        case "cri-o": return (.crio, id)
        case "podman": return (.podman, id)
        default: return (.unknown, id)
        }
    }
}

/// How a container run ended.
public struct Termination: Sendable, Equatable {
    /// E.g. `OOMKilled`, `Error`, `Completed`, `StartError`, `ContainerCannotRun`.
    public var reason: String?
    public var exitCode: Int?
    public var signal: Int?
    public var message: String?
    public var startedAt: String?
    public var finishedAt: String?
    /// The id of the run that ended (bare), which differs from the current one after a restart.
    public var containerId: String?

    public init(reason: String? = nil, exitCode: Int? = nil, signal: Int? = nil, message: String? = nil, startedAt: String? = nil,
                finishedAt: String? = nil, containerId: String? = nil) {
        self.reason = reason
        self.exitCode = exitCode
        self.signal = signal
        self.message = message
        self.startedAt = startedAt
        self.finishedAt = finishedAt
        self.containerId = containerId
    }

    init(_ t: KubeContainerState.Terminated) {
        self.init(reason: t.reason, exitCode: t.exitCode, signal: t.signal, message: t.message, startedAt: t.startedAt,
                  finishedAt: t.finishedAt, containerId: ContainerInfo.splitID(t.containerID).1)
    }
}
