/// `EventBatch.decode` straight from the payload's bytes into `TapioEvent`s,
/// without protobuf-c's unpack: that built one C structure per event and per
/// detail, copied every address into its own allocation, and freed it all
/// again — about half of an ingest event loop's time per event went to that
/// unpack, its mallocs and its frees.
///
/// It accepts and refuses exactly what protobuf-c 1.4's unpack does
/// (`Tests/TapioWireTests/EventBatchDecoderTests.swift` holds the two side
/// by side on valid, mutated and truncated batches):
/// - a key is at most 5 bytes, and one whose first byte has neither field
///   bits nor a continuation is refused (field 0); a varint is at most 10
///   bytes (bits past 64 are dropped), a length prefix at most 5 and at most
///   `Int32.max`; wire types 3, 4, 6 and 7 are refused;
/// - a known field with another wire type than its own is refused; unknown
///   fields are skipped; a 32-bit field keeps the low 32 bits of its varint;
///   a bool may come in any wire type, and is true when any of its bytes
///   has a bit set below the top one;
/// - a repeated singular field: the last wins, except a repeated singular
///   message outside a oneof (`CpuThrottle.usage`, `CpuUsage.pressure`,
///   `CpuUsage.node`, `NodeCpu.pressure`), which protobuf-c merges: the
///   later one's scalars, and a sub-message the later one lacks taken from
///   the earlier;
/// - of the `Event.detail` oneof the last member wins whole; members it
///   replaced must still be well formed;
/// - strings end at their first NUL (as C strings do); ill-formed UTF-8 is
///   repaired as `String(cString:)` repairs it.
///
/// Then the same checks as before on what was decoded: kinds and connect
/// outcomes the server knows, string references inside the table, ports
/// below 65 536, addresses of 4 or 16 bytes. Top-level fields may come in any
/// order (the table after the events that use it, the base time last): a
/// first pass reads the batch's own fields and the table, a second the events.
extension EventBatch {
    static func decodeDirect(_ bytes: UnsafeRawBufferPointer, maxEvents: Int) throws -> EventBatch {
        var node = ""
        var epoch: UInt64 = 0
        var sequence: UInt64 = 0
        var base: Int64 = 0
        var strings: [String] = []
        var eventCount = 0
        var dropCount = 0
        var r = WireReader(bytes)
        while !r.isAtEnd {
            let (field, type) = try r.key()
            switch field {
            case 1: node = try r.string(type)
            case 2: epoch = try r.uint64(type)
            case 3: sequence = try r.uint64(type)
            case 4: base = Int64(bitPattern: try r.uint64(type))
            case 5: strings.append(try r.string(type))
            case 6: _ = try r.message(type); eventCount += 1
            case 7: _ = try r.message(type); dropCount += 1
            default: try r.skip(type)
            }
        }
        guard eventCount <= maxEvents else { throw MessageDecodeError("batch of \(eventCount) events exceeds the limit of \(maxEvents)") }

        var events: [TapioEvent] = []
        events.reserveCapacity(eventCount)
        var drops: [DropCount] = []
        drops.reserveCapacity(dropCount)
        var time = base
        r = WireReader(bytes)
        while !r.isAtEnd {
            let (field, type) = try r.key()
            switch field {
            case 6:
                var m = try r.message(type)
                events.append(try decodeEvent(&m, strings: strings, time: &time))
            case 7:
                var m = try r.message(type)
                drops.append(try decodeDrop(&m))
            default: try r.skip(type)
            }
        }
        return EventBatch(node: node, epoch: epoch, sequence: sequence, events: events, drops: drops)
    }

    private static func decodeDrop(_ r: inout WireReader) throws -> DropCount {
        var kind: UInt32 = 0
        var reason = ""
        var count: UInt64 = 0
        while !r.isAtEnd {
            let (field, type) = try r.key()
            switch field {
            case 1: kind = try r.uint32(type)
            case 2: reason = try r.string(type)
            case 3: count = try r.uint64(type)
            default: try r.skip(type)
            }
        }
        return DropCount(kind: EventKind(rawValue: kind) ?? .unspecified, reason: reason, count: count)
    }

    private static func decodeEvent(_ r: inout WireReader, strings: [String], time: inout Int64) throws -> TapioEvent {
        var kindRaw: UInt32 = 0
        var delta: Int64 = 0
        var pid: UInt32 = 0, ppid: UInt32 = 0, uid: UInt32 = 0
        var comm: UInt32 = 0, containerId: UInt32 = 0, pod: UInt32 = 0, namespace: UInt32 = 0
        var cgroupId: UInt64 = 0
        var netns: UInt32 = 0
        var detailField: UInt32 = 0
        var detail = WireReader.empty
        while !r.isAtEnd {
            let (field, type) = try r.key()
            switch field {
            case 1: kindRaw = try r.uint32(type)
            case 2: delta = try r.sint64(type)
            case 3: pid = try r.uint32(type)
            case 4: ppid = try r.uint32(type)
            case 5: uid = try r.uint32(type)
            case 6: comm = try r.uint32(type)
            case 7: cgroupId = try r.uint64(type)
            case 8: netns = try r.uint32(type)
            case 9: containerId = try r.uint32(type)
            case 10: pod = try r.uint32(type)
            case 11: namespace = try r.uint32(type)
            case 16...28:
                let m = try r.message(type)
                if detailField != 0 {
                    // Replaced by this one, but it had to be well formed.
                    var earlier = detail
                    try validate(earlier: &earlier, message: detailField)
                }
                detailField = field
                detail = m
            default: try r.skip(type)
            }
        }
        guard let kind = EventKind(rawValue: kindRaw) else { throw MessageDecodeError("unknown event kind \(kindRaw)") }
        time = time &+ delta
        let d = detailField == 0 ? TapioEvent.Detail.none : try decodeDetail(detailField, &detail, strings: strings)
        let table = StringTable(strings)
        return TapioEvent(kind: kind, timeNs: time, pid: pid, ppid: ppid, uid: uid, comm: try table[comm], cgroupId: cgroupId, netns: netns,
                          containerId: try table[containerId], pod: try table[pod], namespace: try table[namespace], detail: d)
    }

    private static func decodeDetail(_ field: UInt32, _ r: inout WireReader, strings: [String]) throws -> TapioEvent.Detail {
        let table = StringTable(strings)
        switch field {
        case 16:
            var filename: UInt32 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                if f == 1 { filename = try r.uint32(t) } else { try r.skip(t) }
            }
            return .exec(filename: try table[filename])
        case 17:
            var code: UInt32 = 0, signal: UInt32 = 0
            var core = false
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: code = try r.uint32(t)
                case 2: signal = try r.uint32(t)
                case 3: core = try r.bool(t)
                default: try r.skip(t)
                }
            }
            return .exit(exitCode: Int32(bitPattern: code), signal: Int32(bitPattern: signal), coreDumped: core)
        case 18:
            var victimPid: UInt32 = 0, victimComm: UInt32 = 0, victimUid: UInt32 = 0
            var totalVm: UInt64 = 0, anon: UInt64 = 0, file: UInt64 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: victimPid = try r.uint32(t)
                case 2: victimComm = try r.uint32(t)
                case 3: totalVm = try r.uint64(t)
                case 4: anon = try r.uint64(t)
                case 5: file = try r.uint64(t)
                case 6: victimUid = try r.uint32(t)
                default: try r.skip(t)
                }
            }
            return .oomKill(victimPid: victimPid, victimComm: try table[victimComm], victimUid: victimUid, totalVmKb: totalVm, anonRssKb: anon, fileRssKb: file)
        case 19:
            var flow = RawFlow()
            var outcome: UInt32 = 0, error: UInt32 = 0, count: UInt32 = 0
            var latency: UInt64 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: flow.source = try r.bytes(t)
                case 2: flow.destination = try r.bytes(t)
                case 3: flow.sourcePort = try r.uint32(t)
                case 4: flow.destinationPort = try r.uint32(t)
                case 5: outcome = try r.uint32(t)
                case 6: latency = try r.uint64(t)
                case 7: error = try r.uint32(t)
                case 8: count = try r.uint32(t)
                default: try r.skip(t)
                }
            }
            guard let o = ConnectOutcome(rawValue: outcome) else { throw MessageDecodeError("unknown connect outcome \(outcome)") }
            return .tcpConnect(flow: try flow.flow(), outcome: o, latencyNs: latency, error: Int32(bitPattern: error), count: count)
        case 20:
            var address = WireBytes()
            var port: UInt32 = 0
            var open = false
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: address = try r.bytes(t)
                case 2: port = try r.uint32(t)
                case 3: open = try r.bool(t)
                default: try r.skip(t)
                }
            }
            return .tcpListen(address: try address.address(), port: try wirePort(port), open: open)
        case 21:
            var flow = RawFlow()
            var sent = false
            var state: UInt32 = 0, count: UInt32 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: flow.source = try r.bytes(t)
                case 2: flow.destination = try r.bytes(t)
                case 3: flow.sourcePort = try r.uint32(t)
                case 4: flow.destinationPort = try r.uint32(t)
                case 5: sent = try r.bool(t)
                case 6: state = try r.uint32(t)
                case 7: count = try r.uint32(t)
                default: try r.skip(t)
                }
            }
            return .tcpReset(flow: try flow.flow(), sent: sent, state: state, count: count)
        case 22:
            var flow = RawFlow()
            var count: UInt32 = 0
            var interval: UInt64 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: flow.source = try r.bytes(t)
                case 2: flow.destination = try r.bytes(t)
                case 3: flow.sourcePort = try r.uint32(t)
                case 4: flow.destinationPort = try r.uint32(t)
                case 5: count = try r.uint32(t)
                case 6: interval = try r.uint64(t)
                default: try r.skip(t)
                }
            }
            return .tcpRetransmit(flow: try flow.flow(), count: count, intervalNs: interval)
        case 23:
            var flow = RawFlow()
            var srtt: UInt32 = 0, responses: UInt32 = 0
            var total: UInt64 = 0, maxNs: UInt64 = 0, interval: UInt64 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: flow.source = try r.bytes(t)
                case 2: flow.destination = try r.bytes(t)
                case 3: flow.sourcePort = try r.uint32(t)
                case 4: flow.destinationPort = try r.uint32(t)
                case 5: srtt = try r.uint32(t)
                case 6: responses = try r.uint32(t)
                case 7: total = try r.uint64(t)
                case 8: maxNs = try r.uint64(t)
                case 9: interval = try r.uint64(t)
                default: try r.skip(t)
                }
            }
            return .tcpLatency(flow: try flow.flow(), srttUs: srtt, responses: responses, responseNsTotal: total, responseNsMax: maxNs, intervalNs: interval)
        case 24:
            var flow = RawFlow()
            var reason: UInt32 = 0, count: UInt32 = 0, proto: UInt32 = 0, ifindex: UInt32 = 0
            var interval: UInt64 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: reason = try r.uint32(t)
                case 2: count = try r.uint32(t)
                case 3: flow.source = try r.bytes(t)
                case 4: flow.destination = try r.bytes(t)
                case 5: flow.sourcePort = try r.uint32(t)
                case 6: flow.destinationPort = try r.uint32(t)
                case 7: proto = try r.uint32(t)
                case 8: ifindex = try r.uint32(t)
                case 9: interval = try r.uint64(t)
                default: try r.skip(t)
                }
            }
            // The old decoder converted the flow before the reason; both throw alike.
            let f = try flow.flow()
            return .packetDrop(reason: try table[reason], count: count, flow: f, ipProtocol: proto, ifindex: ifindex, intervalNs: interval)
        case 25:
            let start = r
            var name: UInt32 = 0, qtype: UInt32 = 0, rcode: UInt32 = 0, serverPort: UInt32 = 0, id: UInt32 = 0
            var latency: UInt64 = 0
            var server = WireBytes()
            var answerCount = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: name = try r.uint32(t)
                case 2: qtype = try r.uint32(t)
                case 3: rcode = try r.uint32(t)
                case 4: latency = try r.uint64(t)
                case 5: server = try r.bytes(t)
                case 6: serverPort = try r.uint32(t)
                case 7: id = try r.uint32(t)
                case 8: _ = try r.bytes(t); answerCount += 1
                default: try r.skip(t)
                }
            }
            var answers: [IPAddress] = []
            if answerCount > 0 {
                answers.reserveCapacity(answerCount)
                var again = start
                while !again.isAtEnd {
                    let (f, t) = try again.key()
                    if f == 8 {
                        guard let a = try again.bytes(t).address() else { throw MessageDecodeError("empty DNS answer address") }
                        answers.append(a)
                    } else {
                        try again.skip(t)
                    }
                }
            }
            return .dns(name: try table[name], qtype: qtype, rcode: Int32(bitPattern: rcode), latencyNs: latency, server: try server.address(),
                        serverPort: try wirePort(serverPort), id: UInt16(truncatingIfNeeded: id), answers: answers)
        case 26:
            var periods: UInt64 = 0, throttledPeriods: UInt64 = 0, throttledNs: UInt64 = 0, interval: UInt64 = 0
            var cgroup: UInt32 = 0
            var usage: CPUUsage?
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: periods = try r.uint64(t)
                case 2: throttledPeriods = try r.uint64(t)
                case 3: throttledNs = try r.uint64(t)
                case 4: interval = try r.uint64(t)
                case 5: cgroup = try r.uint32(t)
                case 6:
                    var m = try r.message(t)
                    let later = try decodeUsage(&m)
                    usage = usage.map { merged($0, later) } ?? later
                default: try r.skip(t)
                }
            }
            return .cpuThrottle(periods: periods, throttledPeriods: throttledPeriods, throttledNs: throttledNs, intervalNs: interval,
                                cgroup: try table[cgroup], usage: usage)
        case 27:
            var source: UInt32 = 0, psi: UInt32 = 0, cgroup: UInt32 = 0
            var count: UInt64 = 0, usage: UInt64 = 0, limit: UInt64 = 0, interval: UInt64 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: source = try r.uint32(t)
                case 2: count = try r.uint64(t)
                case 3: usage = try r.uint64(t)
                case 4: limit = try r.uint64(t)
                case 5: psi = try r.uint32(t)
                case 6: interval = try r.uint64(t)
                case 7: cgroup = try r.uint32(t)
                default: try r.skip(t)
                }
            }
            return .memoryPressure(source: try table[source], count: count, usageBytes: usage, limitBytes: limit, psiSomeAvg10Permille: psi,
                                   intervalNs: interval, cgroup: try table[cgroup])
        default:
            var error: UInt32 = 0, syscall: UInt32 = 0, count: UInt32 = 0
            var interval: UInt64 = 0
            while !r.isAtEnd {
                let (f, t) = try r.key()
                switch f {
                case 1: error = try r.uint32(t)
                case 2: syscall = try r.uint32(t)
                case 3: count = try r.uint32(t)
                case 4: interval = try r.uint64(t)
                default: try r.skip(t)
                }
            }
            return .ioError(error: Int32(bitPattern: error), syscall: try table[syscall], count: count, intervalNs: interval)
        }
    }

    /// The shape of a detail message's field (`message`: the detail's field
    /// number in `Event`, or one of the nested messages below).
    private enum Shape { case varint, bool, delimited, usage, nodeCPU, pressure }
    private static let usageMessage: UInt32 = 100, nodeCPUMessage: UInt32 = 101, pressureMessage: UInt32 = 102

    private static func shape(of field: UInt32, in message: UInt32) -> Shape? {
        switch (message, field) {
        case (17, 3), (20, 3), (21, 5):
            return .bool
        case (16, 1), (17, 1...2), (18, 1...6), (19, 3...8), (20, 2), (21, 3...4), (21, 6...7), (22, 3...6), (23, 3...9), (24, 1...2), (24, 5...9),
             (25, 1...4), (25, 6...7), (26, 1...5), (27, 1...7), (28, 1...4), (usageMessage, 1), (nodeCPUMessage, 1...2), (pressureMessage, 1...2):
            return .varint
        case (19, 1...2), (20, 1), (21, 1...2), (22, 1...2), (23, 1...2), (24, 3...4), (25, 5), (25, 8):
            return .delimited
        case (26, 6): return .usage
        case (usageMessage, 2), (nodeCPUMessage, 3): return .pressure
        case (usageMessage, 3): return .nodeCPU
        default: return nil
        }
    }

    /// Reads a detail that a later member of the oneof replaced: protobuf-c
    /// parsed it all the same, so it must be well formed; what it says is not
    /// looked at.
    private static func validate(earlier r: inout WireReader, message: UInt32) throws {
        while !r.isAtEnd {
            let (f, t) = try r.key()
            switch shape(of: f, in: message) {
            case .varint: _ = try r.uint64(t)
            case .bool: _ = try r.bool(t)
            case .delimited: _ = try r.bytes(t)
            case .usage:
                var m = try r.message(t)
                try validate(earlier: &m, message: usageMessage)
            case .nodeCPU:
                var m = try r.message(t)
                try validate(earlier: &m, message: nodeCPUMessage)
            case .pressure:
                var m = try r.message(t)
                try validate(earlier: &m, message: pressureMessage)
            case nil: try r.skip(t)
            }
        }
    }

    private static func decodeUsage(_ r: inout WireReader) throws -> CPUUsage {
        var usage = CPUUsage(usageNs: 0)
        while !r.isAtEnd {
            let (f, t) = try r.key()
            switch f {
            case 1: usage.usageNs = try r.uint64(t)
            case 2:
                var m = try r.message(t)
                usage.pressure = try decodePressure(&m)
            case 3:
                var m = try r.message(t)
                let later = try decodeNodeCPU(&m)
                usage.node = usage.node.map { merged($0, later) } ?? later
            default: try r.skip(t)
            }
        }
        return usage
    }

    private static func decodeNodeCPU(_ r: inout WireReader) throws -> NodeCPU {
        var node = NodeCPU(cpus: 0, runnable: 0)
        while !r.isAtEnd {
            let (f, t) = try r.key()
            switch f {
            case 1: node.cpus = try r.uint32(t)
            case 2: node.runnable = try r.uint32(t)
            case 3:
                var m = try r.message(t)
                // A pressure has scalars only: merging keeps the later one.
                node.pressure = try decodePressure(&m)
            default: try r.skip(t)
            }
        }
        return node
    }

    private static func decodePressure(_ r: inout WireReader) throws -> CPUPressure {
        var p = CPUPressure(someAvg10Permille: 0, someStallNs: 0)
        while !r.isAtEnd {
            let (f, t) = try r.key()
            switch f {
            case 1: p.someAvg10Permille = try r.uint32(t)
            case 2: p.someStallNs = try r.uint64(t)
            default: try r.skip(t)
            }
        }
        return p
    }

    /// protobuf-c's merge of a message field that came twice: the later
    /// one's scalars; its sub-messages, merged with the earlier's, or the
    /// earlier's where it has none.
    private static func merged(_ earlier: CPUUsage, _ later: CPUUsage) -> CPUUsage {
        var u = later
        if u.pressure == nil { u.pressure = earlier.pressure }
        if let e = earlier.node { u.node = u.node.map { merged(e, $0) } ?? e }
        return u
    }

    private static func merged(_ earlier: NodeCPU, _ later: NodeCPU) -> NodeCPU {
        var n = later
        if n.pressure == nil { n.pressure = earlier.pressure }
        return n
    }
}

/// The batch's string table: reference 0 is the empty string, n the n-th entry.
private struct StringTable {
    let strings: [String]
    init(_ strings: [String]) { self.strings = strings }

    subscript(_ reference: UInt32) -> String {
        get throws {
            if reference == 0 { return "" }
            guard Int(reference) <= strings.count else {
                throw MessageDecodeError("string reference \(reference) outside the table of \(strings.count)")
            }
            return strings[Int(reference) &- 1]
        }
    }
}

@inline(__always)
private func wirePort(_ p: UInt32) throws -> UInt16 {
    guard let v = UInt16(exactly: p) else { throw MessageDecodeError("port \(p) out of range") }
    return v
}

/// A `bytes` field's value, pointing into the payload.
struct WireBytes {
    var start: UnsafeRawPointer?
    var count = 0

    /// nil for an empty value; 4 or 16 bytes make an address, anything else is malformed.
    @inline(__always)
    func address() throws -> IPAddress? {
        guard count > 0, let start else { return nil }
        guard let a = IPAddress(bytes: UnsafeBufferPointer(start: start.assumingMemoryBound(to: UInt8.self), count: count)) else {
            throw MessageDecodeError("address of \(count) bytes")
        }
        return a
    }
}

private struct RawFlow {
    var source = WireBytes()
    var destination = WireBytes()
    var sourcePort: UInt32 = 0
    var destinationPort: UInt32 = 0

    @inline(__always)
    func flow() throws -> Flow {
        Flow(source: try source.address(), destination: try destination.address(), sourcePort: try wirePort(sourcePort),
             destinationPort: try wirePort(destinationPort))
    }
}

/// Reads protobuf's wire format the way protobuf-c 1.4's unpack does (see
/// `EventBatch.decodeDirect`). Every read checks the bounds; nothing is copied.
struct WireReader {
    private var p: UnsafeRawPointer
    private let end: UnsafeRawPointer

    init(_ bytes: UnsafeRawBufferPointer) {
        // An empty buffer may have no address; any non-null pointer will do.
        let start = bytes.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!
        p = start
        end = start + bytes.count
    }

    private init(start: UnsafeRawPointer, end: UnsafeRawPointer) {
        p = start
        self.end = end
    }

    static var empty: WireReader {
        let p = UnsafeRawPointer(bitPattern: 1)!
        return WireReader(start: p, end: p)
    }

    var isAtEnd: Bool {
        @inline(__always) get { p >= end }
    }

    private static func malformed(_ what: String) -> MessageDecodeError {
        MessageDecodeError("malformed EventBatch message: \(what)")
    }

    @inline(__always)
    private func byte(_ i: Int) -> UInt8 { p.load(fromByteOffset: i, as: UInt8.self) }

    /// A field's key: at most 5 bytes; field 0 in a one-byte key is refused.
    @inline(__always)
    mutating func key() throws -> (field: UInt32, wireType: UInt8) {
        let first = byte(0)
        if first & 0x80 == 0 {
            guard first & 0xf8 != 0 else { throw Self.malformed("field number 0") }
            p += 1
            return (UInt32(first >> 3), first & 7)
        }
        let available = min(end - p, 5)
        var tag = UInt32(first & 0x7f) >> 3
        var shift: UInt32 = 4
        var i = 1
        while i < available {
            let b = byte(i)
            if b & 0x80 == 0 {
                tag |= UInt32(b) << shift
                p += i + 1
                return (tag, first & 7)
            }
            tag |= UInt32(b & 0x7f) << shift
            shift += 7
            i += 1
        }
        throw Self.malformed("bad field key")
    }

    /// A varint of at most 10 bytes; bits past 64 are dropped.
    @inline(__always)
    private mutating func varint() throws -> UInt64 {
        guard p < end else { throw Self.malformed("unterminated varint") }
        let first = byte(0)
        if first & 0x80 == 0 {
            p += 1
            return UInt64(first)
        }
        let available = min(end - p, 10)
        var value: UInt64 = 0
        var shift: UInt64 = 0
        var i = 0
        while i < available {
            let b = byte(i)
            value |= UInt64(b & 0x7f) << shift
            if b & 0x80 == 0 {
                p += i + 1
                return value
            }
            shift += 7
            i += 1
        }
        throw Self.malformed("unterminated varint")
    }

    @inline(__always)
    mutating func uint64(_ type: UInt8) throws -> UInt64 {
        guard type == 0 else { throw Self.malformed("wire type \(type) for an integer") }
        return try varint()
    }

    /// uint32, int32 and enums: the low 32 bits (int32 and enums by bit pattern).
    @inline(__always)
    mutating func uint32(_ type: UInt8) throws -> UInt32 {
        UInt32(truncatingIfNeeded: try uint64(type))
    }

    @inline(__always)
    mutating func sint64(_ type: UInt8) throws -> Int64 {
        let v = try uint64(type)
        return Int64(bitPattern: (v >> 1) ^ (0 &- (v & 1)))
    }

    /// protobuf-c reads a bool of any wire type: true when any byte of the
    /// value (a length-delimited one's prefix included) has a bit set below
    /// its top bit; for a varint, any bit, those past 64 included.
    mutating func bool(_ type: UInt8) throws -> Bool {
        let start = p
        if type == 0 { _ = try varint() } else { try skip(type) }
        var any: UInt8 = 0
        var q = start
        while q < p {
            any |= q.load(as: UInt8.self) & 0x7f
            q += 1
        }
        return any != 0
    }

    /// A length-delimited value: a prefix of at most 5 bytes, at most Int32.max.
    @inline(__always)
    private mutating func delimited(_ type: UInt8) throws -> (UnsafeRawPointer, Int) {
        guard type == 2 else { throw Self.malformed("wire type \(type) for a length-delimited field") }
        let available = min(end - p, 5)
        var length = 0
        var shift = 0
        var i = 0
        while true {
            guard i < available else { throw Self.malformed("bad length prefix") }
            let b = byte(i)
            length |= Int(b & 0x7f) << shift
            shift += 7
            i += 1
            if b & 0x80 == 0 { break }
        }
        guard length <= Int(Int32.max), length <= end - p - i else { throw Self.malformed("length \(length) past the end") }
        let start = p + i
        p = start + length
        return (start, length)
    }

    @inline(__always)
    mutating func message(_ type: UInt8) throws -> WireReader {
        let (start, count) = try delimited(type)
        return WireReader(start: start, end: start + count)
    }

    @inline(__always)
    mutating func bytes(_ type: UInt8) throws -> WireBytes {
        let (start, count) = try delimited(type)
        return WireBytes(start: start, count: count)
    }

    /// Up to the first NUL, ill-formed UTF-8 repaired.
    mutating func string(_ type: UInt8) throws -> String {
        let (start, count) = try delimited(type)
        let bytes = UnsafeBufferPointer(start: start.assumingMemoryBound(to: UInt8.self), count: count)
        let length = bytes.firstIndex(of: 0) ?? count
        return String(decoding: UnsafeBufferPointer(rebasing: bytes[0..<length]), as: UTF8.self)
    }

    /// An unknown field's value.
    mutating func skip(_ type: UInt8) throws {
        switch type {
        case 0: _ = try varint()
        case 1:
            guard end - p >= 8 else { throw Self.malformed("truncated 64-bit field") }
            p += 8
        case 2: _ = try delimited(type)
        case 5:
            guard end - p >= 4 else { throw Self.malformed("truncated 32-bit field") }
            p += 4
        default: throw Self.malformed("unsupported wire type \(type)")
        }
    }
}
