// The server side of the NATS text protocol as a ByteToMessageDecoder:
// control lines ending in CRLF, and for MSG/HMSG a payload of a declared
// length followed by CRLF. Sizes are checked against the configured limits
// before anything is read or allocated, and anything that is not the
// protocol is an error (the handler closes that one connection).

import Foundation
import NIOCore

/// A message delivered by the server (MSG or HMSG).
public struct NATSMessage: Sendable {
    public var subject: String
    /// The subscription it was delivered to.
    public var sid: UInt64
    public var replyTo: String?
    /// Present for HMSG, nil for MSG.
    public var headers: NATSHeaders?
    public var payload: ByteBuffer

    public init(subject: String, sid: UInt64, replyTo: String? = nil, headers: NATSHeaders? = nil, payload: ByteBuffer) {
        self.subject = subject
        self.sid = sid
        self.replyTo = replyTo
        self.headers = headers
        self.payload = payload
    }

    public var bytes: [UInt8] { Array(payload.readableBytesView) }
    public var string: String { String(decoding: payload.readableBytesView, as: UTF8.self) }
    /// The status in the header block (503, 404, 408 …), nil for an ordinary message.
    public var status: Int? { headers?.status }
}

/// One operation the server sends.
public enum NATSServerOperation: Sendable {
    case info(NATSServerInfo)
    case message(NATSMessage)
    case ping
    case pong
    case ok
    case error(String)
}

/// Decodes the server's byte stream into `NATSServerOperation`s.
public struct NATSFrameDecoder: ByteToMessageDecoder, Sendable {
    public typealias InboundOut = NATSServerOperation

    /// Longest control line accepted, CRLF excluded (the server's own default is 4096).
    public let maxControlLine: Int
    /// Largest payload (headers included) accepted in one message.
    public let maxPayload: Int

    public init(maxControlLine: Int = 4096, maxPayload: Int = 8 << 20) {
        self.maxControlLine = maxControlLine
        self.maxPayload = maxPayload
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let op = try next(&buffer) else { return .needMoreData }
        context.fireChannelRead(Self.wrapInboundOut(op))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while let op = try next(&buffer) { context.fireChannelRead(Self.wrapInboundOut(op)) }
        return .needMoreData
    }

    /// The next whole operation, consuming its bytes; nil (consuming nothing) when more bytes are needed.
    public func next(_ buffer: inout ByteBuffer) throws -> NATSServerOperation? {
        let view = buffer.readableBytesView
        let searchLimit = min(view.count, maxControlLine + 2)
        guard let lf = view.prefix(searchLimit).firstIndex(of: 10) else {
            if view.count > maxControlLine + 1 {
                throw NATSError.protocolViolation("control line longer than \(maxControlLine) bytes")
            }
            return nil
        }
        let lineLength = lf - view.startIndex
        guard lineLength >= 1, view[lf - 1] == 13 else {
            throw NATSError.protocolViolation("control line not ended by CRLF")
        }
        let line = view[view.startIndex..<(lf - 1)]
        let afterLine = lineLength + 1
        if line.contains(where: { $0 == 0 || $0 == 13 }) { throw NATSError.protocolViolation("control byte in a control line") }
        let opEnd = line.firstIndex { $0 == 32 || $0 == 9 } ?? line.endIndex
        let op = String(decoding: line[line.startIndex..<opEnd], as: UTF8.self).uppercased()
        let rest = line[opEnd...]
        switch op {
        case "MSG", "HMSG":
            let args = rest.split(whereSeparator: { $0 == 32 || $0 == 9 }).map { String(decoding: $0, as: UTF8.self) }
            let hasHeaders = op == "HMSG"
            let sizes = hasHeaders ? 2 : 1
            guard args.count == 2 + sizes || args.count == 3 + sizes else {
                throw NATSError.protocolViolation("\(op) with \(args.count) arguments: '\(Self.printable(line))'")
            }
            guard let sid = UInt64(args[1]) else { throw NATSError.protocolViolation("\(op) subscription id '\(args[1])' is not a number") }
            let total = try size(args[args.count - 1], op)
            let headerLength = hasHeaders ? try size(args[args.count - 2], op) : 0
            guard headerLength <= total else {
                throw NATSError.protocolViolation("HMSG header length \(headerLength) exceeds total length \(total)")
            }
            guard view.count >= afterLine + total + 2 else { return nil }
            let end = view.startIndex + afterLine + total
            guard view[end] == 13, view[end + 1] == 10 else {
                throw NATSError.protocolViolation("\(op) payload of \(total) bytes not followed by CRLF")
            }
            let headers = hasHeaders ? try NATSHeaders.parse(view[(view.startIndex + afterLine)..<(view.startIndex + afterLine + headerLength)]) : nil
            let reply = args.count == 3 + sizes ? args[2] : nil
            buffer.moveReaderIndex(forwardBy: afterLine + headerLength)
            let payload = buffer.readSlice(length: total - headerLength)!
            buffer.moveReaderIndex(forwardBy: 2)
            return .message(NATSMessage(subject: args[0], sid: sid, replyTo: reply, headers: headers, payload: payload))
        case "INFO":
            let json = Data(rest)
            buffer.moveReaderIndex(forwardBy: afterLine)
            do {
                return .info(try JSONDecoder().decode(NATSServerInfo.self, from: json))
            } catch {
                throw NATSError.protocolViolation("INFO is not the expected JSON: \(error)")
            }
        case "PING", "PONG", "+OK":
            guard rest.allSatisfy({ $0 == 32 || $0 == 9 }) else {
                throw NATSError.protocolViolation("\(op) followed by '\(Self.printable(rest))'")
            }
            buffer.moveReaderIndex(forwardBy: afterLine)
            return op == "PING" ? .ping : op == "PONG" ? .pong : .ok
        case "-ERR":
            var text = String(decoding: rest, as: UTF8.self).trimmingSpaces()
            if text.count >= 2, text.hasPrefix("'"), text.hasSuffix("'") { text = String(text.dropFirst().dropLast()) }
            buffer.moveReaderIndex(forwardBy: afterLine)
            return .error(text)
        default:
            throw NATSError.protocolViolation("unknown operation '\(Self.printable(line.prefix(32)))'")
        }
    }

    private func size(_ text: String, _ op: String) throws -> Int {
        guard !text.isEmpty, text.count <= 10, text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }), let n = Int(text) else {
            throw NATSError.protocolViolation("\(op) size '\(text)' is not a number")
        }
        guard n <= maxPayload else {
            throw NATSError.protocolViolation("\(op) of \(n) bytes exceeds the client's limit of \(maxPayload) bytes")
        }
        return n
    }

    /// Bytes for an error message: printable ASCII kept, the rest as '?'.
    static func printable(_ bytes: some Collection<UInt8>) -> String {
        String(decoding: bytes.prefix(64).map { $0 >= 32 && $0 < 127 ? $0 : UInt8(ascii: "?") }, as: UTF8.self)
    }
}
