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
public struct TapioEvent: Sendable, Equatable {
    public enum Detail: Sendable, Equatable {
        case none
        case exec(filename: String)
        case exit(exitCode: Int32, signal: Int32, coreDumped: Bool)
        case oomKill(victimPid: UInt32, victimComm: String, victimUid: UInt32, totalVmKb: UInt64, anonRssKb: UInt64, fileRssKb: UInt64)
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
    public var detail: Detail

    public init(kind: EventKind, timeNs: Int64, pid: UInt32 = 0, ppid: UInt32 = 0, uid: UInt32 = 0, comm: String = "", cgroupId: UInt64 = 0, detail: Detail = .none) {
        self.kind = kind
        self.timeNs = timeNs
        self.pid = pid
        self.ppid = ppid
        self.uid = uid
        self.comm = comm
        self.cgroupId = cgroupId
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
            return ["exit_code": .int(Int64(exitCode)), "signal": .int(Int64(signal)), "core_dumped": .bool(coreDumped)]
        case .oomKill(let victimPid, let victimComm, let victimUid, let totalVmKb, let anonRssKb, let fileRssKb):
            return [
                "victim_pid": .int(Int64(victimPid)), "victim_comm": .string(victimComm), "victim_uid": .int(Int64(victimUid)),
                "total_vm_kb": .int(Int64(totalVmKb)), "anon_rss_kb": .int(Int64(anonRssKb)), "file_rss_kb": .int(Int64(fileRssKb)),
            ]
        }
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
