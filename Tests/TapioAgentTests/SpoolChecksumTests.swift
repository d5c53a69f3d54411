import Foundation
@testable import TapioAgent
import XCTest

/// The spool records' CRC-32 (IEEE 802.3, as zlib's crc32): known values,
/// and the same answer as a byte-at-a-time reference for every length and
/// starting offset, so records written by earlier agents still check.
final class SpoolChecksumTests: XCTestCase {
    private func reference(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes {
            crc ^= UInt32(b)
            for _ in 0..<8 { crc = crc & 1 != 0 ? 0xEDB8_8320 ^ (crc >> 1) : crc >> 1 }
        }
        return crc ^ 0xFFFF_FFFF
    }

    func testKnownValues() {
        XCTAssertEqual(CRC32.checksum(ArraySlice(Array("123456789".utf8))), 0xCBF4_3926)
        XCTAssertEqual(CRC32.checksum(ArraySlice(Array("The quick brown fox jumps over the lazy dog".utf8))), 0x414F_A339)
        XCTAssertEqual(CRC32.checksum(ArraySlice([])), 0)
    }

    func testEveryLengthAndOffsetMatchesTheByteAtATimeReference() {
        var generator = SystemRandomNumberGenerator()
        let data = (0..<300).map { _ in UInt8.random(in: 0...255, using: &generator) }
        for start in 0..<9 {
            for end in stride(from: start, through: data.count, by: 7) {
                XCTAssertEqual(CRC32.checksum(data[start..<end]), reference(data[start..<end]), "bytes \(start)..<\(end)")
            }
        }
    }
}
