import Foundation
import TapioAgent
import TapioAttribution
import TapioTestSupport
import TapioWire
import XCTest

/// CPU usage and pressure read from real cgroups: a busy loop in a cgroup of
/// its own, and what the watcher reports for it against the kernel's own
/// account of the process (`/proc/PID/schedstat`, time on a CPU).
final class CgroupUsageTests: XCTestCase {
    private func requireRoot() throws {
        guard geteuid() != 0 else { return }
        if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but cgroup tests need root") }
        throw XCTSkip("needs root to create cgroups")
    }

    /// A shell spinning in `dirs` (it joins each cgroup, then loops).
    private func spin(in dirs: [String]) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", dirs.map { "echo $$ > \($0)/cgroup.procs && " }.joined() + "while :; do :; done"]
        try p.run()
        return p
    }

    /// Time the process has run on a CPU, ns.
    private func cpuTime(_ pid: Int32) throws -> UInt64 {
        let text = try String(contentsOfFile: "/proc/\(pid)/schedstat", encoding: .utf8)
        guard let ns = text.split(separator: " ").first.flatMap({ UInt64($0) }) else { throw TestSupportError("schedstat: \(text)") }
        return ns
    }

    private func joined(_ dir: String, _ pid: Int32) -> Bool {
        ((try? String(contentsOfFile: dir + "/cgroup.procs", encoding: .utf8)) ?? "").split(separator: "\n").contains { $0 == "\(pid)" }
    }

    /// Scans once, lets the loop run, scans again: the second scan's event
    /// for the cgroup, and the loop's CPU time in between.
    private func measure(_ watcher: CgroupWatcher, _ p: Process, joinedAt dir: String, cgroup: String) throws -> (CPUUsage, UInt64, UInt64) {
        let deadline = Date().addingTimeInterval(5)
        while !joined(dir, p.processIdentifier) {
            guard Date() < deadline else { throw TestSupportError("the loop never joined \(dir)") }
            usleep(10_000)
        }
        _ = watcher.scan(nowNs: monotonicNs())
        let before = try cpuTime(p.processIdentifier)
        usleep(1_000_000)
        let after = try cpuTime(p.processIdentifier)
        let events = watcher.scan(nowNs: monotonicNs())
        for e in events {
            if case .cpuThrottle(_, _, _, let interval, let path, let usage) = e.detail, path == cgroup, let usage {
                return (usage, after - before, interval)
            }
        }
        throw TestSupportError("no cpu_throttle with usage for \(cgroup): \(events)")
    }

    func testABusyLoopInACgroupV1IsReportedUsingOneCPU() throws {
        try requireRoot()
        let hosts = HostCgroups.detect()
        guard let cpuacct = hosts.cpuacct else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup v1 cpuacct controller: \(hosts)") }
            throw XCTSkip("no cgroup v1 cpuacct controller mounted (\(hosts))")
        }
        let name = "tapio-usage-\(getpid())"
        var dirs = [cpuacct + "/" + name]
        if let cpu = hosts.cpu, cpu != cpuacct { dirs.append(cpu + "/" + name) }
        for d in dirs { try FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: false) }
        let loop = try spin(in: dirs)
        defer {
            kill(loop.processIdentifier, SIGKILL)
            loop.waitUntilExit()
            for d in dirs { rmdir(d) }
        }
        // v1 only: the usage must come from cpuacct.usage.
        let watcher = CgroupWatcher(configuration: .init(v2Mount: nil, v1CPUMount: hosts.cpu, v1MemoryMount: nil, relativeRoot: "/" + name,
                                                         v1CPUAcctMount: cpuacct))
        let (usage, ran, interval) = try measure(watcher, loop, joinedAt: dirs[0], cgroup: "/" + name)
        // One spinning thread is one CPU, as much as it got: what the cgroup
        // says it used is what the kernel says the process ran.
        let cores = Double(usage.usageNs) / Double(interval)
        XCTAssertEqual(Double(usage.usageNs), Double(ran), accuracy: 0.1 * Double(ran) + 30_000_000,
                       "cgroup usage \(usage.usageNs) ns vs the loop's \(ran) ns on a CPU")
        XCTAssertLessThanOrEqual(cores, 1.05, "one thread cannot use more than one CPU")
        XCTAssertGreaterThan(cores, 0.3, "a spinning loop on a \(ProcessInfo.processInfo.activeProcessorCount)-CPU machine: \(cores) CPUs")
        // The watched root is the node: its CPUs, run queue and pressure.
        let node = try XCTUnwrap(usage.node, "the watched root's event carries the node")
        XCTAssertEqual(Int(node.cpus), ProcessInfo.processInfo.activeProcessorCount)
        XCTAssertGreaterThanOrEqual(node.runnable, 1, "the loop itself was runnable")
        if FileManager.default.fileExists(atPath: "/proc/pressure/cpu") { XCTAssertNotNil(node.pressure) }
        XCTAssertNil(usage.pressure, "cgroup v1 keeps no cpu.pressure here")
    }

    func testABusyLoopInACgroupV2ShowsUsageAndWaitsForCPUAsPressure() throws {
        try requireRoot()
        let hosts = HostCgroups.detect()
        guard let unified = hosts.unified, FileManager.default.fileExists(atPath: unified + "/cgroup.procs") else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup2 hierarchy: \(hosts)") }
            throw XCTSkip("no cgroup2 hierarchy mounted (\(hosts))")
        }
        let name = "tapio-usage2-\(getpid())"
        let dir = unified + "/" + name
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: false)
        // More loops than CPUs: some always wait for one.
        let loops = try (0...ProcessInfo.processInfo.activeProcessorCount).map { _ in try spin(in: [dir]) }
        defer {
            for l in loops { kill(l.processIdentifier, SIGKILL); l.waitUntilExit() }
            rmdir(dir)
        }
        let watcher = CgroupWatcher(configuration: .init(v2Mount: unified, v1CPUMount: nil, v1MemoryMount: nil, relativeRoot: ""))
        for l in loops.dropFirst() {
            while !joined(dir, l.processIdentifier) { usleep(10_000) }
        }
        let (usage, ran, interval) = try measure(watcher, loops[0], joinedAt: dir, cgroup: "/" + name)
        let cores = Double(usage.usageNs) / Double(interval)
        XCTAssertGreaterThan(Double(usage.usageNs), Double(ran), "the cgroup holds more than the one loop measured")
        XCTAssertLessThanOrEqual(cores, Double(ProcessInfo.processInfo.activeProcessorCount) + 0.05)
        XCTAssertNil(usage.node, "not the watched root")
        let pressure = try XCTUnwrap(usage.pressure, "cgroup v2 keeps cpu.pressure")
        XCTAssertGreaterThan(pressure.someStallNs, 100_000_000, "\(loops.count) loops on \(ProcessInfo.processInfo.activeProcessorCount) CPUs wait")
    }
}
