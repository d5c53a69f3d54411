import Foundation
import TapioAttribution
import TapioWire

/// `cpu_throttle` and `memory_pressure` come from cgroup files, where the
/// kernel keeps the counters and has no tracepoint for them: CFS throttling
/// (`cpu.stat`), memory limit hits (`memory.failcnt`, `memory.events`) and
/// pressure stall information (`memory.pressure`). Every interval the watcher
/// reads the counters of every cgroup below the watched subtree in each
/// hierarchy (cgroup v2, and the v1 `cpu` and `memory` controllers) and emits
/// an event for each cgroup whose counters moved.
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
        /// The watched subtree relative to each mount ("" for all).
        public var relativeRoot: String
        /// At most this many cgroups are read per interval.
        public var maximumCgroups = 4000
        /// A PSI "some avg10" at or above this (percent) is reported even without a limit hit.
        public var psiThresholdPercent = 10.0

        public init(v2Mount: String?, v1CPUMount: String?, v1MemoryMount: String?, relativeRoot: String) {
            self.v2Mount = v2Mount
            self.v1CPUMount = v1CPUMount
            self.v1MemoryMount = v1MemoryMount
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
            self.init(v2Mount: hosts.unified, v1CPUMount: hosts.cpu, v1MemoryMount: hosts.memory, relativeRoot: relativeRoot)
        }
    }

    private struct CPUCounters: Equatable {
        var periods: UInt64 = 0
        var throttledPeriods: UInt64 = 0
        var throttledNs: UInt64 = 0
    }

    private struct MemoryCounters: Equatable {
        var limitHits: UInt64 = 0   // v1 failcnt, or v2 memory.events max
        var high: UInt64 = 0        // v2 memory.events high
        var usage: UInt64 = 0
        var limit: UInt64 = 0
        var psiSomeAvg10: Double = 0
    }

    public let configuration: Configuration
    private var cpu: [String: CPUCounters] = [:]
    private var memory: [String: MemoryCounters] = [:]
    private var lastScanNs: Int64 = 0

    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Reads every watched cgroup; returns the events for counters that moved
    /// since the previous scan (the first scan only records a baseline).
    public func scan(nowNs: Int64) -> [TapioEvent] {
        let interval = lastScanNs == 0 ? 0 : UInt64(max(0, nowNs - lastScanNs))
        let first = lastScanNs == 0
        lastScanNs = nowNs
        var events: [TapioEvent] = []
        var seenCPU = Set<String>()
        var seenMemory = Set<String>()

        if let mount = configuration.v1CPUMount {
            for rel in cgroups(under: mount) {
                guard let stat = readKeyValues(mount + rel + "/cpu.stat") else { continue }
                let now = CPUCounters(periods: stat["nr_periods"] ?? 0, throttledPeriods: stat["nr_throttled"] ?? 0, throttledNs: stat["throttled_time"] ?? 0)
                let key = "v1:" + rel
                seenCPU.insert(key)
                if let before = cpu[key], let e = throttle(rel, before, now, interval, nowNs) { events.append(e) }
                cpu[key] = now
            }
        }
        if let mount = configuration.v2Mount {
            for rel in cgroups(under: mount) {
                let dir = mount + rel
                if let stat = readKeyValues(dir + "/cpu.stat"), stat["nr_periods"] != nil {
                    let now = CPUCounters(periods: stat["nr_periods"] ?? 0, throttledPeriods: stat["nr_throttled"] ?? 0, throttledNs: (stat["throttled_usec"] ?? 0) * 1000)
                    let key = "v2:" + rel
                    seenCPU.insert(key)
                    if let before = cpu[key], let e = throttle(rel, before, now, interval, nowNs) { events.append(e) }
                    cpu[key] = now
                }
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
        cpu = cpu.filter { seenCPU.contains($0.key) }
        memory = memory.filter { seenMemory.contains($0.key) }
        return first ? [] : events
    }

    private func throttle(_ rel: String, _ before: CPUCounters, _ now: CPUCounters, _ interval: UInt64, _ nowNs: Int64) -> TapioEvent? {
        // A counter that went backwards means the cgroup was recreated: new baseline.
        guard now.throttledPeriods > before.throttledPeriods, now.periods >= before.periods else { return nil }
        return event(.cpuThrottle, rel, nowNs, .cpuThrottle(
            periods: now.periods - before.periods, throttledPeriods: now.throttledPeriods - before.throttledPeriods,
            throttledNs: now.throttledNs >= before.throttledNs ? now.throttledNs - before.throttledNs : 0,
            intervalNs: interval, cgroup: rel.isEmpty ? "/" : rel))
    }

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
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
    var out: [String: UInt64] = [:]
    for line in text.split(separator: "\n") {
        let parts = line.split(separator: " ")
        if parts.count == 2, let v = UInt64(parts[1]) { out[String(parts[0])] = v }
    }
    return out
}

/// A single number; "max" (no limit) reads as 0.
func readNumber(_ path: String) -> UInt64? {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
    let trimmed = text.trimmingCharacters(in: .whitespacesAndNewlines)
    if trimmed == "max" { return 0 }
    return UInt64(trimmed)
}

/// `some avg10=1.23 avg60=... total=...` → 1.23.
func readPSISomeAvg10(_ path: String) -> Double? {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix("some ") {
        for field in line.split(separator: " ") where field.hasPrefix("avg10=") {
            return Double(field.dropFirst(6))
        }
    }
    return nil
}
