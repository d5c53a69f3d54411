import CTapioBPF
import Foundation
import TapioAttribution
import Logging
import Synchronization
import TapioWire

public struct KernelSourceError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The BPF programs of bpf/, loaded through the one kernel boundary
/// (`KernelObject`, KernelObjects.swift), and the thread that waits on every
/// object's ring buffer at once, converts records and harvested aggregates,
/// and queues them in the outbox.
public final class KernelSource: @unchecked Sendable {
    public struct Program: Sendable, Equatable {
        public var name: String
        public var capability: String
        public var attached: Bool
        public var error: String
    }

    public struct Configuration: Sendable {
        /// A cgroup2 directory: only tasks below it are observed. nil: all.
        public var cgroupRoot: String?
        /// The host's cgroupfs root (`--host-cgroupfs`, e.g. /host/sys/fs/cgroup
        /// in a pod); nil: detected (`HostCgroups.detect`). Its cgroup2 mount is
        /// where cgroup_skb (DNS) attaches when there is no `cgroupRoot`, and its
        /// hierarchies are what the cgroup watcher reads.
        public var hostCgroupfs: String?
        /// Kinds not reported (`--disable`): the kernel programs skip them
        /// (a mask in their settings) and the cgroup files' events of these
        /// kinds are left out.
        public var disabledKinds: Set<EventKind> = []
        /// Ring buffer sizes by object ("process", "net", "dns"); 0 or absent:
        /// the loader's default. Powers of two, multiples of the page size.
        public var ringBufferBytes: [String: UInt32] = [:]
        /// Adaptive wakeup fill mark (bpf/common.bpf.h) for every ring: 0 =
        /// 1/16 of each ring, `UInt32.max` = the kernel's default wakeups.
        public var wakeupBytes: UInt32 = 0
        /// Longest the reader waits when no ring passed its fill mark: the
        /// bound on how long a record of a quiet ring waits to be read.
        public var readIntervalMs: Int32 = 50
        /// Benchmark only: turns on the storm program for tasks of this comm.
        public var benchStormComm: String?
        /// How often aggregated signals (maps, cgroup files) are harvested.
        public var intervalNs: Int64 = 1_000_000_000
        /// The agent's clock (the lab may skew it).
        public var clock = AgentClock()
        /// Per-CPU, per-kind token bucket for network records and new aggregation keys (0: none).
        public var netEventsPerSecond: UInt32 = 20_000
        /// Network events that are the agent's own doing (its connection to
        /// the server): left out, neither reported nor counted as dropped.
        public var isOwnTraffic: (@Sendable (TapioEvent) -> Bool)?

        public init(cgroupRoot: String? = nil) {
            self.cgroupRoot = cgroupRoot
        }
    }

    /// Every BPF object, opened through the one kernel boundary
    /// (KernelObjects.swift): process first, then io, net and dns as loaded.
    private let objects: [KernelObject]
    /// The net object, for its network-namespace filter.
    private let net: NetObject?
    /// The one reader over every object's ring buffer.
    private let rings: OpaquePointer?
    private let cgroups: CgroupWatcher
    private let configuration: Configuration
    public let programs: [Program]
    /// Fills attribution (container, pod, namespace) before an event is
    /// queued, given the record's memory-controller cgroup id (0: none).
    public let enrich: @Sendable (inout TapioEvent, _ memoryCgroupId: UInt64) -> Void
    private let stopFlag = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private var clock: MonotonicToWall
    /// The reader thread's memo of comm strings (`convert` only, on that
    /// one thread: no access checks needed).
    @exclusivity(unchecked) private var comms = CommMemo()
    private let logger: Logger
    private let eventCount = Atomic<UInt64>(0)
    private let ownCount = Atomic<UInt64>(0)

    public init(configuration: Configuration, logger: Logger, enrich: @escaping @Sendable (inout TapioEvent, _ memoryCgroupId: UInt64) -> Void = { _, _ in }) throws {
        self.logger = logger
        self.configuration = configuration
        self.enrich = enrich
        clock = MonotonicToWall(offsetNs: configuration.clock.offsetNs)
        var settings = KernelObjectSettings()
        var relativeRoot = ""
        if let root = configuration.cgroupRoot {
            var id: UInt64 = 0
            var level: UInt32 = 0
            let rc = tapio_bpf_cgroup_id(root, &id, &level)
            guard rc == 0 else { throw KernelSourceError("--cgroup-root \(root): not a cgroup2 directory (\(String(cString: strerror(-rc))))") }
            settings.cgroupRootId = id
            settings.cgroupRootLevel = level
            relativeRoot = CgroupWatcher.Configuration.discover(relativeRoot: "", hostCgroupfs: configuration.hostCgroupfs).v2Mount.map { mount in
                root.hasPrefix(mount) ? String(root.dropFirst(mount.count)) : ""
            } ?? ""
        }
        cgroups = CgroupWatcher(configuration: .discover(relativeRoot: relativeRoot, hostCgroupfs: configuration.hostCgroupfs))
        settings.disabledKinds = configuration.disabledKinds
        settings.ringBufferBytes = configuration.ringBufferBytes
        settings.wakeupBytes = configuration.wakeupBytes
        settings.intervalNs = configuration.intervalNs
        settings.netEventsPerSecond = configuration.netEventsPerSecond
        // A node that is a cgroup subtree (the lab, or a pod-scoped agent) sees
        // only the network namespaces its processes live in; drops without a
        // socket are attributed by namespace alone.
        settings.netnsFilter = configuration.cgroupRoot != nil
        // The host's root cgroup (all pods), never the agent's own: in a pod
        // its /sys/fs/cgroup is its own cgroup namespace.
        settings.dnsAttachPoint = configuration.cgroupRoot ?? cgroups.configuration.v2Mount
        settings.benchStormComm = configuration.benchStormComm
        let tracefs = tapio_bpf_ensure_tracefs()
        if tracefs != 0 {
            logger.warning("tracefs is not available; tracepoint programs may fail to attach", metadata: ["errno": "\(-tracefs)"])
        }
        // The process object is required; the others degrade their signals.
        var objects: [KernelObject] = [try ProcessObject(settings)]
        var programs = objects[0].programs
        var net: NetObject?
        func load(_ open: () throws(KernelObjectFailure) -> KernelObject) {
            do {
                let object = try open()
                objects.append(object)
                programs += object.programs
                if let object = object as? NetObject { net = object }
            } catch {
                programs += error.programs
            }
        }
        load { () throws(KernelObjectFailure) in try IOObject(settings) }
        load { () throws(KernelObjectFailure) in try NetObject(settings) }
        load { () throws(KernelObjectFailure) in try DNSObject(settings) }
        // Not BPF: counters the kernel keeps in cgroup files.
        let watcher = cgroups.configuration
        let cpuSource = watcher.v2Mount != nil || watcher.v1CPUMount != nil || watcher.v1CPUAcctMount != nil
        let memorySource = watcher.v2Mount != nil || watcher.v1MemoryMount != nil
        programs.append(Program(name: "cgroup cpu.stat", capability: "cpu_throttle", attached: cpuSource, error: cpuSource ? "" : "no cgroup cpu controller mounted"))
        programs.append(Program(name: "cgroup memory files", capability: "memory_pressure", attached: memorySource, error: memorySource ? "" : "no cgroup memory controller mounted"))
        self.programs = programs
        self.objects = objects
        self.net = net
        // One reader over every ring (tapio_rings.h).
        rings = tapio_rings_new()
        var ringFailures: [String] = []
        for object in objects {
            guard let ring = object.ring else { continue }
            let rc = tapio_rings_add(rings, ring.fd, object.name, ring.bytes)
            if rc < 0 { ringFailures.append("\(object.name): \(String(cString: strerror(-rc)))") }
        }
        if !ringFailures.isEmpty {
            throw KernelSourceError("reading the ring buffers: \(ringFailures.joined(separator: "; "))")
        }
    }

    deinit {
        // The reader first: it maps the objects' rings. The objects close
        // themselves when released.
        tapio_rings_free(rings)
    }

    public var capabilities: [String] { programs.filter(\.attached).map(\.capability) }

    /// Each ring buffer read: whose, its size, records read from it so far, its fill now.
    public struct Ring: Sendable, Equatable {
        public var name: String
        public var bytes: UInt32
        public var records: UInt64
        /// Bytes written by the programs and not yet read.
        public var fillBytes: UInt64 = 0
    }

    public var ringBuffers: [Ring] {
        (0..<tapio_rings_count(rings)).map { i in
            Ring(name: String(cString: tapio_rings_name(rings, i)), bytes: tapio_rings_size(rings, i), records: tapio_rings_records(rings, i),
                 fillBytes: tapio_rings_fill(rings, i))
        }
    }

    /// Times the reader was woken by a ring past its fill mark.
    public var ringWakeups: UInt64 { tapio_rings_wakeups(rings) }
    public var degraded: [String] { programs.filter { !$0.attached }.map { "\($0.capability): \($0.error)" } }
    public var eventsRead: UInt64 { eventCount.load(ordering: .relaxed) }
    /// Network events of the agent's own traffic, left out (not in `eventsRead`).
    public var selfEventsFiltered: UInt64 { ownCount.load(ordering: .relaxed) }

    /// Whether an event is the agent's own traffic (then counted here only).
    private func isOwn(_ event: TapioEvent) -> Bool {
        guard let filter = configuration.isOwnTraffic, filter(event) else { return false }
        ownCount.add(1, ordering: .relaxed)
        return true
    }

    /// The kernel's cumulative drop counters, summed over every BPF object.
    public func drops() -> [DropCount] {
        let slots = Int(TAPIO_KIND_MAX.rawValue) * Int(TAPIO_DROP_REASON_MAX.rawValue)
        var total = [UInt64](repeating: 0, count: slots)
        var counts = [UInt64](repeating: 0, count: slots)
        for object in objects where object.readDrops(into: &counts) {
            for i in 0..<slots { total[i] += counts[i] }
        }
        var out: [DropCount] = []
        for kindIndex in 0..<Int(TAPIO_KIND_MAX.rawValue) {
            guard let kind = EventKind(rawValue: UInt32(kindIndex)) else { continue }
            for (reason, name) in [(TAPIO_DROP_RINGBUF_FULL, "ringbuf_full"), (TAPIO_DROP_RATE_LIMITED, "rate_limited"), (TAPIO_DROP_MAP_FULL, "map_full")] {
                let c = total[kindIndex * Int(TAPIO_DROP_REASON_MAX.rawValue) + Int(reason.rawValue)]
                if c > 0 { out.append(DropCount(kind: kind, reason: name, count: c)) }
            }
        }
        return out
    }

    /// Starts the polling thread: records go to `sink`, and every pass the
    /// outbox gets a chance to seal a batch that has waited long enough.
    public func start(into outbox: Outbox) {
        let thread = Thread { [self] in
            self.pollLoop(outbox)
            self.finished.signal()
        }
        thread.name = "tapio-ringbuf"
        thread.start()
    }

    /// Stops polling after draining what the ring buffer holds.
    public func stop() {
        stopFlag.store(true, ordering: .relaxed)
        finished.wait()
    }

    /// The reader's state during its passes.
    fileprivate final class PollContext {
        let source: KernelSource
        let outbox: Outbox
        /// Events converted and not yet handed to the outbox, each counted
        /// as read already. Handed over as one group (one lock, and kept as
        /// it is: its events are not copied again) when it holds a batch's
        /// worth, at a critical event, when stopping, or after a pass once
        /// its first event has waited `holdNs`.
        var converted: [TapioEvent] = []
        /// A batch's worth (the outbox's events per batch, read again at every hand-over).
        var group: Int
        /// When the first event of `converted` was added (monotonic).
        var heldSinceNs: Int64 = 0
        let holdNs: Int64

        init(source: KernelSource, outbox: Outbox) {
            self.source = source
            self.outbox = outbox
            group = max(1, outbox.eventsPerBatch)
            // A quarter of the batch delay: a quiet node's events still
            // reach a batch about as soon as before.
            holdNs = max(0, outbox.limits.maxDelayNs / 4)
            converted.reserveCapacity(group)
        }

        /// Whether `converted` holds a critical event.
        var critical = false

        func handOver() {
            guard !converted.isEmpty else { return }
            outbox.add(contentsOf: &converted, critical: critical)
            critical = false
            group = max(1, outbox.eventsPerBatch)
            converted.reserveCapacity(group)
        }

        /// After a step of a pass: hands over a group held long enough (all when stopping).
        func handOverIfDue(stopping: Bool, nowNs: Int64) {
            if stopping || nowNs - heldSinceNs >= holdNs { handOver() }
        }
    }

    private func pollLoop(_ outbox: Outbox) {
        let context = PollContext(source: self, outbox: outbox)
        let opaque = Unmanaged.passUnretained(context).toOpaque()
        var lastResampleNs: Int64 = 0
        var lastDropsNs: Int64 = 0
        var lastHarvestNs: Int64 = 0
        _ = cgroups.scan(nowNs: configuration.clock.now())
        while true {
            let stopping = stopFlag.load(ordering: .relaxed)
            let now = monotonicNs()
            if now - lastResampleNs > 1_000_000_000 {
                clock.resample()
                lastResampleNs = now
            }
            // One wait over every ring, then every ring drained: a busy ring
            // wakes the reader past its fill mark; a quiet one is read at
            // the latest after readIntervalMs.
            let rc = tapio_rings_poll(rings, stopping ? 0 : configuration.readIntervalMs, kernelEventCallback, opaque)
            if rc < 0 {
                logger.error("ring buffer read failed", metadata: ["errno": "\(-rc)"])
                Thread.sleep(forTimeInterval: 0.1)
            }
            // Each object's periodic work: harvests and scans when due.
            for object in objects {
                let orc = object.service(context: opaque, onRecord: kernelEventCallback, onAggregate: aggregateCallback,
                                         stopping: stopping, nowNs: now)
                if orc < 0 { logger.error("kernel object failed", metadata: ["object": "\(object.name)", "errno": "\(-orc)"]) }
            }
            context.handOverIfDue(stopping: stopping, nowNs: monotonicNs())
            if now - lastHarvestNs >= configuration.intervalNs || stopping {
                harvest(into: context)
                lastHarvestNs = now
            }
            if now - lastDropsNs > 1_000_000_000 || stopping {
                outbox.setKernelDrops(drops())
                lastDropsNs = now
            }
            outbox.sealIfDue(nowNs: configuration.clock.now())
            if stopping { break }
        }
        withExtendedLifetime(context) {}
    }

    /// The cgroup counters (not BPF) and the network-namespace filter.
    private func harvest(into context: PollContext) {
        if let net, configuration.cgroupRoot != nil { allowNetworkNamespaces(net) }
        for var event in cgroups.scan(nowNs: configuration.clock.now()) where !configuration.disabledKinds.contains(event.kind) {
            enrich(&event, 0)
            eventCount.add(1, ordering: .relaxed)
            context.outbox.add(event)
        }
    }

    /// Lets the net programs report the network namespaces that processes of
    /// the watched subtree live in (read from cgroup.procs and /proc/PID/ns/net).
    private func allowNetworkNamespaces(_ net: NetObject) {
        guard let root = configuration.cgroupRoot else { return }
        var dirs = [root]
        var visited = 0
        while let dir = dirs.popLast(), visited < 4000 {
            visited += 1
            if let procs = ProcFile.text(dir + "/cgroup.procs") {
                for line in procs.split(separator: "\n") {
                    var st = stat()
                    guard stat("/proc/\(line)/ns/net", &st) == 0 else { continue }
                    let inum = UInt32(truncatingIfNeeded: st.st_ino)
                    net.allow(netns: inum)
                }
            }
            if let children = try? FileManager.default.contentsOfDirectory(atPath: dir) {
                for c in children {
                    var isDir: ObjCBool = false
                    if FileManager.default.fileExists(atPath: dir + "/" + c, isDirectory: &isDir), isDir.boolValue { dirs.append(dir + "/" + c) }
                }
            }
        }
    }

    /// A harvested aggregate (tapio_aggregate.h), whichever object folded it.
    fileprivate func convert(aggregate a: UnsafePointer<tapio_aggregate>) -> TapioEvent? {
        guard let kind = EventKind(rawValue: a.pointee.kind) else { return nil }
        let interval = a.pointee.interval_end_ns >= a.pointee.interval_start_ns ? a.pointee.interval_end_ns - a.pointee.interval_start_ns : 0
        let count = UInt32(clamping: a.pointee.count)
        let time = clock.wall(fromMonotonic: Int64(bitPattern: a.pointee.first_ts_ns))
        var event: TapioEvent
        switch kind {
        case .tcpRetransmit, .tcpLatency, .packetDrop:
            let r = a.pointee
            let flow = Flow(source: IPAddress(family: r.family, raw: withUnsafeBytes(of: r.saddr) { Array($0) }),
                            destination: IPAddress(family: r.family, raw: withUnsafeBytes(of: r.daddr) { Array($0) }),
                            sourcePort: r.sport, destinationPort: r.dport)
            let detail: TapioEvent.Detail
            switch kind {
            case .tcpRetransmit:
                detail = .tcpRetransmit(flow: flow, count: count, intervalNs: interval)
            case .tcpLatency:
                detail = .tcpLatency(flow: flow, srttUs: UInt32(clamping: r.srtt_us), responses: UInt32(clamping: r.responses),
                                     responseNsTotal: r.response_ns_total, responseNsMax: r.response_ns_max, intervalNs: interval)
            default:
                let reason = cString(a, offset: MemoryLayout<tapio_aggregate>.offset(of: \.drop_reason_name)!, size: 64)
                detail = .packetDrop(reason: reason, count: count, flow: flow, ipProtocol: UInt32(r.protocol), ifindex: 0, intervalNs: interval)
            }
            event = TapioEvent(kind: kind, timeNs: time, cgroupId: r.cgroup_id, netns: r.netns, detail: detail)
        case .ioError:
            let comm = cString(a, offset: MemoryLayout<tapio_aggregate>.offset(of: \.comm)!, size: Int(TAPIO_COMM_LEN))
            let syscall = a.pointee.syscall.map { String(cString: $0) } ?? ""
            event = TapioEvent(kind: .ioError, timeNs: time, pid: a.pointee.pid, uid: a.pointee.uid, comm: comm, cgroupId: a.pointee.cgroup_id,
                               detail: .ioError(error: a.pointee.error, syscall: syscall, count: count, intervalNs: interval))
        default:
            return nil
        }
        if isOwn(event) { return nil }
        eventCount.add(1, ordering: .relaxed)
        enrich(&event, 0)
        return event
    }

    /// A ring-buffer record as an event. Reads the record in place (the
    /// header's fields and only the kind's part of the union), never the
    /// whole 320-byte record as one value: at ring-buffer rate that copy
    /// was a tenth of the reader's time.
    fileprivate func convert(_ record: UnsafePointer<tapio_event>) -> TapioEvent? {
        guard let kind = EventKind(rawValue: record.pointee.kind) else { return nil }
        let union = UnsafeRawPointer(record) + unionOffset
        var detail = TapioEvent.Detail.none
        var netns: UInt32 = 0
        switch kind {
        case .processExec:
            detail = .exec(filename: cString(record, offset: unionOffset, size: Int(TAPIO_PATH_LEN)))
        case .processExit:
            let x = union.load(as: tapio_exit_info.self)
            detail = .exit(exitCode: x.exit_code, signal: x.signal, coreDumped: x.core_dumped != 0)
        case .tcpConnect, .tcpListen, .tcpReset:
            let t = union.load(as: tapio_tcp_info.self)
            netns = t.netns
            let flow = Flow(source: IPAddress(family: t.family, raw: withUnsafeBytes(of: t.saddr) { Array($0) }),
                            destination: IPAddress(family: t.family, raw: withUnsafeBytes(of: t.daddr) { Array($0) }),
                            sourcePort: t.sport, destinationPort: t.dport)
            switch UInt32(t.op) {
            case TAPIO_TCP_CONNECT.rawValue:
                detail = .tcpConnect(flow: flow, outcome: ConnectOutcome(rawValue: UInt32(t.outcome)) ?? .error, latencyNs: t.latency_ns,
                                     error: t.error, count: max(1, t.count))
            case TAPIO_TCP_LISTEN.rawValue:
                detail = .tcpListen(address: flow.source, port: t.sport, open: t.state == 1)
            default:
                detail = .tcpReset(flow: flow, sent: t.direction == 1, state: UInt32(t.state), count: max(1, t.count))
            }
        case .dns:
            let d = union.load(as: tapio_dns_info.self)
            netns = d.netns
            var answers: [IPAddress] = []
            let families = withUnsafeBytes(of: d.answer_families) { Array($0) }
            let raw = withUnsafeBytes(of: d.answers) { Array($0) }
            for i in 0..<4 where families[i] != 0 {
                if let a = IPAddress(family: UInt16(families[i]), raw: Array(raw[(i * 16)..<(i * 16 + 16)])) { answers.append(a) }
            }
            let nameOffset = unionOffset + MemoryLayout<tapio_dns_info>.offset(of: \.name)!
            detail = .dns(name: cString(record, offset: nameOffset, size: Int(TAPIO_DNS_NAME_LEN)), qtype: UInt32(d.qtype), rcode: d.rcode,
                          latencyNs: d.latency_ns, server: IPAddress(family: d.family, raw: withUnsafeBytes(of: d.server) { Array($0) }),
                          serverPort: d.server_port, id: d.id, answers: answers)
        case .oomKill:
            let o = union.load(as: tapio_oom_info.self)
            detail = .oomKill(victimPid: o.victim_pid, victimComm: cString(record, offset: unionOffset + MemoryLayout<tapio_oom_info>.offset(of: \.victim_comm)!, size: Int(TAPIO_COMM_LEN)), victimUid: o.victim_uid,
                              totalVmKb: o.total_vm_kb, anonRssKb: o.anon_rss_kb, fileRssKb: o.file_rss_kb)
        default:
            break
        }
        var event = TapioEvent(kind: kind, timeNs: clock.wall(fromMonotonic: Int64(bitPattern: record.pointee.ts_ns)), pid: record.pointee.pid,
                               ppid: record.pointee.ppid, uid: record.pointee.uid, comm: comms.comm(of: record), cgroupId: record.pointee.cgroup_id,
                               netns: netns, detail: detail)
        if isOwn(event) { return nil }
        eventCount.add(1, ordering: .relaxed)
        enrich(&event, record.pointee.mem_cgroup_id)
        return event
    }
}

/// The reader's recent comms: a record's 16 comm bytes, compared as two
/// words, give back the String made for the same bytes before, instead of
/// a new one validated byte by byte (most records come from few processes).
/// Direct-mapped; used by the ring-buffer reader's thread only.
struct CommMemo {
    private static let slots = 64
    private var keys = [(UInt64, UInt64)](repeating: (0, 0), count: CommMemo.slots)
    private var values = [String?](repeating: nil, count: CommMemo.slots)

    mutating func comm(of record: UnsafePointer<tapio_event>) -> String {
        let raw = UnsafeRawPointer(record) + commOffset
        let key = (raw.loadUnaligned(as: UInt64.self), raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let slot = Int(truncatingIfNeeded: ((key.0 ^ (key.1 &* 31)) &* 0x9E37_79B9_7F4A_7C15) >> 58)
        if let known = values[slot], keys[slot] == key { return known }
        let made = cString(record, offset: commOffset, size: Int(TAPIO_COMM_LEN))
        keys[slot] = key
        values[slot] = made
        return made
    }
}

private let commOffset = MemoryLayout<tapio_event>.offset(of: \tapio_event.comm)!

/// Where the per-kind union starts; union members all start there (Swift
/// imports them as computed properties, which have no key-path offset).
private let unionOffset = MemoryLayout<tapio_event>.offset(of: \tapio_event.u)!

/// A fixed-size C char array inside the record, up to its first NUL.
private func cString<Record>(_ record: UnsafePointer<Record>, offset: Int, size: Int) -> String {
    let bytes = UnsafeRawPointer(record).advanced(by: offset).assumingMemoryBound(to: UInt8.self)
    let buffer = UnsafeBufferPointer(start: bytes, count: size)
    let end = buffer.firstIndex(of: 0) ?? size
    return String(decoding: buffer[0..<end], as: UTF8.self)
}

/// Every harvested aggregate, from any object.
private func aggregateCallback(_ ctx: UnsafeMutableRawPointer?, _ aggregate: UnsafePointer<tapio_aggregate>?) -> Int32 {
    guard let ctx, let aggregate else { return 0 }
    Unmanaged<KernelSource.PollContext>.fromOpaque(ctx).takeUnretainedValue().deliver(aggregate: aggregate)
    return 0
}

/// Every ring buffer record. The context is always the reader's PollContext
/// (no dynamic cast per record: this runs at ring-buffer rate).
private func kernelEventCallback(_ ctx: UnsafeMutableRawPointer?, _ record: UnsafePointer<tapio_event>?) -> Int32 {
    guard let ctx, let record else { return 0 }
    Unmanaged<KernelSource.PollContext>.fromOpaque(ctx).takeUnretainedValue().deliver(record)
    return 0
}

extension KernelSource.PollContext {
    /// Counted as read before the callback returns, that is before the ring
    /// buffer lets go of the record: a kill at any point after finds it in
    /// the crash counters.
    func deliver(_ record: UnsafePointer<tapio_event>) {
        guard let event = source.convert(record) else { return }
        keep(event)
    }

    func deliver(aggregate: UnsafePointer<tapio_aggregate>) {
        guard let event = source.convert(aggregate: aggregate) else { return }
        keep(event)
    }

    private func keep(_ event: consuming TapioEvent) {
        outbox.countRead(event.kind)
        let isCritical = event.isCritical
        if converted.isEmpty { heldSinceNs = monotonicNs() }
        converted.append(event)
        critical = critical || isCritical
        if isCritical || converted.count >= group { handOver() }
    }
}

/// Converts CLOCK_MONOTONIC (bpf_ktime_get_ns) to wall time with an offset
/// re-sampled every second, so a stepped or slewed wall clock is followed.
struct MonotonicToWall {
    private var offsetNs: Int64 = 0
    /// Added on top: the agent clock's deliberate skew (lab only).
    private let skewNs: Int64

    init(offsetNs skew: Int64 = 0) {
        skewNs = skew
        resample()
    }

    mutating func resample() {
        var mono: Int64 = 0
        var real: Int64 = 0
        tapio_bpf_clock_pair(&mono, &real)
        offsetNs = real - mono + skewNs
    }

    func wall(fromMonotonic ns: Int64) -> Int64 { ns + offsetNs }
}

/// The agent's wall clock. `offsetNs` is zero in production; the fault lab
/// sets it to make a node's clock wrong on purpose, so that the server's
/// clock estimation can be seen to put events back in their true order.
public struct AgentClock: Sendable {
    public var offsetNs: Int64

    public init(offsetNs: Int64 = 0) {
        self.offsetNs = offsetNs
    }

    public func now() -> Int64 { wallClockNs() + offsetNs }
}
