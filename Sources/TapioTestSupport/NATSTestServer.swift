import Foundation
import XCTest

/// Debian's nats-server (package nats-server, 2.9), started by the tests on
/// loopback with its own config file and store directory, killed at the end.
public final class NATSTestServer {
    public enum Auth { case none, userPassword(String, String), token(String) }

    public let name: String
    public let port: Int
    public let clusterPort: Int
    public let directory: String
    private let config: String
    private var process: ChildProcess?

    public static func binary() throws -> String {
        for path in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        where FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        let why = "nats-server is missing (Debian package nats-server; make deps installs it)"
        if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
        throw XCTSkip(why)
    }

    /// Writes the config; `start()` runs it. `routes` are the cluster ports of all nodes (its own included).
    public init(name: String, directory: String, jetStream: Bool = true, clusterPort: Int = 0, routes: [Int] = [],
         tlsDirectory: String? = nil, extraTLS: [String] = [], auth: Auth = .none, maxPayload: Int? = nil, extraConfig: [String] = []) throws {
        self.name = name
        self.port = TestSupport.freePort()
        self.clusterPort = clusterPort
        self.directory = directory + "/" + name
        try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
        var lines = ["server_name: \(name)", "listen: 127.0.0.1:\(port)"]
        if jetStream {
            lines.append("jetstream { store_dir: \"\(self.directory)/store\", max_memory_store: 64MB, max_file_store: 1GB }")
        }
        if let maxPayload { lines.append("max_payload: \(maxPayload)") }
        if clusterPort != 0 {
            let routeList = routes.map { "nats-route://127.0.0.1:\($0)" }.joined(separator: ", ")
            lines.append("cluster { name: tapio-test, listen: 127.0.0.1:\(clusterPort), routes: [\(routeList)] }")
        }
        if let tls = tlsDirectory {
            lines.append("tls { cert_file: \"\(tls)/tls.crt\", key_file: \"\(tls)/tls.key\", ca_file: \"\(tls)/ca.crt\", timeout: 5\(extraTLS.map { ", " + $0 }.joined()) }")
        }
        switch auth {
        case .none: break
        case .userPassword(let user, let password): lines.append("authorization { user: \"\(user)\", password: \"\(password)\" }")
        case .token(let token): lines.append("authorization { token: \"\(token)\" }")
        }
        lines += extraConfig
        config = self.directory + "/nats.conf"
        try lines.joined(separator: "\n").appending("\n").write(toFile: config, atomically: true, encoding: .utf8)
    }

    public var pid: pid_t? { process?.pid }
    public var isRunning: Bool { process?.isRunning ?? false }
    public var log: String { process?.log ?? "" }

    /// Starts the server and waits until its client port accepts connections.
    public func start() throws {
        process = try ChildProcess(try Self.binary(), ["-c", config], logPath: directory + "/server.log")
        let up = eventually(timeout: 20) { Self.accepts(port: port) || !(process?.isRunning ?? false) }
        guard up, process?.isRunning == true else {
            throw TestSupportError("nats-server \(name) did not start: \(log.suffix(2000))")
        }
    }

    /// kill -9: no goodbye to clients or the cluster.
    public func kill9() { process?.stop(signal: SIGKILL) }

    public func stop() { process?.stop(signal: SIGTERM, timeout: 10) }

    public static func accepts(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }
}

extension NATSTestServer {
    /// Three JetStream nodes routed to each other on loopback, started; `directory` holds their stores.
    public static func startCluster(directory: String) throws -> [NATSTestServer] {
        let clusterPorts = (0..<3).map { _ in TestSupport.freePort() }
        let nodes = try (0..<3).map { i in
            try NATSTestServer(name: "n\(i + 1)", directory: directory, clusterPort: clusterPorts[i], routes: clusterPorts)
        }
        do {
            for n in nodes { try n.start() }
        } catch {
            for n in nodes { n.stop() }
            throw error
        }
        return nodes
    }

    /// `nats://127.0.0.1:<port>`.
    public var url: String { "nats://127.0.0.1:\(port)" }
}
