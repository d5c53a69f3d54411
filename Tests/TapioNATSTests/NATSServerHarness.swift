import Foundation
import Logging
import NIOSSL
@testable import TapioNATS
import TapioTestSupport
import XCTest

/// Debian's nats-server (package nats-server, 2.9), started by the tests on
/// loopback with its own config file and store directory, killed at the end.
final class NATSTestServer {
    enum Auth { case none, userPassword(String, String), token(String) }

    let name: String
    let port: Int
    let clusterPort: Int
    let directory: String
    private let config: String
    private var process: ChildProcess?

    static func binary() throws -> String {
        for path in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
        where FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        let why = "nats-server is missing (Debian package nats-server; make deps installs it)"
        if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
        throw XCTSkip(why)
    }

    /// Writes the config; `start()` runs it. `routes` are the cluster ports of all nodes (its own included).
    init(name: String, directory: String, jetStream: Bool = true, clusterPort: Int = 0, routes: [Int] = [],
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

    var address: NATSServerAddress { NATSServerAddress(host: "127.0.0.1", port: port) }
    var pid: pid_t? { process?.pid }
    var isRunning: Bool { process?.isRunning ?? false }
    var log: String { process?.log ?? "" }

    /// Starts the server and waits until its client port accepts connections.
    func start() throws {
        process = try ChildProcess(try Self.binary(), ["-c", config], logPath: directory + "/server.log")
        let up = eventually(timeout: 20) { Self.accepts(port: port) || !(process?.isRunning ?? false) }
        guard up, process?.isRunning == true else {
            throw TestSupportError("nats-server \(name) did not start: \(log.suffix(2000))")
        }
    }

    /// kill -9: no goodbye to clients or the cluster.
    func kill9() { process?.stop(signal: SIGKILL) }

    func stop() { process?.stop(signal: SIGTERM, timeout: 10) }

    static func accepts(port: Int) -> Bool {
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

/// Servers and a temporary directory that a test case tears down, also on failure.
class NATSTestCase: XCTestCase {
    private(set) var directory = ""
    private var servers: [NATSTestServer] = []
    private var clients: [NATSClient] = []

    override func setUpWithError() throws {
        _ = try NATSTestServer.binary()
        directory = try TestSupport.temporaryDirectory("tapio-nats")
    }

    override func tearDown() {
        let clients = self.clients
        let done = DispatchSemaphore(value: 0)
        Task {
            for c in clients { await c.close() }
            done.signal()
        }
        _ = done.wait(timeout: .now() + 10)
        for s in servers { s.stop() }
        if !directory.isEmpty { try? FileManager.default.removeItem(atPath: directory) }
    }

    func startServer(name: String = "n1", jetStream: Bool = true, tlsDirectory: String? = nil, extraTLS: [String] = [],
                     auth: NATSTestServer.Auth = .none, maxPayload: Int? = nil, extraConfig: [String] = []) throws -> NATSTestServer {
        let server = try NATSTestServer(name: name, directory: directory, jetStream: jetStream, tlsDirectory: tlsDirectory, extraTLS: extraTLS,
                                        auth: auth, maxPayload: maxPayload, extraConfig: extraConfig)
        servers.append(server)
        try server.start()
        return server
    }

    /// Three JetStream nodes routed to each other on loopback.
    func startCluster() throws -> [NATSTestServer] {
        let clusterPorts = (0..<3).map { _ in TestSupport.freePort() }
        let nodes = try (0..<3).map { i in
            try NATSTestServer(name: "n\(i + 1)", directory: directory, clusterPort: clusterPorts[i], routes: clusterPorts)
        }
        servers += nodes
        for n in nodes { try n.start() }
        return nodes
    }

    func connect(_ servers: [NATSTestServer], configure: (inout NATSClient.Configuration) -> Void = { _ in }) async throws -> NATSClient {
        var config = NATSClient.Configuration(servers: servers.map(\.address))
        config.connectTimeout = .seconds(3)
        config.reconnectWait = .milliseconds(100)
        configure(&config)
        var logger = Logger(label: "tapio.nats.test")
        logger.logLevel = .warning
        let client = try await NATSClient.connect(config, logger: logger)
        clients.append(client)
        return client
    }

    /// Waits until JetStream answers (in a cluster: once the meta leader is elected).
    func waitForJetStream(_ js: JetStream, timeout: Duration = .seconds(30)) async throws {
        let deadline = ContinuousClock.now + timeout
        var last = ""
        while ContinuousClock.now < deadline {
            do {
                struct AccountInfo: Decodable { var streams: Int }
                let _: AccountInfo = try await js.call("INFO")
                return
            } catch {
                last = "\(error)"
                try await Task.sleep(for: .milliseconds(200))
            }
        }
        throw TestSupportError("JetStream did not become ready within \(timeout): \(last)")
    }
}

/// The next `count` messages of a subscription, or fewer when `timeout` passes
/// first (the subscription then ends): a test never waits forever.
func receive(_ count: Int, from subscription: NATSSubscription, timeout: Duration = .seconds(10)) async -> [NATSMessage] {
    await withTaskGroup(of: [NATSMessage]?.self) { group in
        group.addTask {
            var got: [NATSMessage] = []
            for await message in subscription {
                got.append(message)
                if got.count == count { break }
            }
            return got
        }
        group.addTask {
            try? await Task.sleep(for: timeout)
            return nil
        }
        let first = await group.next() ?? nil
        group.cancelAll()
        if let first { return first }
        return await group.next().flatMap { $0 } ?? []
    }
}
