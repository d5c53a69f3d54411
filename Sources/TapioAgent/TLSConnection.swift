import CTapioTLS
import TapioWire

public struct ConnectionError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// One mutually authenticated TLS 1.3 connection to the server (system
/// OpenSSL through CTapioTLS), speaking frames. Used from one thread only:
/// OpenSSL cannot read and write one connection concurrently.
final class TLSConnection {
    private let tls: OpaquePointer
    private var assembler: FrameAssembler
    private var readBuffer = [UInt8](repeating: 0, count: 64 << 10)

    struct Endpoint: Sendable {
        var host: String
        var port: UInt16
        /// Name the server certificate must carry; nil checks `host`.
        var serverName: String?
        var tls: AgentTLSFiles
    }

    init(endpoint: Endpoint, timeoutMs: Int32, maximumPayload: UInt32 = FrameHeader.defaultMaximumPayload) throws {
        var err = [CChar](repeating: 0, count: 512)
        guard let handle = tapio_tls_connect(endpoint.host, endpoint.port, endpoint.serverName, endpoint.tls.ca, endpoint.tls.certificate, endpoint.tls.key, timeoutMs, &err, err.count) else {
            throw ConnectionError(String(cBuffer: err))
        }
        tls = handle
        assembler = FrameAssembler(maximumPayload: maximumPayload)
    }

    deinit {
        tapio_tls_close(tls)
    }

    var protocolName: String { String(cString: tapio_tls_protocol(tls)) }

    func send(_ type: FrameType, _ payload: [UInt8], timeoutMs: Int32 = 10_000) throws {
        let bytes = Frame(type: type, payload: payload).encoded()
        let n = bytes.withUnsafeBytes { tapio_tls_write_all(tls, $0.baseAddress, $0.count, timeoutMs) }
        guard n == bytes.count else { throw ConnectionError(String(cString: tapio_tls_error(tls))) }
    }

    /// The next frame, waiting up to `timeoutMs`; nil on timeout.
    func receive(timeoutMs: Int32) throws -> Frame? {
        if let frame = try assembler.next() { return frame }
        let n = readBuffer.withUnsafeMutableBytes { tapio_tls_read(tls, $0.baseAddress, $0.count, timeoutMs) }
        switch n {
        case 0:
            return nil
        case -2:
            throw ConnectionError("server closed the connection")
        case ..<0:
            throw ConnectionError(String(cString: tapio_tls_error(tls)))
        default:
            assembler.append(readBuffer[0..<n])
            return try assembler.next()
        }
    }
}

/// PEM files of the agent's identity.
public struct AgentTLSFiles: Sendable, Equatable {
    public var ca: String
    public var certificate: String
    public var key: String

    public init(ca: String, certificate: String, key: String) {
        self.ca = ca
        self.certificate = certificate
        self.key = key
    }

    public init(directory: String) {
        self.init(ca: directory + "/ca.crt", certificate: directory + "/tls.crt", key: directory + "/tls.key")
    }
}
