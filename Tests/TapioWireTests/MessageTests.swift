import Foundation
import TapioTestSupport
import TapioWire
import XCTest

final class MessageTests: XCTestCase {
    static let sampleEvents: [TapioEvent] = [
        TapioEvent(kind: .processExec, timeNs: 1_795_000_000_000_000_000, pid: 100, ppid: 1, uid: 0, comm: "redis-server", cgroupId: 42,
                   detail: .exec(filename: "/usr/bin/redis-server")),
        TapioEvent(kind: .processExit, timeNs: 1_795_000_000_000_001_000, pid: 100, ppid: 1, uid: 0, comm: "redis-server", cgroupId: 42,
                   detail: .exit(exitCode: 0, signal: 9, coreDumped: false)),
        TapioEvent(kind: .oomKill, timeNs: 1_795_000_000_000_000_500, pid: 100, ppid: 1, uid: 0, comm: "redis-server", cgroupId: 42,
                   detail: .oomKill(victimPid: 100, victimComm: "redis-server", victimUid: 999, totalVmKb: 300_000, anonRssKb: 250_000, fileRssKb: 1000)),
        TapioEvent(kind: .processExit, timeNs: 1_795_000_000_000_000_400, pid: 7, comm: "", detail: .exit(exitCode: 3, signal: 0, coreDumped: true)),
    ]

    func testBatchRoundTripsWithStringTableAndNegativeDeltas() throws {
        let batch = EventBatch(node: "node-a", epoch: 17, sequence: 3, events: Self.sampleEvents,
                               drops: [DropCount(kind: .processExec, reason: "ringbuf_full", count: 12)])
        let bytes = batch.encoded()
        XCTAssertEqual(try EventBatch.decode(bytes), batch)
        // The repeated comm is stored once.
        let text = String(decoding: bytes, as: UTF8.self)
        XCTAssertEqual(text.components(separatedBy: "redis-server").count - 1, 1 + 1, "comm once, the exec path holds it once more")
    }

    func testEmptyBatchRoundTrips() throws {
        let batch = EventBatch(node: "n", epoch: 1, sequence: 1, events: [])
        XCTAssertEqual(try EventBatch.decode(batch.encoded()), batch)
    }

    func testSmallMessagesRoundTrip() throws {
        let hello = Hello(node: "node-a", agentVersion: "0.1.0", bootId: "b", capabilities: ["process_exec", "oom_kill"], degraded: ["x: y"], streamEpoch: 99)
        XCTAssertEqual(try Hello.decode(hello.encoded()), hello)
        let ack = HelloAck(maxFrameBytes: 4 << 20, windowBatches: 32, ackedSequence: 7, serverVersion: "0.1.0")
        XCTAssertEqual(try HelloAck.decode(ack.encoded()), ack)
        XCTAssertEqual(try Ack.decode(Ack(epoch: 5, sequence: 9).encoded()), Ack(epoch: 5, sequence: 9))
        let sync = TimeSync(id: 3, t1: -5, t2: 10, t3: 11)
        XCTAssertEqual(try TimeSync.decode(sync.encoded()), sync)
        XCTAssertEqual(try WireError.decode(WireError(.forbidden, "no").encoded()), WireError(.forbidden, "no"))
        XCTAssertEqual(try Goodbye.decode(Goodbye(reason: "bye", lastSequence: 4).encoded()), Goodbye(reason: "bye", lastSequence: 4))
        let q = QueryRequest(method: "events", params: ["kind": "oom_kill", "limit": "5"])
        XCTAssertEqual(try QueryRequest.decode(q.encoded()), q)
        let r = QueryResponse(status: 0, error: "", json: Array("{\"a\":1}".utf8))
        XCTAssertEqual(try QueryResponse.decode(r.encoded()), r)
    }

    func testGarbageIsAnErrorNotACrash() {
        var generator = SystemRandomNumberGenerator()
        var failures = 0
        for _ in 0..<500 {
            let bytes = (0..<Int.random(in: 1...200, using: &generator)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            do { _ = try EventBatch.decode(bytes) } catch { failures += 1 }
        }
        XCTAssertGreaterThan(failures, 400, "random bytes almost never form a valid batch")
        // Valid protobuf, but the event's comm refers to string 5 of an empty table:
        // EventBatch{node: "n", events: [Event{kind: 1, comm: 5}]}, written by hand.
        let bad: [UInt8] = [0x0A, 0x01, 0x6E, 0x32, 0x04, 0x08, 0x01, 0x30, 0x05]
        XCTAssertThrowsError(try EventBatch.decode(bad))
    }

    /// The agent's encoding, decoded by Python's protobuf from the same .proto.
    func testPythonDecodesWhatWeEncode() throws {
        let pb = try TestSupport.pythonProtobufModules()
        let batch = EventBatch(node: "node-π", epoch: 1_795_000_000_123, sequence: 42, events: Self.sampleEvents,
                               drops: [DropCount(kind: .oomKill, reason: "ringbuf_full", count: 2)])
        let path = pb + "/batch.bin"
        try Data(batch.encoded()).write(to: URL(fileURLWithPath: path))
        let r = try TestSupport.run(TestSupport.systemPython, [TestSupport.interopScript, "decode-batch", pb, path])
        XCTAssertEqual(r.status, 0, r.stderr)
        let decoded = try JSONValue.parse(Array(r.stdout.utf8))
        XCTAssertEqual(decoded["node"], .string("node-π"))
        XCTAssertEqual(decoded["epoch"]?.intValue, 1_795_000_000_123)
        XCTAssertEqual(decoded["sequence"]?.intValue, 42)
        let events = try XCTUnwrap(decoded["events"]?.arrayValue)
        XCTAssertEqual(events.count, Self.sampleEvents.count)
        for (got, want) in zip(events, Self.sampleEvents) {
            XCTAssertEqual(got["kind"]?.stringValue, "EVENT_KIND_" + want.kind.name.uppercased())
            XCTAssertEqual(got["time_ns"]?.intValue, want.timeNs)
            XCTAssertEqual(got["pid"]?.intValue, Int64(want.pid))
            XCTAssertEqual(got["comm"]?.stringValue, want.comm)
            XCTAssertEqual(got["cgroup_id"]?.intValue, Int64(want.cgroupId))
            for (key, value) in want.detailFields {
                XCTAssertEqual(got[key], value, "\(want.kind.name).\(key)")
            }
        }
        XCTAssertEqual(decoded["drops"], .array([.object(["kind": .string("EVENT_KIND_OOM_KILL"), "reason": .string("ringbuf_full"), "count": .int(2)])]))
    }

    /// CPU usage is a sub-message of `cpu_throttle` that decoders built from
    /// the schema before it skip: Python's protobuf, with the schema as it
    /// was (without `usage`), reads the rest of the event unchanged; with
    /// today's schema it reads the usage too.
    func testADecoderOfTheSchemaBeforeCPUUsageSkipsIt() throws {
        let root = TapioEvent(kind: .cpuThrottle, timeNs: 1_795_000_000_000_000_000, comm: "", cgroupId: 7, detail: .cpuThrottle(
            periods: 10, throttledPeriods: 9, throttledNs: 400_000_000, intervalNs: 1_000_000_000, cgroup: "/kubepods",
            usage: CPUUsage(usageNs: 480_000_000, pressure: CPUPressure(someAvg10Permille: 377, someStallNs: 799_889_000),
                            node: NodeCPU(cpus: 2, runnable: 4, pressure: CPUPressure(someAvg10Permille: 532, someStallNs: 1)))))
        let batch = EventBatch(node: "n", epoch: 1, sequence: 1, events: [root])
        let schema = try String(contentsOfFile: TestSupport.packageRoot + "/proto/tapio.proto", encoding: .utf8)
        let before = schema.split(separator: "\n", omittingEmptySubsequences: false).filter { !$0.contains("CpuUsage usage = 6;") }.joined(separator: "\n")
        XCTAssertNotEqual(before, schema, "the usage field is in the schema")

        func decode(with proto: String) throws -> JSONValue {
            let dir = try TestSupport.temporaryDirectory("tapio-pb-old")
            try proto.write(toFile: dir + "/tapio.proto", atomically: true, encoding: .utf8)
            let gen = try TestSupport.run("/usr/bin/protoc", ["--proto_path=\(dir)", "--python_out=\(dir)", "\(dir)/tapio.proto"])
            XCTAssertEqual(gen.status, 0, gen.stderr)
            try Data(batch.encoded()).write(to: URL(fileURLWithPath: dir + "/batch.bin"))
            let r = try TestSupport.run(TestSupport.systemPython, [TestSupport.interopScript, "decode-batch", dir, dir + "/batch.bin"])
            XCTAssertEqual(r.status, 0, r.stderr)
            return try XCTUnwrap(JSONValue.parse(Array(r.stdout.utf8))["events"]?.arrayValue?.first)
        }
        let old = try decode(with: before)
        let now = try decode(with: schema)
        for (key, value) in root.detailFields {
            XCTAssertEqual(now[key], value, "today's schema: \(key)")
            let usage = ["usage_ns", "psi_some_avg10", "psi_some_stall_ns", "node_cpus", "node_runnable", "node_psi_some_avg10"].contains(key)
            XCTAssertEqual(old[key], usage ? nil : value, "the schema before usage: \(key)")
        }
    }

    func testRFC3339HasNanoseconds() {
        XCTAssertEqual(rfc3339(ns: 0), "1970-01-01T00:00:00.000000000Z")
        XCTAssertEqual(rfc3339(ns: 1_795_791_547_311_600_106), "2026-11-27T14:59:07.311600106Z")
        XCTAssertEqual(rfc3339(ns: -1), "1969-12-31T23:59:59.999999999Z")
    }

    /// The committed protobuf-c code is what protoc-c generates from the .proto today.
    func testGeneratedCodeMatchesTheSchema() throws {
        let out = try TestSupport.temporaryDirectory("tapio-protoc")
        let r = try TestSupport.run("/usr/bin/protoc-c", ["--proto_path=\(TestSupport.packageRoot)/proto", "--c_out=\(out)", "\(TestSupport.packageRoot)/proto/tapio.proto"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let root = TestSupport.packageRoot + "/Sources/CTapioProto"
        XCTAssertEqual(try String(contentsOfFile: out + "/tapio.pb-c.c", encoding: .utf8), try String(contentsOfFile: root + "/tapio.pb-c.c", encoding: .utf8),
                       "run `make proto` and commit the result")
        XCTAssertEqual(try String(contentsOfFile: out + "/tapio.pb-c.h", encoding: .utf8), try String(contentsOfFile: root + "/include/tapio.pb-c.h", encoding: .utf8),
                       "run `make proto` and commit the result")
    }
}
