// Message headers in NATS's HTTP-like block: a "NATS/1.0" line with an
// optional status code and description (how the server says "no responders"
// or "no messages"), then "Name: value" lines, then an empty line.

import NIOCore

/// Headers of one message: ordered, a name may repeat, names compared as sent
/// (NATS keeps their case; the JetStream names are spelled as below).
public struct NATSHeaders: Sendable, Equatable {
    public private(set) var fields: [(name: String, value: String)] = []
    /// The status on the version line (503 no responders, 404 no messages, 408 expired …), nil for none.
    public var status: Int?
    /// The words after the status ("No Messages"), empty when there are none.
    public var statusDescription: String = ""

    public init(_ fields: [(String, String)] = []) {
        for (name, value) in fields { append(name, value) }
    }

    public static func == (a: NATSHeaders, b: NATSHeaders) -> Bool {
        a.status == b.status && a.statusDescription == b.statusDescription
            && a.fields.elementsEqual(b.fields) { $0.name == $1.name && $0.value == $1.value }
    }

    public mutating func append(_ name: String, _ value: String) {
        fields.append((name, value))
    }

    /// Replaces every value of `name` with `value`.
    public subscript(name: String) -> String? {
        get { fields.first { $0.name == name }?.value }
        set {
            fields.removeAll { $0.name == name }
            if let newValue { fields.append((name, newValue)) }
        }
    }

    public var isEmpty: Bool { fields.isEmpty && status == nil }

    /// Refuses names and values that would break the block (CR, LF, a colon
    /// in a name) rather than sending a block the server cannot parse.
    func validate() throws {
        for (name, value) in fields {
            if name.isEmpty || name.utf8.contains(where: { $0 <= 32 || $0 == UInt8(ascii: ":") || $0 >= 127 }) {
                throw NATSError.invalidName("invalid header name '\(name)'")
            }
            if value.utf8.contains(where: { $0 == 13 || $0 == 10 }) {
                throw NATSError.invalidName("header '\(name)' has a line break in its value")
            }
        }
    }

    /// The block as sent: "NATS/1.0\r\n" fields "\r\n".
    func encoded() -> [UInt8] {
        var out = Array("NATS/1.0".utf8)
        if let status { out += Array(" \(status)".utf8); if !statusDescription.isEmpty { out += Array(" \(statusDescription)".utf8) } }
        out += [13, 10]
        for (name, value) in fields { out += Array("\(name): \(value)\r\n".utf8) }
        out += [13, 10]
        return out
    }

    /// Parses a header block exactly as long as the bytes given.
    static func parse(_ bytes: some Collection<UInt8>) throws -> NATSHeaders {
        let text = Array(bytes)
        guard text.count >= 12, text.suffix(4) == [13, 10, 13, 10] else {
            throw NATSError.protocolViolation("header block does not end with an empty line")
        }
        var lines: [ArraySlice<UInt8>] = []
        var start = 0
        var i = 0
        while i + 1 < text.count - 2 {
            if text[i] == 13 && text[i + 1] == 10 {
                lines.append(text[start..<i])
                start = i + 2
                i += 2
            } else {
                if text[i] == 10 || text[i] == 13 { throw NATSError.protocolViolation("bare CR or LF in a header block") }
                i += 1
            }
        }
        guard start == text.count - 2 else { throw NATSError.protocolViolation("header block has an unterminated line") }
        guard let version = lines.first, version.starts(with: Array("NATS/1.0".utf8)) else {
            throw NATSError.protocolViolation("header block does not start with NATS/1.0")
        }
        var headers = NATSHeaders()
        let rest = String(decoding: version.dropFirst(8), as: UTF8.self).trimmingSpaces()
        if !rest.isEmpty {
            let codeText = rest.prefix { $0 != " " }
            guard codeText.count == 3, let code = Int(codeText) else {
                throw NATSError.protocolViolation("header status '\(rest)' is not a 3-digit code")
            }
            headers.status = code
            headers.statusDescription = String(rest.dropFirst(3)).trimmingSpaces()
        }
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: UInt8(ascii: ":")), colon > line.startIndex else {
                throw NATSError.protocolViolation("header line without a name and colon")
            }
            let name = String(decoding: line[line.startIndex..<colon], as: UTF8.self)
            let value = String(decoding: line[(colon + 1)...], as: UTF8.self).trimmingSpaces()
            headers.append(name, value)
        }
        return headers
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}
