import Foundation

/// An IPv4 (4 bytes) or IPv6 (16 bytes) address in network order.
public struct IPAddress: Sendable, Hashable, CustomStringConvertible, Comparable, Codable {
    public var bytes: [UInt8]

    public init?(bytes: [UInt8]) {
        guard bytes.count == 4 || bytes.count == 16 else { return nil }
        self.bytes = bytes
    }

    /// Parses a dotted IPv4 or textual IPv6 address.
    public init?(_ text: String) {
        var v4 = in_addr()
        if inet_pton(AF_INET, text, &v4) == 1 {
            bytes = withUnsafeBytes(of: &v4) { Array($0) }
            return
        }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, text, &v6) == 1 {
            bytes = withUnsafeBytes(of: &v6) { Array($0) }
            return
        }
        return nil
    }

    /// From a kernel record: `family` AF_INET (2) or AF_INET6 (10), address in the first 4 or 16 bytes.
    public init?(family: UInt16, raw: [UInt8]) {
        switch Int32(family) {
        case AF_INET where raw.count >= 4: bytes = Array(raw[0..<4])
        case AF_INET6 where raw.count >= 16:
            // An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is shown as the IPv4 address.
            if raw[0..<10].allSatisfy({ $0 == 0 }) && raw[10] == 0xff && raw[11] == 0xff {
                bytes = Array(raw[12..<16])
            } else {
                bytes = Array(raw[0..<16])
            }
        default: return nil
        }
    }

    public var isIPv4: Bool { bytes.count == 4 }

    public var description: String {
        if bytes.count == 4 {
            // Dotted quad by hand: at most 15 bytes, a small string with no
            // allocation (inet_ntop formats through printf; the engine asks
            // for an address's text on every network event).
            var s = String(bytes[0])
            for b in bytes[1...] {
                s.append(".")
                s.append(String(b))
            }
            return s
        }
        var buffer = [CChar](repeating: 0, count: Int(INET6_ADDRSTRLEN))
        let family = isIPv4 ? AF_INET : AF_INET6
        let ok = bytes.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &buffer, socklen_t(buffer.count)) } != nil
        return ok ? String(cString: buffer) : "?"
    }

    public static func < (a: IPAddress, b: IPAddress) -> Bool {
        a.bytes.lexicographicallyPrecedes(b.bytes)
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
