import Foundation
import Logging
import NIOSSL
@testable import TapioNATS
import TapioTestSupport
import XCTest

extension NATSTestServer {
    var address: NATSServerAddress { NATSServerAddress(host: "127.0.0.1", port: port) }
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
