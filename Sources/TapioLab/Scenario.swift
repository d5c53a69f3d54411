import Foundation
import TapioWire

/// One lab scenario: the cluster to build, its load, the faults to inject and
/// the root causes a correct answer names. Read from a JSON file (docs/lab.md);
/// a new scenario is a new file, never new code.
public struct Scenario: Codable, Sendable, Equatable {
    public var name: String
    public var description: String?
    /// Seeds the load's arrival times and the generated pod names and ids.
    public var seed: UInt64?
    public var topology: Topology
    public var services: [ServiceSpec]
    public var load: LoadSpec
    public var timing: Timing
    public var faults: [FaultSpec]
    /// The right answer: empty for a healthy run (no incident is the right answer).
    public var expected: [Cause]

    public var effectiveSeed: UInt64 { seed ?? 1 }
    public var isHealthy: Bool { expected.isEmpty }

    public func service(_ name: String) -> ServiceSpec? { services.first { $0.name == name } }
    public func node(_ name: String) -> NodeSpec? { topology.nodes.first { $0.name == name } }
}

public struct Topology: Codable, Sendable, Equatable {
    public var nodes: [NodeSpec]
    /// The DNS zone services are named in (`<service>.<domain>`).
    public var domain: String?

    public var effectiveDomain: String { domain ?? "tapio.lab" }
}

public struct NodeSpec: Codable, Sendable, Equatable {
    public var name: String
    /// The node's CPU capacity as a cfs quota, in percent of one CPU (nil: unlimited).
    /// Pods on the node compete for it: how a noisy neighbour hurts.
    public var cpuLimitPct: Double?
    /// The node's memory capacity (v1 memory limit over all its pods), MiB.
    public var memoryLimitMb: Int?
    /// Added to this node's agent clock (the agent's hidden `--lab-clock-offset-ms`).
    public var clockOffsetMs: Int?
}

/// A workload: one pod with one container, on one node.
public struct ServiceSpec: Codable, Sendable, Equatable {
    public enum Kind: String, Codable, Sendable {
        /// nginx as a reverse proxy to `upstream` (resolved through the lab DNS).
        case nginx
        /// lab/services/api.py: resolves `upstream` (a redis service) per request.
        case api
        /// Debian's redis-server.
        case redis
        /// Any program: `argv`, with {lab}, {ip}, {port}, {volume}, {dns}, {run} replaced.
        case command
    }

    public var name: String
    public var type: Kind
    public var node: String
    public var port: Int?
    public var upstream: String?
    public var argv: [String]?
    public var memoryLimitMb: Int?
    public var cpuLimitPct: Double?
    /// A tmpfs of this many MiB mounted for the service ({volume}); redis keeps its AOF there.
    public var volumeMb: Int?
    /// `always` (default) or `on_fault`: started by a `start` fault.
    public var start: String?
    /// `always` (default, kubelet-like backoff) or `never`.
    public var restart: String?
    /// api: CPU work per request, ms.
    public var workMs: Double?
    /// redis: size of the `blob` value the api reads per request, bytes.
    public var blobBytes: Int?
    /// api: bytes of the blob echoed to the caller (so a slow link is felt end to end).
    public var echoBytes: Int?
    /// Another pod of `replicaOf`'s Deployment: the same app label, template
    /// hash and ReplicaSet (so the same service to Tapio), its own pod, node
    /// and address; the fields it does not set are `replicaOf`'s. It gets no
    /// DNS record of its own: clients reach it through the service's name.
    public var replicaOf: String?
    /// The service gets a virtual IP (a ClusterIP Service): its DNS name
    /// answers the VIP, and every node namespace DNATs connections to it to
    /// one of the service's pods at random (kube-proxy's iptables mode).
    public var clusterIp: Bool?

    /// The Deployment (app label) the pod belongs to.
    public var app: String { replicaOf ?? name }
    public var startsWithRun: Bool { (start ?? "always") != "on_fault" }
    public var restarts: Bool { (restart ?? "always") != "never" }
    public var effectivePort: Int? {
        if let port { return port }
        switch type {
        case .nginx: return 80
        case .api: return 8080
        case .redis: return 6379
        case .command: return nil
        }
    }
}

public struct LoadSpec: Codable, Sendable, Equatable {
    /// The service requests are sent to (the entry of the request path).
    public var target: String
    public var ratePerS: Double
    public var timeoutS: Double?
    public var path: String?
}

public struct Timing: Codable, Sendable, Equatable {
    /// Seconds of steady load before the first fault (the engine's baseline).
    public var warmupS: Double
    /// Seconds watched after the first fault.
    public var observeS: Double
}

public struct FaultSpec: Codable, Sendable, Equatable {
    /// memory_fill, stop, kill, crash_loop, firewall_drop, packet_loss,
    /// bandwidth, dns, cpu_quota, start, disk_fill, scale, dns_restart (docs/lab.md).
    public var type: String
    /// A service name (a DNS name for `dns`).
    public var target: String
    /// Seconds after the warmup.
    public var atS: Double
    /// Seconds until the fault is reverted; nil: until the end of the run.
    public var durationS: Double?
    public var params: [String: JSONValue]?
    /// Documentation only: a fault that is not on the request path and that
    /// the expected answer leaves out on purpose.
    public var redHerring: Bool?

    public func double(_ key: String) -> Double? {
        switch params?[key] {
        case .int(let i): return Double(i)
        case .double(let d): return d
        case .string(let s): return Double(s)
        default: return nil
        }
    }

    public func string(_ key: String) -> String? {
        switch params?[key] {
        case .string(let s): return s
        case .int(let i): return String(i)
        default: return nil
        }
    }

    public static let types: Set<String> = [
        "memory_fill", "stop", "kill", "crash_loop", "firewall_drop", "packet_loss",
        "bandwidth", "dns", "cpu_quota", "start", "disk_fill", "scale", "dns_restart",
    ]
}

/// A root cause as the contract names it (docs/correlation-contract.md).
public struct Cause: Codable, Sendable, Hashable {
    public var entity: String
    public var kind: String

    public init(entity: String, kind: String) {
        self.entity = entity
        self.kind = kind
    }

    public static let kinds: Set<String> = [
        "oom_kill", "crash", "crash_loop", "listener_closed", "firewall_drop", "packet_loss",
        "dns_failure", "cpu_throttle", "memory_pressure", "disk_full", "noisy_neighbour", "network_latency",
    ]
}

public struct ScenarioError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension Scenario {
    /// Reads a scenario file. A file may name a base with `"extends": "<name>"`
    /// (lab/topologies/<name>.json): the base's keys are taken unless the
    /// scenario sets them; lists of objects with a `name` (services, nodes)
    /// merge by name, field by field, and new names are appended.
    public static func load(path: String, labDirectory: String) throws -> Scenario {
        guard let data = FileManager.default.contents(atPath: path) else { throw ScenarioError("cannot read \(path)") }
        var doc: JSONValue
        do { doc = try JSONValue.parse(Array(data)) } catch { throw ScenarioError("\(path): not JSON: \(error)") }
        if let base = doc["extends"]?.stringValue {
            let basePath = labDirectory + "/topologies/" + base + ".json"
            guard let baseData = FileManager.default.contents(atPath: basePath) else {
                throw ScenarioError("\(path): extends \(base), but \(basePath) is missing")
            }
            doc = merge(try JSONValue.parse(Array(baseData)), doc)
        }
        if case .object(var o) = doc {
            o["extends"] = nil
            // A replica takes every field it does not set from the pod it replicates.
            if case .array(let list)? = o["services"] {
                var services: [JSONValue] = []
                for item in list {
                    guard let of = item["replica_of"]?.stringValue else { services.append(item); continue }
                    guard let original = list.first(where: { $0["name"]?.stringValue == of && $0["replica_of"] == nil }),
                          case .object(var base) = original else {
                        throw ScenarioError("\(path): service \(item["name"]?.stringValue ?? "?") is a replica of \(of), which is not a service of its own")
                    }
                    for key in ["name", "start", "cluster_ip", "replica_of"] { base[key] = nil }
                    services.append(merge(.object(base), item))
                }
                o["services"] = .array(services)
            }
            if o["name"] == nil { o["name"] = .string(URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent) }
            doc = .object(o)
        }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        let scenario: Scenario
        do {
            scenario = try decoder.decode(Scenario.self, from: Data(doc.serialized().utf8))
        } catch let DecodingError.keyNotFound(key, ctx) {
            throw ScenarioError("\(path): missing \(pathText(ctx.codingPath + [key]))")
        } catch let DecodingError.typeMismatch(_, ctx) {
            throw ScenarioError("\(path): wrong type at \(pathText(ctx.codingPath)): \(ctx.debugDescription)")
        } catch let DecodingError.dataCorrupted(ctx) {
            throw ScenarioError("\(path): bad value at \(pathText(ctx.codingPath)): \(ctx.debugDescription)")
        }
        try scenario.validate()
        return scenario
    }

    private static func pathText(_ path: [CodingKey]) -> String {
        path.map { $0.intValue.map { "[\($0)]" } ?? "." + $0.stringValue }.joined()
    }

    /// `overlay` over `base`: objects merge key by key, arrays of named objects merge by name.
    static func merge(_ base: JSONValue, _ overlay: JSONValue) -> JSONValue {
        switch (base, overlay) {
        case (.object(var b), .object(let o)):
            for (k, v) in o { b[k] = b[k].map { merge($0, v) } ?? v }
            return .object(b)
        case (.array(let b), .array(let o))
            where o.allSatisfy({ $0["name"]?.stringValue != nil }) && b.allSatisfy({ $0["name"]?.stringValue != nil }):
            var out = b
            for item in o {
                if let i = out.firstIndex(where: { $0["name"] == item["name"] }) { out[i] = merge(out[i], item) } else { out.append(item) }
            }
            return .array(out)
        default:
            return overlay
        }
    }

    /// Checks the references a run depends on, so a typo fails before anything is built.
    public func validate() throws {
        func fail(_ s: String) -> ScenarioError { ScenarioError("scenario \(name): \(s)") }
        guard !topology.nodes.isEmpty else { throw fail("no nodes") }
        guard Set(topology.nodes.map(\.name)).count == topology.nodes.count else { throw fail("two nodes share a name") }
        guard Set(services.map(\.name)).count == services.count else { throw fail("two services share a name") }
        let nameOK: (String) -> Bool = { n in !n.isEmpty && n.count <= 40 && n.allSatisfy { $0.isLetter || $0.isNumber || $0 == "-" } && n.first!.isLetter }
        for n in topology.nodes where !nameOK(n.name) { throw fail("node name \(n.name): letters, digits and '-' only") }
        for s in services {
            guard nameOK(s.name), s.name == s.name.lowercased() else { throw fail("service name \(s.name): lowercase letters, digits and '-' only") }
            guard node(s.node) != nil else { throw fail("service \(s.name) is on unknown node \(s.node)") }
            switch s.type {
            case .nginx, .api:
                guard let u = s.upstream, service(u) != nil else { throw fail("service \(s.name) needs an upstream service") }
            case .command:
                guard !(s.argv ?? []).isEmpty else { throw fail("command service \(s.name) needs argv") }
            case .redis: break
            }
            if let of = s.replicaOf {
                guard let original = service(of), original.replicaOf == nil, of != s.name else {
                    throw fail("service \(s.name) is a replica of \(of), which is not a service of its own")
                }
            }
            if s.clusterIp == true, s.replicaOf != nil || s.effectivePort == nil {
                throw fail("cluster_ip is set on the service itself (not a replica), which needs a port")
            }
        }
        guard let target = service(load.target), target.effectivePort != nil else { throw fail("load target \(load.target) is not a service with a port") }
        guard load.ratePerS > 0, load.ratePerS <= 500 else { throw fail("load rate must be in (0, 500] per second") }
        guard timing.warmupS >= 0, timing.observeS > 0 else { throw fail("timing: warmup ≥ 0 and observe > 0 seconds") }
        for f in faults {
            guard FaultSpec.types.contains(f.type) else { throw fail("unknown fault type \(f.type); one of \(FaultSpec.types.sorted().joined(separator: ", "))") }
            if f.type != "dns", f.type != "dns_restart", service(f.target) == nil { throw fail("fault \(f.type) targets unknown service \(f.target)") }
            if f.type == "disk_fill", service(f.target)?.volumeMb == nil { throw fail("disk_fill needs a service with volume_mb") }
            if f.type == "start" || f.type == "scale", service(f.target)?.startsWithRun != false { throw fail("\(f.type) needs a service with start: on_fault") }
            if f.type == "scale", f.string("joins").flatMap(service) == nil { throw fail("scale needs params.joins naming the service the replica joins") }
            if f.type == "scale", f.string("joins").flatMap(service)?.clusterIp == true {
                // A scale joins the name's DNS records; a ClusterIP's endpoints are its iptables rules, built once.
                throw fail("scale cannot join \(f.string("joins")!), a cluster_ip service (its endpoints are fixed when the nodes are built)")
            }
            guard f.atS >= 0, f.atS < timing.observeS else { throw fail("fault \(f.type) at \(f.atS) s is outside the observed \(timing.observeS) s") }
        }
        for c in expected where !Cause.kinds.contains(c.kind) {
            throw fail("expected kind \(c.kind) is not a root-cause kind of docs/correlation-contract.md")
        }
    }

    /// The services a request to the load target passes through, in order
    /// (nginx → api → redis), and the DNS names resolved on the way.
    public var requestPath: (services: [String], dnsNames: [String]) {
        var path: [String] = []
        var names: [String] = []
        var next: String? = load.target
        while let n = next, !path.contains(n), let s = service(n) {
            path.append(n)
            next = s.upstream
            if let u = s.upstream { names.append(u + "." + topology.effectiveDomain) }
        }
        return (path, names)
    }

    /// What the rule baseline looks at: every service on a node the request
    /// path crosses. A rule knows where the failing requests run, not which
    /// of the workloads there serve them (that graph is what the engine learns).
    public var baselineScope: Set<String> {
        let nodes = Set(requestPath.services.compactMap { service($0)?.node })
        return Set(services.filter { nodes.contains($0.node) }.map(\.name))
    }
}

/// Where the lab's files live: scenarios, topologies, service scripts.
public enum LabFiles {
    /// The `lab/` directory: `$TAPIO_LAB_DIR`, `./lab`, or the first `lab/`
    /// with `scenarios/` found walking up from the executable, else the source tree's.
    public static func labDirectory(executable: String = CommandLine.arguments[0]) -> String {
        let fm = FileManager.default
        if let env = ProcessInfo.processInfo.environment["TAPIO_LAB_DIR"], !env.isEmpty { return env }
        let cwd = fm.currentDirectoryPath + "/lab"
        if fm.fileExists(atPath: cwd + "/scenarios") { return cwd }
        var url = URL(fileURLWithPath: executable).resolvingSymlinksInPath().deletingLastPathComponent()
        while url.path != "/" {
            if fm.fileExists(atPath: url.path + "/lab/scenarios") { return url.path + "/lab" }
            url.deleteLastPathComponent()
        }
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return source.path + "/lab"
    }

    /// The built-in scenarios: lab/scenarios/*.json, by name.
    public static func scenarioNames(labDirectory: String) -> [String] {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: labDirectory + "/scenarios")) ?? []
        return files.filter { $0.hasSuffix(".json") }.map { String($0.dropLast(5)) }.sorted()
    }

    /// A built-in name or a path to a file.
    public static func resolve(_ nameOrPath: String, labDirectory: String) throws -> Scenario {
        let fm = FileManager.default
        if nameOrPath.contains("/") || nameOrPath.hasSuffix(".json") {
            guard fm.fileExists(atPath: nameOrPath) else { throw ScenarioError("no scenario file \(nameOrPath)") }
            return try Scenario.load(path: nameOrPath, labDirectory: labDirectory)
        }
        let path = labDirectory + "/scenarios/" + nameOrPath + ".json"
        guard fm.fileExists(atPath: path) else {
            throw ScenarioError("no scenario \(nameOrPath); built-in: \(scenarioNames(labDirectory: labDirectory).joined(separator: ", "))")
        }
        return try Scenario.load(path: path, labDirectory: labDirectory)
    }
}
