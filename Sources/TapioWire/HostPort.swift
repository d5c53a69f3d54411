/// Splits "host:port" and "[v6]:port".
public func parseHostPort(_ text: String) throws -> (host: String, port: Int) {
    if text.hasPrefix("["), let close = text.firstIndex(of: "]") {
        let host = String(text[text.index(after: text.startIndex)..<close])
        let rest = text[text.index(after: close)...]
        guard rest.hasPrefix(":"), let port = Int(rest.dropFirst()), (0...65535).contains(port) else {
            throw HostPortError("expected [HOST]:PORT, got \(text)")
        }
        return (host, port)
    }
    guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else {
        throw HostPortError("expected HOST:PORT, got \(text)")
    }
    return (String(text[..<colon]), port)
}

public struct HostPortError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}
