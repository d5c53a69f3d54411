import NIOCore
import NIOTestUtils
@testable import TapioNATS
import XCTest

/// The decoder of the server's side of the protocol: whole operations out of
/// any split of the bytes, and a clear error for anything that is not NATS.
final class FrameDecoderTests: XCTestCase {
    private let info = #"INFO {"server_id":"S1","server_name":"n1","version":"2.9.10","max_payload":1048576,"headers":true}"# + "\r\n"

    private func decodeAll(_ text: String, decoder: NATSFrameDecoder = NATSFrameDecoder()) throws -> [NATSServerOperation] {
        var buffer = ByteBuffer(string: text)
        var ops: [NATSServerOperation] = []
        while let op = try decoder.next(&buffer) { ops.append(op) }
        XCTAssertEqual(buffer.readableBytes, 0, "bytes left over")
        return ops
    }

    func testEveryOperationIsDecodedWhateverTheSplitOfTheBytes() throws {
        let hmsgHeaders = "NATS/1.0\r\nNats-Msg-Id: a b\r\nX: 1\r\n\r\n"
        let stream = info + "PING\r\npong\r\n+OK\r\n-ERR 'Unknown Protocol Operation'\r\n"
            + "MSG foo.bar 7 5\r\nhello\r\n"
            + "MSG foo 8 _INBOX.x.1 0\r\n\r\n"
            + "HMSG foo 9 reply \(hmsgHeaders.utf8.count) \(hmsgHeaders.utf8.count + 3)\r\n\(hmsgHeaders)abc\r\n"
            + "HMSG _INBOX.x.2 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
        let expected = try describe(decodeAll(stream))
        XCTAssertEqual(expected, [
            "info S1 1048576", "ping", "pong", "ok", "error Unknown Protocol Operation",
            "msg foo.bar 7 - hello", "msg foo 8 _INBOX.x.1 ", "hmsg foo 9 reply abc [Nats-Msg-Id=a b,X=1] nil",
            "hmsg _INBOX.x.2 1 -  [] 503",
        ])
        // One byte at a time, and every split into two pieces.
        let bytes = Array(stream.utf8)
        for cut in 0...bytes.count {
            var buffer = ByteBuffer()
            var ops: [NATSServerOperation] = []
            let decoder = NATSFrameDecoder()
            buffer.writeBytes(bytes[..<cut])
            while let op = try decoder.next(&buffer) { ops.append(op) }
            buffer.writeBytes(bytes[cut...])
            while let op = try decoder.next(&buffer) { ops.append(op) }
            XCTAssertEqual(describe(ops), expected, "split at \(cut)")
        }
    }

    func testTheDecoderPassesNIOsVerifierForOneByteAtATimeAndManyPerBuffer() throws {
        let pairs: [(ByteBuffer, [String])] = [
            (ByteBuffer(string: "MSG a 1 3\r\nabc\r\n"), ["msg a 1 - abc"]),
            (ByteBuffer(string: "PING\r\nMSG b 2 r 1\r\nx\r\n"), ["ping", "msg b 2 r x"]),
        ]
        // The verifier compares outputs with ==; compare their descriptions.
        try ByteToMessageDecoderVerifier.verifyDecoder(
            inputOutputPairs: pairs.map { ($0.0, $0.1.map(Described.init)) },
            decoderFactory: { DescribingDecoder() })
    }

    func testMalformedInputIsRefusedWithAnErrorThatSaysWhy() {
        let cases: [(String, String)] = [
            ("MSG foo 1 notanumber\r\n", "size 'notanumber' is not a number"),
            ("MSG foo x 3\r\nabc\r\n", "subscription id 'x' is not a number"),
            ("MSG foo 1 3\r\nabcdef\r\n", "not followed by CRLF"),
            ("MSG foo\r\n", "MSG with 1 arguments"),
            ("HMSG foo 1 10 5\r\n", "header length 10 exceeds total length 5"),
            ("HMSG foo 1 5 5\r\nHELLO\r\n", "header block"),
            ("GARBAGE\r\n", "unknown operation 'GARBAGE'"),
            ("PING\n", "not ended by CRLF"),
            ("PING junk\r\n", "PING followed by"),
            ("INFO {not json\r\n", "INFO is not the expected JSON"),
            (String(repeating: "x", count: 5000), "control line longer than 4096 bytes"),
            ("MSG foo 1 99999999999\r\n", "is not a number"),
            ("MSG foo 1 2000000\r\n", "exceeds the client's limit of 1048576 bytes"),
            ("\u{0}\u{1}\u{2}\r\n", "control byte"),
        ]
        for (input, reason) in cases {
            var buffer = ByteBuffer(string: input)
            XCTAssertThrowsError(try NATSFrameDecoder(maxPayload: 1 << 20).next(&buffer), input) { error in
                guard case NATSError.protocolViolation(let why) = error else { return XCTFail("\(error)") }
                XCTAssertTrue(why.contains(reason), "'\(why)' does not say '\(reason)'")
            }
        }
    }

    func testASizeOverTheLimitIsRefusedBeforeThePayloadArrives() {
        // Only the control line is here: the decoder must not wait for (or buffer) 2 MB.
        var buffer = ByteBuffer(string: "MSG foo 1 2097152\r\n")
        XCTAssertThrowsError(try NATSFrameDecoder(maxPayload: 1 << 20).next(&buffer))
    }

    /// Mutations of a valid stream (bytes changed, dropped, duplicated, digits
    /// inserted into sizes): each either decodes or is refused with a
    /// protocolViolation — never a trap, never another error. Seeded, so a
    /// failure repeats.
    func testMutatedInputIsDecodedOrRefusedNeverATrap() throws {
        let valid = Array((info + "PING\r\nMSG a.b 7 r 5\r\nhello\r\nHMSG c 8 24 27\r\nNATS/1.0 503 x\r\nA: b\r\n\r\nxyz\r\n-ERR 'e'\r\n").utf8)
        XCTAssertEqual(try decodeAll(String(decoding: valid, as: UTF8.self)).count, 5, "the stream mutated is not valid to begin with")
        var rng = SplitMix64(seed: 0x7A91)
        let alphabet = Array("0123456789 \r\n:.-'{}\"NATS/HMSG".utf8) + [0, 255]
        var refused = 0
        for _ in 0..<10_000 {
            var bytes = valid
            for _ in 0..<(1 + Int(rng.next() % 4)) {
                let at = Int(rng.next() % UInt64(bytes.count))
                switch rng.next() % 4 {
                case 0: bytes[at] = alphabet[Int(rng.next() % UInt64(alphabet.count))]
                case 1: bytes.remove(at: at)
                case 2: bytes.insert(bytes[at], at: at)
                default: bytes.insert(contentsOf: Array("9999".utf8), at: at)
                }
                if bytes.isEmpty { bytes = [13] }
            }
            var buffer = ByteBuffer(bytes: bytes)
            do {
                while try NATSFrameDecoder(maxPayload: 4096).next(&buffer) != nil {}
            } catch NATSError.protocolViolation {
                refused += 1
            }
        }
        XCTAssertGreaterThan(refused, 500, "the mutations hardly ever produced invalid input: the test tests little")
    }

    func testHeaderBlocksRoundTripWithStatusAndRepeatedNames() throws {
        var headers = NATSHeaders([("Nats-Msg-Id", "n1-7"), ("X", "1"), ("X", "2")])
        headers.status = 404
        headers.statusDescription = "No Messages"
        let parsed = try NATSHeaders.parse(headers.encoded())
        XCTAssertEqual(parsed, headers)
        XCTAssertEqual(parsed["X"], "1")
        var bad = NATSHeaders()
        bad.append("Bad Name", "v")
        XCTAssertThrowsError(try bad.validate())
        XCTAssertThrowsError(try NATSHeaders([("A", "x\r\nB: y")]).validate())
    }

    private func describe(_ ops: [NATSServerOperation]) -> [String] {
        ops.map { op in
            switch op {
            case .info(let i): return "info \(i.serverID) \(i.maxPayload)"
            case .ping: return "ping"
            case .pong: return "pong"
            case .ok: return "ok"
            case .error(let e): return "error \(e)"
            case .message(let m):
                if let h = m.headers {
                    let fields = h.fields.map { "\($0.name)=\($0.value)" }.joined(separator: ",")
                    return "hmsg \(m.subject) \(m.sid) \(m.replyTo ?? "-") \(m.string) [\(fields)] \(h.status.map(String.init) ?? "nil")"
                }
                return "msg \(m.subject) \(m.sid) \(m.replyTo ?? "-") \(m.string)"
            }
        }
    }
}

/// An operation by its description, so the verifier can compare outputs.
private struct Described: Equatable, Sendable {
    var text: String
    init(_ text: String) { self.text = text }
}

/// NATSFrameDecoder with its output described.
private struct DescribingDecoder: ByteToMessageDecoder {
    typealias InboundOut = Described
    var inner = NATSFrameDecoder()

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let op = try inner.next(&buffer) else { return .needMoreData }
        let text: String
        switch op {
        case .ping: text = "ping"
        case .message(let m): text = "msg \(m.subject) \(m.sid) \(m.replyTo ?? "-") \(m.string)"
        default: text = "other"
        }
        context.fireChannelRead(Self.wrapInboundOut(Described(text)))
        return .continue
    }

    mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}

/// The stream sequence of a fetched message comes from its ack subject.
final class AckSubjectTests: XCTestCase {
    func testBothFormsOfTheAckSubjectAreRead() throws {
        let short = try JetStreamMessage.parseAckSubject("$JS.ACK.FEED.engine.2.17.5.1733560000000000000.3")
        XCTAssertEqual(short.delivered, 2)
        XCTAssertEqual(short.stream, 17)
        XCTAssertEqual(short.consumer, 5)
        XCTAssertEqual(short.pending, 3)
        let long = try JetStreamMessage.parseAckSubject("$JS.ACK.hub.ACCHASH.FEED.engine.1.42.40.1733560000000000000.0.rnd")
        XCTAssertEqual(long.stream, 42)
        XCTAssertEqual(long.consumer, 40)
        XCTAssertEqual(long.delivered, 1)
        for bad in ["_INBOX.x.1", "$JS.ACK.FEED.engine.x.17.5.1.3", "$JS.ACK.FEED.engine.2.17", "$JS.ACK.a.b.c.d.e.f.g.h.i.j"] {
            XCTAssertThrowsError(try JetStreamMessage.parseAckSubject(bad), bad)
        }
    }
}

/// A small seeded generator (SplitMix64), so mutation tests repeat exactly.
struct SplitMix64 {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
