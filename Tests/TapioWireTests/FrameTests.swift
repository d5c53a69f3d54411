import TapioWire
import XCTest

final class FrameTests: XCTestCase {
    func testHeaderRoundTripsEveryType() throws {
        for type in FrameType.allCases {
            let frame = Frame(type: type, payload: Array("payload-\(type)".utf8))
            let bytes = frame.encoded()
            XCTAssertEqual(bytes.count, FrameHeader.size + frame.payload.count)
            let header = try FrameHeader.parse(bytes, maximumPayload: 1024)
            XCTAssertEqual(header.type, type)
            XCTAssertEqual(Int(header.length), frame.payload.count)
        }
    }

    func testOversizedLengthIsRefusedFromTheHeaderAlone() {
        // Only the 12 header bytes exist: the refusal cannot depend on buffering the payload.
        var header: [UInt8] = []
        FrameHeader(type: .eventBatch, length: 4_000_000_000).write(into: &header)
        XCTAssertThrowsError(try FrameHeader.parse(header, maximumPayload: 1 << 20)) { error in
            XCTAssertEqual(error as? FrameError, .tooLarge(length: 4_000_000_000, maximum: 1 << 20))
        }
        var assembler = FrameAssembler(maximumPayload: 1 << 20)
        assembler.append(header)
        XCTAssertThrowsError(try assembler.next())
    }

    func testMalformedHeadersAreNamed() {
        var good: [UInt8] = []
        FrameHeader(type: .hello, length: 0).write(into: &good)
        var badMagic = good
        badMagic[0] = 0x47
        XCTAssertEqual(Self.error(badMagic), .badMagic(0x47, 0x50))
        var badVersion = good
        badVersion[2] = 9
        XCTAssertEqual(Self.error(badVersion), .unsupportedVersion(9))
        var badType = good
        badType[3] = 200
        XCTAssertEqual(Self.error(badType), .unknownType(200))
        var reserved = good
        reserved[6] = 1
        XCTAssertEqual(Self.error(reserved), .nonZeroReserved)
    }

    private static func error(_ bytes: [UInt8]) -> FrameError? {
        do {
            _ = try FrameHeader.parse(bytes, maximumPayload: 100)
            return nil
        } catch {
            return error as? FrameError
        }
    }

    func testAssemblerAcceptsOneByteAtATime() throws {
        let frames = (0..<5).map { Frame(type: .eventBatch, payload: Array(repeating: UInt8($0), count: $0 * 37)) }
        let stream = frames.flatMap { $0.encoded() }
        var assembler = FrameAssembler()
        var out: [Frame] = []
        for byte in stream {
            assembler.append([byte])
            while let f = try assembler.next() { out.append(f) }
        }
        XCTAssertEqual(out, frames)
    }

    func testAssemblerAcceptsManyFramesInOneBuffer() throws {
        let frames = (0..<50).map { Frame(type: .ack, payload: Ack(epoch: 1, sequence: UInt64($0)).encoded()) }
        var assembler = FrameAssembler()
        assembler.append(frames.flatMap { $0.encoded() })
        var out: [Frame] = []
        while let f = try assembler.next() { out.append(f) }
        XCTAssertEqual(out, frames)
        XCTAssertNil(try assembler.next())
    }

    func testHostPortParsing() throws {
        XCTAssertTrue(try parseHostPort("127.0.0.1:7400") == ("127.0.0.1", 7400))
        XCTAssertTrue(try parseHostPort("[::1]:7401") == ("::1", 7401))
        XCTAssertTrue(try parseHostPort("tapio-server.tapio-system.svc:7400") == ("tapio-server.tapio-system.svc", 7400))
        XCTAssertThrowsError(try parseHostPort("no-port"))
        XCTAssertThrowsError(try parseHostPort("host:99999"))
    }
}
