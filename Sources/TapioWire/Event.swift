import Foundation

/// Every event kind of the catalog (docs/events.md); raw values are the wire
/// enum `tapio.v1.EventKind`, names are the JSON `kind`.
public enum EventKind: UInt32, Sendable, CaseIterable, Codable {
    case unspecified = 0
    case processExec = 1
    case processExit = 2
    case oomKill = 3
    case tcpConnect = 4
    case tcpListen = 5
    case tcpReset = 6
    case tcpRetransmit = 7
    case tcpLatency = 8
    case packetDrop = 9
    case dns = 10
    case cpuThrottle = 11
    case memoryPressure = 12
    case ioError = 13

    public var name: String {
        switch self {
        case .unspecified: return "unspecified"
        case .processExec: return "process_exec"
        case .processExit: return "process_exit"
        case .oomKill: return "oom_kill"
        case .tcpConnect: return "tcp_connect"
        case .tcpListen: return "tcp_listen"
        case .tcpReset: return "tcp_reset"
        case .tcpRetransmit: return "tcp_retransmit"
        case .tcpLatency: return "tcp_latency"
        case .packetDrop: return "packet_drop"
        case .dns: return "dns"
        case .cpuThrottle: return "cpu_throttle"
        case .memoryPressure: return "memory_pressure"
        case .ioError: return "io_error"
        }
    }

    public init?(name: String) {
        guard let kind = EventKind.allCases.first(where: { $0.name == name }) else { return nil }
        self = kind
    }
}

/// One kernel observation as the agent reports it.
public struct TapioEvent: Sendable, Equatable, Codable {
    public enum Detail: Sendable, Equatable, Codable {
        case none
        case exec(filename: String)
        case exit(exitCode: Int32, signal: Int32, coreDumped: Bool)
        case oomKill(victimPid: UInt32, victimComm: String, victimUid: UInt32, totalVmKb: UInt64, anonRssKb: UInt64, fileRssKb: UInt64)
        case tcpConnect(flow: Flow, outcome: ConnectOutcome, latencyNs: UInt64, error: Int32, count: UInt32)
        case tcpListen(address: IPAddress?, port: UInt16, open: Bool)
        case tcpReset(flow: Flow, sent: Bool, state: UInt32, count: UInt32)
        case tcpRetransmit(flow: Flow, count: UInt32, intervalNs: UInt64)
        case tcpLatency(flow: Flow, srttUs: UInt32, responses: UInt32, responseNsTotal: UInt64, responseNsMax: UInt64, intervalNs: UInt64)
        case packetDrop(reason: String, count: UInt32, flow: Flow, ipProtocol: UInt32, ifindex: UInt32, intervalNs: UInt64)
        case dns(name: String, qtype: UInt32, rcode: Int32, latencyNs: UInt64, server: IPAddress?, serverPort: UInt16, id: UInt16, answers: [IPAddress])
        /// `usage` is nil from agents that do not report CPU usage.
        case cpuThrottle(periods: UInt64, throttledPeriods: UInt64, throttledNs: UInt64, intervalNs: UInt64, cgroup: String, usage: CPUUsage? = nil)
        case memoryPressure(source: String, count: UInt64, usageBytes: UInt64, limitBytes: UInt64, psiSomeAvg10Permille: UInt32, intervalNs: UInt64, cgroup: String)
        case ioError(error: Int32, syscall: String, count: UInt32, intervalNs: UInt64)
    }

    public var kind: EventKind
    /// Wall time, ns since the Unix epoch, on the agent's clock.
    public var timeNs: Int64
    public var pid: UInt32
    public var ppid: UInt32
    public var uid: UInt32
    public var comm: String
    /// cgroup v2 id (the inode number of the cgroup directory).
    public var cgroupId: UInt64
    /// Network namespace inode, 0 when unknown.
    public var netns: UInt32
    /// Attribution, empty when unknown (a host process, or no metadata).
    public var containerId: String
    public var pod: String
    public var namespace: String
    public var detail: Detail

    public init(kind: EventKind, timeNs: Int64, pid: UInt32 = 0, ppid: UInt32 = 0, uid: UInt32 = 0, comm: String = "", cgroupId: UInt64 = 0,
                netns: UInt32 = 0, containerId: String = "", pod: String = "", namespace: String = "", detail: Detail = .none) {
        self.kind = kind
        self.timeNs = timeNs
        self.pid = pid
        self.ppid = ppid
        self.uid = uid
        self.comm = comm
        self.cgroupId = cgroupId
        self.netns = netns
        self.containerId = containerId
        self.pod = pod
        self.namespace = namespace
        self.detail = detail
    }

    /// An event the agent sends at once instead of waiting for a full batch.
    public var isCritical: Bool {
        kind == .oomKill
    }

    /// The kind-specific fields as JSON members (snake_case, docs/events.md).
    public var detailFields: [String: JSONValue] {
        switch detail {
        case .none:
            return [:]
        case .exec(let filename):
            return ["filename": .string(filename)]
        case .exit(let exitCode, let signal, let coreDumped):
            return ["exit_code": .int(Int64(clamping: exitCode)), "signal": .int(Int64(clamping: signal)), "core_dumped": .bool(coreDumped)]
        case .oomKill(let victimPid, let victimComm, let victimUid, let totalVmKb, let anonRssKb, let fileRssKb):
            return [
                "victim_pid": .int(Int64(clamping: victimPid)), "victim_comm": .string(victimComm), "victim_uid": .int(Int64(clamping: victimUid)),
                "total_vm_kb": .int(Int64(clamping: totalVmKb)), "anon_rss_kb": .int(Int64(clamping: anonRssKb)), "file_rss_kb": .int(Int64(clamping: fileRssKb)),
            ]
        case .tcpConnect(let flow, let outcome, let latencyNs, let error, let count):
            var o = flow.jsonFields
            o["outcome"] = .string(outcome.name)
            o["latency_ns"] = .int(Int64(clamping: latencyNs))
            o["count"] = .int(Int64(clamping: count))
            if error != 0 { o["errno"] = .string(errnoName(error)) }
            return o
        case .tcpListen(let address, let port, let open):
            var o: [String: JSONValue] = ["port": .int(Int64(clamping: port)), "state": .string(open ? "open" : "closed")]
            if let address { o["ip"] = .string(address.description) }
            return o
        case .tcpReset(let flow, let sent, let state, let count):
            var o = flow.jsonFields
            o["direction"] = .string(sent ? "sent" : "received")
            o["tcp_state"] = .int(Int64(clamping: state))
            o["count"] = .int(Int64(clamping: count))
            return o
        case .tcpRetransmit(let flow, let count, let intervalNs):
            var o = flow.jsonFields
            o["count"] = .int(Int64(clamping: count))
            o["interval_ns"] = .int(Int64(clamping: intervalNs))
            return o
        case .tcpLatency(let flow, let srttUs, let responses, let total, let maxNs, let intervalNs):
            var o = flow.jsonFields
            o["srtt_us"] = .int(Int64(clamping: srttUs))
            o["responses"] = .int(Int64(clamping: responses))
            o["response_ns_avg"] = .int(responses == 0 ? 0 : Int64(clamping: total / UInt64(responses)))
            o["response_ns_max"] = .int(Int64(clamping: maxNs))
            o["interval_ns"] = .int(Int64(clamping: intervalNs))
            return o
        case .packetDrop(let reason, let count, let flow, let proto, let ifindex, let intervalNs):
            var o = flow.jsonFields
            o["reason"] = .string(reason)
            o["count"] = .int(Int64(clamping: count))
            o["protocol"] = .string(ipProtocolName(proto))
            o["ifindex"] = .int(Int64(clamping: ifindex))
            o["interval_ns"] = .int(Int64(clamping: intervalNs))
            return o
        case .dns(let name, let qtype, let rcode, let latencyNs, let server, let serverPort, let id, let answers):
            var o: [String: JSONValue] = [
                "name": .string(name), "qtype": .string(dnsTypeName(qtype)), "rcode": .string(dnsRcodeName(rcode)),
                "outcome": .string(rcode < 0 ? "timeout" : "answer"), "latency_ns": .int(Int64(clamping: latencyNs)),
                "id": .int(Int64(clamping: id)), "answers": .array(answers.map { .string($0.description) }),
            ]
            if let server { o["server"] = .string(server.description); o["server_port"] = .int(Int64(clamping: serverPort)) }
            return o
        case .cpuThrottle(let periods, let throttledPeriods, let throttledNs, let intervalNs, let cgroup, let usage):
            var o: [String: JSONValue] = [
                "periods": .int(Int64(clamping: periods)), "throttled_periods": .int(Int64(clamping: throttledPeriods)),
                "throttled_ns": .int(Int64(clamping: throttledNs)), "interval_ns": .int(Int64(clamping: intervalNs)), "cgroup": .string(cgroup),
            ]
            if let usage {
                o["usage_ns"] = .int(Int64(clamping: usage.usageNs))
                if let p = usage.pressure {
                    o["psi_some_avg10"] = .double(Double(p.someAvg10Permille) / 10)
                    o["psi_some_stall_ns"] = .int(Int64(clamping: p.someStallNs))
                }
                if let n = usage.node {
                    o["node_cpus"] = .int(Int64(clamping: n.cpus))
                    o["node_runnable"] = .int(Int64(clamping: n.runnable))
                    if let p = n.pressure { o["node_psi_some_avg10"] = .double(Double(p.someAvg10Permille) / 10) }
                }
            }
            return o
        case .memoryPressure(let source, let count, let usage, let limit, let psi, let intervalNs, let cgroup):
            return ["source": .string(source), "count": .int(Int64(clamping: count)), "usage_bytes": .int(Int64(clamping: usage)),
                    "limit_bytes": .int(Int64(clamping: limit)), "psi_some_avg10": .double(Double(psi) / 10), "interval_ns": .int(Int64(clamping: intervalNs)),
                    "cgroup": .string(cgroup)]
        case .ioError(let error, let syscall, let count, let intervalNs):
            return ["errno": .string(errnoName(error)), "error_code": .int(Int64(clamping: error)), "syscall": .string(syscall),
                    "count": .int(Int64(clamping: count)), "interval_ns": .int(Int64(clamping: intervalNs))]
        }
    }
}

/// What a cgroup's tasks did with the CPU in one interval (`cpu_throttle`).
public struct CPUUsage: Sendable, Equatable, Codable {
    /// CPU time used in the interval, ns (cgroup v2 `cpu.stat` usage_usec,
    /// v1 `cpuacct.usage`); over an interval of one second, 1e9 is one CPU busy.
    public var usageNs: UInt64
    /// The cgroup's `cpu.pressure`; nil where the kernel keeps none (cgroup v1).
    public var pressure: CPUPressure?
    /// Only on the event of the watched subtree's root: the node as a whole.
    public var node: NodeCPU?

    public init(usageNs: UInt64, pressure: CPUPressure? = nil, node: NodeCPU? = nil) {
        self.usageNs = usageNs
        self.pressure = pressure
        self.node = node
    }
}

/// Pressure stall information for CPU: the share of time at least one
/// runnable task waited for a CPU.
public struct CPUPressure: Sendable, Equatable, Codable {
    /// "some avg10" (the last 10 s), in permille.
    public var someAvg10Permille: UInt32
    /// Growth of "some total" in the interval, ns.
    public var someStallNs: UInt64

    public init(someAvg10Permille: UInt32, someStallNs: UInt64) {
        self.someAvg10Permille = someAvg10Permille
        self.someStallNs = someStallNs
    }
}

/// The node's CPUs at the end of an interval.
public struct NodeCPU: Sendable, Equatable, Codable {
    /// CPUs online.
    public var cpus: UInt32
    /// Tasks runnable at the sample (`/proc/stat` procs_running).
    public var runnable: UInt32
    /// `/proc/pressure/cpu`; nil on kernels without PSI.
    public var pressure: CPUPressure?

    public init(cpus: UInt32, runnable: UInt32, pressure: CPUPressure? = nil) {
        self.cpus = cpus
        self.runnable = runnable
        self.pressure = pressure
    }
}

/// A count of events lost before they reached the wire, cumulative per stream epoch.
public struct DropCount: Sendable, Equatable, Hashable {
    public var kind: EventKind
    public var reason: String
    public var count: UInt64

    public init(kind: EventKind, reason: String, count: UInt64) {
        self.kind = kind
        self.reason = reason
        self.count = count
    }
}

/// RFC 3339 with nanoseconds in UTC, e.g. `2026-11-27T14:50:57.123456789Z`.
public func rfc3339(ns: Int64) -> String {
    var seconds = time_t(ns / 1_000_000_000)
    var fraction = ns % 1_000_000_000
    if fraction < 0 {
        fraction += 1_000_000_000
        seconds -= 1
    }
    var parts = tm()
    gmtime_r(&seconds, &parts)
    let frac = String(fraction)
    let padded = String(repeating: "0", count: 9 - frac.count) + frac
    func two(_ v: Int32) -> String { v < 10 ? "0\(v)" : "\(v)" }
    return "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))T\(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec)).\(padded)Z"
}

/// Wall clock now, ns since the Unix epoch.
public func wallClockNs() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}

/// Monotonic clock now, ns.
public func monotonicNs() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
}

extension String {
    /// The text in a C char buffer up to its first NUL (the buffer need not hold one).
    public init(cBuffer: [CChar]) {
        self.init(decoding: cBuffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
