/// One sealed batch as the agent keeps it on disk, checksummed so that a torn
/// write, a truncated file or flipped bits are recognised instead of being
/// sent (and refused) forever.
///
/// ```
/// offset  size  field
///      0     4  magic "TPSR"
///      4     1  version: 1
///      5     3  reserved: 0 0 0
///      8     8  stream epoch, unsigned big-endian
///     16     8  sequence, unsigned big-endian
///     24     4  events in the batch, unsigned big-endian
///     28     4  payload length n, unsigned big-endian
///     32     4  CRC-32 of bytes 0..<32 (the header)
///     36     4  CRC-32 of the payload
///     40     n  payload: the encoded EventBatch, exactly as sent
/// ```
///
/// The header has its own checksum so that the event count is still known
/// (and counted as dropped) when only the payload is damaged. `decode` never
/// traps: any input either decodes or throws.
///
/// A spool segment (`SpoolSegments`) is records back to back, nothing
/// between them; `scan` splits one into its records and damaged pieces.
public struct SpoolRecord: Sendable, Equatable {
    public static let magic: [UInt8] = [0x54, 0x50, 0x53, 0x52]
    public static let version: UInt8 = 1
    public static let headerSize = 40

    public var epoch: UInt64
    public var sequence: UInt64
    public var eventCount: UInt32
    public var payload: [UInt8]

    public init(epoch: UInt64, sequence: UInt64, eventCount: UInt32, payload: [UInt8]) {
        self.epoch = epoch
        self.sequence = sequence
        self.eventCount = eventCount
        self.payload = payload
    }

    /// Why a record could not be read, and how many events it held when that
    /// much is still known (its header checksum holds).
    public struct DecodeError: Error, Sendable, Equatable, CustomStringConvertible {
        public var message: String
        public var eventCount: UInt32?

        public var description: String { message }
    }

    public func encode() -> [UInt8] {
        var out = payload.withUnsafeBytes { Self.header(epoch: epoch, sequence: sequence, eventCount: eventCount, payload: $0) }
        out += payload
        return out
    }

    /// The header of the record holding `payload`: a record is written as
    /// this and the payload side by side, without copying the payload.
    public static func header(epoch: UInt64, sequence: UInt64, eventCount: UInt32, payload: UnsafeRawBufferPointer) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(headerSize)
        out += magic
        out += [version, 0, 0, 0]
        append(epoch, to: &out)
        append(sequence, to: &out)
        append(eventCount, to: &out)
        append(UInt32(truncatingIfNeeded: payload.count), to: &out)
        append(CRC32.checksum(out[0..<32]), to: &out)
        append(CRC32.checksum(payload), to: &out)
        return out
    }

    /// One piece of a segment: a record, or bytes that are not one.
    public struct Piece: Sendable, Equatable {
        public var offset: Int
        /// Bytes the piece spans.
        public var length: Int
        /// Every check holds: the bytes decode to the record.
        public var intact: Bool
        /// From the header when its checksum holds (else nil and zeros):
        /// a damaged record's events are still known and counted.
        public var eventCount: UInt32?
        public var epoch: UInt64 = 0
        public var sequence: UInt64 = 0
        public var payloadCRC: UInt32 = 0
    }

    /// Splits records written back to back into pieces, in order, covering
    /// every byte. A record whose header checks out spans its stated length
    /// (to the end when the bytes stop short: a torn write); bytes that start
    /// no record with a valid header are one damaged piece up to the next
    /// that does. Never traps.
    public static func scan(_ bytes: UnsafeRawBufferPointer) -> [Piece] {
        var pieces: [Piece] = []
        let n = bytes.count
        var offset = 0
        while offset < n {
            guard let h = parseHeader(bytes, at: offset) else {
                var next = offset + 1
                while next < n, parseHeader(bytes, at: next) == nil { next += 1 }
                pieces.append(Piece(offset: offset, length: next - offset, intact: false, eventCount: nil))
                offset = next
                continue
            }
            let end = offset + headerSize + Int(h.length)
            var piece = Piece(offset: offset, length: min(end, n) - offset, intact: false, eventCount: h.events,
                              epoch: h.epoch, sequence: h.sequence, payloadCRC: h.payloadCRC)
            if end <= n, h.wellFormed {
                piece.intact = CRC32.checksum(UnsafeRawBufferPointer(rebasing: bytes[(offset + headerSize)..<end])) == h.payloadCRC
            }
            pieces.append(piece)
            offset = piece.offset + piece.length
        }
        return pieces
    }

    private struct Header {
        var epoch: UInt64
        var sequence: UInt64
        var events: UInt32
        var length: UInt32
        var payloadCRC: UInt32
        /// Version and reserved bytes as this agent writes them.
        var wellFormed: Bool
    }

    /// A header at `offset` whose magic and checksum hold.
    private static func parseHeader(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> Header? {
        guard offset >= 0, bytes.count - offset >= headerSize,
              bytes[offset] == magic[0], bytes[offset + 1] == magic[1], bytes[offset + 2] == magic[2], bytes[offset + 3] == magic[3] else { return nil }
        func u32(_ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(bytes[offset + at + $1]) } }
        func u64(_ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(bytes[offset + at + $1]) } }
        guard CRC32.checksum(UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + 32)])) == u32(32) else { return nil }
        return Header(epoch: u64(8), sequence: u64(16), events: u32(24), length: u32(28), payloadCRC: u32(36),
                      wellFormed: bytes[offset + 4] == version && bytes[offset + 5] == 0 && bytes[offset + 6] == 0 && bytes[offset + 7] == 0)
    }

    public static func decode(_ bytes: [UInt8]) throws -> SpoolRecord {
        guard bytes.count >= headerSize else {
            throw DecodeError(message: "spool record of \(bytes.count) bytes is shorter than its header", eventCount: nil)
        }
        guard Array(bytes[0..<4]) == magic else { throw DecodeError(message: "not a spool record (bad magic)", eventCount: nil) }
        guard CRC32.checksum(bytes[0..<32]) == uint32(bytes, at: 32) else {
            throw DecodeError(message: "spool record header checksum mismatch", eventCount: nil)
        }
        let events = uint32(bytes, at: 24)
        guard bytes[4] == version else { throw DecodeError(message: "spool record version \(bytes[4]) is not supported", eventCount: events) }
        guard bytes[5] == 0, bytes[6] == 0, bytes[7] == 0 else { throw DecodeError(message: "spool record reserved bytes are not zero", eventCount: events) }
        let length = Int(uint32(bytes, at: 28))
        guard bytes.count - headerSize == length else {
            throw DecodeError(message: "spool record payload is \(bytes.count - headerSize) bytes, header says \(length)", eventCount: events)
        }
        let payload = bytes[headerSize...]
        guard CRC32.checksum(payload) == uint32(bytes, at: 36) else {
            throw DecodeError(message: "spool record payload checksum mismatch", eventCount: events)
        }
        return SpoolRecord(epoch: uint64(bytes, at: 8), sequence: uint64(bytes, at: 16), eventCount: events, payload: Array(payload))
    }

    private static func append(_ value: UInt64, to out: inout [UInt8]) {
        for shift in stride(from: 56, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: value >> UInt64(shift))) }
    }

    private static func append(_ value: UInt32, to out: inout [UInt8]) {
        for shift in stride(from: 24, through: 0, by: -8) { out.append(UInt8(truncatingIfNeeded: value >> UInt32(shift))) }
    }

    /// Callers have checked that `offset + 8 <= bytes.count`.
    private static func uint64(_ bytes: [UInt8], at offset: Int) -> UInt64 {
        bytes[offset..<offset + 8].reduce(0) { $0 << 8 | UInt64($1) }
    }

    private static func uint32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        bytes[offset..<offset + 4].reduce(0) { $0 << 8 | UInt32($1) }
    }
}

/// CRC-32 as zlib computes it (IEEE 802.3, reflected, polynomial 0xEDB88320).
enum CRC32 {
    /// Slicing-by-8 tables: `tables[k * 256 + n]` is the CRC of byte n
    /// followed by k zero bytes. Eight bytes a step instead of one: the
    /// spooler checksums every sealed batch (a byte at a time it took 3 % of
    /// the agent's CPU under a per-event storm).
    private static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for n in 0..<256 {
            var c = UInt32(n)
            for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
            t[n] = c
        }
        for k in 1..<8 {
            for n in 0..<256 {
                let prev = t[(k - 1) * 256 + n]
                t[k * 256 + n] = t[Int(prev & 0xFF)] ^ (prev >> 8)
            }
        }
        return t
    }()

    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        bytes.withUnsafeBufferPointer { checksum(UnsafeRawBufferPointer($0)) }
    }

    static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        tables.withUnsafeBufferPointer { t in
            var crc: UInt32 = 0xFFFF_FFFF
            var i = 0
            let n = bytes.count
            while i + 8 <= n {
                let lo = crc ^ bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self).littleEndian
                let hi = bytes.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self).littleEndian
                crc = t[7 * 256 + Int(lo & 0xFF)] ^ t[6 * 256 + Int((lo >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((lo >> 16) & 0xFF)] ^ t[4 * 256 + Int(lo >> 24)]
                    ^ t[3 * 256 + Int(hi & 0xFF)] ^ t[2 * 256 + Int((hi >> 8) & 0xFF)]
                    ^ t[1 * 256 + Int((hi >> 16) & 0xFF)] ^ t[Int(hi >> 24)]
                i += 8
            }
            while i < n {
                crc = t[Int((crc ^ UInt32(bytes[i])) & 0xFF)] ^ (crc >> 8)
                i += 1
            }
            return crc ^ 0xFFFF_FFFF
        }
    }
}
