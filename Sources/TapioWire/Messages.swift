import CTapioProto
import Foundation

/// A payload that is not a valid message of the type its frame announced.
public struct MessageDecodeError: Error, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// C memory owned for the length of one pack call: protobuf-c wants
/// `char *` and arrays of pointers, Swift frees them together afterwards.
final class CArena {
    private var blocks: [UnsafeMutableRawPointer] = []

    func string(_ s: String) -> UnsafeMutablePointer<CChar> {
        let p = strdup(s)!
        blocks.append(UnsafeMutableRawPointer(p))
        return p
    }

    func allocate<T>(_ type: T.Type, count: Int) -> UnsafeMutablePointer<T> {
        let raw = calloc(max(count, 1), MemoryLayout<T>.stride)!
        blocks.append(raw)
        return raw.bindMemory(to: T.self, capacity: max(count, 1))
    }

    /// A protobuf `bytes` value pointing into arena memory.
    func bytes(_ b: [UInt8]) -> ProtobufCBinaryData {
        guard !b.isEmpty else { return ProtobufCBinaryData(len: 0, data: nil) }
        let p = allocate(UInt8.self, count: b.count)
        p.initialize(from: b, count: b.count)
        return ProtobufCBinaryData(len: b.count, data: p)
    }

    func flow(_ f: Flow) -> (ProtobufCBinaryData, ProtobufCBinaryData, UInt32, UInt32) {
        (bytes(f.source?.bytes ?? []), bytes(f.destination?.bytes ?? []), UInt32(f.sourcePort), UInt32(f.destinationPort))
    }

    deinit {
        for b in blocks { free(b) }
    }
}

@inline(__always)
private func swiftString(_ p: UnsafeMutablePointer<CChar>?) -> String {
    guard let p else { return "" }
    return String(cString: p)
}

/// Packs a protobuf-c message; `size` and `pack` are the generated functions.
private func packMessage<M>(_ message: inout M, size: (UnsafePointer<M>) -> Int, pack: (UnsafePointer<M>, UnsafeMutablePointer<UInt8>) -> Int) -> [UInt8] {
    withUnsafePointer(to: &message) { m in
        let n = size(m)
        return [UInt8](unsafeUninitializedCapacity: n) { buf, count in
            count = n == 0 ? 0 : pack(m, buf.baseAddress!)
        }
    }
}

/// Unpacks with the generated function; nil from protobuf-c means malformed.
private func unpackMessage<M, R>(_ bytes: [UInt8], name: String, unpack: (Int, UnsafePointer<UInt8>) -> UnsafeMutablePointer<M>?, free: (UnsafeMutablePointer<M>) -> Void, _ body: (M) throws -> R) throws -> R {
    let message: UnsafeMutablePointer<M>? = bytes.withUnsafeBufferPointer { buf in
        // protobuf-c needs a non-null pointer even for an empty message.
        var empty: UInt8 = 0
        if buf.count == 0 { return unpack(0, &empty) }
        return unpack(buf.count, buf.baseAddress!)
    }
    guard let message else { throw MessageDecodeError("malformed \(name) message (\(bytes.count) bytes)") }
    defer { free(message) }
    return try body(message.pointee)
}

// MARK: - Hello / HelloAck

public struct Hello: Sendable, Equatable {
    /// 2: an `Ack` names exactly one durable batch and `HelloAck.ackedSequence`
    /// is the contiguous durable prefix. Version 1 acknowledged cumulatively,
    /// which lost batches behind a gap (docs/protocol.md).
    public static let currentProtocolVersion: UInt32 = 2

    public var node: String
    public var agentVersion: String
    public var bootId: String
    public var capabilities: [String]
    public var degraded: [String]
    public var streamEpoch: UInt64
    public var protocolVersion: UInt32

    public init(node: String, agentVersion: String, bootId: String, capabilities: [String], degraded: [String] = [], streamEpoch: UInt64, protocolVersion: UInt32 = Hello.currentProtocolVersion) {
        self.node = node
        self.agentVersion = agentVersion
        self.bootId = bootId
        self.capabilities = capabilities
        self.degraded = degraded
        self.streamEpoch = streamEpoch
        self.protocolVersion = protocolVersion
    }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__Hello()
        tapio__v1__hello__init(&m)
        m.node = arena.string(node)
        m.agent_version = arena.string(agentVersion)
        m.boot_id = arena.string(bootId)
        m.n_capabilities = capabilities.count
        let caps = arena.allocate(UnsafeMutablePointer<CChar>?.self, count: capabilities.count)
        for (i, c) in capabilities.enumerated() { caps[i] = arena.string(c) }
        m.capabilities = caps
        m.n_degraded = degraded.count
        let degr = arena.allocate(UnsafeMutablePointer<CChar>?.self, count: degraded.count)
        for (i, c) in degraded.enumerated() { degr[i] = arena.string(c) }
        m.degraded = degr
        m.stream_epoch = streamEpoch
        m.protocol_version = protocolVersion
        return packMessage(&m, size: { tapio__v1__hello__get_packed_size($0) }, pack: { tapio__v1__hello__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> Hello {
        try unpackMessage(bytes, name: "Hello", unpack: { tapio__v1__hello__unpack(nil, $0, $1) }, free: { tapio__v1__hello__free_unpacked($0, nil) }) { m in
            Hello(
                node: swiftString(m.node), agentVersion: swiftString(m.agent_version), bootId: swiftString(m.boot_id),
                capabilities: (0..<m.n_capabilities).map { swiftString(m.capabilities[$0]) },
                degraded: (0..<m.n_degraded).map { swiftString(m.degraded[$0]) },
                streamEpoch: m.stream_epoch, protocolVersion: m.protocol_version)
        }
    }
}

public struct HelloAck: Sendable, Equatable {
    public var maxFrameBytes: UInt32
    public var windowBatches: UInt32
    /// Every batch of the hello's epoch from sequence 1 to this one is durable.
    public var ackedSequence: UInt64
    public var serverVersion: String
    /// The most events one batch may hold; 0 when the server announced none.
    public var maxBatchEvents: UInt32

    public init(maxFrameBytes: UInt32, windowBatches: UInt32, ackedSequence: UInt64, serverVersion: String, maxBatchEvents: UInt32 = 0) {
        self.maxFrameBytes = maxFrameBytes
        self.windowBatches = windowBatches
        self.ackedSequence = ackedSequence
        self.serverVersion = serverVersion
        self.maxBatchEvents = maxBatchEvents
    }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__HelloAck()
        tapio__v1__hello_ack__init(&m)
        m.max_frame_bytes = maxFrameBytes
        m.window_batches = windowBatches
        m.acked_sequence = ackedSequence
        m.server_version = arena.string(serverVersion)
        m.max_batch_events = maxBatchEvents
        return packMessage(&m, size: { tapio__v1__hello_ack__get_packed_size($0) }, pack: { tapio__v1__hello_ack__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> HelloAck {
        try unpackMessage(bytes, name: "HelloAck", unpack: { tapio__v1__hello_ack__unpack(nil, $0, $1) }, free: { tapio__v1__hello_ack__free_unpacked($0, nil) }) { m in
            HelloAck(maxFrameBytes: m.max_frame_bytes, windowBatches: m.window_batches, ackedSequence: m.acked_sequence, serverVersion: swiftString(m.server_version),
                     maxBatchEvents: m.max_batch_events)
        }
    }
}

// MARK: - EventBatch

public struct EventBatch: Sendable, Equatable {
    public var node: String
    public var epoch: UInt64
    public var sequence: UInt64
    public var events: [TapioEvent]
    public var drops: [DropCount]

    public init(node: String, epoch: UInt64, sequence: UInt64, events: [TapioEvent], drops: [DropCount] = []) {
        self.node = node
        self.epoch = epoch
        self.sequence = sequence
        self.events = events
        self.drops = drops
    }

    /// Encodes with a per-batch string table and delta-encoded times: the
    /// first event's delta is from `base_time_ns` (the first event's time),
    /// later ones from the event before.
    public func encoded() -> [UInt8] {
        let arena = CArena()
        var table: [String: UInt32] = [:]
        var strings: [String] = []
        func ref(_ s: String) -> UInt32 {
            if s.isEmpty { return 0 }
            if let r = table[s] { return r }
            strings.append(s)
            let r = UInt32(strings.count)
            table[s] = r
            return r
        }

        let n = events.count
        let cEvents = arena.allocate(Tapio__V1__Event.self, count: n)
        let cEventPtrs = arena.allocate(UnsafeMutablePointer<Tapio__V1__Event>?.self, count: n)
        let execs = arena.allocate(Tapio__V1__ProcessExec.self, count: n)
        let exits = arena.allocate(Tapio__V1__ProcessExit.self, count: n)
        let ooms = arena.allocate(Tapio__V1__OomKill.self, count: n)
        let base = events.first?.timeNs ?? 0
        var previous = base
        for (i, e) in events.enumerated() {
            let ce = cEvents + i
            tapio__v1__event__init(ce)
            ce.pointee.kind = Tapio__V1__EventKind(rawValue: e.kind.rawValue)
            ce.pointee.time_delta_ns = e.timeNs &- previous
            previous = e.timeNs
            ce.pointee.pid = e.pid
            ce.pointee.ppid = e.ppid
            ce.pointee.uid = e.uid
            ce.pointee.comm = ref(e.comm)
            ce.pointee.cgroup_id = e.cgroupId
            ce.pointee.netns = e.netns
            ce.pointee.container_id = ref(e.containerId)
            ce.pointee.pod = ref(e.pod)
            ce.pointee.namespace_ = ref(e.namespace)
            switch e.detail {
            case .none:
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL__NOT_SET
            case .exec(let filename):
                tapio__v1__process_exec__init(execs + i)
                execs[i].filename = ref(filename)
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_EXEC
                ce.pointee.exec = execs + i
            case .exit(let code, let signal, let core):
                tapio__v1__process_exit__init(exits + i)
                exits[i].exit_code = code
                exits[i].signal = signal
                exits[i].core_dumped = core ? 1 : 0
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_EXIT
                ce.pointee.exit = exits + i
            case .oomKill(let victimPid, let victimComm, let victimUid, let totalVm, let anonRss, let fileRss):
                tapio__v1__oom_kill__init(ooms + i)
                ooms[i].victim_pid = victimPid
                ooms[i].victim_comm = ref(victimComm)
                ooms[i].victim_uid = victimUid
                ooms[i].total_vm_kb = totalVm
                ooms[i].anon_rss_kb = anonRss
                ooms[i].file_rss_kb = fileRss
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_OOM_KILL
                ce.pointee.oom_kill = ooms + i
            case .tcpConnect(let flow, let outcome, let latencyNs, let error, let count):
                let d = arena.allocate(Tapio__V1__TcpConnect.self, count: 1)
                tapio__v1__tcp_connect__init(d)
                (d.pointee.saddr, d.pointee.daddr, d.pointee.sport, d.pointee.dport) = arena.flow(flow)
                d.pointee.outcome = Tapio__V1__ConnectOutcome(rawValue: outcome.rawValue)
                d.pointee.latency_ns = latencyNs
                d.pointee.error = error
                d.pointee.count = count
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_TCP_CONNECT
                ce.pointee.tcp_connect = d
            case .tcpListen(let address, let port, let open):
                let d = arena.allocate(Tapio__V1__TcpListen.self, count: 1)
                tapio__v1__tcp_listen__init(d)
                d.pointee.addr = arena.bytes(address?.bytes ?? [])
                d.pointee.port = UInt32(port)
                d.pointee.open = open ? 1 : 0
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_TCP_LISTEN
                ce.pointee.tcp_listen = d
            case .tcpReset(let flow, let sent, let state, let count):
                let d = arena.allocate(Tapio__V1__TcpReset.self, count: 1)
                tapio__v1__tcp_reset__init(d)
                (d.pointee.saddr, d.pointee.daddr, d.pointee.sport, d.pointee.dport) = arena.flow(flow)
                d.pointee.sent = sent ? 1 : 0
                d.pointee.state = state
                d.pointee.count = count
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_TCP_RESET
                ce.pointee.tcp_reset = d
            case .tcpRetransmit(let flow, let count, let intervalNs):
                let d = arena.allocate(Tapio__V1__TcpRetransmit.self, count: 1)
                tapio__v1__tcp_retransmit__init(d)
                (d.pointee.saddr, d.pointee.daddr, d.pointee.sport, d.pointee.dport) = arena.flow(flow)
                d.pointee.count = count
                d.pointee.interval_ns = intervalNs
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_TCP_RETRANSMIT
                ce.pointee.tcp_retransmit = d
            case .tcpLatency(let flow, let srttUs, let responses, let total, let maxNs, let intervalNs):
                let d = arena.allocate(Tapio__V1__TcpLatency.self, count: 1)
                tapio__v1__tcp_latency__init(d)
                (d.pointee.saddr, d.pointee.daddr, d.pointee.sport, d.pointee.dport) = arena.flow(flow)
                d.pointee.srtt_us = srttUs
                d.pointee.responses = responses
                d.pointee.response_ns_total = total
                d.pointee.response_ns_max = maxNs
                d.pointee.interval_ns = intervalNs
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_TCP_LATENCY
                ce.pointee.tcp_latency = d
            case .packetDrop(let reason, let count, let flow, let proto, let ifindex, let intervalNs):
                let d = arena.allocate(Tapio__V1__PacketDrop.self, count: 1)
                tapio__v1__packet_drop__init(d)
                d.pointee.reason = ref(reason)
                d.pointee.count = count
                (d.pointee.saddr, d.pointee.daddr, d.pointee.sport, d.pointee.dport) = arena.flow(flow)
                d.pointee.protocol = proto
                d.pointee.ifindex = ifindex
                d.pointee.interval_ns = intervalNs
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_PACKET_DROP
                ce.pointee.packet_drop = d
            case .dns(let name, let qtype, let rcode, let latencyNs, let server, let serverPort, let id, let answers):
                let d = arena.allocate(Tapio__V1__Dns.self, count: 1)
                tapio__v1__dns__init(d)
                d.pointee.name = ref(name)
                d.pointee.qtype = qtype
                d.pointee.rcode = rcode
                d.pointee.latency_ns = latencyNs
                d.pointee.server = arena.bytes(server?.bytes ?? [])
                d.pointee.server_port = UInt32(serverPort)
                d.pointee.id = UInt32(id)
                let list = arena.allocate(ProtobufCBinaryData.self, count: answers.count)
                for (j, a) in answers.enumerated() { list[j] = arena.bytes(a.bytes) }
                d.pointee.n_answers = answers.count
                d.pointee.answers = list
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_DNS
                ce.pointee.dns = d
            case .cpuThrottle(let periods, let throttledPeriods, let throttledNs, let intervalNs, let cgroup, let usage):
                let d = arena.allocate(Tapio__V1__CpuThrottle.self, count: 1)
                tapio__v1__cpu_throttle__init(d)
                d.pointee.periods = periods
                d.pointee.throttled_periods = throttledPeriods
                d.pointee.throttled_ns = throttledNs
                d.pointee.interval_ns = intervalNs
                d.pointee.cgroup = ref(cgroup)
                func pressure(_ p: CPUPressure?) -> UnsafeMutablePointer<Tapio__V1__CpuPressure>? {
                    guard let p else { return nil }
                    let c = arena.allocate(Tapio__V1__CpuPressure.self, count: 1)
                    tapio__v1__cpu_pressure__init(c)
                    c.pointee.some_avg10_permille = p.someAvg10Permille
                    c.pointee.some_stall_ns = p.someStallNs
                    return c
                }
                if let usage {
                    let u = arena.allocate(Tapio__V1__CpuUsage.self, count: 1)
                    tapio__v1__cpu_usage__init(u)
                    u.pointee.usage_ns = usage.usageNs
                    u.pointee.pressure = pressure(usage.pressure)
                    if let node = usage.node {
                        let n = arena.allocate(Tapio__V1__NodeCpu.self, count: 1)
                        tapio__v1__node_cpu__init(n)
                        n.pointee.cpus = node.cpus
                        n.pointee.runnable = node.runnable
                        n.pointee.pressure = pressure(node.pressure)
                        u.pointee.node = n
                    }
                    d.pointee.usage = u
                }
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_CPU_THROTTLE
                ce.pointee.cpu_throttle = d
            case .memoryPressure(let source, let count, let usage, let limit, let psi, let intervalNs, let cgroup):
                let d = arena.allocate(Tapio__V1__MemoryPressure.self, count: 1)
                tapio__v1__memory_pressure__init(d)
                d.pointee.source = ref(source)
                d.pointee.count = count
                d.pointee.usage_bytes = usage
                d.pointee.limit_bytes = limit
                d.pointee.psi_some_avg10_permille = psi
                d.pointee.interval_ns = intervalNs
                d.pointee.cgroup = ref(cgroup)
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_MEMORY_PRESSURE
                ce.pointee.memory_pressure = d
            case .ioError(let error, let syscall, let count, let intervalNs):
                let d = arena.allocate(Tapio__V1__IoError.self, count: 1)
                tapio__v1__io_error__init(d)
                d.pointee.error = error
                d.pointee.syscall = ref(syscall)
                d.pointee.count = count
                d.pointee.interval_ns = intervalNs
                ce.pointee.detail_case = TAPIO__V1__EVENT__DETAIL_IO_ERROR
                ce.pointee.io_error = d
            }
            cEventPtrs[i] = ce
        }

        let cDrops = arena.allocate(Tapio__V1__DropCount.self, count: drops.count)
        let cDropPtrs = arena.allocate(UnsafeMutablePointer<Tapio__V1__DropCount>?.self, count: drops.count)
        for (i, d) in drops.enumerated() {
            tapio__v1__drop_count__init(cDrops + i)
            cDrops[i].kind = Tapio__V1__EventKind(rawValue: d.kind.rawValue)
            cDrops[i].reason = arena.string(d.reason)
            cDrops[i].count = d.count
            cDropPtrs[i] = cDrops + i
        }

        var m = Tapio__V1__EventBatch()
        tapio__v1__event_batch__init(&m)
        m.node = arena.string(node)
        m.epoch = epoch
        m.sequence = sequence
        m.base_time_ns = base
        let cStrings = arena.allocate(UnsafeMutablePointer<CChar>?.self, count: strings.count)
        for (i, s) in strings.enumerated() { cStrings[i] = arena.string(s) }
        m.n_strings = strings.count
        m.strings = cStrings
        m.n_events = n
        m.events = cEventPtrs
        m.n_drops = drops.count
        m.drops = cDropPtrs
        return packMessage(&m, size: { tapio__v1__event_batch__get_packed_size($0) }, pack: { tapio__v1__event_batch__pack($0, $1) })
    }

    /// Counts the events of an encoded batch from its top-level fields alone,
    /// without allocating. Throws on a truncated or invalid top-level
    /// encoding. (`decode(_:maxEvents:)` counts in its own first pass.)
    public static func eventCount(encoded bytes: [UInt8]) throws -> Int {
        var i = 0
        var count = 0
        func varint() throws -> UInt64 {
            var value: UInt64 = 0
            var shift: UInt64 = 0
            while true {
                guard i < bytes.count, shift < 64 else { throw MessageDecodeError("truncated varint in EventBatch") }
                let b = bytes[i]
                i += 1
                value |= UInt64(b & 0x7f) << shift
                if b & 0x80 == 0 { return value }
                shift += 7
            }
        }
        while i < bytes.count {
            let key = try varint()
            let field = key >> 3
            switch key & 7 {
            case 0: _ = try varint()
            case 1: i += 8
            case 5: i += 4
            case 2:
                let n = try varint()
                guard n <= UInt64(bytes.count - i) else { throw MessageDecodeError("field \(field) longer than the EventBatch") }
                i += Int(n)
                if field == 6 { count += 1 }
            default: throw MessageDecodeError("wire type \(key & 7) in EventBatch")
            }
            guard i <= bytes.count else { throw MessageDecodeError("truncated EventBatch") }
        }
        return count
    }

    /// Decodes a batch after checking that it holds at most `maxEvents`
    /// events (counted in a first pass over its top-level fields, before any
    /// event is built).
    public static func decode(_ bytes: [UInt8], maxEvents: Int) throws -> EventBatch {
        try bytes.withUnsafeBytes { try decodeDirect($0, maxEvents: maxEvents) }
    }

    /// Decodes a batch straight from its bytes (`EventBatchDecoder.swift`).
    public static func decode(_ bytes: [UInt8]) throws -> EventBatch {
        try bytes.withUnsafeBytes { try decodeDirect($0, maxEvents: .max) }
    }

    /// The same through protobuf-c's unpack, as the server decoded batches
    /// before `decodeDirect`: the reference its tests compare it with.
    static func decodeWithProtobufC(_ bytes: [UInt8]) throws -> EventBatch {
        try unpackMessage(bytes, name: "EventBatch", unpack: { tapio__v1__event_batch__unpack(nil, $0, $1) }, free: { tapio__v1__event_batch__free_unpacked($0, nil) }) { m in
            let strings = (0..<m.n_strings).map { swiftString(m.strings[$0]) }
            func address(_ b: ProtobufCBinaryData) throws -> IPAddress? {
                if b.len == 0 { return nil }
                guard let a = IPAddress(bytes: UnsafeBufferPointer(start: b.data, count: b.len)) else {
                    throw MessageDecodeError("address of \(b.len) bytes")
                }
                return a
            }
            func port(_ p: UInt32) throws -> UInt16 {
                guard let v = UInt16(exactly: p) else { throw MessageDecodeError("port \(p) out of range") }
                return v
            }
            func flow(_ s: ProtobufCBinaryData, _ d: ProtobufCBinaryData, _ sp: UInt32, _ dp: UInt32) throws -> Flow {
                Flow(source: try address(s), destination: try address(d), sourcePort: try port(sp), destinationPort: try port(dp))
            }
            func lookup(_ r: UInt32) throws -> String {
                if r == 0 { return "" }
                guard Int(r) <= strings.count else { throw MessageDecodeError("string reference \(r) outside the table of \(strings.count)") }
                return strings[Int(r) - 1]
            }
            var events: [TapioEvent] = []
            events.reserveCapacity(m.n_events)
            var time = m.base_time_ns
            for i in 0..<m.n_events {
                guard let ce = m.events[i]?.pointee else { throw MessageDecodeError("null event") }
                guard let kind = EventKind(rawValue: ce.kind.rawValue) else { throw MessageDecodeError("unknown event kind \(ce.kind.rawValue)") }
                time = time &+ ce.time_delta_ns
                var detail = TapioEvent.Detail.none
                switch ce.detail_case {
                case TAPIO__V1__EVENT__DETAIL_EXEC:
                    detail = .exec(filename: try lookup(ce.exec.pointee.filename))
                case TAPIO__V1__EVENT__DETAIL_EXIT:
                    let x = ce.exit.pointee
                    detail = .exit(exitCode: x.exit_code, signal: x.signal, coreDumped: x.core_dumped != 0)
                case TAPIO__V1__EVENT__DETAIL_OOM_KILL:
                    let o = ce.oom_kill.pointee
                    detail = .oomKill(victimPid: o.victim_pid, victimComm: try lookup(o.victim_comm), victimUid: o.victim_uid, totalVmKb: o.total_vm_kb, anonRssKb: o.anon_rss_kb, fileRssKb: o.file_rss_kb)
                case TAPIO__V1__EVENT__DETAIL_TCP_CONNECT:
                    let d = ce.tcp_connect.pointee
                    guard let outcome = ConnectOutcome(rawValue: d.outcome.rawValue) else { throw MessageDecodeError("unknown connect outcome \(d.outcome.rawValue)") }
                    detail = .tcpConnect(flow: try flow(d.saddr, d.daddr, d.sport, d.dport), outcome: outcome, latencyNs: d.latency_ns, error: d.error, count: d.count)
                case TAPIO__V1__EVENT__DETAIL_TCP_LISTEN:
                    let d = ce.tcp_listen.pointee
                    detail = .tcpListen(address: try address(d.addr), port: try port(d.port), open: d.open != 0)
                case TAPIO__V1__EVENT__DETAIL_TCP_RESET:
                    let d = ce.tcp_reset.pointee
                    detail = .tcpReset(flow: try flow(d.saddr, d.daddr, d.sport, d.dport), sent: d.sent != 0, state: d.state, count: d.count)
                case TAPIO__V1__EVENT__DETAIL_TCP_RETRANSMIT:
                    let d = ce.tcp_retransmit.pointee
                    detail = .tcpRetransmit(flow: try flow(d.saddr, d.daddr, d.sport, d.dport), count: d.count, intervalNs: d.interval_ns)
                case TAPIO__V1__EVENT__DETAIL_TCP_LATENCY:
                    let d = ce.tcp_latency.pointee
                    detail = .tcpLatency(flow: try flow(d.saddr, d.daddr, d.sport, d.dport), srttUs: d.srtt_us, responses: d.responses,
                                         responseNsTotal: d.response_ns_total, responseNsMax: d.response_ns_max, intervalNs: d.interval_ns)
                case TAPIO__V1__EVENT__DETAIL_PACKET_DROP:
                    let d = ce.packet_drop.pointee
                    detail = .packetDrop(reason: try lookup(d.reason), count: d.count, flow: try flow(d.saddr, d.daddr, d.sport, d.dport),
                                         ipProtocol: d.protocol, ifindex: d.ifindex, intervalNs: d.interval_ns)
                case TAPIO__V1__EVENT__DETAIL_DNS:
                    let d = ce.dns.pointee
                    var answers: [IPAddress] = []
                    for j in 0..<d.n_answers {
                        guard let a = try address(d.answers[j]) else { throw MessageDecodeError("empty DNS answer address") }
                        answers.append(a)
                    }
                    detail = .dns(name: try lookup(d.name), qtype: d.qtype, rcode: d.rcode, latencyNs: d.latency_ns, server: try address(d.server),
                                  serverPort: try port(d.server_port), id: UInt16(truncatingIfNeeded: d.id), answers: answers)
                case TAPIO__V1__EVENT__DETAIL_CPU_THROTTLE:
                    let d = ce.cpu_throttle.pointee
                    func pressure(_ p: UnsafeMutablePointer<Tapio__V1__CpuPressure>?) -> CPUPressure? {
                        p.map { CPUPressure(someAvg10Permille: $0.pointee.some_avg10_permille, someStallNs: $0.pointee.some_stall_ns) }
                    }
                    let usage = d.usage.map { u in
                        CPUUsage(usageNs: u.pointee.usage_ns, pressure: pressure(u.pointee.pressure),
                                 node: u.pointee.node.map { NodeCPU(cpus: $0.pointee.cpus, runnable: $0.pointee.runnable, pressure: pressure($0.pointee.pressure)) })
                    }
                    detail = .cpuThrottle(periods: d.periods, throttledPeriods: d.throttled_periods, throttledNs: d.throttled_ns, intervalNs: d.interval_ns,
                                          cgroup: try lookup(d.cgroup), usage: usage)
                case TAPIO__V1__EVENT__DETAIL_MEMORY_PRESSURE:
                    let d = ce.memory_pressure.pointee
                    detail = .memoryPressure(source: try lookup(d.source), count: d.count, usageBytes: d.usage_bytes, limitBytes: d.limit_bytes,
                                             psiSomeAvg10Permille: d.psi_some_avg10_permille, intervalNs: d.interval_ns, cgroup: try lookup(d.cgroup))
                case TAPIO__V1__EVENT__DETAIL_IO_ERROR:
                    let d = ce.io_error.pointee
                    detail = .ioError(error: d.error, syscall: try lookup(d.syscall), count: d.count, intervalNs: d.interval_ns)
                default:
                    detail = .none
                }
                events.append(TapioEvent(kind: kind, timeNs: time, pid: ce.pid, ppid: ce.ppid, uid: ce.uid, comm: try lookup(ce.comm), cgroupId: ce.cgroup_id,
                                         netns: ce.netns, containerId: try lookup(ce.container_id), pod: try lookup(ce.pod), namespace: try lookup(ce.namespace_),
                                         detail: detail))
            }
            var drops: [DropCount] = []
            for i in 0..<m.n_drops {
                guard let d = m.drops[i]?.pointee else { throw MessageDecodeError("null drop count") }
                drops.append(DropCount(kind: EventKind(rawValue: d.kind.rawValue) ?? .unspecified, reason: swiftString(d.reason), count: d.count))
            }
            return EventBatch(node: swiftString(m.node), epoch: m.epoch, sequence: m.sequence, events: events, drops: drops)
        }
    }
}

// MARK: - Small messages

public struct Ack: Sendable, Equatable {
    public var epoch: UInt64
    public var sequence: UInt64

    public init(epoch: UInt64, sequence: UInt64) {
        self.epoch = epoch
        self.sequence = sequence
    }

    public func encoded() -> [UInt8] {
        var m = Tapio__V1__Ack()
        tapio__v1__ack__init(&m)
        m.epoch = epoch
        m.sequence = sequence
        return packMessage(&m, size: { tapio__v1__ack__get_packed_size($0) }, pack: { tapio__v1__ack__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> Ack {
        try unpackMessage(bytes, name: "Ack", unpack: { tapio__v1__ack__unpack(nil, $0, $1) }, free: { tapio__v1__ack__free_unpacked($0, nil) }) {
            Ack(epoch: $0.epoch, sequence: $0.sequence)
        }
    }
}

/// The NTP-style exchange: server stamps t1 and sends; the agent stamps t2 on
/// receipt and t3 on sending back; the server stamps t4 on receipt.
public struct TimeSync: Sendable, Equatable {
    public var id: UInt64
    public var t1: Int64
    public var t2: Int64
    public var t3: Int64

    public init(id: UInt64, t1: Int64, t2: Int64 = 0, t3: Int64 = 0) {
        self.id = id
        self.t1 = t1
        self.t2 = t2
        self.t3 = t3
    }

    public func encoded() -> [UInt8] {
        var m = Tapio__V1__TimeSync()
        tapio__v1__time_sync__init(&m)
        m.id = id
        m.t1 = t1
        m.t2 = t2
        m.t3 = t3
        return packMessage(&m, size: { tapio__v1__time_sync__get_packed_size($0) }, pack: { tapio__v1__time_sync__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> TimeSync {
        try unpackMessage(bytes, name: "TimeSync", unpack: { tapio__v1__time_sync__unpack(nil, $0, $1) }, free: { tapio__v1__time_sync__free_unpacked($0, nil) }) {
            TimeSync(id: $0.id, t1: $0.t1, t2: $0.t2, t3: $0.t3)
        }
    }
}

public struct Heartbeat: Sendable, Equatable {
    public var timeNs: Int64

    public init(timeNs: Int64) { self.timeNs = timeNs }

    public func encoded() -> [UInt8] {
        var m = Tapio__V1__Heartbeat()
        tapio__v1__heartbeat__init(&m)
        m.time_ns = timeNs
        return packMessage(&m, size: { tapio__v1__heartbeat__get_packed_size($0) }, pack: { tapio__v1__heartbeat__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> Heartbeat {
        try unpackMessage(bytes, name: "Heartbeat", unpack: { tapio__v1__heartbeat__unpack(nil, $0, $1) }, free: { tapio__v1__heartbeat__free_unpacked($0, nil) }) {
            Heartbeat(timeNs: $0.time_ns)
        }
    }
}

/// Error codes of the `Error` frame and of `QueryResponse.status`.
public enum WireErrorCode: UInt32, Sendable {
    case malformed = 1
    case unexpectedFrame = 2
    case identityMismatch = 3
    case forbidden = 4
    case windowExceeded = 5
    case storageFailed = 6
    case badRequest = 7
    case shuttingDown = 8
}

public struct WireError: Sendable, Equatable, Error {
    public var code: UInt32
    public var message: String

    public init(code: UInt32, message: String) {
        self.code = code
        self.message = message
    }

    public init(_ code: WireErrorCode, _ message: String) {
        self.init(code: code.rawValue, message: message)
    }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__Error()
        tapio__v1__error__init(&m)
        m.code = code
        m.message = arena.string(message)
        return packMessage(&m, size: { tapio__v1__error__get_packed_size($0) }, pack: { tapio__v1__error__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> WireError {
        try unpackMessage(bytes, name: "Error", unpack: { tapio__v1__error__unpack(nil, $0, $1) }, free: { tapio__v1__error__free_unpacked($0, nil) }) {
            WireError(code: $0.code, message: swiftString($0.message))
        }
    }
}

public struct Goodbye: Sendable, Equatable {
    public var reason: String
    public var lastSequence: UInt64

    public init(reason: String, lastSequence: UInt64) {
        self.reason = reason
        self.lastSequence = lastSequence
    }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__Goodbye()
        tapio__v1__goodbye__init(&m)
        m.reason = arena.string(reason)
        m.last_sequence = lastSequence
        return packMessage(&m, size: { tapio__v1__goodbye__get_packed_size($0) }, pack: { tapio__v1__goodbye__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> Goodbye {
        try unpackMessage(bytes, name: "Goodbye", unpack: { tapio__v1__goodbye__unpack(nil, $0, $1) }, free: { tapio__v1__goodbye__free_unpacked($0, nil) }) {
            Goodbye(reason: swiftString($0.reason), lastSequence: $0.last_sequence)
        }
    }
}

// MARK: - Query

public struct QueryRequest: Sendable, Equatable {
    public var method: String
    public var params: [String: String]

    public init(method: String, params: [String: String] = [:]) {
        self.method = method
        self.params = params
    }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__QueryRequest()
        tapio__v1__query_request__init(&m)
        m.method = arena.string(method)
        let keys = params.keys.sorted()
        let entries = arena.allocate(Tapio__V1__QueryRequest__ParamsEntry.self, count: keys.count)
        let entryPtrs = arena.allocate(UnsafeMutablePointer<Tapio__V1__QueryRequest__ParamsEntry>?.self, count: keys.count)
        for (i, k) in keys.enumerated() {
            tapio__v1__query_request__params_entry__init(entries + i)
            entries[i].key = arena.string(k)
            entries[i].value = arena.string(params[k]!)
            entryPtrs[i] = entries + i
        }
        m.n_params = keys.count
        m.params = entryPtrs
        return packMessage(&m, size: { tapio__v1__query_request__get_packed_size($0) }, pack: { tapio__v1__query_request__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> QueryRequest {
        try unpackMessage(bytes, name: "QueryRequest", unpack: { tapio__v1__query_request__unpack(nil, $0, $1) }, free: { tapio__v1__query_request__free_unpacked($0, nil) }) { m in
            var params: [String: String] = [:]
            for i in 0..<m.n_params {
                if let e = m.params[i]?.pointee { params[swiftString(e.key)] = swiftString(e.value) }
            }
            return QueryRequest(method: swiftString(m.method), params: params)
        }
    }
}

public struct QueryResponse: Sendable, Equatable {
    public var status: UInt32
    public var error: String
    public var json: [UInt8]

    public init(status: UInt32 = 0, error: String = "", json: [UInt8] = []) {
        self.status = status
        self.error = error
        self.json = json
    }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__QueryResponse()
        tapio__v1__query_response__init(&m)
        m.status = status
        m.error = arena.string(error)
        let data = arena.allocate(UInt8.self, count: json.count)
        data.initialize(from: json, count: json.count)
        m.json = ProtobufCBinaryData(len: json.count, data: data)
        return packMessage(&m, size: { tapio__v1__query_response__get_packed_size($0) }, pack: { tapio__v1__query_response__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> QueryResponse {
        try unpackMessage(bytes, name: "QueryResponse", unpack: { tapio__v1__query_response__unpack(nil, $0, $1) }, free: { tapio__v1__query_response__free_unpacked($0, nil) }) { m in
            let json = m.json.len == 0 ? [] : [UInt8](UnsafeBufferPointer(start: m.json.data, count: m.json.len))
            return QueryResponse(status: m.status, error: swiftString(m.error), json: json)
        }
    }
}

// MARK: - Inventory

/// A pod as the agent of its node knows it (from the Kubernetes API or a metadata file).
public struct PodInfo: Sendable, Equatable, Hashable, Codable {
    public var uid: String
    public var name: String
    public var namespace: String
    public var node: String
    public var ips: [String]
    public var service: String
    public var ownerKind: String
    public var ownerName: String
    public var labels: [String: String]
    public var containerIds: [String]

    public init(uid: String, name: String, namespace: String, node: String, ips: [String] = [], service: String = "", ownerKind: String = "", ownerName: String = "",
                labels: [String: String] = [:], containerIds: [String] = []) {
        self.uid = uid
        self.name = name
        self.namespace = namespace
        self.node = node
        self.ips = ips
        self.service = service
        self.ownerKind = ownerKind
        self.ownerName = ownerName
        self.labels = labels
        self.containerIds = containerIds
    }
}

/// Agent -> server: the complete set of pods on the agent's node.
public struct Inventory: Sendable, Equatable {
    public var pods: [PodInfo]

    public init(pods: [PodInfo]) { self.pods = pods }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__Inventory()
        tapio__v1__inventory__init(&m)
        let cPods = arena.allocate(Tapio__V1__Pod.self, count: pods.count)
        let cPodPtrs = arena.allocate(UnsafeMutablePointer<Tapio__V1__Pod>?.self, count: pods.count)
        func strings(_ list: [String]) -> UnsafeMutablePointer<UnsafeMutablePointer<CChar>?> {
            let out = arena.allocate(UnsafeMutablePointer<CChar>?.self, count: list.count)
            for (i, s) in list.enumerated() { out[i] = arena.string(s) }
            return out
        }
        for (i, p) in pods.enumerated() {
            let c = cPods + i
            tapio__v1__pod__init(c)
            c.pointee.uid = arena.string(p.uid)
            c.pointee.name = arena.string(p.name)
            c.pointee.namespace_ = arena.string(p.namespace)
            c.pointee.node = arena.string(p.node)
            c.pointee.n_ips = p.ips.count
            c.pointee.ips = strings(p.ips)
            c.pointee.service = arena.string(p.service)
            c.pointee.owner_kind = arena.string(p.ownerKind)
            c.pointee.owner_name = arena.string(p.ownerName)
            let keys = p.labels.keys.sorted()
            let entries = arena.allocate(Tapio__V1__Pod__LabelsEntry.self, count: keys.count)
            let entryPtrs = arena.allocate(UnsafeMutablePointer<Tapio__V1__Pod__LabelsEntry>?.self, count: keys.count)
            for (j, k) in keys.enumerated() {
                tapio__v1__pod__labels_entry__init(entries + j)
                entries[j].key = arena.string(k)
                entries[j].value = arena.string(p.labels[k]!)
                entryPtrs[j] = entries + j
            }
            c.pointee.n_labels = keys.count
            c.pointee.labels = entryPtrs
            c.pointee.n_container_ids = p.containerIds.count
            c.pointee.container_ids = strings(p.containerIds)
            cPodPtrs[i] = c
        }
        m.n_pods = pods.count
        m.pods = cPodPtrs
        return packMessage(&m, size: { tapio__v1__inventory__get_packed_size($0) }, pack: { tapio__v1__inventory__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> Inventory {
        try unpackMessage(bytes, name: "Inventory", unpack: { tapio__v1__inventory__unpack(nil, $0, $1) }, free: { tapio__v1__inventory__free_unpacked($0, nil) }) { m in
            var pods: [PodInfo] = []
            for i in 0..<m.n_pods {
                guard let p = m.pods[i]?.pointee else { throw MessageDecodeError("null pod") }
                var labels: [String: String] = [:]
                for j in 0..<p.n_labels {
                    if let e = p.labels[j]?.pointee { labels[swiftString(e.key)] = swiftString(e.value) }
                }
                pods.append(PodInfo(
                    uid: swiftString(p.uid), name: swiftString(p.name), namespace: swiftString(p.namespace_), node: swiftString(p.node),
                    ips: (0..<p.n_ips).map { swiftString(p.ips[$0]) }, service: swiftString(p.service),
                    ownerKind: swiftString(p.owner_kind), ownerName: swiftString(p.owner_name), labels: labels,
                    containerIds: (0..<p.n_container_ids).map { swiftString(p.container_ids[$0]) }))
            }
            return Inventory(pods: pods)
        }
    }
}
