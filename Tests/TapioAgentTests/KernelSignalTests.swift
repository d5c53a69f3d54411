import CTapioBPF
import Foundation
import Logging
import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

/// The aggregated and cgroup-file signals, made to happen with real kernel
/// mechanisms: a full tmpfs, a CFS quota, a memory limit.
final class KernelSignalTests: XCTestCase {
    /// Runs `body` with the kernel source started, then returns every event it produced.
    private func observe(settle: UInt32 = 400_000, _ body: () throws -> Void) throws -> [TapioEvent] {
        var config = KernelSource.Configuration()
        config.intervalNs = 200_000_000
        let source = try KernelSource(configuration: config, logger: Logger(label: "test"))
        var limits = Outbox.Limits()
        limits.maxMemoryBytes = 256 << 20
        let outbox = try Outbox(node: "t", epoch: 1, limits: limits, spoolDirectory: nil)
        source.start(into: outbox)
        usleep(300_000)
        try body()
        usleep(settle)
        source.stop()
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        return try KernelSourceTests.drain(outbox)
    }

    private static func run(_ path: String, _ arguments: [String]) throws -> UInt32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = arguments
        try p.run()
        p.waitUntilExit()
        return UInt32(p.processIdentifier)
    }

    func testFailedWritesToAFullFilesystemAreOneAggregatedIOError() throws {
        try TestSupport.requireBPF()
        let dir = try TestSupport.temporaryDirectory("tapio-full")
        XCTAssertEqual(try TestSupport.run("/bin/mount", ["-t", "tmpfs", "-o", "size=256k", "tmpfs", dir]).status, 0)
        defer { _ = try? TestSupport.run("/bin/umount", [dir]) }
        // Fill it, then fail 50 more writes in the same process.
        let script = """
            import os, errno, sys
            f = os.open("\(dir)/fill", os.O_WRONLY | os.O_CREAT)
            try:
                while True: os.write(f, b"x" * 65536)
            except OSError as e:
                assert e.errno == errno.ENOSPC
            failed = 0
            for _ in range(50):
                try: os.write(f, b"x" * 4096)
                except OSError: failed += 1
            sys.exit(0 if failed == 50 else 1)
            """
        var pid: UInt32 = 0
        let events = try observe { pid = try Self.run("/usr/bin/python3", ["-c", script]) }
        let io = events.filter { $0.kind == .ioError && $0.pid == pid }
        var total = 0
        for e in io {
            if case .ioError(let error, let syscall, let count, _) = e.detail, error == ENOSPC, syscall == "write" { total += Int(count) }
        }
        XCTAssertEqual(total, 51, "the first failing write plus 50: \(io)")
        XCTAssertLessThanOrEqual(io.count, 3, "aggregated, not one event per failure")
        XCTAssertEqual(io.first?.comm, "python3")
        // The interval each aggregate covers comes from its own harvest: more
        // than nothing, less than the test.
        for e in io {
            if case .ioError(_, _, _, let interval) = e.detail {
                XCTAssertGreaterThan(interval, 0)
                XCTAssertLessThan(interval, 60_000_000_000)
            }
        }
    }

    func testCFSQuotaThrottlingIsReportedForItsCgroup() throws {
        try TestSupport.requireBPF()
        guard FileManager.default.fileExists(atPath: "/sys/fs/cgroup/cpu/cpu.cfs_quota_us") else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup v1 cpu controller") }
            throw XCTSkip("no cgroup v1 cpu controller at /sys/fs/cgroup/cpu")
        }
        let name = "tapio-throttle-\(getpid())"
        let group = "/sys/fs/cgroup/cpu/" + name
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)
        defer { rmdir(group) }
        try "10000".write(toFile: group + "/cpu.cfs_quota_us", atomically: false, encoding: .utf8)
        let events = try observe {
            _ = try Self.run("/bin/sh", ["-c", "echo $$ > \(group)/cgroup.procs && timeout 1.5 sh -c 'while :; do :; done'; true"])
        }
        let throttled = events.contains {
            if case .cpuThrottle(_, let periods, _, _, let cgroup, _) = $0.detail { return cgroup == "/" + name && periods > 0 }
            return false
        }
        XCTAssertTrue(throttled, "cpu_throttle for /\(name): \(events.filter { $0.kind == .cpuThrottle })")
    }

    func testMemoryLimitHitsAreReportedAsPressure() throws {
        try TestSupport.requireBPF()
        guard FileManager.default.fileExists(atPath: "/sys/fs/cgroup/memory/memory.limit_in_bytes") else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup v1 memory controller") }
            throw XCTSkip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
        }
        let name = "tapio-pressure-\(getpid())"
        let group = "/sys/fs/cgroup/memory/" + name
        try FileManager.default.createDirectory(atPath: group, withIntermediateDirectories: false)
        defer { rmdir(group) }
        try "32M".write(toFile: group + "/memory.limit_in_bytes", atomically: false, encoding: .utf8)
        let events = try observe(settle: 700_000) {
            _ = try Self.run("/bin/sh", ["-c", "echo $$ > \(group)/cgroup.procs && exec tail /dev/zero"])
        }
        let pressure = events.contains {
            if case .memoryPressure(let source, let count, _, let limit, _, _, let cgroup) = $0.detail {
                return cgroup == "/" + name && source == "limit" && count > 0 && limit == 32 << 20
            }
            return false
        }
        XCTAssertTrue(pressure, "memory_pressure for /\(name): \(events.filter { $0.kind == .memoryPressure })")
    }
}
