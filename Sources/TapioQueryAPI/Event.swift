import TapioWire

/// One event of the `events` answer (docs/events.md): the fields every event
/// has, the kind's own fields (absent on other kinds), and the pods the
/// server found behind its peer addresses. On the wire it is one flat object
/// with snake_case keys; fields a newer server adds that this version does
/// not know are kept in `extra` (so `-o json` passes them on) and are empty
/// against a server of the same version.
public struct QueryEvent: Sendable, Equatable, Codable {
    /// The pod behind a peer address, from every node's inventory.
    public struct Peer: Sendable, Equatable {
        public var pod: String
        public var namespace: String
        public var service: String?
        public var node: String
        public init(pod: String, namespace: String, service: String?, node: String) {
            self.pod = pod
            self.namespace = namespace
            self.service = service
            self.node = node
        }
    }

    public var kind: String
    /// RFC 3339, corrected to the server's clock.
    public var time: String
    public var timeNs: Int64
    /// The true time is within `time ± timeErrorNs` (−1: no clock sample yet).
    public var timeErrorNs: Int64
    /// The agent's own clock, before correction.
    public var agentTime: String
    public var node: String
    public var pid: Int64?
    public var ppid: Int64?
    public var uid: Int64?
    public var comm: String?
    public var cgroupId: Int64?
    public var netns: Int64?
    public var containerId: String?
    public var pod: String?
    public var namespace: String?

    // process_exec
    public var filename: String?
    // process_exit
    public var exitCode: Int64?
    public var signal: Int64?
    public var coreDumped: Bool?
    // oom_kill
    public var victimPid: Int64?
    public var victimComm: String?
    public var victimUid: Int64?
    public var totalVmKb: Int64?
    public var anonRssKb: Int64?
    public var fileRssKb: Int64?
    // the flow of network events, seen from the socket that reported it
    public var srcIp: String?
    public var srcPort: Int64?
    public var dstIp: String?
    public var dstPort: Int64?
    // tcp_connect, dns
    public var outcome: String?
    public var latencyNs: Int64?
    /// Aggregated kinds: how many occurrences this event stands for.
    public var count: Int64?
    /// The error's name (`ECONNREFUSED`, `ENOSPC`).
    public var errno: String?
    // tcp_listen
    public var ip: String?
    public var port: Int64?
    public var state: String?
    // tcp_reset
    public var direction: String?
    public var tcpState: Int64?
    /// Aggregated kinds: the interval the event covers, ns.
    public var intervalNs: Int64?
    // tcp_latency
    public var srttUs: Int64?
    public var responses: Int64?
    public var responseNsAvg: Int64?
    public var responseNsMax: Int64?
    // packet_drop
    public var reason: String?
    public var ipProtocol: String?
    public var ifindex: Int64?
    // dns
    public var name: String?
    public var qtype: String?
    public var rcode: String?
    public var dnsId: Int64?
    public var answers: [String]?
    public var server: String?
    public var serverPort: Int64?
    // cpu_throttle, memory_pressure
    public var periods: Int64?
    public var throttledPeriods: Int64?
    public var throttledNs: Int64?
    public var cgroup: String?
    public var source: String?
    public var usageBytes: Int64?
    public var limitBytes: Int64?
    public var psiSomeAvg10: Double?
    /// cpu_throttle: CPU time the cgroup used in the interval, ns, and its
    /// pressure stall; on the watched subtree's root, the node's CPUs,
    /// runnable tasks and pressure.
    public var usageNs: Int64?
    public var psiSomeStallNs: Int64?
    public var nodeCpus: Int64?
    public var nodeRunnable: Int64?
    public var nodePsiSomeAvg10: Double?
    // io_error
    public var errorCode: Int64?
    public var syscall: String?

    /// The pods behind `dstIp`, `srcIp` and a DNS `server`.
    public var dstPeer: Peer?
    public var srcPeer: Peer?
    public var serverPeer: Peer?

    /// Fields this version does not know (a newer server's).
    public var extra: [String: JSONValue] = [:]

    public init(kind: String, time: String, timeNs: Int64, timeErrorNs: Int64, agentTime: String, node: String) {
        self.kind = kind
        self.time = time
        self.timeNs = timeNs
        self.timeErrorNs = timeErrorNs
        self.agentTime = agentTime
        self.node = node
    }

    /// The kind as the wire enum, nil for a kind this version does not know.
    public var eventKind: EventKind? { EventKind(name: kind) }

    /// From the flat JSON object (what the server builds from a stored event).
    public init(fields: [String: JSONValue]) throws {
        var f = FieldReader(fields)
        self.init(kind: try f.required("kind"), time: try f.required("time"), timeNs: try f.required("time_ns"),
                  timeErrorNs: try f.required("time_error_ns"), agentTime: try f.required("agent_time"), node: try f.required("node"))
        pid = try f.int("pid"); ppid = try f.int("ppid"); uid = try f.int("uid"); comm = try f.string("comm")
        cgroupId = try f.int("cgroup_id"); netns = try f.int("netns"); containerId = try f.string("container_id")
        pod = try f.string("pod"); namespace = try f.string("namespace")
        filename = try f.string("filename")
        exitCode = try f.int("exit_code"); signal = try f.int("signal"); coreDumped = try f.bool("core_dumped")
        victimPid = try f.int("victim_pid"); victimComm = try f.string("victim_comm"); victimUid = try f.int("victim_uid")
        totalVmKb = try f.int("total_vm_kb"); anonRssKb = try f.int("anon_rss_kb"); fileRssKb = try f.int("file_rss_kb")
        srcIp = try f.string("src_ip"); srcPort = try f.int("src_port"); dstIp = try f.string("dst_ip"); dstPort = try f.int("dst_port")
        outcome = try f.string("outcome"); latencyNs = try f.int("latency_ns"); count = try f.int("count"); errno = try f.string("errno")
        ip = try f.string("ip"); port = try f.int("port"); state = try f.string("state")
        direction = try f.string("direction"); tcpState = try f.int("tcp_state"); intervalNs = try f.int("interval_ns")
        srttUs = try f.int("srtt_us"); responses = try f.int("responses")
        responseNsAvg = try f.int("response_ns_avg"); responseNsMax = try f.int("response_ns_max")
        reason = try f.string("reason"); ipProtocol = try f.string("protocol"); ifindex = try f.int("ifindex")
        name = try f.string("name"); qtype = try f.string("qtype"); rcode = try f.string("rcode"); dnsId = try f.int("id")
        answers = try f.strings("answers"); server = try f.string("server"); serverPort = try f.int("server_port")
        periods = try f.int("periods"); throttledPeriods = try f.int("throttled_periods"); throttledNs = try f.int("throttled_ns")
        cgroup = try f.string("cgroup"); source = try f.string("source")
        usageBytes = try f.int("usage_bytes"); limitBytes = try f.int("limit_bytes"); psiSomeAvg10 = try f.double("psi_some_avg10")
        usageNs = try f.int("usage_ns"); psiSomeStallNs = try f.int("psi_some_stall_ns"); nodeCpus = try f.int("node_cpus")
        nodeRunnable = try f.int("node_runnable"); nodePsiSomeAvg10 = try f.double("node_psi_some_avg10")
        errorCode = try f.int("error_code"); syscall = try f.string("syscall")
        dstPeer = try f.peer("dst"); srcPeer = try f.peer("src"); serverPeer = try f.peer("server")
        extra = f.rest
    }

    /// The flat JSON object, as `init(fields:)` reads it.
    public var fields: [String: JSONValue] {
        var o = extra
        func put(_ key: String, _ v: String?) { if let v { o[key] = .string(v) } }
        func put(_ key: String, _ v: Int64?) { if let v { o[key] = .int(v) } }
        put("kind", kind); put("time", time); put("time_ns", timeNs); put("time_error_ns", timeErrorNs)
        put("agent_time", agentTime); put("node", node)
        put("pid", pid); put("ppid", ppid); put("uid", uid); put("comm", comm); put("cgroup_id", cgroupId); put("netns", netns)
        put("container_id", containerId); put("pod", pod); put("namespace", namespace)
        put("filename", filename)
        put("exit_code", exitCode); put("signal", signal); if let coreDumped { o["core_dumped"] = .bool(coreDumped) }
        put("victim_pid", victimPid); put("victim_comm", victimComm); put("victim_uid", victimUid)
        put("total_vm_kb", totalVmKb); put("anon_rss_kb", anonRssKb); put("file_rss_kb", fileRssKb)
        put("src_ip", srcIp); put("src_port", srcPort); put("dst_ip", dstIp); put("dst_port", dstPort)
        put("outcome", outcome); put("latency_ns", latencyNs); put("count", count); put("errno", errno)
        put("ip", ip); put("port", port); put("state", state)
        put("direction", direction); put("tcp_state", tcpState); put("interval_ns", intervalNs)
        put("srtt_us", srttUs); put("responses", responses); put("response_ns_avg", responseNsAvg); put("response_ns_max", responseNsMax)
        put("reason", reason); put("protocol", ipProtocol); put("ifindex", ifindex)
        put("name", name); put("qtype", qtype); put("rcode", rcode); put("id", dnsId)
        if let answers { o["answers"] = .array(answers.map { .string($0) }) }
        put("server", server); put("server_port", serverPort)
        put("periods", periods); put("throttled_periods", throttledPeriods); put("throttled_ns", throttledNs)
        put("cgroup", cgroup); put("source", source); put("usage_bytes", usageBytes); put("limit_bytes", limitBytes)
        if let psiSomeAvg10 { o["psi_some_avg10"] = .double(psiSomeAvg10) }
        put("usage_ns", usageNs); put("psi_some_stall_ns", psiSomeStallNs); put("node_cpus", nodeCpus); put("node_runnable", nodeRunnable)
        if let nodePsiSomeAvg10 { o["node_psi_some_avg10"] = .double(nodePsiSomeAvg10) }
        put("error_code", errorCode); put("syscall", syscall)
        for (prefix, peer) in [("dst", dstPeer), ("src", srcPeer), ("server", serverPeer)] {
            guard let peer else { continue }
            put(prefix + "_pod", peer.pod); put(prefix + "_namespace", peer.namespace)
            put(prefix + "_service", peer.service); put(prefix + "_node", peer.node)
        }
        return o
    }

    public init(from decoder: Decoder) throws {
        let value = try decoder.singleValueContainer().decode(JSONValue.self)
        guard case .object(let o) = value else {
            throw DecodingError.typeMismatch([String: JSONValue].self, .init(codingPath: decoder.codingPath, debugDescription: "an event is a JSON object"))
        }
        do {
            try self.init(fields: o)
        } catch let error as FieldReader.Failure {
            throw DecodingError.dataCorrupted(.init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(JSONValue.object(fields))
    }
}

/// Takes typed fields out of a JSON object; what is left over is `rest`.
struct FieldReader {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    private(set) var rest: [String: JSONValue]

    init(_ fields: [String: JSONValue]) { rest = fields }

    private mutating func take(_ key: String) -> JSONValue? {
        guard let v = rest.removeValue(forKey: key), v != .null else { return nil }
        return v
    }

    mutating func string(_ key: String) throws -> String? {
        guard let v = take(key) else { return nil }
        guard case .string(let s) = v else { throw Failure(description: "field \(key) must be a string, got \(v.serialized())") }
        return s
    }

    mutating func int(_ key: String) throws -> Int64? {
        guard let v = take(key) else { return nil }
        guard let i = v.intValue else { throw Failure(description: "field \(key) must be an integer, got \(v.serialized())") }
        return i
    }

    mutating func double(_ key: String) throws -> Double? {
        switch take(key) {
        case nil: return nil
        case .int(let i)?: return Double(i)
        case .double(let d)?: return d
        case let v?: throw Failure(description: "field \(key) must be a number, got \(v.serialized())")
        }
    }

    mutating func bool(_ key: String) throws -> Bool? {
        guard let v = take(key) else { return nil }
        guard case .bool(let b) = v else { throw Failure(description: "field \(key) must be true or false, got \(v.serialized())") }
        return b
    }

    mutating func strings(_ key: String) throws -> [String]? {
        guard let v = take(key) else { return nil }
        guard case .array(let a) = v, let s = Optional(a.compactMap(\.stringValue)), s.count == a.count else {
            throw Failure(description: "field \(key) must be a list of strings, got \(v.serialized())")
        }
        return s
    }

    mutating func required<T>(_ key: String) throws -> T {
        let v: Any?
        switch T.self {
        case is String.Type: v = try string(key)
        case is Int64.Type: v = try int(key)
        default: v = nil
        }
        guard let t = v as? T else { throw Failure(description: "missing field \(key)") }
        return t
    }

    mutating func peer(_ prefix: String) throws -> QueryEvent.Peer? {
        let pod = try string(prefix + "_pod"), namespace = try string(prefix + "_namespace")
        let service = try string(prefix + "_service"), node = try string(prefix + "_node")
        guard let pod else { return nil }
        return QueryEvent.Peer(pod: pod, namespace: namespace ?? "", service: service, node: node ?? "")
    }
}
