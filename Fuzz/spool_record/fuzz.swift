// The agent's spool record reader (Sources/TapioAgent/SpoolRecord.swift): a
// file on disk that may be torn, truncated or damaged.
//
// Input: byte 0 bit 0 set means "make the checksums right first", so the
// fuzzer reaches the checks behind them; the rest is the file.
import TapioSpoolRecord

/// CRC-32 as zlib computes it, written here apart from the reader's.
private let table: [UInt32] = (0..<256).map { n -> UInt32 in
    var c = UInt32(n)
    for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
    return c
}

private func crc32(_ bytes: ArraySlice<UInt8>) -> UInt32 {
    var crc: UInt32 = 0xFFFF_FFFF
    for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
    return crc ^ 0xFFFF_FFFF
}

private func put(_ value: UInt32, into bytes: inout [UInt8], at offset: Int) {
    for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> UInt32(24 - 8 * i)) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    var record = bytes(data + 1, size - 1)
    if data[0] & 1 != 0 && record.count >= 40 {
        put(crc32(record[0..<32]), into: &record, at: 32)
        put(crc32(record[40...]), into: &record, at: 36)
    }
    guard let decoded = try? SpoolRecord.decode(record) else { return 0 }
    require(decoded.encode() == record, "a spool record that decodes does not encode to its bytes")
    return 0
}
