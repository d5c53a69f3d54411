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

    func testChunkSizeIsHexDigitsOnly() throws {
        // "-d" read as a signed number was a chunk of -13 bytes, and a trap.
        for size in ["-d", "+5", "-0", "0x5", "g", "1 2x", "1000000000000000"] {
            var decoder = ChunkedDecoder()
            XCTAssertThrowsError(try decoder.feed(Array("\(size)\r\nabcde\r\n0\r\n\r\n".utf8)), size)
        }
        var upper = ChunkedDecoder()
        XCTAssertEqual(try upper.feed(Array("A\r\n0123456789\r\n0\r\n\r\n".utf8)), Array("0123456789".utf8))
        XCTAssertTrue(upper.isDone)
        // The input the fuzzer found, through a whole response.
        let found = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\n{\"a\":1}\r\n-d\r\n{\"b\":2}\r\n"
        XCTAssertThrowsError(try response(found).body(limit: 100))
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

    // MARK: - Response heads from an untrusted server

    /// Replays fixed bytes as the server's side of a connection.
    private final class ReplayStream: ByteStream {
        private var bytes: [UInt8]
        init(_ text: String) { bytes = Array(text.utf8) }
        func write(_ bytes: [UInt8], timeoutMs: Int32) throws {}
        func read(maximum: Int, timeoutMs: Int32) throws -> [UInt8]? {
            if bytes.isEmpty { return nil }
            defer { bytes.removeFirst(min(maximum, bytes.count)) }
            return Array(bytes.prefix(maximum))
        }
        func close() {}
    }

    private let endpoint = HTTPEndpoint(isTLS: false, host: "127.0.0.1", port: 80)

    private func response(_ text: String, idleTimeout: Double = 1) throws -> HTTPResponse {
        try HTTPResponse.get("/", headers: [], endpoint: endpoint, stream: ReplayStream(text), idleTimeout: idleTimeout)
    }

    func testStatusMustBeThreeDigits() throws {
        XCTAssertEqual(try response("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").status, 200)
        XCTAssertEqual(try response("HTTP/1.0 410\r\n\r\n").status, 410)
        for bad in ["HTTP/1.1 99999999999999999999999 OK", "HTTP/1.1 -200 OK", "HTTP/1.1 +200 OK", "HTTP/1.1 20 OK", "HTTP/1.1 2000 OK", "HTTP/1.1", ""] {
            XCTAssertThrowsError(try response(bad + "\r\n\r\n"), bad)
        }
    }

    func testContentLengthIsDigitsOnly() throws {
        let exact = try response("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef")
        XCTAssertEqual(try exact.body(limit: 100), Array("abc".utf8))
        // Anything but digits is no length: the body runs until the connection closes.
        for value in ["+3", "-1", "3 3", "3, 3", "99999999999999999999999999", "0x3", ""] {
            let r = try response("HTTP/1.1 200 OK\r\nContent-Length: \(value)\r\n\r\nabcdef")
            XCTAssertEqual(try r.body(limit: 100), Array("abcdef".utf8), value)
        }
    }

    func testHugeOrOddTimeoutsDoNotTrap() throws {
        for timeout in [Double.infinity, 1e300, Double(Int64.max), -1, -Double.infinity, Double.nan] {
            let r = try response("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", idleTimeout: timeout)
            XCTAssertEqual(try r.body(limit: 10), Array("ok".utf8), "\(timeout)")
        }
        // A watch waits watchTimeoutSeconds + 30 s: a huge configured value must not trap either.
        var configuration = KubernetesAPIConfiguration(endpoint: endpoint, nodeName: "n", connector: { _, _, _ in
            ReplayStream("HTTP/1.1 200 OK\r\n\r\n{\"type\":\"BOOKMARK\",\"object\":{\"metadata\":{\"resourceVersion\":\"9\"}}}\n")
        })
        configuration.watchTimeoutSeconds = .max
        configuration.requestTimeout = .infinity
        let source = KubernetesAPISource(configuration: configuration, index: PodIndex())
        XCTAssertEqual(try source.watch(from: "1"), .closed(resourceVersion: "9"))
    }
}
