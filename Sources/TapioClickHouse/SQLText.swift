// The two text forms Tapio speaks to ClickHouse: SQL string literals in
// queries (ClickHouse 18.16 has no query parameters) and the TabSeparated
// format for inserted and selected rows. Both are byte-exact: a String goes
// out as its UTF-8 bytes and comes back as the same bytes, whatever they
// hold (tabs, newlines, quotes, backslashes, NULs).

/// A ClickHouse string literal: `'…'` with backslash escapes.
public func sqlString(_ s: String) -> String {
    var out = "'"
    out.reserveCapacity(s.utf8.count + 2)
    for c in s.unicodeScalars {
        switch c {
        case "\\": out += "\\\\"
        case "'": out += "\\'"
        case "\n": out += "\\n"
        case "\t": out += "\\t"
        case "\r": out += "\\r"
        case "\0": out += "\\0"
        default: out.unicodeScalars.append(c)
        }
    }
    return out + "'"
}

/// The TabSeparated format: one row per line, fields split by tabs, and in
/// a field `\` escapes the bytes that would end it (and itself).
public enum TabSeparated {
    /// Appends one field, escaped, to `out`.
    public static func appendField(_ s: String, to out: inout [UInt8]) {
        for b in s.utf8 {
            switch b {
            case UInt8(ascii: "\\"): out += [0x5C, 0x5C]
            case UInt8(ascii: "\t"): out += [0x5C, UInt8(ascii: "t")]
            case UInt8(ascii: "\n"): out += [0x5C, UInt8(ascii: "n")]
            case UInt8(ascii: "\r"): out += [0x5C, UInt8(ascii: "r")]
            case 0: out += [0x5C, UInt8(ascii: "0")]
            default: out.append(b)
            }
        }
    }

    /// Appends one row: fields escaped, tab-separated, ending in a newline.
    public static func appendRow(_ fields: [String], to out: inout [UInt8]) {
        for (i, f) in fields.enumerated() {
            if i > 0 { out.append(0x09) }
            appendField(f, to: &out)
        }
        out.append(0x0A)
    }

    public struct Malformed: Error, CustomStringConvertible {
        public var description: String
    }

    /// The rows of a TabSeparated answer, every field unescaped. Each row
    /// must have `columns` fields: anything else is an error, not a guess.
    public static func rows(_ bytes: [UInt8], columns: Int) throws -> [[String]] {
        var rows: [[String]] = []
        var row: [String] = []
        var field: [UInt8] = []
        var i = 0
        func endField() {
            row.append(String(decoding: field, as: UTF8.self))
            field.removeAll(keepingCapacity: true)
        }
        while i < bytes.count {
            let b = bytes[i]
            switch b {
            case 0x09:
                endField()
            case 0x0A:
                endField()
                guard row.count == columns else {
                    throw Malformed(description: "row \(rows.count + 1) has \(row.count) fields, expected \(columns)")
                }
                rows.append(row)
                row.removeAll(keepingCapacity: true)
            case 0x5C:
                i += 1
                guard i < bytes.count else { throw Malformed(description: "the answer ends inside an escape") }
                switch bytes[i] {
                case UInt8(ascii: "n"): field.append(0x0A)
                case UInt8(ascii: "t"): field.append(0x09)
                case UInt8(ascii: "r"): field.append(0x0D)
                case UInt8(ascii: "0"): field.append(0)
                case UInt8(ascii: "b"): field.append(0x08)
                case UInt8(ascii: "f"): field.append(0x0C)
                case UInt8(ascii: "a"): field.append(0x07)
                case UInt8(ascii: "v"): field.append(0x0B)
                case UInt8(ascii: "x"):
                    guard i + 2 < bytes.count, let hi = hexDigit(bytes[i + 1]), let lo = hexDigit(bytes[i + 2]) else {
                        throw Malformed(description: "bad \\x escape in row \(rows.count + 1)")
                    }
                    field.append(hi << 4 | lo)
                    i += 2
                default: field.append(bytes[i])  // \\ \' \" and any other escaped byte stand for themselves
                }
            default:
                field.append(b)
            }
            i += 1
        }
        guard row.isEmpty, field.isEmpty else { throw Malformed(description: "the answer's last row has no newline") }
        return rows
    }

    private static func hexDigit(_ b: UInt8) -> UInt8? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return b - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return b - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return b - UInt8(ascii: "A") + 10
        default: return nil
        }
    }
}
