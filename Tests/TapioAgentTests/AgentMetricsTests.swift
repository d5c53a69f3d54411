import CTapioBPF
import Foundation
import Logging
@testable import TapioAgent
import TapioTestSupport
import XCTest

/// What the agent's /metrics says about its kernel side: how full each ring
/// buffer is and how often each BPF program ran, both read from the kernel.
final class AgentMetricsTests: XCTestCase {
    private func runTrue(_ times: Int) throws {
        for _ in 0..<times {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/bin/true")
            try p.run()
            p.waitUntilExit()
        }
    }

    /// Nobody reads this source's rings: what the programs write stays, and
    /// the fill (producer minus consumer position) shows it, up to the size.
    func testTheRingFillIsWhatTheProgramsWroteAndNobodyRead() throws {
        try TestSupport.requireBPF()
        var config = KernelSource.Configuration()
        config.ringBufferBytes = ["process": 4096]
        let source = try KernelSource(configuration: config, logger: Logger(label: "test"))
        let before = try XCTUnwrap(source.ringBuffers.first { $0.name == "process" })
        try runTrue(50)
        let after = try XCTUnwrap(source.ringBuffers.first { $0.name == "process" })
        XCTAssertEqual(after.bytes, 4096)
        XCTAssertGreaterThan(after.fillBytes, before.fillBytes)
        // 50 execs and exits do not fit in 4 KiB: the ring is full but for less than one record.
        XCTAssertGreaterThan(after.fillBytes, 4096 - UInt64(TAPIO_EVENT_SIZE) - 8, "\(after)")
        XCTAssertLessThanOrEqual(after.fillBytes, 4096)
    }

    /// With run statistics on (here through a BPF_ENABLE_STATS descriptor,
    /// as `sysctl kernel.bpf_stats_enabled=1` would), the kernel counts every
    /// run of the exec program, and the agent reports it under its full name.
    func testEachProgramsRunsAreCountedWhileStatisticsAreOn() throws {
        try TestSupport.requireBPF()
        let source = try KernelSource(configuration: .init(), logger: Logger(label: "test"))
        let stats = tapio_prog_stats_enable()
        guard stats >= 0 else {
            if TestSupport.bpfRequired { throw TestSupportError("BPF_ENABLE_STATS failed: errno \(-stats)") }
            throw XCTSkip("BPF_ENABLE_STATS is not available on this kernel (errno \(-stats))")
        }
        defer { close(stats) }
        let known = source.programs.map(\.name)
        func exec() -> Agent.BPFProgramStatistics? { Agent.bpfProgramStatistics(known: known).first { $0.name == "handle_exec" } }
        let before = try XCTUnwrap(exec(), "\(Agent.bpfProgramStatistics(known: known))")
        try runTrue(20)
        let after = try XCTUnwrap(exec())
        XCTAssertGreaterThanOrEqual(after.runs - before.runs, 20)
        XCTAssertGreaterThan(after.runTimeNs, before.runTimeNs)
        // Names the kernel cut at 15 characters are the loader's again.
        guard source.programs.contains(where: { $0.name == "handle_latency_state" && $0.attached }) else { return }
        XCTAssertTrue(Agent.bpfProgramStatistics(known: known).contains { $0.name == "handle_latency_state" },
                      "\(Agent.bpfProgramStatistics(known: known).map(\.name))")
    }
}
