// HTTP/1.1 responses from the Kubernetes API server
// (Sources/TapioAttribution/HTTPClient.swift): the response head, bodies by
// Content-Length, chunked or until close, line splitting; and, through a
// connector that returns these bytes, a whole list or watch of
// KubernetesAPISource (JSON → pods → index).
//
// Input: byte 0 selects what reads the stream (low 3 bits) and the size of
// the pieces it arrives in (high 5 bits: 0 all at once, else 1…31 bytes); the
// rest is what the server sent.
import Foundation
import TapioAttribution

/// A stream that yields the input in pieces, then ends.
final class ReplayStream: ByteStream, @unchecked Sendable {
    private let bytes: [UInt8]
    private let piece: Int
    private var offset = 0

    init(_ bytes: [UInt8], piece: Int) {
        self.bytes = bytes
        self.piece = piece
    }

    func write(_ bytes: [UInt8], timeoutMs: Int32) throws {}

    func read(maximum: Int, timeoutMs: Int32) throws -> [UInt8]? {
        guard offset < bytes.count else { return nil }
        let end = min(offset + min(piece, maximum), bytes.count)
        defer { offset = end }
        return Array(bytes[offset..<end])
    }

    func close() {}
}

private let endpoint = HTTPEndpoint(isTLS: false, host: "127.0.0.1", port: 6443, basePath: "/k8s")

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let control = data[0]
    let input = bytes(data + 1, size - 1)
    let piece = control >> 3 == 0 ? max(input.count, 1) : Int(control >> 3)

    switch control & 7 {
    case 0, 1:
        // The whole body, as a list reads it; or line by line, as a watch does.
        let stream = ReplayStream(input, piece: piece)
        guard let response = try? HTTPResponse.get("/api/v1/pods", headers: [("Accept", "application/json")], endpoint: endpoint,
                                                   stream: stream, idleTimeout: 1, maximumLineLength: 4096) else { return 0 }
        _ = response.status
        if control & 7 == 0 {
            if let body = try? response.body(limit: 1 << 20) { require(body.count <= 1 << 20, "body over its limit") }
        } else {
            var lines = 0
            while let line = try? response.nextLine() {
                require(line.count <= 4096 + 2, "line of \(line.count) bytes over the limit")
                lines += 1
                require(lines <= input.count + 1, "more lines than bytes")
            }
        }
    case 2, 3:
        // KubernetesAPISource's watch and list over this response.
        let replay = ReplayStream(input, piece: piece)
        var configuration = KubernetesAPIConfiguration(endpoint: endpoint, nodeName: "node-a", token: "t",
                                                       connector: { _, _, _ in replay })
        configuration.watchTimeoutSeconds = 1
        configuration.requestTimeout = 1
        configuration.maximumListBytes = 1 << 20
        configuration.maximumObjectBytes = 64 << 10
        let index = PodIndex(retention: 0)
        let source = KubernetesAPISource(configuration: configuration, index: index)
        if control & 7 == 2 {
            _ = try? source.watch(from: "1")
        } else {
            _ = try? source.list()
        }
        _ = index.allPods
        _ = source.status
    default:
        // The chunked decoder alone: any split of the input decodes to the
        // same body, or fails the same way.
        var whole = ChunkedDecoder()
        let all = Result { try whole.feed(input) }
        var split = ChunkedDecoder()
        var pieces: [UInt8] = []
        var failed = false
        var offset = 0
        while offset < input.count && !split.isDone {
            let end = min(offset + piece, input.count)
            do { pieces += try split.feed(input[offset..<end]) } catch { failed = true; break }
            offset = end
        }
        switch all {
        case .success(let body):
            require(!failed, "a split of the input fails where the whole decodes")
            require(body == pieces, "a split of the input decodes to a different body")
            require(whole.isDone == split.isDone, "a split of the input ends differently")
        case .failure:
            require(failed || !split.isDone, "a split of the input decodes where the whole fails")
        }
        var lines = LineSplitter(maximumLineLength: 256)
        lines.append(input)
        while let line = try? lines.next() { require(line.count <= input.count, "line longer than its input") }
        _ = lines.remainder
    }
    return 0
}
