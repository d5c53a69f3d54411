import CTapioBPF
import Foundation
import Logging
import Synchronization
import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

final class KernelSourceTests: XCTestCase {
    /// The record layout Swift sees is the one the BPF programs were compiled
    /// against (the C side checks itself with static asserts in tapio_events.h).
    func testRecordLayoutMatchesTheABIHeader() {
        XCTAssertEqual(MemoryLayout<tapio_event>.size, Int(TAPIO_EVENT_SIZE))
        XCTAssertEqual(MemoryLayout<tapio_event>.offset(of: \tapio_event.u), Int(TAPIO_EVENT_HEADER_SIZE))
        XCTAssertEqual(MemoryLayout<tapio_event>.offset(of: \tapio_event.ts_ns), 24)
        XCTAssertEqual(MemoryLayout<tapio_event>.offset(of: \tapio_event.cgroup_id), 32)
        XCTAssertEqual(MemoryLayout<tapio_exit_info>.size, 16)
        XCTAssertEqual(MemoryLayout<tapio_oom_info>.size, 48)
        XCTAssertEqual(TAPIO_KIND_MAX.rawValue, UInt32(EventKind.allCases.count), "one kernel kind per wire kind")
    }

    func testProgramsLoadAndAttachInThisKernel() throws {
        try TestSupport.requireBPF()
        let source = try KernelSource(configuration: .init(), logger: Logger(label: "test"))
        // Every signal of the catalog runs on this kernel.
        let catalog = Set(EventKind.allCases.filter { $0 != .unspecified }.map(\.name))
        XCTAssertEqual(Set(source.capabilities), catalog, "degraded: \(source.degraded)")
        XCTAssertTrue(source.degraded.isEmpty, "\(source.degraded)")
    }

    /// A ring buffer nobody reads fills up; every record that did not fit is
    /// counted per kind as ringbuf_full, none silently lost.
    func testAFullRingBufferIsCountedPerKind() throws {
        try TestSupport.requireBPF()
        var config = KernelSource.Configuration()
        config.ringBufferBytes = ["process": 4096]
        let source = try KernelSource(configuration: config, logger: Logger(label: "test"))
        for _ in 0..<50 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/true")
            try p.run()
            p.waitUntilExit()
        }
        let drops = Dictionary(source.drops().map { ("\($0.kind.name)/\($0.reason)", $0.count) }, uniquingKeysWith: +)
        XCTAssertGreaterThanOrEqual(drops["process_exec/ringbuf_full"] ?? 0, 30, "\(drops)")
        XCTAssertGreaterThanOrEqual(drops["process_exit/ringbuf_full"] ?? 0, 30, "\(drops)")
    }

    func testExecAndExitArriveWithPidCommAndExitCode() throws {
        try TestSupport.requireBPF()
        let source = try KernelSource(configuration: .init(), logger: Logger(label: "test"))
        let outbox = try Outbox(node: "t", epoch: 1, spoolDirectory: nil)
        source.start(into: outbox)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "exit 7"]
        try p.run()
        p.waitUntilExit()
        let pid = UInt32(p.processIdentifier)
        XCTAssertTrue(eventually { outbox.pendingEvents > 0 || outbox.unacknowledged > 0 })
        // Let the poll thread see everything, then read the sealed batches back.
        usleep(300_000)
        source.stop()
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        let events = try Self.drain(outbox)
        let exec = events.first { $0.pid == pid && $0.kind == .processExec }
        let exit = events.first { $0.pid == pid && $0.kind == .processExit }
        XCTAssertEqual(exec?.comm, "sh")
        XCTAssertEqual(exec?.detail, .exec(filename: "/bin/sh"))
        XCTAssertEqual(exec?.ppid, UInt32(getpid()))
        XCTAssertEqual(exit?.detail, .exit(exitCode: 7, signal: 0, coreDumped: false))
        // Kernel monotonic time was converted to wall time: within a minute of now.
        XCTAssertLessThan(abs(wallClockNs() - (exit?.timeNs ?? 0)), 60_000_000_000)
    }

    func testCgroupRootLimitsObservationToItsSubtree() throws {
        try TestSupport.requireBPF()
        let unified = "/sys/fs/cgroup/unified"
        guard FileManager.default.fileExists(atPath: unified + "/cgroup.procs") else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup2 hierarchy at \(unified)") }
            throw XCTSkip("no cgroup2 hierarchy at \(unified)")
        }
        let group = unified + "/tapio-test-\(getpid())"
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)
        defer { rmdir(group) }
        let source = try KernelSource(configuration: .init(cgroupRoot: group), logger: Logger(label: "test"))
        let outbox = try Outbox(node: "t", epoch: 1, spoolDirectory: nil)
        source.start(into: outbox)
        // One child inside the subtree, one outside.
        let inside = try Self.runShell("echo $$ > \(group)/cgroup.procs && exit 11")
        let outside = try Self.runShell("exit 12")
        usleep(300_000)
        source.stop()
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        let events = try Self.drain(outbox)
        XCTAssertTrue(events.contains { $0.pid == inside && $0.detail == .exit(exitCode: 11, signal: 0, coreDumped: false) }, "\(events)")
        XCTAssertFalse(events.contains { $0.pid == outside }, "a task outside --cgroup-root was reported")
    }

    /// Every process record carries its memory-controller cgroup id from the
    /// kernel: the inode of its directory in the v1 memory hierarchy (on a
    /// hybrid host the id that names a container), so attribution never has
    /// to read /proc/PID/cgroup per event.
    func testRecordsCarryTheMemoryCgroupIdFromTheKernel() throws {
        try TestSupport.requireBPF()
        let memory = "/sys/fs/cgroup/memory"
        guard FileManager.default.fileExists(atPath: memory + "/cgroup.procs") else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup v1 memory hierarchy at \(memory)") }
            throw XCTSkip("no cgroup v1 memory hierarchy at \(memory)")
        }
        let group = memory + "/tapio-test-memcg-\(getpid())"
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)
        defer { rmdir(group) }
        var st = stat()
        XCTAssertEqual(stat(group, &st), 0)
        let expected = UInt64(st.st_ino)
        let seen = Mutex<[UInt32: [UInt64]]>([:])
        let source = try KernelSource(configuration: .init(), logger: Logger(label: "test")) { event, memoryCgroupId in
            seen.withLock { $0[event.pid, default: []].append(memoryCgroupId) }
        }
        let outbox = try Outbox(node: "t", epoch: 1, spoolDirectory: nil)
        source.start(into: outbox)
        let inside = try Self.runShell("echo $$ > \(group)/cgroup.procs && exec /bin/true")
        let outside = try Self.runShell("exec /bin/true")
        usleep(300_000)
        source.stop()
        let ids = seen.withLock { $0 }
        // The shell's own exec (still in the parent's group), then the exec
        // of /bin/true and the exit, both in the new memory cgroup.
        XCTAssertEqual(ids[inside]?.count, 3, "\(ids[inside] ?? [])")
        XCTAssertNotEqual(ids[inside]?.first, expected)
        XCTAssertEqual(ids[inside]?.suffix(2), [expected, expected], "ids seen for the pid in \(group) (inode \(expected))")
        XCTAssertFalse(ids[outside, default: []].isEmpty)
        XCTAssertFalse(ids[outside, default: []].contains(expected))
        XCTAssertFalse(ids[outside, default: []].contains(0), "a task outside any created group still has the root's id")
    }

    private static func runShell(_ script: String) throws -> UInt32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", script]
        try p.run()
        p.waitUntilExit()
        return UInt32(p.processIdentifier)
    }

    /// Every event in the outbox's sealed batches.
    static func drain(_ outbox: Outbox) throws -> [TapioEvent] {
        var events: [TapioEvent] = []
        for payload in outbox.sealedPayloadsForTesting() {
            events += try EventBatch.decode(payload).events
        }
        return events
    }
}
