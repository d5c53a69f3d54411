import Foundation
@testable import TapioWire
import XCTest

/// `EventBatch.decode` reads the bytes itself; protobuf-c's unpack (what the
/// server decoded with before, kept as `decodeWithProtobufC`) is the
/// reference: for every input both refuse it, or both give the same batch.
final class EventBatchDecoderTests: XCTestCase {
    /// Every detail, IPv4 and IPv6, empty and repeated strings, drops.
    static let everyDetail: EventBatch = {
        let v4 = IPAddress("10.0.0.7")!, v6 = IPAddress("fd00::1:2")!
        let flow = Flow(source: v4, destination: IPAddress("10.0.1.9")!, sourcePort: 40_000, destinationPort: 6379)
        let flow6 = Flow(source: v6, destination: nil, sourcePort: 0, destinationPort: 443)
        let t: Int64 = 1_795_000_000_000_000_000
        let events: [TapioEvent] = [
            TapioEvent(kind: .processExec, timeNs: t, pid: 1, ppid: 2, uid: 3, comm: "sh", cgroupId: 9, netns: 4, containerId: String(repeating: "ab", count: 32),
                       pod: "api-7d9f", namespace: "shop", detail: .exec(filename: "/bin/sh")),
            TapioEvent(kind: .processExit, timeNs: t - 5, pid: 1, comm: "sh", detail: .exit(exitCode: -1, signal: 9, coreDumped: true)),
            TapioEvent(kind: .oomKill, timeNs: t + 1, detail: .oomKill(victimPid: 5, victimComm: "redis-server", victimUid: 999, totalVmKb: 1, anonRssKb: 2, fileRssKb: 3)),
            TapioEvent(kind: .tcpConnect, timeNs: t + 2, pod: "api-7d9f", detail: .tcpConnect(flow: flow, outcome: .refused, latencyNs: 77, error: -111, count: 3)),
            TapioEvent(kind: .tcpConnect, timeNs: t + 2, detail: .tcpConnect(flow: flow6, outcome: .established, latencyNs: 1, error: 0, count: 1)),
            TapioEvent(kind: .tcpListen, timeNs: t + 3, detail: .tcpListen(address: v6, port: 80, open: false)),
            TapioEvent(kind: .tcpListen, timeNs: t + 3, detail: .tcpListen(address: nil, port: 0, open: true)),
            TapioEvent(kind: .tcpReset, timeNs: t + 4, detail: .tcpReset(flow: flow, sent: true, state: 7, count: 2)),
            TapioEvent(kind: .tcpRetransmit, timeNs: t + 5, detail: .tcpRetransmit(flow: flow, count: 11, intervalNs: 1_000_000_000)),
            TapioEvent(kind: .tcpLatency, timeNs: t + 6, detail: .tcpLatency(flow: flow, srttUs: 250, responses: 4, responseNsTotal: 4000, responseNsMax: 2000,
                                                                         intervalNs: 1_000_000_000)),
            TapioEvent(kind: .packetDrop, timeNs: t + 7, detail: .packetDrop(reason: "NETFILTER_DROP", count: 6, flow: flow, ipProtocol: 6, ifindex: 2, intervalNs: 5)),
            TapioEvent(kind: .dns, timeNs: t + 8, detail: .dns(name: "redis.shop.svc.cluster.local", qtype: 1, rcode: -1, latencyNs: 9, server: v4, serverPort: 53,
                                                           id: 4242, answers: [v4, v6])),
            TapioEvent(kind: .dns, timeNs: t + 8, detail: .dns(name: "", qtype: 28, rcode: 3, latencyNs: 0, server: nil, serverPort: 0, id: 0, answers: [])),
            TapioEvent(kind: .cpuThrottle, timeNs: t + 9, detail: .cpuThrottle(periods: 10, throttledPeriods: 4, throttledNs: 99, intervalNs: 1, cgroup: "/kubepods/a",
                                                                           usage: CPUUsage(usageNs: 5, pressure: CPUPressure(someAvg10Permille: 12, someStallNs: 13),
                                                                                           node: NodeCPU(cpus: 2, runnable: 3, pressure: CPUPressure(someAvg10Permille: 1, someStallNs: 2))))),
            TapioEvent(kind: .cpuThrottle, timeNs: t + 9, detail: .cpuThrottle(periods: 1, throttledPeriods: 0, throttledNs: 0, intervalNs: 1, cgroup: "", usage: nil)),
            TapioEvent(kind: .memoryPressure, timeNs: t + 10, detail: .memoryPressure(source: "psi", count: 1, usageBytes: 2, limitBytes: 3, psiSomeAvg10Permille: 4,
                                                                                    intervalNs: 5, cgroup: "/kubepods/b")),
            TapioEvent(kind: .ioError, timeNs: t + 11, detail: .ioError(error: 28, syscall: "write", count: 2, intervalNs: 3)),
            TapioEvent(kind: .unspecified, timeNs: t + 12),
        ]
        return EventBatch(node: "node-a", epoch: 7, sequence: 12, events: events,
                          drops: [DropCount(kind: .dns, reason: "ringbuf_full", count: 3), DropCount(kind: .unspecified, reason: "", count: 0)])
    }()

    /// Both decoders on one input: the same batch, or both refuse it.
    private func assertSame(_ bytes: [UInt8], _ message: @autoclosure () -> String = "", file: StaticString = #filePath, line: UInt = #line) {
        let reference = Result { try EventBatch.decodeWithProtobufC(bytes) }
        let direct = Result { try EventBatch.decode(bytes) }
        switch (reference, direct) {
        case (.success(let a), .success(let b)):
            XCTAssertEqual(a, b, "\(message()) \(bytes)", file: file, line: line)
        case (.failure, .failure):
            break
        case (.success, .failure(let e)):
            XCTFail("protobuf-c accepts what the direct decoder refuses (\(e)): \(message()) \(bytes)", file: file, line: line)
        case (.failure(let e), .success):
            XCTFail("the direct decoder accepts what protobuf-c refuses (\(e)): \(message()) \(bytes)", file: file, line: line)
        }
    }

    func testEveryDetailDecodesAsProtobufCDecodesIt() throws {
        let bytes = Self.everyDetail.encoded()
        XCTAssertEqual(try EventBatch.decode(bytes), Self.everyDetail)
        assertSame(bytes)
        assertSame(EventBatch(node: "", epoch: 0, sequence: 0, events: []).encoded())
        assertSame([])
    }

    func testTheMaximumCountsEventsBeforeDecodingThem() throws {
        let bytes = Self.everyDetail.encoded()
        let n = Self.everyDetail.events.count
        XCTAssertEqual(try EventBatch.decode(bytes, maxEvents: n).events.count, n)
        XCTAssertThrowsError(try EventBatch.decode(bytes, maxEvents: n - 1))
        XCTAssertEqual(try EventBatch.eventCount(encoded: bytes), n)
    }

    func testMutatedAndTruncatedBatchesDecodeAlikeOrFailAlike() {
        var random = SplitMix(seed: 0x7a91_0c3e)
        let seeds = [Self.everyDetail.encoded(), EventBatch(node: "n", epoch: 1, sequence: 2, events: Array(Self.everyDetail.events.prefix(3))).encoded()]
        for round in 0..<20_000 {
            var bytes = seeds[round % seeds.count]
            let edits = 1 + Int(random.next() % 4)
            for _ in 0..<edits {
                guard !bytes.isEmpty else { break }
                let at = Int(random.next() % UInt64(bytes.count))
                switch random.next() % 6 {
                case 0: bytes[at] = UInt8(truncatingIfNeeded: random.next())
                case 1: bytes[at] ^= UInt8(1) << (random.next() % 8)
                case 2: bytes.removeSubrange(at...)
                case 3: bytes.insert(UInt8(truncatingIfNeeded: random.next()), at: at)
                case 4: bytes.remove(at: at)
                default:
                    // A field (or any run of bytes) repeated.
                    let n = min(bytes.count - at, 1 + Int(random.next() % 24))
                    bytes.insert(contentsOf: bytes[at..<(at + n)], at: at)
                }
            }
            assertSame(bytes, "round \(round)")
        }
    }

    func testTheCommittedFuzzInputsDecodeAlike() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        var seen = 0
        for dir in ["Fuzz/corpus/event_batch", "Fuzz/regressions/event_batch"] {
            let url = root.appendingPathComponent(dir)
            for name in (try? FileManager.default.contentsOfDirectory(atPath: url.path)) ?? [] {
                assertSame(Array(try Data(contentsOf: url.appendingPathComponent(name))), name)
                seen += 1
            }
        }
        XCTAssertGreaterThan(seen, 10, "the fuzz corpus (Python's protobuf encodings) is there")
    }

    // MARK: - protobuf-c's rules, one by one

    func testFieldsInAnyOrderTheTableAfterTheEventsAndTheBaseTimeLast() throws {
        let event = P.message(6, P.varint(1, 1) + P.sint(2, 5) + P.varint(6, 2) + P.message(16, P.varint(1, 1)))
        let bytes = event + P.string(5, "/bin/true") + P.string(5, "true") + P.varint(4, 1000) + P.string(1, "n") + P.varint(4, 2000)
        let batch = try EventBatch.decode(bytes)
        XCTAssertEqual(batch.events, [TapioEvent(kind: .processExec, timeNs: 2005, comm: "true", detail: .exec(filename: "/bin/true"))])
        assertSame(bytes)
    }

    func testTheLastMemberOfTheDetailWinsAndTheOnesItReplacedMustBeWellFormed() throws {
        // An exec whose filename is outside the table, then an exit: the exit.
        let replaced = P.message(6, P.varint(1, 2) + P.message(16, P.varint(1, 99)) + P.message(17, P.varint(2, 9)))
        XCTAssertEqual(try EventBatch.decode(replaced).events.first?.detail, .exit(exitCode: 0, signal: 9, coreDumped: false))
        assertSame(replaced)
        // The replaced member with a wrong wire type for a known field: refused.
        let broken = P.message(6, P.varint(1, 2) + P.message(16, P.fixed32(1)) + P.message(17, P.varint(2, 9)))
        XCTAssertThrowsError(try EventBatch.decode(broken))
        assertSame(broken)
        // The same member twice: the second alone, not merged.
        let twice = P.message(6, P.varint(1, 2) + P.message(17, P.varint(1, 3)) + P.message(17, P.varint(2, 9)))
        XCTAssertEqual(try EventBatch.decode(twice).events.first?.detail, .exit(exitCode: 0, signal: 9, coreDumped: false))
        assertSame(twice)
    }

    func testARepeatedUsageIsMergedAsProtobufCMergesIt() throws {
        let pressure = { (a: UInt64, s: UInt64) in P.varint(1, a) + P.varint(2, s) }
        let first = P.varint(1, 100) + P.message(2, pressure(1, 2)) + P.message(3, P.varint(1, 4) + P.message(3, pressure(5, 6)))
        let second = P.message(3, P.varint(2, 7))
        let bytes = P.message(6, P.varint(1, 11) + P.message(26, P.varint(1, 1) + P.message(6, first) + P.message(6, second)))
        guard case .cpuThrottle(_, _, _, _, _, let usage) = try EventBatch.decode(bytes).events.first?.detail else { return XCTFail("a throttle event") }
        // The later one's scalars (usage 0, cpus 0), the earlier one's sub-messages where the later has none.
        XCTAssertEqual(usage, CPUUsage(usageNs: 0, pressure: CPUPressure(someAvg10Permille: 1, someStallNs: 2),
                                       node: NodeCPU(cpus: 0, runnable: 7, pressure: CPUPressure(someAvg10Permille: 5, someStallNs: 6))))
        assertSame(bytes)
    }

    func testStringsEndAtTheirFirstNULAndBadUTF8IsRepaired() throws {
        let bytes = P.bytes(1, [0x6e, 0x00, 0x6f]) + P.bytes(5, [0x61, 0xff, 0xc3]) + P.message(6, P.varint(1, 1) + P.varint(6, 1))
        let batch = try EventBatch.decode(bytes)
        XCTAssertEqual(batch.node, "n")
        XCTAssertEqual(batch.events.first?.comm, "a\u{FFFD}\u{FFFD}")
        assertSame(bytes)
    }

    func testVarintsKeysAndWireTypesFollowProtobufC() {
        let cases: [(String, [UInt8])] = [
            ("a bool from a non-minimal varint", P.message(6, P.varint(1, 2) + P.message(17, [0x18, 0x80, 0x00]))),
            ("a bool whose only bit is past 64", P.message(6, P.varint(1, 2) + P.message(17, [0x18] + Array(repeating: 0x80, count: 9) + [0x02]))),
            ("a bool as a fixed32 of only top bits", P.message(6, P.varint(1, 2) + P.message(17, [0x1d, 0x80, 0x80, 0x80, 0x80]))),
            ("a bool as a fixed64", P.message(6, P.varint(1, 2) + P.message(17, [0x19, 0, 0, 0, 0, 0, 0, 0, 0x40]))),
            ("a bool as empty bytes", P.message(6, P.varint(1, 2) + P.message(17, [0x1a, 0x00]))),
            ("a bool as bytes", P.message(6, P.varint(1, 2) + P.message(17, [0x1a, 0x01, 0x00]))),
            ("a listener's bool as bytes in a replaced detail", P.message(6, P.varint(1, 5) + P.message(20, [0x1a, 0x00]) + P.message(17, []))),
            ("a 10-byte varint", P.message(6, [0x08] + Array(repeating: 0xff, count: 9) + [0x01])),
            ("an 11-byte varint", [0x10] + Array(repeating: 0x80, count: 10) + [0x01]),
            ("a uint32 from a 64-bit value", P.message(6, P.varint(1, 1) + P.varint(3, 0x1_0000_0005))),
            ("a 5-byte key", [0x80 | 0x10, 0x80, 0x80, 0x80, 0x01, 0x00]),
            ("a 6-byte key", [0x80 | 0x10, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00]),
            ("field 0", [0x00, 0x01]),
            ("field 0 in two bytes", [0x80, 0x00, 0x01]),
            ("a group", [0x0b, 0x0c]),
            ("wire type 6", [0x0e]),
            ("a truncated fixed64", [0x09, 1, 2, 3]),
            ("an unknown fixed64", [0x09, 1, 2, 3, 4, 5, 6, 7, 8]),
            ("an unknown fixed32 in an event", P.message(6, P.varint(1, 1) + [0xfd, 0x01, 1, 2, 3, 4])),
            ("a string as a varint", [0x08, 0x01]),
            ("an event as a varint", [0x30, 0x01]),
            ("a length past the end", [0x0a, 0x05, 0x61]),
            ("a 6-byte length", [0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00]),
            ("a length over 2 GiB", [0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]),
            ("an unknown kind", P.message(6, P.varint(1, 99))),
            ("a kind past 32 bits", P.message(6, P.varint(1, 0x1_0000_0002))),
            ("an unknown outcome", P.message(6, P.varint(1, 4) + P.message(19, P.varint(5, 9)))),
            ("a port of 65 536", P.message(6, P.varint(1, 5) + P.message(20, P.varint(2, 65_536)))),
            ("an address of 5 bytes", P.message(6, P.varint(1, 5) + P.message(20, P.bytes(1, [1, 2, 3, 4, 5])))),
            ("an empty DNS answer", P.message(6, P.varint(1, 10) + P.message(25, P.bytes(8, [])))),
            ("an empty address", P.message(6, P.varint(1, 5) + P.message(20, P.bytes(1, [])))),
            ("a drop of an unknown kind", P.message(7, P.varint(1, 77) + P.string(2, "x") + P.varint(3, 1))),
            ("a drop's reason as a varint", P.message(7, P.varint(2, 1))),
        ]
        for (name, bytes) in cases { assertSame(bytes, name) }
    }
}

/// Protobuf fields written by hand, for inputs the encoder never makes.
private enum P {
    static func raw(_ v: UInt64) -> [UInt8] {
        var v = v, out: [UInt8] = []
        while v >= 0x80 {
            out.append(UInt8(v & 0x7f) | 0x80)
            v >>= 7
        }
        return out + [UInt8(v)]
    }

    static func varint(_ field: UInt64, _ v: UInt64) -> [UInt8] { raw(field << 3) + raw(v) }
    static func sint(_ field: UInt64, _ v: Int64) -> [UInt8] { varint(field, UInt64(bitPattern: (v << 1) ^ (v >> 63))) }
    static func fixed32(_ field: UInt64) -> [UInt8] { raw(field << 3 | 5) + [0, 0, 0, 0] }
    static func bytes(_ field: UInt64, _ b: [UInt8]) -> [UInt8] { raw(field << 3 | 2) + raw(UInt64(b.count)) + b }
    static func string(_ field: UInt64, _ s: String) -> [UInt8] { bytes(field, Array(s.utf8)) }
    static func message(_ field: UInt64, _ body: [UInt8]) -> [UInt8] { bytes(field, body) }
}

private struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}
