import TapioAttribution
import XCTest

final class HTTPDecodingTests: XCTestCase {
    private let encoded = Array("7\r\n{\"a\":1}\r\n3;ext=1\r\n\n{\"\r\n6\r\nb\":2}\n\r\n0\r\nX-Trailer: y\r\n\r\n".utf8)
    private let body = Array("{\"a\":1}\n{\"b\":2}\n".utf8)

    func testChunkedDecodingOneByteAtATime() throws {
        var decoder = ChunkedDecoder()
        var out: [UInt8] = []
        for b in encoded { out += try decoder.feed([b]) }
        XCTAssertEqual(out, body)
        XCTAssertTrue(decoder.isDone)
    }

    func testChunkedDecodingInOneBufferAndEverySplit() throws {
        for split in 0...encoded.count {
            var decoder = ChunkedDecoder()
            let out = try decoder.feed(encoded[..<split]) + decoder.feed(encoded[split...])
            XCTAssertEqual(out, body, "split at \(split)")
            XCTAssertTrue(decoder.isDone)
        }
    }

    func testChunkedDecodingRejectsGarbage() {
        var bad = ChunkedDecoder()
        XCTAssertThrowsError(try bad.feed(Array("zz\r\n".utf8)))
        var noCRLF = ChunkedDecoder()
        XCTAssertThrowsError(try noCRLF.feed(Array("1\r\nab\r\n".utf8)))
        var long = ChunkedDecoder()
        long.maximumLineLength = 8
        XCTAssertThrowsError(try long.feed(Array("1;aaaaaaaaaaaaaaaaa\r\n".utf8)))
    }

    func testLinesAreReassembledAcrossPieces() throws {
        var lines = LineSplitter(maximumLineLength: 64)
        var got: [String] = []
        for b in Array("one\r\ntwo\n\nthree".utf8) {
            lines.append([b])
            while let line = try lines.next() { got.append(String(decoding: line, as: UTF8.self)) }
        }
        XCTAssertEqual(got, ["one", "two", ""])
        XCTAssertEqual(lines.remainder, Array("three".utf8))
        var short = LineSplitter(maximumLineLength: 4)
        short.append(Array("12345678".utf8))
        XCTAssertThrowsError(try short.next())
    }

    func testEndpointsParse() {
        XCTAssertEqual(HTTPEndpoint(url: "https://10.96.0.1"), HTTPEndpoint(isTLS: true, host: "10.96.0.1", port: 443))
        XCTAssertEqual(HTTPEndpoint(url: "http://127.0.0.1:8080/k8s/"), HTTPEndpoint(isTLS: false, host: "127.0.0.1", port: 8080, basePath: "/k8s"))
        XCTAssertEqual(HTTPEndpoint(url: "https://[fd00::1]:6443"), HTTPEndpoint(isTLS: true, host: "fd00::1", port: 6443))
        XCTAssertEqual(HTTPEndpoint(url: "https://[fd00::1]:6443")?.authority, "[fd00::1]:6443")
        XCTAssertNil(HTTPEndpoint(url: "ftp://x"))
        XCTAssertNil(HTTPEndpoint(url: "http://x:0"))
        XCTAssertNil(HTTPEndpoint(url: "http://:80"))
    }
}
