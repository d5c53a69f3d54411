import Foundation

/// An IPv4 (4 bytes) or IPv6 (16 bytes) address in network order.
///
/// Kept as two integers, not an array: every network event carries two
/// addresses, and the engine hashes, compares and copies them per event.
public struct IPAddress: Sendable, Hashable, CustomStringConvertible, Comparable, Codable {
    /// Bytes 0..<8 big-endian (IPv4: its 4 bytes in the top half).
    private var high: UInt64
    /// Bytes 8..<16 big-endian (IPv4: 0).
    private var low: UInt64
    public let isIPv4: Bool

    /// The address in network order, 4 or 16 bytes.
    public var bytes: [UInt8] {
        let count = isIPv4 ? 4 : 16
        return (0..<count).map { i in UInt8(truncatingIfNeeded: (i < 8 ? high : low) >> UInt64(56 - 8 * (i % 8))) }
    }

    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.init(unchecked: bytes)
    }

    /// From 4 or 16 bytes in memory (a decoded message), without copying them first.
    public init?(bytes: UnsafeBufferPointer<UInt8>) {
        guard let start = bytes.baseAddress else { return nil }
        let raw = UnsafeRawPointer(start)
        switch bytes.count {
        case 4:
            high = UInt64(UInt32(bigEndian: raw.loadUnaligned(as: UInt32.self))) << 32
            low = 0
            isIPv4 = true
        case 16:
            high = UInt64(bigEndian: raw.loadUnaligned(as: UInt64.self))
            low = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            isIPv4 = false
        default:
            return nil
        }
    }

    private init<C: Collection>(unchecked bytes: C) where C.Element == UInt8 {
        var h: UInt64 = 0, l: UInt64 = 0
        for (i, b) in bytes.enumerated() {
            if i < 8 { h |= UInt64(b) << UInt64(56 - 8 * i) } else { l |= UInt64(b) << UInt64(56 - 8 * (i - 8)) }
        }
        high = h
        low = l
        isIPv4 = bytes.count == 4
    }

    /// Parses a dotted IPv4 or textual IPv6 address.
    public init?(_ text: String) {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            self.init(unchecked: withUnsafeBytes(of: &v4) { Array($0) }[...])
            return
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            self.init(unchecked: withUnsafeBytes(of: &v6) { Array($0) }[...])
            return
        }
        return nil
    }

    /// From a kernel record: `family` AF_INET (2) or AF_INET6 (10), address in the first 4 or 16 bytes.
    public init?(family: UInt16, raw: [UInt8]) {
        switch Int32(family) {
        case AF_INET where raw.count >= 4: self.init(unchecked: raw[0..<4])
        case AF_INET6 where raw.count >= 16:
            // An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is shown as the IPv4 address.
            if raw[0..<10].allSatisfy({ $0 == 0 }) && raw[10] == 0xff && raw[11] == 0xff {
                self.init(unchecked: raw[12..<16])
            } else {
                self.init(unchecked: raw[0..<16])
            }
        default: return nil
        }
    }

    /// 0.0.0.0 or :: (every byte zero): "any address", not a peer.
    public var isUnspecified: Bool { high == 0 && low == 0 }

    public var description: String {
        if isIPv4 {
            // Dotted quad by hand: at most 15 bytes, a small string with no
            // allocation (inet_ntop formats through printf; the engine asks
            // for an address's text on every network event).
            var s = String(UInt8(truncatingIfNeeded: high >> 56))
            for shift: UInt64 in [48, 40, 32] {
                s.append(".")
                s.append(String(UInt8(truncatingIfNeeded: high >> shift)))
            }
            return s
        }
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let raw = bytes
        let ok = raw.withUnsafeBytes { inet_ntop(AF_INET6, $0.baseAddress, &buffer, socklen_t(buffer.count)) } != nil
        return ok ? String(cString: buffer) : "?"
    }

    /// Byte order, a shorter address before a longer one with the same start
    /// (as comparing the byte arrays would).
    public static func < (a: IPAddress, b: IPAddress) -> Bool {
        let (ha, hb) = (a.high >> 32, b.high >> 32)
        if ha != hb { return ha < hb }
        if a.isIPv4 != b.isIPv4 { return a.isIPv4 }
        return (a.high, a.low) < (b.high, b.low)
    }

    // The bytes, as before the integers: checkpoints and anything else
    // encoded stay readable.
    private enum CodingKeys: String, CodingKey { case bytes }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let raw = try c.decode([UInt8].self, forKey: .bytes)
        guard raw.count == 4 || raw.count == 16 else {
            throw DecodingError.dataCorruptedError(forKey: .bytes, in: c, debugDescription: "an address has 4 or 16 bytes, not \(raw.count)")
        }
        self.init(unchecked: raw[...])
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(bytes, forKey: .bytes)
    }
}

/// One TCP (or UDP) flow as seen from the socket that reported it: source is local.
public struct Flow: Sendable, Hashable, Codable {
    public var source: IPAddress?
    public var destination: IPAddress?
    public var sourcePort: UInt16
    public var destinationPort: UInt16

    public init(source: IPAddress?, destination: IPAddress?, sourcePort: UInt16, destinationPort: UInt16) {
        self.source = source
        self.destination = destination
        self.sourcePort = sourcePort
        self.destinationPort = destinationPort
    }

    var jsonFields: [String: JSONValue] {
        var o: [String: JSONValue] = ["src_port": .int(Int64(sourcePort)), "dst_port": .int(Int64(destinationPort))]
        if let s = source { o["src_ip"] = .string(s.description) }
        if let d = destination { o["dst_ip"] = .string(d.description) }
        return o
    }
}

public enum ConnectOutcome: UInt32, Sendable, CaseIterable, Codable {
    case established = 1
    case refused = 2
    case timeout = 3
    case reset = 4
    case error = 5

    public var name: String {
        switch self {
        case .established: return "established"
        case .refused: return "refused"
        case .timeout: return "timeout"
        case .reset: return "reset"
        case .error: return "error"
        }
    }

    public var isFailure: Bool { self != .established }
}

/// errno values worth naming in events; others print as their number.
public func errnoName(_ code: Int32) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EIO: "EIO", EBADF: "EBADF", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES",
        EEXIST: "EEXIST", ENOSPC: "ENOSPC", EROFS: "EROFS", EPIPE: "EPIPE", EDQUOT: "EDQUOT", EFBIG: "EFBIG",
        ECONNREFUSED: "ECONNREFUSED", ECONNRESET: "ECONNRESET", ETIMEDOUT: "ETIMEDOUT", EHOSTUNREACH: "EHOSTUNREACH",
        ENETUNREACH: "ENETUNREACH", ECONNABORTED: "ECONNABORTED", EADDRNOTAVAIL: "EADDRNOTAVAIL",
    ]
    return names[code] ?? "errno \(code)"
}

/// DNS response codes (RFC 1035, 6895).
public func dnsRcodeName(_ rcode: Int32) -> String {
    switch rcode {
    case -1: return "TIMEOUT"
    case 0: return "NOERROR"
    case 1: return "FORMERR"
    case 2: return "SERVFAIL"
    case 3: return "NXDOMAIN"
    case 4: return "NOTIMP"
    case 5: return "REFUSED"
    default: return "RCODE\(rcode)"
    }
}

public func dnsTypeName(_ qtype: UInt32) -> String {
    switch qtype {
    case 1: return "A"
    case 2: return "NS"
    case 5: return "CNAME"
    case 6: return "SOA"
    case 12: return "PTR"
    case 15: return "MX"
    case 16: return "TXT"
    case 28: return "AAAA"
    case 33: return "SRV"
    case 65: return "HTTPS"
    default: return "TYPE\(qtype)"
    }
}

public func ipProtocolName(_ proto: UInt32) -> String {
    switch proto {
    case 1: return "icmp"
    case 6: return "tcp"
    case 17: return "udp"
    case 58: return "icmpv6"
    default: return "ip-proto-\(proto)"
    }
}
