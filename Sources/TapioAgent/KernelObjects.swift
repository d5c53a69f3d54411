import CTapioBPF
import Foundation
import TapioWire

/// The agent's one kernel boundary: every BPF object (process, io, net, dns)
/// is loaded, read and closed through this shape, so KernelSource holds a list
/// of objects and treats them alike — one wait over their rings, one sum of
/// their drop counters, one pass of their periodic work. What differs (the C
/// loader and its settings) stays inside each object.
protocol KernelObject: AnyObject {
    /// "process", "io", "net", "dns": also the ring buffer's name.
    var name: String { get }
    /// Every program of the object, attached or degraded with the reason.
    var programs: [KernelSource.Program] { get }
    /// Its ring buffer map and size, when it has one.
    var ring: (fd: Int32, bytes: UInt32)? { get }
    /// Cumulative drop counters at kind * TAPIO_DROP_REASON_MAX + reason; false when unreadable.
    func readDrops(into counts: inout [UInt64]) -> Bool
    /// The object's periodic work after each read of the rings: harvesting its
    /// aggregation maps or scanning for timeouts when due; everything at once
    /// when `stopping`. Records go to `onRecord`, aggregates to `onAggregate`,
    /// both called with `context`. Returns -errno on failure.
    func service(context: UnsafeMutableRawPointer, onRecord: tapio_bpf_event_fn, onAggregate: tapio_aggregate_fn,
                 stopping: Bool, nowNs: Int64) -> Int32
}

/// What every object is opened with.
struct KernelObjectSettings {
    var cgroupRootId: UInt64 = 0
    var cgroupRootLevel: UInt32 = 0
    var disabledKinds: Set<EventKind> = []
    var ringBufferBytes: [String: UInt32] = [:]
    var wakeupBytes: UInt32 = 0
    var intervalNs: Int64 = 1_000_000_000
    var netEventsPerSecond: UInt32 = 0
    /// Report only network namespaces allowed through `NetObject.allow(netns:)`.
    var netnsFilter = false
    /// The cgroup2 directory the DNS programs attach to (nil: the loader's default).
    var dnsAttachPoint: String?
    var benchStormComm: String?

    var kindsDisabledMask: UInt32 { disabledKinds.reduce(0) { $0 | (1 << $1.rawValue) } }
}

/// An object that could not be opened: its programs, all degraded with the reason.
struct KernelObjectFailure: Error {
    var programs: [KernelSource.Program]
}

private func errorText(_ buffer: [CChar]) -> String { String(cBuffer: buffer) }

/// process.bpf.c: exec, exit, OOM kill (and the benchmark's storm).
final class ProcessObject: KernelObject {
    let name = "process"
    let handle: OpaquePointer
    let programs: [KernelSource.Program]

    /// The process object is the one the agent cannot run without: its
    /// failure fails the agent (the error says why), unlike the others'.
    init(_ settings: KernelObjectSettings) throws {
        var config = tapio_bpf_config()
        config.cgroup_root_id = settings.cgroupRootId
        config.cgroup_root_level = settings.cgroupRootLevel
        config.kinds_disabled_mask = settings.kindsDisabledMask
        config.ringbuf_bytes = settings.ringBufferBytes[name] ?? 0
        config.wakeup_bytes = settings.wakeupBytes
        var err = [CChar](repeating: 0, count: 1024)
        let opened: OpaquePointer? = settings.benchStormComm.map { comm in
            comm.withCString { text in
                config.bench_comm = text
                defer { config.bench_comm = nil }
                return tapio_bpf_open(&config, &err, err.count)
            }
        } ?? tapio_bpf_open(&config, &err, err.count)
        guard let opened else { throw KernelSourceError("loading BPF programs failed: \(errorText(err))") }
        handle = opened
        programs = (0..<tapio_bpf_program_count(opened)).map { i in
            KernelSource.Program(name: String(cString: tapio_bpf_program_name(opened, i)),
                                 capability: String(cString: tapio_bpf_program_capability(opened, i)),
                                 attached: tapio_bpf_program_attached(opened, i) == 1,
                                 error: String(cString: tapio_bpf_program_error(opened, i)))
        }
    }

    deinit { tapio_bpf_close(handle) }

    var ring: (fd: Int32, bytes: UInt32)? { (tapio_bpf_events_fd(handle), tapio_bpf_ringbuf_bytes(handle)) }

    func readDrops(into counts: inout [UInt64]) -> Bool { tapio_bpf_read_drops(handle, &counts, counts.count) == 0 }

    func service(context: UnsafeMutableRawPointer, onRecord: tapio_bpf_event_fn, onAggregate: tapio_aggregate_fn,
                 stopping: Bool, nowNs: Int64) -> Int32 { 0 }
}

/// io.bpf.c: failed storage syscalls, folded per process and errno.
final class IOObject: KernelObject {
    let name = "io"
    let handle: OpaquePointer
    let programs: [KernelSource.Program]
    private let intervalNs: Int64
    private var lastHarvestNs: Int64 = 0

    init(_ settings: KernelObjectSettings) throws(KernelObjectFailure) {
        let program = "handle_sys_exit"
        guard !settings.disabledKinds.contains(.ioError) else {
            throw KernelObjectFailure(programs: [.init(name: program, capability: "io_error", attached: false, error: "disabled by configuration")])
        }
        var config = tapio_io_config()
        config.cgroup_root_id = settings.cgroupRootId
        config.cgroup_root_level = settings.cgroupRootLevel
        var err = [CChar](repeating: 0, count: 1024)
        guard let opened = tapio_io_open(&config, &err, err.count) else {
            throw KernelObjectFailure(programs: [.init(name: program, capability: "io_error", attached: false, error: errorText(err))])
        }
        handle = opened
        intervalNs = settings.intervalNs
        programs = [.init(name: program, capability: "io_error", attached: true, error: "")]
    }

    deinit { tapio_io_close(handle) }

    var ring: (fd: Int32, bytes: UInt32)? { nil }

    func readDrops(into counts: inout [UInt64]) -> Bool { tapio_io_read_drops(handle, &counts, counts.count) == 0 }

    func service(context: UnsafeMutableRawPointer, onRecord: tapio_bpf_event_fn, onAggregate: tapio_aggregate_fn,
                 stopping: Bool, nowNs: Int64) -> Int32 {
        if lastHarvestNs == 0 { lastHarvestNs = nowNs }
        guard stopping || nowNs - lastHarvestNs >= intervalNs else { return 0 }
        lastHarvestNs = nowNs
        let rc = tapio_io_harvest(handle, onAggregate, context)
        return rc == -EBUSY ? 0 : min(rc, 0)
    }
}

/// net.bpf.c: TCP connects, listens, resets (records and folded), and the
/// aggregated retransmits, latency and packet drops.
final class NetObject: KernelObject {
    static let capabilities = ["tcp_connect", "tcp_listen", "tcp_reset", "tcp_retransmit", "tcp_latency", "packet_drop"]
    let name = "net"
    let handle: OpaquePointer
    let programs: [KernelSource.Program]
    /// Network namespaces already allowed through the filter.
    private var allowed = Set<UInt32>()

    init(_ settings: KernelObjectSettings) throws(KernelObjectFailure) {
        var config = tapio_net_config()
        config.cgroup_root_id = settings.cgroupRootId
        config.cgroup_root_level = settings.cgroupRootLevel
        config.kinds_disabled_mask = settings.kindsDisabledMask
        config.netns_filter = settings.netnsFilter ? 1 : 0
        config.events_per_sec = settings.netEventsPerSecond
        config.interval_ns = UInt64(max(1, settings.intervalNs))
        config.ringbuf_bytes = settings.ringBufferBytes[name] ?? 0
        config.wakeup_bytes = settings.wakeupBytes
        var err = [CChar](repeating: 0, count: 4096)
        guard let opened = tapio_net_open(&config, &err, err.count) else {
            let reason = errorText(err)
            throw KernelObjectFailure(programs: Self.capabilities.map { .init(name: "net.bpf.o", capability: $0, attached: false, error: reason) })
        }
        handle = opened
        programs = (0..<tapio_net_program_count(opened)).map { i in
            KernelSource.Program(name: String(cString: tapio_net_program_name(opened, i)),
                                 capability: String(cString: tapio_net_program_capability(opened, i)),
                                 attached: tapio_net_program_attached(opened, i) == 1,
                                 error: String(cString: tapio_net_program_error(opened, i)))
        }
    }

    deinit { tapio_net_close(handle) }

    var ring: (fd: Int32, bytes: UInt32)? { (tapio_net_events_fd(handle), tapio_net_ringbuf_bytes(handle)) }

    func readDrops(into counts: inout [UInt64]) -> Bool { tapio_net_read_drops(handle, &counts, counts.count) == 0 }

    /// Never waits (the ring was just drained): the maps' harvest when its
    /// interval is due, and everything at shutdown.
    func service(context: UnsafeMutableRawPointer, onRecord: tapio_bpf_event_fn, onAggregate: tapio_aggregate_fn,
                 stopping: Bool, nowNs: Int64) -> Int32 {
        let rc = stopping
            ? tapio_net_harvest(handle, onRecord, onAggregate, context)
            : tapio_net_harvest_due(handle, onRecord, onAggregate, context)
        return rc == -EINTR ? 0 : min(rc, 0)
    }

    /// Lets the programs report events of this network namespace (with a netns filter).
    func allow(netns inum: UInt32) {
        if allowed.insert(inum).inserted { _ = tapio_net_allow_netns(handle, inum) }
    }
}

/// dns.bpf.c: cgroup_skb programs that pair queries with answers; unanswered
/// queries are emitted by a periodic scan.
final class DNSObject: KernelObject {
    let name = "dns"
    let handle: OpaquePointer
    let programs: [KernelSource.Program]

    init(_ settings: KernelObjectSettings) throws(KernelObjectFailure) {
        let program = "cgroup_skb dns"
        guard !settings.disabledKinds.contains(.dns) else {
            throw KernelObjectFailure(programs: [.init(name: program, capability: "dns", attached: false, error: "disabled by configuration")])
        }
        var config = tapio_dns_config()
        config.ringbuf_bytes = settings.ringBufferBytes[name] ?? 0
        config.wakeup_bytes = settings.wakeupBytes
        var err = [CChar](repeating: 0, count: 4096)
        let opened: OpaquePointer?
        if let attachPoint = settings.dnsAttachPoint {
            opened = attachPoint.withCString { path -> OpaquePointer? in
                config.cgroup_path = path
                defer { config.cgroup_path = nil }
                return tapio_dns_open(&config, &err, err.count)
            }
        } else {
            opened = tapio_dns_open(&config, &err, err.count)
        }
        guard let opened else {
            throw KernelObjectFailure(programs: [.init(name: program, capability: "dns", attached: false, error: errorText(err))])
        }
        handle = opened
        programs = [.init(name: program, capability: "dns", attached: true, error: "")]
    }

    deinit { tapio_dns_close(handle) }

    var ring: (fd: Int32, bytes: UInt32)? { (tapio_dns_events_fd(handle), tapio_dns_ringbuf_bytes(handle)) }

    func readDrops(into counts: inout [UInt64]) -> Bool { tapio_dns_read_drops(handle, &counts, counts.count) == 0 }

    /// Emits the queries that timed out, when the scan is due.
    func service(context: UnsafeMutableRawPointer, onRecord: tapio_bpf_event_fn, onAggregate: tapio_aggregate_fn,
                 stopping: Bool, nowNs: Int64) -> Int32 {
        let rc = tapio_dns_scan_due(handle, onRecord, context)
        return rc == -EINTR ? 0 : min(rc, 0)
    }
}
