import Foundation
import TapioAttribution
import TapioWire

/// `cpu_throttle` and `memory_pressure` come from cgroup files, where the
/// kernel keeps the counters and has no tracepoint for them: CFS throttling
/// and CPU usage (`cpu.stat`, v1 `cpuacct.usage`), CPU and memory pressure
/// stall information (`cpu.pressure`, `memory.pressure`) and memory limit
/// hits (`memory.failcnt`, `memory.events`). Every interval the watcher reads
/// the counters of every cgroup below the watched subtree in each hierarchy
/// (cgroup v2, and the v1 `cpu`, `cpuacct` and `memory` controllers) and
/// emits an event for each cgroup whose counters moved.
///
/// CPU usage is what tells a neighbour that consumed the CPU from one that
/// merely ran: a cgroup is reported when it was throttled, when it used at
/// least `usageReportShare` of a CPU, or when its tasks waited for a CPU
/// (`cpu.pressure` at or above `psiThresholdPercent`); the watched subtree's
/// root every interval, with the node's CPUs, run queue and pressure.
///
/// In cgroup v1 each controller has its own tree; the watched subtree is the
/// same relative path in each (how kubelet and the lab lay them out). Events
/// carry the cgroup v2 id of the same relative path when it exists, so they
/// are attributed like every other event.
public final class CgroupWatcher: @unchecked Sendable {
    public struct Configuration: Sendable {
        /// Mount points; nil when the hierarchy is absent.
        public var v2Mount: String?
        public var v1CPUMount: String?
        public var v1MemoryMount: String?
        /// The v1 cpuacct controller's mount (CPU usage); often the same as `v1CPUMount`.
        public var v1CPUAcctMount: String?
        /// The watched subtree relative to each mount ("" for all).
        public var relativeRoot: String
        /// At most this many cgroups are read per interval (per hierarchy).
        public var maximumCgroups = 4000
        /// A PSI "some avg10" at or above this (percent) is reported even
        /// without a limit hit (memory) or throttling (CPU).
        public var psiThresholdPercent = 10.0
        /// A cgroup that used at least this share of one CPU in an interval
        /// is reported even when nothing throttled it (0.05: 50 ms a second).
        /// Below it a cgroup cannot have starved anyone; leaving it out keeps
        /// idle pods off the wire.
        public var usageReportShare = 0.05
        /// Where the node's `stat` and `pressure/cpu` are read.
        public var procRoot = "/proc"

        public init(v2Mount: String?, v1CPUMount: String?, v1MemoryMount: String?, relativeRoot: String, v1CPUAcctMount: String? = nil) {
            self.v2Mount = v2Mount
            self.v1CPUMount = v1CPUMount
            self.v1MemoryMount = v1MemoryMount
            self.v1CPUAcctMount = v1CPUAcctMount
            self.relativeRoot = relativeRoot
        }

        /// The host's hierarchies (`HostCgroups.detect`): under `hostCgroupfs`
        /// when given, else under /host/sys/fs/cgroup when the agent runs in a
        /// pod that mounts the host's tree there, else this mount namespace's.
        /// Never the pod's own /sys/fs/cgroup, which shows only its own cgroup.
        public static func discover(relativeRoot: String, hostCgroupfs: String? = nil) -> Configuration {
            Configuration(hosts: HostCgroups.detect(configured: hostCgroupfs), relativeRoot: relativeRoot)
        }

        public init(hosts: HostCgroups, relativeRoot: String) {
            self.init(v2Mount: hosts.unified, v1CPUMount: hosts.cpu, v1MemoryMount: hosts.memory, relativeRoot: relativeRoot, v1CPUAcctMount: hosts.cpuacct)
        }
    }

    private struct CPUCounters: Equatable {
        var periods: UInt64 = 0
        var throttledPeriods: UInt64 = 0
        var throttledNs: UInt64 = 0
    }

    /// One cgroup's CPU counters from whichever hierarchies have them.
    private struct CPUState {
        var throttle: CPUCounters?
        /// Cumulative CPU time, ns.
        var usageNs: UInt64?
        /// `cpu.pressure` some avg10 (percent) and total (µs).
        var psiAvg10: Double?
        var psiTotalUs: UInt64?
    }

    private struct MemoryCounters: Equatable {
        var limitHits: UInt64 = 0   // v1 failcnt, or v2 memory.events max
        var high: UInt64 = 0        // v2 memory.events high
        var usage: UInt64 = 0
        var limit: UInt64 = 0
        var psiSomeAvg10: Double = 0
    }

    public let configuration: Configuration
    private var cpu: [String: CPUState] = [:]
    private var memory: [String: MemoryCounters] = [:]
    private var nodePSITotalUs: UInt64?
    private var lastScanNs: Int64 = 0
    /// The subtree of each mount as listed in this scan (CPU and memory read the same trees).
    private var listed: [String: [String]] = [:]

    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Reads every watched cgroup; returns the events for counters that moved
    /// since the previous scan (the first scan only records a baseline).
    public func scan(nowNs: Int64) -> [TapioEvent] {
        let interval = lastScanNs == 0 ? 0 : UInt64(max(0, nowNs - lastScanNs))
        let first = lastScanNs == 0
        lastScanNs = nowNs
        listed = [:]
        defer { listed = [:] }
        var events: [TapioEvent] = []
        var seenMemory = Set<String>()

        let cpuNow = readCPU()
        for rel in cpuNow.keys.sorted() {
            if let before = cpu[rel], let e = cpuEvent(rel, before, cpuNow[rel]!, interval, nowNs) { events.append(e) }
        }
        cpu = cpuNow  // cgroups that are gone are forgotten

        if let mount = configuration.v2Mount {
            for rel in cgroups(under: mount) {
                let dir = mount + rel
                if let ev = readKeyValues(dir + "/memory.events") {
                    var now = MemoryCounters(limitHits: ev["max"] ?? 0, high: ev["high"] ?? 0)
                    now.usage = readNumber(dir + "/memory.current") ?? 0
                    now.limit = readNumber(dir + "/memory.max") ?? 0
                    now.psiSomeAvg10 = readPSISomeAvg10(dir + "/memory.pressure") ?? 0
                    let key = "v2:" + rel
                    seenMemory.insert(key)
                    events += memoryEvents(rel, memory[key], now, interval, nowNs)
                    memory[key] = now
                }
            }
        }
        if let mount = configuration.v1MemoryMount {
            for rel in cgroups(under: mount) {
                let dir = mount + rel
                guard let failcnt = readNumber(dir + "/memory.failcnt") else { continue }
                var now = MemoryCounters(limitHits: failcnt)
                now.usage = readNumber(dir + "/memory.usage_in_bytes") ?? 0
                now.limit = readNumber(dir + "/memory.limit_in_bytes") ?? 0
                now.psiSomeAvg10 = readPSISomeAvg10(dir + "/memory.pressure") ?? 0
                let key = "v1:" + rel
                seenMemory.insert(key)
                events += memoryEvents(rel, memory[key], now, interval, nowNs)
                memory[key] = now
            }
        }
        // Forget cgroups that are gone.
        memory = memory.filter { seenMemory.contains($0.key) }
        return first ? [] : events
    }

    /// The relative path of the watched subtree's root ("" for a whole hierarchy).
    private var rootRelative: String {
        let r = configuration.relativeRoot
        return r.isEmpty ? "" : (r.hasPrefix("/") ? r : "/" + r)
    }

    /// Every watched cgroup's CPU counters, merged by relative path across
    /// hierarchies: throttling from the cpu controller (v1, or v2 where it is
    /// enabled), usage from v1 cpuacct where the cgroup exists there (on a
    /// hybrid host the containers live in v1), else from v2 `cpu.stat`
    /// (kept for every v2 cgroup, controller or not), pressure from v2
    /// `cpu.pressure`, else a v1 one where the kernel keeps it.
    private func readCPU() -> [String: CPUState] {
        var out: [String: CPUState] = [:]
        if let mount = configuration.v1CPUMount {
            for rel in cgroups(under: mount) {
                guard let stat = readKeyValues(mount + rel + "/cpu.stat") else { continue }
                var s = CPUState()
                s.throttle = CPUCounters(periods: stat["nr_periods"] ?? 0, throttledPeriods: stat["nr_throttled"] ?? 0, throttledNs: stat["throttled_time"] ?? 0)
                if let psi = readPSISome(mount + rel + "/cpu.pressure") { (s.psiAvg10, s.psiTotalUs) = (psi.avg10, psi.totalUs) }
                out[rel] = s
            }
        }
        if let mount = configuration.v1CPUAcctMount {
            for rel in cgroups(under: mount) {
                guard let usage = readNumber(mount + rel + "/cpuacct.usage") else { continue }
                out[rel, default: CPUState()].usageNs = usage
            }
        }
        if let mount = configuration.v2Mount {
            for rel in cgroups(under: mount) {
                let dir = mount + rel
                guard let stat = readKeyValues(dir + "/cpu.stat") else { continue }
                var s = out[rel] ?? CPUState()
                if s.throttle == nil, stat["nr_periods"] != nil {
                    s.throttle = CPUCounters(periods: stat["nr_periods"] ?? 0, throttledPeriods: stat["nr_throttled"] ?? 0, throttledNs: (stat["throttled_usec"] ?? 0) * 1000)
                }
                if s.usageNs == nil, let u = stat["usage_usec"] { s.usageNs = u * 1000 }
                if let psi = readPSISome(dir + "/cpu.pressure") { (s.psiAvg10, s.psiTotalUs) = (psi.avg10, psi.totalUs) }
                out[rel] = s
            }
        }
        return out
    }

    /// The event for one cgroup's interval, nil when there is nothing to
    /// say: not throttled, below the usage floor, not waiting for a CPU, and
    /// not the watched root (reported every interval, as the node).
    private func cpuEvent(_ rel: String, _ before: CPUState, _ now: CPUState, _ interval: UInt64, _ nowNs: Int64) -> TapioEvent? {
        // A counter that went backwards means the cgroup was recreated: new baseline.
        var periods: UInt64 = 0, throttled: UInt64 = 0, throttledNs: UInt64 = 0
        if let b = before.throttle, let n = now.throttle, n.throttledPeriods >= b.throttledPeriods, n.periods >= b.periods {
            periods = n.periods - b.periods
            throttled = n.throttledPeriods - b.throttledPeriods
            throttledNs = n.throttledNs >= b.throttledNs ? n.throttledNs - b.throttledNs : 0
        }
        var usage: CPUUsage?
        if let b = before.usageNs, let n = now.usageNs, n >= b {
            usage = CPUUsage(usageNs: n - b)
            if let avg10 = now.psiAvg10 {
                let stall = before.psiTotalUs.flatMap { b in now.psiTotalUs.map { $0 >= b ? ($0 - b) * 1000 : 0 } } ?? 0
                usage!.pressure = CPUPressure(someAvg10Permille: permille(avg10), someStallNs: stall)
            }
        }
        let isRoot = rel == rootRelative
        if isRoot, usage != nil { usage!.node = readNode() }
        let used = Double(usage?.usageNs ?? 0) >= configuration.usageReportShare * Double(interval)
        let waited = (now.psiAvg10 ?? 0) >= configuration.psiThresholdPercent
        guard throttled > 0 || (usage != nil && (isRoot || used || waited)) else { return nil }
        return event(.cpuThrottle, rel, nowNs, .cpuThrottle(
            periods: periods, throttledPeriods: throttled, throttledNs: throttledNs, intervalNs: interval, cgroup: rel.isEmpty ? "/" : rel, usage: usage))
    }

    /// The node's CPUs now: online count, runnable tasks, /proc/pressure/cpu.
    private func readNode() -> NodeCPU {
        let cpus = UInt32(max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN))))
        var runnable: UInt32 = 0
        if let text = ProcFile.text(configuration.procRoot + "/stat") {
            for line in text.split(separator: "\n") where line.hasPrefix("procs_running ") {
                runnable = UInt32(line.split(separator: " ").last ?? "") ?? 0
            }
        }
        var node = NodeCPU(cpus: cpus, runnable: runnable)
        if let psi = readPSISome(configuration.procRoot + "/pressure/cpu") {
            let stall = nodePSITotalUs.map { psi.totalUs >= $0 ? (psi.totalUs - $0) * 1000 : 0 } ?? 0
            nodePSITotalUs = psi.totalUs
            node.pressure = CPUPressure(someAvg10Permille: permille(psi.avg10), someStallNs: stall)
        }
        return node
    }

    private func permille(_ percent: Double) -> UInt32 { UInt32(min(1000, max(0, (percent * 10).rounded()))) }

    private func memoryEvents(_ rel: String, _ before: MemoryCounters?, _ now: MemoryCounters, _ interval: UInt64, _ nowNs: Int64) -> [TapioEvent] {
        guard let before else { return [] }
        let psi = UInt32(min(1000, max(0, now.psiSomeAvg10 * 10)))
        var out: [TapioEvent] = []
        func emit(_ source: String, _ count: UInt64) {
            out.append(event(.memoryPressure, rel, nowNs, .memoryPressure(
                source: source, count: count, usageBytes: now.usage, limitBytes: now.limit,
                psiSomeAvg10Permille: psi, intervalNs: interval, cgroup: rel.isEmpty ? "/" : rel)))
        }
        if now.limitHits > before.limitHits { emit("limit", now.limitHits - before.limitHits) }
        if now.high > before.high { emit("high", now.high - before.high) }
        if out.isEmpty, now.psiSomeAvg10 >= configuration.psiThresholdPercent { emit("psi", 0) }
        return out
    }

    private func event(_ kind: EventKind, _ rel: String, _ nowNs: Int64, _ detail: TapioEvent.Detail) -> TapioEvent {
        TapioEvent(kind: kind, timeNs: nowNs, cgroupId: v2Id(rel), detail: detail)
    }

    /// cgroup v2 id (directory inode) of the same relative path, 0 when absent.
    private func v2Id(_ rel: String) -> UInt64 {
        guard let mount = configuration.v2Mount else { return 0 }
        var st = stat()
        guard stat(mount + rel, &st) == 0 else { return 0 }
        return UInt64(st.st_ino)
    }

    /// Relative paths ("" for the root itself, then "/a", "/a/b", ...) of the
    /// watched subtree under `mount`, breadth first, bounded.
    private func cgroups(under mount: String) -> [String] {
        if let known = listed[mount] { return known }
        let found = walk(mount)
        listed[mount] = found
        return found
    }

    private func walk(_ mount: String) -> [String] {
        let root = configuration.relativeRoot.isEmpty ? "" : (configuration.relativeRoot.hasPrefix("/") ? configuration.relativeRoot : "/" + configuration.relativeRoot)
        var out: [String] = []
        var queue = [root]
        let fm = FileManager.default
        var isDir: ObjCBool = false
        guard fm.fileExists(atPath: mount + root, isDirectory: &isDir), isDir.boolValue else { return [] }
        while !queue.isEmpty, out.count < configuration.maximumCgroups {
            let rel = queue.removeFirst()
            out.append(rel)
            guard let children = try? fm.contentsOfDirectory(atPath: mount + rel) else { continue }
            for child in children.sorted() {
                var d: ObjCBool = false
                if fm.fileExists(atPath: mount + rel + "/" + child, isDirectory: &d), d.boolValue {
                    queue.append(rel + "/" + child)
                }
            }
        }
        return out
    }
}

/// "key value" lines (cpu.stat, memory.events) as numbers.
func readKeyValues(_ path: String) -> [String: UInt64]? {
    guard let text = ProcFile.text(path) else { return nil }
    var out: [String: UInt64] = [:]
    for line in text.split(separator: "\n") {
        let parts = line.split(separator: " ")
        if parts.count == 2, let v = UInt64(parts[1]) { out[String(parts[0])] = v }
    }
    return out
}

/// A single number; "max" (no limit) reads as 0.
func readNumber(_ path: String) -> UInt64? {
    guard let text = ProcFile.text(path) else { return nil }
    let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
    if trimmed == "max" { return 0 }
    return UInt64(trimmed)
}

/// `some avg10=1.23 avg60=... total=...` → 1.23.
func readPSISomeAvg10(_ path: String) -> Double? {
    readPSISome(path)?.avg10
}

/// The "some" line of a pressure file: avg10 (percent) and total (µs).
func readPSISome(_ path: String) -> (avg10: Double, totalUs: UInt64)? {
    guard let text = ProcFile.text(path) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix("some ") {
        var avg10: Double?
        var total: UInt64?
        for field in line.split(separator: " ") {
            if field.hasPrefix("avg10=") { avg10 = Double(field.dropFirst(6)) }
            if field.hasPrefix("total=") { total = UInt64(field.dropFirst(6)) }
        }
        if let avg10, let total { return (avg10, total) }
    }
    return nil
}
