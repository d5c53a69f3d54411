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
    public var node: String
    public var agentVersion: String
    public var bootId: String
    public var capabilities: [String]
    public var degraded: [String]
    public var streamEpoch: UInt64
    public var protocolVersion: UInt32

    public init(node: String, agentVersion: String, bootId: String, capabilities: [String], degraded: [String] = [], streamEpoch: UInt64, protocolVersion: UInt32 = 1) {
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
    public var ackedSequence: UInt64
    public var serverVersion: String

    public init(maxFrameBytes: UInt32, windowBatches: UInt32, ackedSequence: UInt64, serverVersion: String) {
        self.maxFrameBytes = maxFrameBytes
        self.windowBatches = windowBatches
        self.ackedSequence = ackedSequence
        self.serverVersion = serverVersion
    }

    public func encoded() -> [UInt8] {
        let arena = CArena()
        var m = Tapio__V1__HelloAck()
        tapio__v1__hello_ack__init(&m)
        m.max_frame_bytes = maxFrameBytes
        m.window_batches = windowBatches
        m.acked_sequence = ackedSequence
        m.server_version = arena.string(serverVersion)
        return packMessage(&m, size: { tapio__v1__hello_ack__get_packed_size($0) }, pack: { tapio__v1__hello_ack__pack($0, $1) })
    }

    public static func decode(_ bytes: [UInt8]) throws -> HelloAck {
        try unpackMessage(bytes, name: "HelloAck", unpack: { tapio__v1__hello_ack__unpack(nil, $0, $1) }, free: { tapio__v1__hello_ack__free_unpacked($0, nil) }) { m in
            HelloAck(maxFrameBytes: m.max_frame_bytes, windowBatches: m.window_batches, ackedSequence: m.acked_sequence, serverVersion: swiftString(m.server_version))
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

    public static func decode(_ bytes: [UInt8]) throws -> EventBatch {
        try unpackMessage(bytes, name: "EventBatch", unpack: { tapio__v1__event_batch__unpack(nil, $0, $1) }, free: { tapio__v1__event_batch__free_unpacked($0, nil) }) { m in
            let strings = (0..<m.n_strings).map { swiftString(m.strings[$0]) }
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
                default:
                    detail = .none
                }
                events.append(TapioEvent(kind: kind, timeNs: time, pid: ce.pid, ppid: ce.ppid, uid: ce.uid, comm: try lookup(ce.comm), cgroupId: ce.cgroup_id, detail: detail))
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
