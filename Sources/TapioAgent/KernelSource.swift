import CTapioBPF
import Foundation
import Logging
import Synchronization
import TapioWire

public struct KernelSourceError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The BPF programs of bpf/, loaded with libbpf, and the thread that drains
/// their ring buffer into the outbox.
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
        public var disabledKinds: Set<EventKind> = []
        public var ringBufferBytes: UInt32 = 0

        public init(cgroupRoot: String? = nil) {
            self.cgroupRoot = cgroupRoot
        }
    }

    private let bpf: OpaquePointer
    public let programs: [Program]
    private let stopFlag = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    private var clock = MonotonicToWall()
    private let logger: Logger
    private let eventCount = Atomic<UInt64>(0)

    public init(configuration: Configuration, logger: Logger) throws {
        self.logger = logger
        var config = tapio_bpf_config()
        if let root = configuration.cgroupRoot {
            var id: UInt64 = 0
            var level: UInt32 = 0
            let rc = tapio_bpf_cgroup_id(root, &id, &level)
            guard rc == 0 else { throw KernelSourceError("--cgroup-root \(root): not a cgroup2 directory (\(String(cString: strerror(-rc))))") }
            config.cgroup_root_id = id
            config.cgroup_root_level = level
        }
        for kind in configuration.disabledKinds { config.kinds_disabled_mask |= 1 << kind.rawValue }
        config.ringbuf_bytes = configuration.ringBufferBytes
        let tracefs = tapio_bpf_ensure_tracefs()
        if tracefs != 0 {
            logger.warning("tracefs is not available; tracepoint programs may fail to attach", metadata: ["errno": "\(-tracefs)"])
        }
        var err = [CChar](repeating: 0, count: 1024)
        guard let handle = tapio_bpf_open(&config, &err, err.count) else {
            throw KernelSourceError("loading BPF programs failed: \(String(cString: err))")
        }
        bpf = handle
        var programs: [Program] = []
        for i in 0..<tapio_bpf_program_count(handle) {
            programs.append(Program(
                name: String(cString: tapio_bpf_program_name(handle, i)),
                capability: String(cString: tapio_bpf_program_capability(handle, i)),
                attached: tapio_bpf_program_attached(handle, i) == 1,
                error: String(cString: tapio_bpf_program_error(handle, i))))
        }
        self.programs = programs
    }

    deinit {
        tapio_bpf_close(bpf)
    }

    public var capabilities: [String] { programs.filter(\.attached).map(\.capability) }
    public var degraded: [String] { programs.filter { !$0.attached }.map { "\($0.capability): \($0.error)" } }
    public var eventsRead: UInt64 { eventCount.load(ordering: .relaxed) }

    /// The kernel's cumulative drop counters.
    public func drops() -> [DropCount] {
        let slots = Int(TAPIO_KIND_MAX.rawValue) * Int(TAPIO_DROP_REASON_MAX.rawValue)
        var counts = [UInt64](repeating: 0, count: slots)
        guard tapio_bpf_read_drops(bpf, &counts, slots) == 0 else { return [] }
        var out: [DropCount] = []
        for kindIndex in 0..<Int(TAPIO_KIND_MAX.rawValue) {
            guard let kind = EventKind(rawValue: UInt32(kindIndex)) else { continue }
            for (reason, name) in [(TAPIO_DROP_RINGBUF_FULL, "ringbuf_full"), (TAPIO_DROP_RATE_LIMITED, "rate_limited")] {
                let c = counts[kindIndex * Int(TAPIO_DROP_REASON_MAX.rawValue) + Int(reason.rawValue)]
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

    fileprivate final class PollContext {
        let source: KernelSource
        let outbox: Outbox
        init(source: KernelSource, outbox: Outbox) {
            self.source = source
            self.outbox = outbox
        }
    }

    private func pollLoop(_ outbox: Outbox) {
        let context = PollContext(source: self, outbox: outbox)
        let opaque = Unmanaged.passUnretained(context).toOpaque()
        var lastResampleNs: Int64 = 0
        var lastDropsNs: Int64 = 0
        while true {
            let stopping = stopFlag.load(ordering: .relaxed)
            let now = monotonicNs()
            if now - lastResampleNs > 1_000_000_000 {
                clock.resample()
                lastResampleNs = now
            }
            let rc = stopping
                ? tapio_bpf_consume(bpf, kernelEventCallback, opaque)
                : tapio_bpf_poll(bpf, 100, kernelEventCallback, opaque)
            if rc < 0, rc != -EINTR {
                logger.error("ring buffer poll failed", metadata: ["errno": "\(-rc)"])
                Thread.sleep(forTimeInterval: 0.1)
            }
            if now - lastDropsNs > 1_000_000_000 || stopping {
                outbox.setKernelDrops(drops())
                lastDropsNs = now
            }
            outbox.sealIfDue(nowNs: wallClockNs())
            if stopping { break }
        }
        withExtendedLifetime(context) {}
    }

    fileprivate func convert(_ record: UnsafePointer<tapio_event>) -> TapioEvent? {
        let r = record.pointee
        guard let kind = EventKind(rawValue: r.kind) else { return nil }
        var detail = TapioEvent.Detail.none
        switch kind {
        case .processExec:
            detail = .exec(filename: cString(record, offset: unionOffset, size: Int(TAPIO_PATH_LEN)))
        case .processExit:
            detail = .exit(exitCode: r.u.exit.exit_code, signal: r.u.exit.signal, coreDumped: r.u.exit.core_dumped != 0)
        case .oomKill:
            let o = r.u.oom
            detail = .oomKill(victimPid: o.victim_pid, victimComm: cString(record, offset: unionOffset + MemoryLayout<tapio_oom_info>.offset(of: \.victim_comm)!, size: Int(TAPIO_COMM_LEN)), victimUid: o.victim_uid,
                              totalVmKb: o.total_vm_kb, anonRssKb: o.anon_rss_kb, fileRssKb: o.file_rss_kb)
        default:
            break
        }
        eventCount.add(1, ordering: .relaxed)
        return TapioEvent(kind: kind, timeNs: clock.wall(fromMonotonic: Int64(bitPattern: r.ts_ns)), pid: r.pid, ppid: r.ppid, uid: r.uid,
                          comm: cString(record, offset: MemoryLayout<tapio_event>.offset(of: \.comm)!, size: Int(TAPIO_COMM_LEN)), cgroupId: r.cgroup_id, detail: detail)
    }
}

/// Where the per-kind union starts; union members all start there (Swift
/// imports them as computed properties, which have no key-path offset).
private let unionOffset = MemoryLayout<tapio_event>.offset(of: \tapio_event.u)!

/// A fixed-size C char array inside the record, up to its first NUL.
private func cString(_ record: UnsafePointer<tapio_event>, offset: Int, size: Int) -> String {
    let bytes = UnsafeRawPointer(record).advanced(by: offset).assumingMemoryBound(to: UInt8.self)
    let buffer = UnsafeBufferPointer(start: bytes, count: size)
    let end = buffer.firstIndex(of: 0) ?? size
    return String(decoding: buffer[0..<end], as: UTF8.self)
}

private func kernelEventCallback(_ ctx: UnsafeMutableRawPointer?, _ record: UnsafePointer<tapio_event>?) -> Int32 {
    guard let ctx, let record else { return 0 }
    let context = Unmanaged<AnyObject>.fromOpaque(ctx).takeUnretainedValue()
    guard let poll = context as? KernelSourcePollBridge else { return 0 }
    poll.deliver(record)
    return 0
}

/// Lets the C callback reach the poll context without generic gymnastics.
protocol KernelSourcePollBridge: AnyObject {
    func deliver(_ record: UnsafePointer<tapio_event>)
}

extension KernelSource.PollContext: KernelSourcePollBridge {
    func deliver(_ record: UnsafePointer<tapio_event>) {
        if let event = source.convert(record) { outbox.add(event) }
    }
}

/// Converts CLOCK_MONOTONIC (bpf_ktime_get_ns) to wall time with an offset
/// re-sampled every second, so a stepped or slewed wall clock is followed.
struct MonotonicToWall {
    private var offsetNs: Int64 = 0

    init() { resample() }

    mutating func resample() {
        var mono: Int64 = 0
        var real: Int64 = 0
        tapio_bpf_clock_pair(&mono, &real)
        offsetNs = real - mono
    }

    func wall(fromMonotonic ns: Int64) -> Int64 { ns + offsetNs }
}
