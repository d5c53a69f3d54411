/// Length-prefixed frames: the unit every Tapio connection speaks.
///
/// ```
/// offset  size  field
///      0     2  magic "TP" (0x54 0x50)
///      2     1  version (1)
///      3     1  type (FrameType)
///      4     1  flags (0; reserved)
///      5     3  reserved, zero
///      8     4  payload length, big-endian, at most the receiver's maximum
///     12     n  payload (a protobuf message of tapio.proto)
/// ```
///
/// The length is checked against the maximum before a single payload byte is
/// buffered, so a peer cannot make the receiver allocate more than it allows.
public enum FrameType: UInt8, Sendable, CaseIterable {
    case hello = 1
    case helloAck = 2
    case eventBatch = 3
    case ack = 4
    case timeSync = 5
    case heartbeat = 6
    case query = 7
    case queryResponse = 8
    case error = 9
    case goodbye = 10
    case inventory = 11
}

public enum FrameError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt8, UInt8)
    case unsupportedVersion(UInt8)
    case unknownType(UInt8)
    case tooLarge(length: UInt32, maximum: UInt32)
    case nonZeroReserved

    public var description: String {
        switch self {
        case .badMagic(let a, let b): return "bad frame magic 0x\(String(a, radix: 16)) 0x\(String(b, radix: 16))"
        case .unsupportedVersion(let v): return "unsupported frame version \(v)"
        case .unknownType(let t): return "unknown frame type \(t)"
        case .tooLarge(let length, let maximum): return "frame of \(length) bytes exceeds the maximum of \(maximum)"
        case .nonZeroReserved: return "reserved frame header bytes are not zero"
        }
    }
}

public struct FrameHeader: Sendable, Equatable {
    public static let size = 12
    public static let version: UInt8 = 1
    public static let magic: (UInt8, UInt8) = (0x54, 0x50)
    /// Default hard maximum payload size: 4 MiB.
    public static let defaultMaximumPayload: UInt32 = 4 << 20

    public var type: FrameType
    public var flags: UInt8
    public var length: UInt32

    public init(type: FrameType, flags: UInt8 = 0, length: UInt32) {
        self.type = type
        self.flags = flags
        self.length = length
    }

    /// Parses the 12 header bytes at the start of `bytes` and checks the length
    /// against `maximumPayload`.
    public static func parse<Bytes: RandomAccessCollection>(_ bytes: Bytes, maximumPayload: UInt32) throws -> FrameHeader
    where Bytes.Element == UInt8, Bytes.Index == Int {
        precondition(bytes.count >= size)
        let b = bytes.startIndex
        guard bytes[b] == magic.0, bytes[b + 1] == magic.1 else { throw FrameError.badMagic(bytes[b], bytes[b + 1]) }
        guard bytes[b + 2] == version else { throw FrameError.unsupportedVersion(bytes[b + 2]) }
        guard let type = FrameType(rawValue: bytes[b + 3]) else { throw FrameError.unknownType(bytes[b + 3]) }
        guard bytes[b + 5] == 0, bytes[b + 6] == 0, bytes[b + 7] == 0 else { throw FrameError.nonZeroReserved }
        let length = UInt32(bytes[b + 8]) << 24 | UInt32(bytes[b + 9]) << 16 | UInt32(bytes[b + 10]) << 8 | UInt32(bytes[b + 11])
        guard length <= maximumPayload else { throw FrameError.tooLarge(length: length, maximum: maximumPayload) }
        return FrameHeader(type: type, flags: bytes[b + 4], length: length)
    }

    public func write(into bytes: inout [UInt8]) {
        bytes.append(contentsOf: [Self.magic.0, Self.magic.1, Self.version, type.rawValue, flags, 0, 0, 0])
        bytes.append(UInt8(truncatingIfNeeded: length >> 24))
        bytes.append(UInt8(truncatingIfNeeded: length >> 16))
        bytes.append(UInt8(truncatingIfNeeded: length >> 8))
        bytes.append(UInt8(truncatingIfNeeded: length))
    }
}

public struct Frame: Sendable, Equatable {
    public var type: FrameType
    public var payload: [UInt8]

    public init(type: FrameType, payload: [UInt8]) {
        self.type = type
        self.payload = payload
    }

    /// Header and payload, ready to write.
    public func encoded() -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(FrameHeader.size + payload.count)
        FrameHeader(type: type, length: UInt32(payload.count)).write(into: &out)
        out.append(contentsOf: payload)
        return out
    }
}

/// Reassembles frames from a byte stream that arrives in arbitrary pieces.
/// Used by the agent's blocking reader; the server uses the NIO decoder
/// built on the same `FrameHeader.parse`.
public struct FrameAssembler: Sendable {
    public let maximumPayload: UInt32
    private var buffer: [UInt8] = []
    private var start = 0

    public init(maximumPayload: UInt32 = FrameHeader.defaultMaximumPayload) {
        self.maximumPayload = maximumPayload
    }

    public mutating func append<Bytes: Sequence>(_ bytes: Bytes) where Bytes.Element == UInt8 {
        buffer.append(contentsOf: bytes)
    }

    /// The next complete frame, nil when more bytes are needed. Throws on a
    /// malformed or oversized header; the stream is unusable afterwards.
    public mutating func next() throws -> Frame? {
        let available = buffer.count - start
        guard available >= FrameHeader.size else { compact(); return nil }
        let header = try FrameHeader.parse(buffer[start..<(start + FrameHeader.size)], maximumPayload: maximumPayload)
        let total = FrameHeader.size + Int(header.length)
        guard available >= total else { compact(); return nil }
        let payload = Array(buffer[(start + FrameHeader.size)..<(start + total)])
        start += total
        return Frame(type: header.type, payload: payload)
    }

    private mutating func compact() {
        if start > 0 {
            buffer.removeFirst(start)
            start = 0
        }
    }
}
