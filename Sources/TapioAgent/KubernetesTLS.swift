import CTapioTLS
import TapioAttribution
import TapioWire

/// The Kubernetes API over the agent's OpenSSL client: TLS 1.3, the API
/// server verified against the service account's CA, no client certificate
/// (the request carries the bearer token). Plugs into TapioAttribution's HTTP
/// client as its `StreamConnector`.
final class TLSByteStream: ByteStream {
    private let tls: OpaquePointer

    private init(tls: OpaquePointer) {
        self.tls = tls
    }

    deinit {
        tapio_tls_close(tls)
    }

    static let connector: StreamConnector = { endpoint, caFile, timeoutMs in
        guard endpoint.isTLS else { return try TCPByteStream.connect(host: endpoint.host, port: endpoint.port, timeoutMs: timeoutMs) }
        guard let caFile else { throw ConnectionError("\(endpoint) needs a CA file to verify the API server") }
        var err = [CChar](repeating: 0, count: 512)
        guard let handle = tapio_tls_connect(endpoint.host, endpoint.port, nil, caFile, nil, nil, timeoutMs, &err, err.count) else {
            throw ConnectionError(String(cBuffer: err))
        }
        return TLSByteStream(tls: handle)
    }

    func write(_ bytes: [UInt8], timeoutMs: Int32) throws {
        let n = bytes.withUnsafeBytes { tapio_tls_write_all(tls, $0.baseAddress, $0.count, timeoutMs) }
        guard n == bytes.count else { throw ConnectionError(String(cString: tapio_tls_error(tls))) }
    }

    func read(maximum: Int, timeoutMs: Int32) throws -> [UInt8]? {
        var buffer = [UInt8](repeating: 0, count: max(1, maximum))
        let n = buffer.withUnsafeMutableBytes { tapio_tls_read(tls, $0.baseAddress, $0.count, timeoutMs) }
        switch n {
        case 0: return []
        case -2: return nil
        case ..<0: throw ConnectionError(String(cString: tapio_tls_error(tls)))
        default: return Array(buffer[0..<n])
        }
    }

    func close() {}
}

extension Agent {
    /// The connector the agent uses for `https` API endpoints (public for tests).
    public static var kubernetesConnector: StreamConnector { TLSByteStream.connector }
}
