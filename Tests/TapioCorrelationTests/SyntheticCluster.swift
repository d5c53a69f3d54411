import TapioCorrelation
import TapioWire

/// A small cluster written as data, and a builder of the event streams its
/// agents would send: healthy traffic, then a fault. Times are seconds from
/// `base`; every event carries a 1 ms clock uncertainty unless told.
struct SyntheticCluster {
    static let base: Int64 = 1_800_000_000 * 1_000_000_000
    static func ns(_ seconds: Double) -> Int64 { base + Int64((seconds * 1e9).rounded()) }

    struct Pod {
        var name: String
        var service: String
        var node: String
        var ip: String
        var port: UInt16
        var pid: UInt32
        var comm: String
    }

    let pods: [Pod] = [
        Pod(name: "frontend-1", service: "frontend", node: "node1", ip: "10.0.1.10", port: 80, pid: 101, comm: "nginx"),
        Pod(name: "cart-1", service: "cart", node: "node1", ip: "10.0.1.20", port: 9000, pid: 102, comm: "cart"),
        Pod(name: "worker-1", service: "worker", node: "node1", ip: "10.0.1.30", port: 0, pid: 103, comm: "worker"),
        Pod(name: "api-1", service: "api", node: "node2", ip: "10.0.2.10", port: 8080, pid: 201, comm: "python3"),
        Pod(name: "batch-1", service: "batch", node: "node2", ip: "10.0.2.30", port: 0, pid: 202, comm: "cpu_hog"),
        Pod(name: "redis-0", service: "redis", node: "node3", ip: "10.0.3.10", port: 6379, pid: 301, comm: "redis-server"),
        Pod(name: "db-0", service: "db", node: "node3", ip: "10.0.3.20", port: 5432, pid: 302, comm: "postgres"),
    ]

    var events: [ObservedEvent] = []
    var errorNs: Int64 = 1_000_000

    func pod(_ name: String) -> Pod { pods.first { $0.name == name || $0.service == name }! }

    var inventory: [String: [PodInfo]] {
        var out: [String: [PodInfo]] = [:]
        for p in pods {
            out[p.node, default: []].append(PodInfo(uid: "uid-\(p.name)", name: p.name, namespace: "shop", node: p.node, ips: [p.ip], service: p.service,
                                                    ownerKind: "ReplicaSet", ownerName: p.service, containerIds: ["containerd://c-\(p.name)"]))
        }
        return out
    }

    mutating func add(_ at: Double, _ podName: String, _ kind: EventKind, _ detail: TapioEvent.Detail, pid: UInt32? = nil, attributed: Bool = true, comm: String? = nil) {
        let p = pod(podName)
        let ev = TapioEvent(kind: kind, timeNs: SyntheticCluster.ns(at), pid: pid ?? p.pid, comm: comm ?? p.comm,
                            containerId: attributed ? "containerd://c-\(p.name)" : "", pod: attributed ? p.name : "",
                            namespace: attributed ? "shop" : "", detail: detail)
        events.append(ObservedEvent(node: p.node, timeNs: SyntheticCluster.ns(at), errorNs: errorNs, event: ev))
    }

    func flow(_ from: String, _ to: String, serverSide: Bool = false, clientPort: UInt16 = 40000) -> Flow {
        let a = pod(from), b = pod(to)
        return serverSide
            ? Flow(source: IPAddress(b.ip), destination: IPAddress(a.ip), sourcePort: b.port, destinationPort: clientPort)
            : Flow(source: IPAddress(a.ip), destination: IPAddress(b.ip), sourcePort: clientPort, destinationPort: b.port)
    }

    mutating func connect(_ at: Double, _ from: String, _ to: String, _ outcome: ConnectOutcome, count: UInt32 = 1) {
        add(at, from, .tcpConnect, .tcpConnect(flow: flow(from, to), outcome: outcome, latencyNs: outcome == .established ? 300_000 : 0,
                                               error: outcome == .refused ? 111 : (outcome == .timeout ? 110 : 0), count: count))
    }

    mutating func connect(_ at: Double, _ from: String, ip: String, port: UInt16, _ outcome: ConnectOutcome, count: UInt32 = 1) {
        let a = pod(from)
        let f = Flow(source: IPAddress(a.ip), destination: IPAddress(ip), sourcePort: 40000, destinationPort: port)
        add(at, from, .tcpConnect, .tcpConnect(flow: f, outcome: outcome, latencyNs: 0, error: 111, count: count))
    }

    /// `from`'s view of its requests to `to`: response time and smoothed RTT.
    mutating func latency(_ at: Double, _ from: String, _ to: String, ms: Double, srttUs: UInt32 = 200) {
        let f = Flow(source: IPAddress(pod(from).ip), destination: IPAddress(pod(to).ip), sourcePort: 0, destinationPort: pod(to).port)
        let total = UInt64(ms * 1e6) * 10
        add(at, from, .tcpLatency, .tcpLatency(flow: f, srttUs: srttUs, responses: 10, responseNsTotal: total, responseNsMax: total / 5, intervalNs: 500_000_000))
    }

    /// The server's view of the same: its own request → response time.
    mutating func served(_ at: Double, _ server: String, _ client: String, ms: Double, srttUs: UInt32 = 200) {
        let f = Flow(source: IPAddress(pod(server).ip), destination: IPAddress(pod(client).ip), sourcePort: pod(server).port, destinationPort: 0)
        let total = UInt64(ms * 1e6) * 10
        add(at, server, .tcpLatency, .tcpLatency(flow: f, srttUs: srttUs, responses: 10, responseNsTotal: total, responseNsMax: total / 5, intervalNs: 500_000_000))
    }

    mutating func oom(_ at: Double, _ victim: String) {
        add(at, victim, .oomKill, .oomKill(victimPid: pod(victim).pid, victimComm: pod(victim).comm, victimUid: 999, totalVmKb: 600_000, anonRssKb: 512_000, fileRssKb: 1000))
    }

    mutating func exit(_ at: Double, _ who: String, code: Int32 = 0, signal: Int32 = 0, pid: UInt32? = nil, comm: String? = nil) {
        add(at, who, .processExit, .exit(exitCode: code, signal: signal, coreDumped: false), pid: pid, comm: comm)
    }

    mutating func exec(_ at: Double, _ who: String, pid: UInt32? = nil, comm: String? = nil, file: String = "/usr/bin/true") {
        add(at, who, .processExec, .exec(filename: file), pid: pid, comm: comm)
    }

    mutating func listen(_ at: Double, _ who: String, open: Bool) {
        add(at, who, .tcpListen, .tcpListen(address: IPAddress("0.0.0.0"), port: pod(who).port, open: open))
    }

    mutating func dns(_ at: Double, _ who: String, name: String, rcode: Int32, answer: String? = nil, latencyNs: UInt64 = 400_000) {
        add(at, who, .dns, .dns(name: name, qtype: 1, rcode: rcode, latencyNs: latencyNs, server: IPAddress("10.0.0.2"), serverPort: 53, id: 7,
                                answers: answer.map { [IPAddress($0)!] } ?? []))
    }

    mutating func throttle(_ at: Double, _ who: String, ratio: Double) {
        add(at, who, .cpuThrottle, .cpuThrottle(periods: 100, throttledPeriods: UInt64(ratio * 100), throttledNs: UInt64(ratio * 5e8), intervalNs: 500_000_000, cgroup: "/kubepods/\(who)"))
    }

    /// Steady healthy load from `from` to `until` (s): frontend → api → redis
    /// and api → db connections, latencies and redis name lookups every 0.5 s.
    mutating func healthy(from: Double = 0, until: Double, skip: Set<String> = []) {
        var t = from
        while t < until {
            if !skip.contains("frontend>api") {
                connect(t, "frontend", "api", .established, count: 4)
                latency(t + 0.01, "frontend", "api", ms: 5)
            }
            if !skip.contains("api>redis") {
                connect(t + 0.02, "api", "redis", .established, count: 4)
                latency(t + 0.03, "api", "redis", ms: 1)
            }
            if !skip.contains("dns") { dns(t + 0.015, "api", name: "redis.shop.svc", rcode: 0, answer: "10.0.3.10") }
            if !skip.contains("api>db") { connect(t + 0.04, "api", "db", .established, count: 2) }
            if !skip.contains("frontend>cart") { connect(t + 0.05, "frontend", "cart", .established, count: 2) }
            t += 0.5
        }
    }

    func engine(configuration: CorrelationConfiguration = CorrelationConfiguration()) -> CorrelationEngine {
        CorrelationEngine.replay(events, inventory: inventory, configuration: configuration)
    }
}

/// A small deterministic generator (SplitMix64) for shuffles and jitter.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
