import Foundation

// A minimal HTTP/1.1 client for the Kubernetes API: one GET per connection
// (`Connection: close`), bodies by Content-Length, chunked transfer coding or
// until close, read incrementally so a watch stream is handled line by line
// as it arrives. Plain TCP is built in; TLS is a `ByteStream` the caller
// supplies (see `KubernetesAPIConfiguration.connector`), which keeps this
// module free of a TLS library.

/// A connected, ordered byte stream: plain TCP, or TLS from the caller.
/// Used from one thread at a time.
public protocol ByteStream: AnyObject {
    /// Writes every byte or throws, waiting at most `timeoutMs` in total.
    func write(_ bytes: [UInt8], timeoutMs: Int32) throws
    /// Up to `maximum` bytes, waiting at most `timeoutMs` for some: `[]` when
    /// none arrived in time, nil at the end of the stream.
    func read(maximum: Int, timeoutMs: Int32) throws -> [UInt8]?
    func close()
}

/// Where to send requests: from a URL such as `https://10.96.0.1:443` or
/// `http://127.0.0.1:8080/prefix`.
public struct HTTPEndpoint: Sendable, Equatable, CustomStringConvertible {
    public var isTLS: Bool
    /// Without brackets for IPv6 (`fd00::1`).
    public var host: String
    public var port: UInt16
    /// A path prefix to put before every request path ("" for none).
    public var basePath: String

    public init(isTLS: Bool, host: String, port: UInt16, basePath: String = "") {
        self.isTLS = isTLS
        self.host = host
        self.port = port
        self.basePath = basePath
    }

    /// Parses `http[s]://host[:port][/path]`, IPv6 literals in brackets.
    public init?(url: String) {
        let tls: Bool
        var rest: Substring
        if url.hasPrefix("https://") { tls = true; rest = url.dropFirst(8) } else if url.hasPrefix("http://") { tls = false; rest = url.dropFirst(7) } else { return nil }
        var path = ""
        if let slash = rest.firstIndex(of: "/") {
            path = String(rest[slash...])
            rest = rest[..<slash]
        }
        while path.hasSuffix("/") { path.removeLast() }
        var host: Substring
        var portText: Substring?
        if rest.hasPrefix("[") {
            guard let close = rest.firstIndex(of: "]") else { return nil }
            host = rest[rest.index(after: rest.startIndex)..<close]
            let after = rest[rest.index(after: close)...]
            if after.hasPrefix(":") { portText = after.dropFirst() } else if !after.isEmpty { return nil }
        } else if let colon = rest.lastIndex(of: ":") {
            host = rest[..<colon]
            portText = rest[rest.index(after: colon)...]
        } else {
            host = rest
        }
        guard !host.isEmpty else { return nil }
        let port: UInt16
        if let portText { guard let p = UInt16(portText), p > 0 else { return nil }; port = p } else { port = tls ? 443 : 80 }
        self.init(isTLS: tls, host: String(host), port: port, basePath: path)
    }

    /// `host:port`, brackets around an IPv6 literal: the Host header.
    public var authority: String { (host.contains(":") ? "[\(host)]" : host) + ":\(port)" }
    public var description: String { (isTLS ? "https://" : "http://") + authority + basePath }
}

/// HTTP failures, with the status and the server's message when there was one.
public struct HTTPError: Error, CustomStringConvertible, Equatable {
    public var status: Int?
    public var message: String
    public init(status: Int? = nil, _ message: String) {
        self.status = status
        self.message = message
    }
    public var description: String { status.map { "HTTP \($0): \(message)" } ?? message }
    static let stopped = HTTPError("stopped")
}

/// A plain TCP connection with poll-based timeouts (non-blocking socket).
public final class TCPByteStream: ByteStream {
    private var fd: Int32

    private init(fd: Int32) { self.fd = fd }
    deinit { close() }

    /// Connects to the first address of `host` that answers within `timeoutMs` (each).
    public static func connect(host: String, port: UInt16, timeoutMs: Int32) throws -> TCPByteStream {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        #if canImport(Darwin)
        hints.ai_socktype = SOCK_STREAM
        #else
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        #endif
        hints.ai_flags = AI_NUMERICSERV
        var result: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &result)
        guard rc == 0, let first = result else { throw HTTPError("cannot resolve \(host): \(String(cString: gai_strerror(rc)))") }
        defer { freeaddrinfo(first) }
        var lastError = "no address"
        var ai: UnsafeMutablePointer<addrinfo>? = first
        while let a = ai {
            ai = a.pointee.ai_next
            let fd = socket(a.pointee.ai_family, a.pointee.ai_socktype, a.pointee.ai_protocol)
            if fd < 0 { lastError = String(cString: strerror(errno)); continue }
            _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
            var one: Int32 = 1
            _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
            if Foundation.connect(fd, a.pointee.ai_addr, a.pointee.ai_addrlen) == 0 { return TCPByteStream(fd: fd) }
            if errno == EINPROGRESS {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                let n = poll(&p, 1, timeoutMs)
                var soError: Int32 = 0
                var len = socklen_t(MemoryLayout<Int32>.size)
                if n == 1, getsockopt(fd, SOL_SOCKET, SO_ERROR, &soError, &len) == 0, soError == 0 { return TCPByteStream(fd: fd) }
                lastError = n == 0 ? "timed out" : String(cString: strerror(soError != 0 ? soError : errno))
            } else {
                lastError = String(cString: strerror(errno))
            }
            Foundation.close(fd)
        }
        throw HTTPError("cannot connect to \(host):\(port): \(lastError)")
    }

    public func write(_ bytes: [UInt8], timeoutMs: Int32) throws {
        guard fd >= 0 else { throw HTTPError("connection closed") }
        var offset = 0
        let deadline = ContinuousClock.now + .milliseconds(Int64(timeoutMs))
        while offset < bytes.count {
            #if canImport(Darwin)
            let flags: Int32 = 0
            #else
            let flags = Int32(MSG_NOSIGNAL)
            #endif
            let n = bytes[offset...].withUnsafeBytes { send(fd, $0.baseAddress, $0.count, flags) }
            if n > 0 { offset += n; continue }
            if n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR { throw HTTPError("write: \(String(cString: strerror(errno)))") }
            let left = deadline - ContinuousClock.now
            guard left > .zero else { throw HTTPError("write timed out") }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, Int32(left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000))
        }
    }

    public func read(maximum: Int, timeoutMs: Int32) throws -> [UInt8]? {
        guard fd >= 0 else { return nil }
        var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&p, 1, timeoutMs)
        if ready == 0 || (ready < 0 && errno == EINTR) { return [] }
        if ready < 0 { throw HTTPError("poll: \(String(cString: strerror(errno)))") }
        var buffer = [UInt8](repeating: 0, count: maximum)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n == 0 { return nil }
        if n < 0 {
            if errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR { return [] }
            throw HTTPError("read: \(String(cString: strerror(errno)))")
        }
        buffer.removeLast(maximum - n)
        return buffer
    }

    public func close() {
        if fd >= 0 { Foundation.close(fd); fd = -1 }
    }
}

/// Decodes the chunked transfer coding (RFC 9112 §7.1) incrementally: feed it
/// bytes as they arrive, in any split, and it returns the body bytes they
/// complete. Chunk extensions and trailers are read and ignored.
public struct ChunkedDecoder: Sendable {
    private enum State: Sendable { case size, data(Int), dataEnd, trailer, done }
    private var state = State.size
    private var line: [UInt8] = []
    /// The longest chunk-size or trailer line accepted.
    public var maximumLineLength = 4096

    public init() {}

    /// True after the last chunk and the trailer section.
    public var isDone: Bool { if case .done = state { return true } else { return false } }

    public mutating func feed<C: Collection>(_ bytes: C) throws -> [UInt8] where C.Element == UInt8 {
        var out: [UInt8] = []
        var i = bytes.startIndex
        while i != bytes.endIndex {
            switch state {
            case .done:
                return out
            case .data(let remaining):
                let end = bytes.index(i, offsetBy: remaining, limitedBy: bytes.endIndex) ?? bytes.endIndex
                out.append(contentsOf: bytes[i..<end])
                let taken = bytes.distance(from: i, to: end)
                i = end
                state = remaining - taken == 0 ? .dataEnd : .data(remaining - taken)
            case .size, .dataEnd, .trailer:
                let b = bytes[i]
                i = bytes.index(after: i)
                guard b == UInt8(ascii: "\n") else {
                    line.append(b)
                    if line.count > maximumLineLength { throw HTTPError("chunked encoding: line too long") }
                    continue
                }
                if line.last == UInt8(ascii: "\r") { line.removeLast() }
                defer { line.removeAll(keepingCapacity: true) }
                switch state {
                case .size:
                    let sizeText = line.prefix { $0 != UInt8(ascii: ";") }.filter { $0 != UInt8(ascii: " ") && $0 != UInt8(ascii: "\t") }
                    // Hex digits only (RFC 9112: chunk-size = 1*HEXDIG): a sign would
                    // make a negative size. At most 15 digits always fit an Int.
                    var size = 0
                    for digit in sizeText {
                        guard let value = Self.hexValue(digit) else { size = -1; break }
                        size = size << 4 | value
                    }
                    guard !sizeText.isEmpty, sizeText.count <= 15, size >= 0 else {
                        throw HTTPError("chunked encoding: bad chunk size \(String(decoding: line.prefix(32), as: UTF8.self).debugDescription)")
                    }
                    state = size == 0 ? .trailer : .data(size)
                case .dataEnd:
                    guard line.isEmpty else { throw HTTPError("chunked encoding: chunk not followed by CRLF") }
                    state = .size
                case .trailer:
                    if line.isEmpty { state = .done }
                default:
                    break
                }
            }
        }
        return out
    }
}

extension ChunkedDecoder {
    /// The value of one ASCII hex digit, nil for any other byte.
    static func hexValue(_ b: UInt8) -> Int? {
        switch b {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return Int(b - UInt8(ascii: "0"))
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return Int(b - UInt8(ascii: "a")) + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): return Int(b - UInt8(ascii: "A")) + 10
        default: return nil
        }
    }
}

/// Splits a byte stream into `\n`-terminated lines (a trailing `\r` removed),
/// with a bound on line length.
public struct LineSplitter: Sendable {
    private var buffer: [UInt8] = []
    private var start = 0
    private var scanned = 0
    public var maximumLineLength: Int

    public init(maximumLineLength: Int = 16 << 20) {
        self.maximumLineLength = maximumLineLength
    }

    public mutating func append<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        if start > 0 && start >= buffer.count / 2 {
            buffer.removeFirst(start)
            scanned -= start
            start = 0
        }
        buffer.append(contentsOf: bytes)
    }

    /// The next complete line, nil if none is complete yet.
    public mutating func next() throws -> [UInt8]? {
        if let nl = buffer[scanned...].firstIndex(of: UInt8(ascii: "\n")) {
            var line = Array(buffer[start..<nl])
            if line.last == UInt8(ascii: "\r") { line.removeLast() }
            start = nl + 1
            scanned = start
            return line
        }
        scanned = buffer.count
        if buffer.count - start > maximumLineLength { throw HTTPError("line longer than \(maximumLineLength) bytes") }
        return nil
    }

    /// Bytes after the last complete line (an unterminated last line).
    public var remainder: [UInt8] { Array(buffer[start...]) }
}

/// One HTTP/1.1 response read from a stream: the head at once, the body as it arrives.
public final class HTTPResponse {
    public let status: Int
    public let reason: String
    /// Header names lowercased; repeated headers joined with ", ".
    public let headers: [String: String]

    private enum Framing { case chunked(ChunkedDecoder), length(Int), untilClose }
    private let stream: any ByteStream
    private var framing: Framing
    private var pending: [UInt8]
    private var ended = false
    private var lines: LineSplitter
    private let idleTimeoutMs: Int
    private let shouldStop: @Sendable () -> Bool

    /// Sends `GET path` and reads the response head.
    /// - Parameters:
    ///   - idleTimeout: seconds without a byte before the read fails.
    ///   - shouldStop: polled at least every 200 ms while waiting; true ends the wait with an error.
    public static func get(_ path: String, headers: [(String, String)], endpoint: HTTPEndpoint, stream: any ByteStream,
                           idleTimeout: Double, maximumLineLength: Int = 16 << 20,
                           shouldStop: @escaping @Sendable () -> Bool = { false }) throws -> HTTPResponse {
        var request = "GET \(endpoint.basePath)\(path) HTTP/1.1\r\nHost: \(endpoint.authority)\r\n"
        for (name, value) in headers { request += "\(name): \(value)\r\n" }
        request += "Connection: close\r\n\r\n"
        let timeoutMs = milliseconds(idleTimeout)
        try stream.write(Array(request.utf8), timeoutMs: timeoutMs)
        return try HTTPResponse(stream: stream, idleTimeoutMs: Int(timeoutMs), maximumLineLength: maximumLineLength, shouldStop: shouldStop)
    }

    private init(stream: any ByteStream, idleTimeoutMs: Int, maximumLineLength: Int, shouldStop: @escaping @Sendable () -> Bool) throws {
        self.stream = stream
        self.idleTimeoutMs = idleTimeoutMs
        self.shouldStop = shouldStop
        lines = LineSplitter(maximumLineLength: maximumLineLength)
        var head: [UInt8] = []
        // The offset of the blank line ending the head.
        let headEnd: Int
        while true {
            guard let bytes = try Self.receive(stream, idleTimeoutMs: idleTimeoutMs, shouldStop: shouldStop) else {
                throw HTTPError("connection closed before the response head")
            }
            let scanFrom = max(0, head.count - 3)
            head.append(contentsOf: bytes)
            if let r = Self.find([13, 10, 13, 10], in: head, from: scanFrom) { headEnd = r; break }
            if head.count > 64 << 10 { throw HTTPError("response head larger than 64 KiB") }
        }
        pending = Array(head[(headEnd + 4)...])
        let text = String(decoding: head[..<headEnd], as: UTF8.self)
        var headLines = text.components(separatedBy: "\r\n")
        let statusLine = headLines.isEmpty ? [] : headLines.removeFirst().split(separator: " ", maxSplits: 2)
        // RFC 9112: HTTP-version SP 3DIGIT SP reason.
        guard statusLine.count >= 2, statusLine[0].hasPrefix("HTTP/1."), let code = Self.decimal(statusLine[1], digits: 3...3) else {
            throw HTTPError("not an HTTP/1.x response")
        }
        status = code
        reason = statusLine.count > 2 ? String(statusLine[2]) : ""
        var h: [String: String] = [:]
        for line in headLines {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            let value = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            h[name] = h[name].map { $0 + ", " + value } ?? value
        }
        headers = h
        if h["transfer-encoding"]?.lowercased().contains("chunked") == true {
            framing = .chunked(ChunkedDecoder())
        } else if let length = h["content-length"].flatMap({ Self.decimal(Substring($0), digits: 1...18) }) {
            framing = .length(length)
        } else {
            framing = .untilClose
        }
    }

    deinit { stream.close() }

    /// The next piece of the body, nil at its end.
    public func nextBodyBytes() throws -> [UInt8]? {
        while !ended {
            var raw = pending
            pending = []
            if raw.isEmpty {
                if case .length(0) = framing { ended = true; break }
                guard let bytes = try Self.receive(stream, idleTimeoutMs: idleTimeoutMs, shouldStop: shouldStop) else {
                    if case .untilClose = framing { ended = true; break }
                    throw HTTPError("connection closed in the middle of the body")
                }
                raw = bytes
            }
            switch framing {
            case .chunked(var decoder):
                let out = try decoder.feed(raw)
                if decoder.isDone { ended = true }
                framing = .chunked(decoder)
                if !out.isEmpty { return out }
            case .length(let remaining):
                let take = min(remaining, raw.count)
                framing = .length(remaining - take)
                if remaining - take == 0 { ended = true }
                if take > 0 { return Array(raw.prefix(take)) }
            case .untilClose:
                return raw
            }
        }
        return nil
    }

    /// The next line of the body (without its newline); an unterminated last
    /// line is returned too; nil at the end.
    public func nextLine() throws -> [UInt8]? {
        while true {
            if let line = try lines.next() { return line }
            guard let bytes = try nextBodyBytes() else {
                let rest = lines.remainder
                lines = LineSplitter(maximumLineLength: lines.maximumLineLength)
                return rest.isEmpty ? nil : rest
            }
            lines.append(bytes)
        }
    }

    /// The whole body, failing beyond `limit` bytes.
    public func body(limit: Int) throws -> [UInt8] {
        var all: [UInt8] = []
        while let bytes = try nextBodyBytes() {
            all.append(contentsOf: bytes)
            if all.count > limit { throw HTTPError("response body larger than \(limit) bytes") }
        }
        return all
    }

    private static func receive(_ stream: any ByteStream, idleTimeoutMs: Int, shouldStop: @Sendable () -> Bool) throws -> [UInt8]? {
        var waited = 0
        while true {
            if shouldStop() { throw HTTPError.stopped }
            let slice = min(200, max(idleTimeoutMs - waited, 1))
            guard let bytes = try stream.read(maximum: 64 << 10, timeoutMs: Int32(slice)) else { return nil }
            if !bytes.isEmpty { return bytes }
            waited += slice
            if waited >= idleTimeoutMs { throw HTTPError("no data for \(idleTimeoutMs / 1000) s") }
        }
    }

    /// A number of ASCII digits only (no sign, no spaces), with a digit count
    /// in `digits`: at most 18 always fit an Int.
    static func decimal(_ text: Substring, digits: ClosedRange<Int>) -> Int? {
        let utf8 = text.utf8
        guard digits.contains(utf8.count), utf8.count <= 18, utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }) else { return nil }
        return utf8.reduce(0) { $0 * 10 + Int($1 - UInt8(ascii: "0")) }
    }

    private static func find(_ needle: [UInt8], in hay: [UInt8], from: Int) -> Int? {
        guard hay.count >= needle.count else { return nil }
        var i = from
        while i + needle.count <= hay.count {
            if hay[i] == needle[0] && Array(hay[i..<(i + needle.count)]) == needle { return i }
            i += 1
        }
        return nil
    }
}

/// Seconds as whole milliseconds for poll(2), clamped to 0…Int32.max (about
/// 24 days): a configured timeout never traps, whatever its size.
func milliseconds(_ seconds: Double) -> Int32 {
    let ms = seconds * 1000
    guard ms.isFinite else { return ms > 0 ? .max : 0 }
    return Int32(max(0, min(ms, Double(Int32.max))))
}
