import Foundation
@testable import TapioAttribution
import XCTest

final class ProcFileTests: XCTestCase {
    /// procfs hands a file out a page per read(); a reader that stops after the
    /// first one cuts /proc/self/mountinfo in a container mid-line.
    func testAProcfsFileLongerThanAPageIsReadWhole() throws {
        // A test process maps far more than 4 KiB of text: the loader, libc,
        // Foundation, XCTest and this bundle.
        let data = try XCTUnwrap(ProcFile.bytes("/proc/self/maps"))
        XCTAssertGreaterThan(data.count, 8192)
        XCTAssertEqual(data.last, UInt8(ascii: "\n"), "the last line is whole")
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n")
        XCTAssertTrue(lines.contains { $0.contains("[stack]") }, "the stack mapping, near the end of maps, is there")
    }

    func testAFileThatDoesNotExistIsNil() {
        XCTAssertNil(ProcFile.bytes("/proc/self/no-such-file"))
        XCTAssertNil(ProcFile.text("/proc/self/no-such-file"))
    }

    func testALimitStopsTheRead() throws {
        let head = try XCTUnwrap(ProcFile.bytes("/proc/self/maps", limit: 100))
        XCTAssertEqual(head.count, 100)
    }

    /// The agent reads the cgroup.procs of every pod-level cgroup each second,
    /// and those are empty. Foundation's readers lost 4 KiB on each empty
    /// pseudo-file (20 000 reads: +80 MiB); these reads must not grow the heap.
    func testReadingAnEmptyPseudoFileAgainAndAgainDoesNotGrowMemory() throws {
        let path = "/proc/self/timers" // empty while the process has no POSIX timers; size 0 like every procfs file
        let first = try XCTUnwrap(ProcFile.text(path), "\(path) is readable")
        try XCTSkipUnless(first.isEmpty, "\(path) is not empty here: no empty pseudo-file to read")
        func residentKiB() -> Int {
            let statm = ProcFile.text("/proc/self/statm") ?? ""
            return (Int(statm.split(separator: " ").dropFirst().first ?? "") ?? 0) * Int(sysconf(Int32(_SC_PAGESIZE))) / 1024
        }
        let before = residentKiB()
        var empty = 0
        for _ in 0..<20_000 where ProcFile.text(path) == "" { empty += 1 }
        XCTAssertEqual(empty, 20_000)
        let grown = residentKiB() - before
        XCTAssertLessThan(grown, 8 * 1024, "20 000 reads of an empty file grew the resident set by \(grown) KiB")
    }
}
