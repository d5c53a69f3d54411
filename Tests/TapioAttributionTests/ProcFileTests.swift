import Foundation
@testable import TapioAttribution
import XCTest

final class ProcFileTests: XCTestCase {
    /// procfs hands a file out a page per read(); a reader that stops after the
    /// first one cuts /proc/self/mountinfo in a container mid-line.
    func testAProcfsFileLongerThanAPageIsReadWhole() throws {
        // A test process maps far more than 4 KiB of text: the loader, libc,
        // Foundation, XCTest and this bundle.
        let data = try XCTUnwrap(ProcFile.read("/proc/self/maps"))
        XCTAssertGreaterThan(data.count, 8192)
        XCTAssertEqual(data.last, UInt8(ascii: "\n"), "the last line is whole")
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n")
        XCTAssertTrue(lines.contains { $0.contains("[stack]") }, "the stack mapping, near the end of maps, is there")
    }

    func testAFileThatDoesNotExistIsNil() {
        XCTAssertNil(ProcFile.read("/proc/self/no-such-file"))
    }
}
