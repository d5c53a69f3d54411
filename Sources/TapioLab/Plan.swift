import Foundation
import TapioWire

/// A pod as the lab creates it: the Kubernetes identity the agent's metadata
/// file announces and the cgroup the process runs in, named the way the
/// kubelet names it (`…/kubepods/pod<uid>/<container id>`) so the agent's
/// attribution reads the pod and container from the path alone.
public struct PodIdentity: Sendable, Equatable {
    public var service: String
    public var node: String
    public var name: String
    public var uid: String
    /// 64 hex digits (the runtime's id, `containerd://<id>` in the pod status).
    public var containerId: String
    public var templateHash: String
    public var ip: String
}

/// Names and addresses of one run, derived from the scenario and a run id:
/// nothing here touches the machine, so it is tested on its own.
///
/// Network, as a cluster with a bridge CNI and host-gateway routes: a
/// "fabric" namespace holds the bridge `br0` (10.77.0.1/24, also the DNS
/// server and the load client); node i is namespace `tlab-<id>-<node>` at
/// 10.77.0.(11+i) with its veth on the bridge, IP forwarding on, its pod CIDR
/// 10.77.(i+1).0/24 on a bridge `cni0` (gateway .1) and a route to every
/// other node's pod CIDR via that node's address. Each pod is its own
/// namespace `tlab-<id>-pod-<service>` whose `eth0` is a veth on its node's
/// `cni0`, with an address 10.77.(i+1).(11+k) from the node's CIDR and a
/// default route via the gateway: peers are pod addresses, and traffic between
/// nodes is routed through the node namespaces. Nothing is added to the
/// host's own namespace, so runs never collide with each other or with the
/// host's addresses.
public struct LabPlan: Sendable {
    public let scenario: Scenario
    public let id: String
    public let runDirectory: String
    public let labDirectory: String

    public static let cgroup2Mount = "/sys/fs/cgroup/unified"
    public static let cgroupV1Mounts = ["memory": "/sys/fs/cgroup/memory", "cpu": "/sys/fs/cgroup/cpu"]
    public static let dnsIP = "10.77.0.1"
    public static let badDNSPort = 5354
    /// The fabric's (nodes') subnet, 10.77.0.0/24.
    public static let prefixLength = 24
    /// A pod CIDR's prefix (one /24 a node).
    public static let podPrefixLength = 24

    public init(scenario: Scenario, id: String, runDirectory: String, labDirectory: String) {
        self.scenario = scenario
        self.id = id
        self.runDirectory = runDirectory
        self.labDirectory = labDirectory
    }

    public var fabricNetns: String { "tlab-\(id)-fab" }
    public func netns(node: String) -> String { "tlab-\(id)-\(node)" }

    public func nodeIP(_ node: String) -> String {
        let i = scenario.topology.nodes.firstIndex { $0.name == node } ?? 0
        return "10.77.0.\(11 + i)"
    }

    /// The node's pod CIDR, 10.77.(i+1).0/24.
    public func podCIDR(_ node: String) -> String { "10.77.\(nodeIndex(node) + 1).0/\(LabPlan.podPrefixLength)" }

    /// The node's `cni0` address, the default gateway of its pods.
    public func podGateway(_ node: String) -> String { "10.77.\(nodeIndex(node) + 1).1" }

    func nodeIndex(_ node: String) -> Int { scenario.topology.nodes.firstIndex { $0.name == node } ?? 0 }

    /// The pod's own address, from its node's pod CIDR (the k-th pod of the node is .11+k).
    public func serviceIP(_ service: String) -> String {
        guard let spec = scenario.service(service) else { return "10.77.1.11" }
        let k = scenario.services.filter { $0.node == spec.node }.firstIndex { $0.name == service } ?? 0
        return "10.77.\(nodeIndex(spec.node) + 1).\(11 + k)"
    }

    /// The pod's network namespace.
    public func podNetns(_ service: String) -> String { "tlab-\(id)-pod-\(service)" }

    /// The pod's veth in its node's namespace (on `cni0`); interface names are at most 15 bytes.
    public func podVeth(_ service: String) -> String {
        "veth\(scenario.services.firstIndex { $0.name == service } ?? 0)"
    }

    /// The node agent's clock offset option, one word with `=`: as two
    /// words a negative offset ("-2500") would be read as an option.
    public static func clockOffsetArgument(ms: Int) -> String { "--lab-clock-offset-ms=\(ms)" }

    /// `name` as it is on the wire in a DNS query (length-prefixed labels and
    /// the root's 0), as iptables' `--hex-string` matches it.
    public static func dnsQueryMatch(_ name: String) -> String {
        let labels = name.split(separator: ".").map { l in String(format: "%02x", l.utf8.count) + l.utf8.map { String(format: "%02x", $0) }.joined() }
        return "|" + labels.joined() + "00|"
    }

    public func dnsName(_ service: String) -> String { service + "." + scenario.topology.effectiveDomain }

    /// `tapio-lab/<id>` below each cgroup mount.
    public var labCgroup: String { "tapio-lab/\(id)" }
    public func nodeCgroup(_ node: String) -> String { labCgroup + "/" + node }
    public func podCgroup(_ service: String) -> String {
        let pod = pod(service)
        return nodeCgroup(pod.node) + "/kubepods/pod" + pod.uid
    }
    public func containerCgroup(_ service: String) -> String { podCgroup(service) + "/" + pod(service).containerId }
    /// Server, agents, DNS and load client: outside every node's subtree.
    public var infraCgroup: String { labCgroup + "/infra" }

    /// The directory the node's agent watches (`--cgroup-root`).
    public func agentCgroupRoot(_ node: String) -> String { LabPlan.cgroup2Mount + "/" + nodeCgroup(node) }

    public func pod(_ service: String) -> PodIdentity {
        let spec = scenario.service(service)
        let seed = "\(scenario.name)/\(service)/\(scenario.effectiveSeed)"
        let hex = LabPlan.hexDigits(seed, count: 64 + 32 + 10)
        let u = Array(hex.dropFirst(64).prefix(32))
        let uid = "\(String(u[0..<8]))-\(String(u[8..<12]))-\(String(u[12..<16]))-\(String(u[16..<20]))-\(String(u[20..<32]))"
        // Replicas of one Deployment share its pod template (hash) and app name.
        let app = spec?.app ?? service
        let template = app == service ? String(hex.suffix(10))
            : String(LabPlan.hexDigits("\(scenario.name)/\(app)/\(scenario.effectiveSeed)", count: 64 + 32 + 10).suffix(10))
        let alphabet = Array("bcdfghjklmnpqrstvwxz2456789")
        var h = LabPlan.fnv(seed + "/pod")
        var suffix = ""
        for _ in 0..<5 { suffix.append(alphabet[Int(h % UInt64(alphabet.count))]); h /= UInt64(alphabet.count) }
        return PodIdentity(service: service, node: spec?.node ?? "", name: "\(app)-\(template)-\(suffix)", uid: uid,
                           containerId: String(hex.prefix(64)), templateHash: template, ip: serviceIP(service))
    }

    /// A ClusterIP service's virtual address, 10.96.0.(10+j); nil without `cluster_ip`.
    public func clusterIP(_ service: String) -> String? {
        guard scenario.service(service)?.clusterIp == true else { return nil }
        let j = scenario.services.firstIndex { $0.name == service } ?? 0
        return "10.96.0.\(10 + j)"
    }

    /// The pods behind a service (its own and its replicas'), those that start with the run.
    public func endpoints(_ service: String) -> [String] {
        scenario.services.filter { ($0.name == service || $0.replicaOf == service) && $0.startsWithRun }.map(\.name)
    }

    /// kube-proxy's iptables mode for every ClusterIP service, as `iptables -t nat`
    /// argument lists in order: `KUBE-SERVICES` from PREROUTING (pods' traffic
    /// through the node) and OUTPUT (the node's own), one `KUBE-SVC-…` chain
    /// per service that picks endpoint i of n with probability 1/(n−i)
    /// (`statistic --mode random`), one `KUBE-SEP-…` chain per endpoint that
    /// DNATs to the pod's address. Installed in every node's namespace; they
    /// go with it.
    public var serviceRules: [[String]] {
        var rules: [[String]] = []
        let services = scenario.services.filter { clusterIP($0.name) != nil }
        guard !services.isEmpty else { return [] }
        rules.append(["-N", "KUBE-SERVICES"])
        rules.append(["-A", "PREROUTING", "-j", "KUBE-SERVICES"])
        rules.append(["-A", "OUTPUT", "-j", "KUBE-SERVICES"])
        for svc in services {
            let vip = clusterIP(svc.name)!
            let port = String(svc.effectivePort!)
            let chain = "KUBE-SVC-" + LabPlan.chainHash("default/\(svc.name):tcp")
            rules.append(["-N", chain])
            rules.append(["-A", "KUBE-SERVICES", "-d", vip + "/32", "-p", "tcp", "--dport", port, "-j", chain])
            let eps = endpoints(svc.name)
            for (i, ep) in eps.enumerated() {
                let sep = "KUBE-SEP-" + LabPlan.chainHash("default/\(svc.name):tcp/\(ep)")
                rules.append(["-N", sep])
                rules.append(["-A", sep, "-p", "tcp", "-j", "DNAT", "--to-destination", "\(serviceIP(ep)):\(port)"])
                let n = eps.count - i
                rules.append(["-A", chain] + (n > 1 ? ["-m", "statistic", "--mode", "random", "--probability", String(format: "%.5f", 1.0 / Double(n))] : []) + ["-j", sep])
            }
        }
        return rules
    }

    /// 16 characters from A–Z and 2–7, as kube-proxy names its chains.
    static func chainHash(_ s: String) -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
        var h = fnv(s)
        var out = ""
        for i in 0..<16 {
            if i == 12 { h = fnv(s + "/2") }
            out.append(alphabet[Int(h & 31)])
            h >>= 5
        }
        return out
    }

    public var pods: [PodIdentity] { scenario.services.map { pod($0.name) } }

    /// The node's pods in the Kubernetes API's PodList JSON, as
    /// `kubectl get pods -o json` prints it (the agent's `--metadata-file`).
    public func podList(node: String, createdAt: String) -> JSONValue {
        let items: [JSONValue] = scenario.services.filter { $0.node == node }.map { s in
            let p = pod(s.name)
            let app = s.app
            let running = s.startsWithRun
            var status: [String: JSONValue] = [
                "phase": .string(running ? "Running" : "Pending"),
                "hostIP": .string(nodeIP(node)),
                "podIP": .string(p.ip),
                "podIPs": .array([.object(["ip": .string(p.ip)])]),
                "qosClass": .string(s.memoryLimitMb != nil || s.cpuLimitPct != nil ? "Burstable" : "BestEffort"),
                "startTime": .string(createdAt),
            ]
            var containerStatus: [String: JSONValue] = [
                "name": .string(app),
                "image": .string(LabPlan.image(s)),
                "ready": .bool(running),
                "restartCount": .int(0),
                "started": .bool(running),
            ]
            if running {
                containerStatus["containerID"] = .string("containerd://" + p.containerId)
                containerStatus["state"] = .object(["running": .object(["startedAt": .string(createdAt)])])
            } else {
                containerStatus["state"] = .object(["waiting": .object(["reason": .string("ContainerCreating")])])
            }
            status["containerStatuses"] = .array([.object(containerStatus)])
            var resources: [String: JSONValue] = [:]
            var limits: [String: JSONValue] = [:]
            if let m = s.memoryLimitMb { limits["memory"] = .string("\(m)Mi") }
            if let c = s.cpuLimitPct { limits["cpu"] = .string("\(Int(c * 10))m") }
            if !limits.isEmpty { resources["limits"] = .object(limits) }
            var container: [String: JSONValue] = ["name": .string(app), "image": .string(LabPlan.image(s)), "resources": .object(resources)]
            if let port = s.effectivePort {
                container["ports"] = .array([.object(["containerPort": .int(Int64(port)), "protocol": .string("TCP")])])
            }
            return .object([
                "apiVersion": .string("v1"),
                "kind": .string("Pod"),
                "metadata": .object([
                    "name": .string(p.name),
                    "generateName": .string("\(app)-\(p.templateHash)-"),
                    "namespace": .string("default"),
                    "uid": .string(p.uid),
                    "creationTimestamp": .string(createdAt),
                    "labels": .object(["app": .string(app), "pod-template-hash": .string(p.templateHash)]),
                    "ownerReferences": .array([.object([
                        "apiVersion": .string("apps/v1"), "kind": .string("ReplicaSet"), "name": .string("\(app)-\(p.templateHash)"),
                        "controller": .bool(true), "blockOwnerDeletion": .bool(true),
                    ])]),
                ]),
                "spec": .object([
                    "nodeName": .string(node),
                    "containers": .array([.object(container)]),
                    "restartPolicy": .string(s.restarts ? "Always" : "Never"),
                ]),
                "status": .object(status),
            ])
        }
        return .object([
            "apiVersion": .string("v1"),
            "kind": .string("List"),
            "items": .array(items),
            "metadata": .object(["resourceVersion": .string("")]),
        ])
    }

    static func image(_ s: ServiceSpec) -> String {
        switch s.type {
        case .nginx: return "debian/nginx-light:bookworm"
        case .api: return "tapio-lab/api:py3.11"
        case .redis: return "debian/redis-server:7.0"
        case .command: return "tapio-lab/\(s.name):latest"
        }
    }

    /// The dnsmasq hosts file: one A record per service (not per replica),
    /// its virtual IP for a ClusterIP service, else its pod's address.
    public var hostsFile: String {
        scenario.services.filter { $0.replicaOf == nil }.map { "\(clusterIP($0.name) ?? serviceIP($0.name)) \(dnsName($0.name))\n" }.joined()
    }

    static func fnv(_ s: String) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }

    /// `count` lowercase hex digits, a deterministic function of `seed`.
    static func hexDigits(_ seed: String, count: Int) -> String {
        var state = fnv(seed)
        var out = ""
        while out.count < count {
            state = state &+ 0x9e37_79b9_7f4a_7c15
            var z = state
            z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
            z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
            z ^= z >> 31
            let h = String(z, radix: 16)
            out += String(repeating: "0", count: 16 - h.count) + h
        }
        return String(out.prefix(count))
    }
}
