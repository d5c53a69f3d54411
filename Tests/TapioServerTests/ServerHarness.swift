import Foundation
import Logging
import NIOCore
import TapioAgent
import TapioClient
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// A real tapio-server in this process (real TLS, real SQLite) on free ports.
final class ServerHarness {
    let dir: String
    let pki: String
    let server: TapioServer
    let ingestPort: Int
    let queryPort: Int

    init(nodes: [String] = ["node-a", "node-b"], operations: ServerConfiguration.Operations = .init(),
         configure: (inout ServerConfiguration) -> Void = { _ in }) throws {
        dir = try TestSupport.temporaryDirectory("tapio-server-test")
        pki = try TestSupport.makePKI(in: dir, nodes: nodes, operators: ["alice"])
        var config = ServerConfiguration(dataDirectory: dir + "/data", tls: TLSFiles(directory: pki + "/server"))
        config.ingestPort = 0
        config.queryPort = 0
        config.metricsHost = nil
        config.shutdownGrace = .seconds(2)
        configure(&config)
        var logger = Logger(label: "tapio-server-test")
        logger.logLevel = .notice
        server = try TapioServer(configuration: config, operations: operations, logger: logger)
        let addresses = try server.start()
        ingestPort = addresses.ingest.port!
        queryPort = addresses.query.port!
    }

    deinit {
        server.shutdown()
    }

    func nodeTLS(_ node: String) -> AgentTLSFiles { AgentTLSFiles(directory: pki + "/nodes/" + node) }

    /// A well-behaved agent without the kernel part: an outbox fed by the test and the real sender.
    func agent(node: String, claiming claimed: String? = nil, spool: String? = nil, limits: Outbox.Limits = Outbox.Limits()) throws -> (Outbox, Sender) {
        let outbox = try Outbox(node: claimed ?? node, epoch: UInt64(wallClockNs()), limits: limits, spoolDirectory: spool)
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(ingestPort), serverName: "localhost", tls: nodeTLS(node),
                                          node: claimed ?? node, bootId: "test", capabilities: ["process_exec"], degraded: [])
        config.maximumBackoffMs = 200
        var logger = Logger(label: "tapio-agent-test")
        logger.logLevel = .critical
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        sender.start()
        return (outbox, sender)
    }

    func operatorClient(_ name: String = "alice") throws -> QueryClient {
        try QueryClient(host: "127.0.0.1", port: queryPort, ca: pki + "/operators/\(name)/ca.crt",
                        certificate: pki + "/operators/\(name)/tls.crt", key: pki + "/operators/\(name)/tls.key")
    }

    /// Runs the independent Python peer.
    func python(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        try TestSupport.run(TestSupport.systemPython, [TestSupport.interopScript] + arguments, timeout: 30)
    }
}

func event(_ pid: UInt32, comm: String, time: Int64 = wallClockNs()) -> TapioEvent {
    TapioEvent(kind: .processExit, timeNs: time, pid: pid, comm: comm, detail: .exit(exitCode: 0, signal: 0, coreDumped: false))
}
