import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import Synchronization
import TapioAgent
import TapioClient
@testable import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

/// What an operator relies on: one server per data directory, probes that say
/// whether the server works and should get traffic, and certificates renewed
/// under a running server and agent.
final class OperabilityTests: XCTestCase {
    // MARK: the data directory lock

    func testASecondServerOnTheSameDataDirectoryIsRefusedNamingTheDirectoryAndTheHolder() throws {
        let s = try OperableServer()
        defer { s.stop() }
        let arguments = ["--data-dir", s.dataDir, "--tls-dir", s.serverTLS, "--listen", "127.0.0.1:0",
                         "--query-listen", "127.0.0.1:0", "--metrics-listen", "off"]
        let r = try TestSupport.run(try TestSupport.product("tapio-server"), arguments, timeout: 30)
        XCTAssertEqual(r.status, 1)
        XCTAssertTrue(r.stderr.contains("data directory \(s.dataDir) is in use") && r.stderr.contains("pid \(getpid())"), r.stderr)
        // The first server is untouched.
        XCTAssertEqual(try TestSupport.httpGet(port: s.metricsPort, path: "/readyz").status, 200)

        // Stopped, it lets the next one in.
        s.stop()
        let log = s.dir + "/next.log"
        let next = try ChildProcess(try TestSupport.product("tapio-server"), arguments, logPath: log)
        XCTAssertTrue(eventually { next.log.contains("tapio-server listening") || !next.isRunning }, next.log)
        XCTAssertTrue(next.isRunning, next.log)
        XCTAssertEqual(next.stop(), 0, next.log)
        XCTAssertTrue(next.log.contains("tapio-server stopped"), next.log)
    }

    // MARK: health and readiness

    func testHealthzAndReadyzOnARunningServer() throws {
        let s = try OperableServer()
        defer { s.stop() }
        XCTAssertTrue(try eventually {
            let h = try TestSupport.httpGet(port: s.metricsPort, path: "/healthz")
            // Both checks have run at least once.
            return h.status == 200 && h.body.contains("store: ok (last write check") && h.body.contains("engine: ok (last tick")
        })
        let h = try TestSupport.httpGet(port: s.metricsPort, path: "/healthz")
        XCTAssertTrue(h.body.hasPrefix("ok\n"), h.body)
        XCTAssertTrue(h.body.contains("store: ok") && h.body.contains("engine: ok"), h.body)
        let r = try TestSupport.httpGet(port: s.metricsPort, path: "/readyz")
        XCTAssertEqual(r.status, 200, r.body)
    }

    func testHealthzSaysTheStoreIsNotWritableAndRecovers() throws {
        let s = try OperableServer()
        defer { s.stop() }
        XCTAssertTrue(try eventually { try TestSupport.httpGet(port: s.metricsPort, path: "/healthz").status == 200 })
        // The write check's file cannot be created (a directory is in its place).
        // (Between two checks: the check renames its file away when done.)
        XCTAssertTrue(eventually { (try? FileManager.default.createDirectory(atPath: s.dataDir + "/health.tmp", withIntermediateDirectories: false)) != nil })
        XCTAssertTrue(try eventually { try TestSupport.httpGet(port: s.metricsPort, path: "/healthz").status == 503 })
        let h = try TestSupport.httpGet(port: s.metricsPort, path: "/healthz")
        XCTAssertTrue(h.body.hasPrefix("unhealthy\n") && h.body.contains("store: not writable") && h.body.contains("health.tmp"), h.body)
        XCTAssertTrue(h.body.contains("engine: ok"), h.body)
        // Still ready: a probe that restarts the pod is liveness, not readiness.
        XCTAssertEqual(try TestSupport.httpGet(port: s.metricsPort, path: "/readyz").status, 200)

        try FileManager.default.removeItem(atPath: s.dataDir + "/health.tmp")
        XCTAssertTrue(try eventually { try TestSupport.httpGet(port: s.metricsPort, path: "/healthz").status == 200 })
    }

    func testReadyzSaysShuttingDownWhileConnectionsDrain() throws {
        let s = try OperableServer(shutdownGrace: .seconds(30))
        defer { s.stop() }
        XCTAssertEqual(try TestSupport.httpGet(port: s.metricsPort, path: "/readyz").status, 200)
        // A connection that holds the drain open: TCP only, it never says a word.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(s.ingestPort).bigEndian
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        XCTAssertEqual(rc, 0)
        XCTAssertTrue(eventually { s.server.connectionCount == 1 })
        let stopped = DispatchSemaphore(value: 0)
        let server = s.server
        Thread { server.shutdown(); stopped.signal() }.start()
        XCTAssertTrue(try eventually {
            let r = try TestSupport.httpGet(port: s.metricsPort, path: "/readyz")
            return r.status == 503 && r.body.contains("shutting down")
        })
        close(fd)
        XCTAssertEqual(stopped.wait(timeout: .now() + 30), .success)
        XCTAssertEqual(s.server.health.phase, .stopped)
    }

    func testHealthzSaysTheStoreIsFullWhenTheDiskIs() throws {
        let dataDir = try TestSupport.temporaryDirectory("tapio-full-data")
        let mount = try TestSupport.run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", dataDir])
        guard mount.status == 0 else { throw XCTSkip("cannot mount a small file system here: \(mount.stderr)") }
        defer { _ = try? TestSupport.run("/usr/bin/umount", ["-l", dataDir]) }
        let s = try OperableServer(dataDir: dataDir)
        defer { s.stop() }
        XCTAssertTrue(try eventually { try TestSupport.httpGet(port: s.metricsPort, path: "/healthz").status == 200 })
        // Fill it to the last page.
        let filler = dataDir + "/filler"
        _ = try TestSupport.run("/usr/bin/dd", ["if=/dev/zero", "of=" + filler, "bs=1M"], timeout: 60)
        _ = try TestSupport.run("/usr/bin/dd", ["if=/dev/zero", "of=" + filler, "bs=4k", "oflag=append", "conv=notrunc"], timeout: 60)
        XCTAssertTrue(try eventually { try TestSupport.httpGet(port: s.metricsPort, path: "/healthz").status == 503 })
        let h = try TestSupport.httpGet(port: s.metricsPort, path: "/healthz")
        XCTAssertTrue(h.body.contains("store: not writable") && h.body.contains("No space left on device"), h.body)
        try FileManager.default.removeItem(atPath: filler)
        XCTAssertTrue(try eventually { try TestSupport.httpGet(port: s.metricsPort, path: "/healthz").status == 200 })
    }

    func testHealthReportsAStalledEngineFailedCommitsAndTheStartAndShutdownPhases() {
        var ops = ServerConfiguration.Operations()
        ops.engineStallAfter = .seconds(5)
        ops.storeCheckStaleAfter = .seconds(20)
        let health = ServerHealth(operations: ops)
        let s: Int64 = 1_000_000_000
        XCTAssertFalse(health.readiness().ok)
        XCTAssertFalse(health.health(nowNs: 0).ok)
        health.set(.restoring, nowNs: 0)
        XCTAssertTrue(health.readiness().text.contains("restoring"), health.readiness().text)
        XCTAssertFalse(health.health(nowNs: 0).ok)

        health.set(.ready, nowNs: 100 * s)
        XCTAssertTrue(health.readiness().ok)
        health.engineTicked(nowNs: 101 * s)
        health.storeChecked(error: nil, nowNs: 101 * s)
        XCTAssertTrue(health.health(nowNs: 102 * s).ok)
        // The engine's last tick is too old.
        let stalled = health.health(nowNs: 107 * s)
        XCTAssertFalse(stalled.ok)
        XCTAssertTrue(stalled.text.contains("engine: not advancing: last tick 6.0 s ago"), stalled.text)
        health.engineTicked(nowNs: 107 * s)
        health.storeChecked(error: nil, nowNs: 107 * s)
        XCTAssertTrue(health.health(nowNs: 107 * s).ok)
        // No write check has completed for too long (the storage thread is stuck).
        health.engineTicked(nowNs: 130 * s)
        let stuck = health.health(nowNs: 130 * s)
        XCTAssertFalse(stuck.ok)
        XCTAssertTrue(stuck.text.contains("store: no write check has completed"), stuck.text)
        health.storeChecked(error: nil, nowNs: 130 * s)
        XCTAssertTrue(health.health(nowNs: 130 * s).ok)

        // Batch commits failing and none succeeding; then one succeeds.
        health.commitsObserved(succeeded: 10, failed: 0)
        health.commitsObserved(succeeded: 10, failed: 2)
        let failing = health.health(nowNs: 130 * s)
        XCTAssertFalse(failing.ok)
        XCTAssertTrue(failing.text.contains("2 batch commit(s) failed"), failing.text)
        health.commitsObserved(succeeded: 11, failed: 2)
        XCTAssertTrue(health.health(nowNs: 130 * s).ok)

        health.set(.shuttingDown, nowNs: 131 * s)
        XCTAssertFalse(health.readiness().ok)
        XCTAssertTrue(health.readiness().text.contains("shutting down"))
        // The engine stops ticking on purpose: not a reason to kill the process.
        XCTAssertTrue(health.health(nowNs: 140 * s).ok, health.health(nowNs: 140 * s).text)
        health.set(.stopped)
        XCTAssertFalse(health.readiness().ok)
    }

    // MARK: certificate rotation

    /// cert-manager renews the server's certificate from the same CA: the
    /// kubelet swaps the secret's files under the running server.
    func testARenewedServerCertificateServesNewConnectionsWhileOpenOnesKeepWorking() throws {
        let s = try OperableServer()
        defer { s.stop() }
        let (outbox, sender) = try s.agent(node: "node-a", tls: s.nodeTLS("node-a"))
        defer { sender.drainAndStop(graceSeconds: 1) }
        try deliver(outbox, "before")
        let first = try presentedCertificate(port: s.ingestPort, ca: s.pki + "/ca/ca.crt", client: s.pki + "/operators/alice")
        XCTAssertEqual(first, try leaf(s.pki + "/server/tls.crt"))

        // Renewed: a new key and certificate from the same CA.
        _ = try DevelopmentPKI.initialize(directory: s.pki, nodes: [], operators: [])
        let renewed = try leaf(s.pki + "/server/tls.crt")
        XCTAssertNotEqual(renewed, first)
        try publish(s.serverTLS, from: s.pki + "/server")
        XCTAssertTrue(eventually { s.server.metrics.value(#"tapio_server_tls_reloads_total{result="applied"}"#) == 1 })

        XCTAssertEqual(try presentedCertificate(port: s.ingestPort, ca: s.pki + "/ca/ca.crt", client: s.pki + "/operators/alice"), renewed)
        XCTAssertEqual(try presentedCertificate(port: s.queryPort, ca: s.pki + "/ca/ca.crt", client: s.pki + "/operators/alice"), renewed)
        // The open agent connection goes on, without reconnecting.
        try deliver(outbox, "after")
        XCTAssertEqual(sender.status.connects, 1)
        // A new agent connection and a new operator connection work.
        let (outboxB, senderB) = try s.agent(node: "node-b", tls: s.nodeTLS("node-b"))
        defer { senderB.drainAndStop(graceSeconds: 1) }
        try deliver(outboxB, "b")
        XCTAssertNoThrow(try s.operatorClient(s.pki + "/operators/alice").json("incidents"))
        XCTAssertEqual(s.server.metrics.value(#"tapio_server_tls_reloads_total{result="refused"}"#), 0)
    }

    /// The CA itself is rotated: first every side trusts old and new CA and
    /// the certificates are reissued by the new one; then the old CA goes. The
    /// agent keeps running throughout and its next connection uses its new files.
    func testACARotationUnderARunningServerAndAgent() throws {
        let s = try OperableServer()
        defer { s.stop() }
        let newPKI = try TestSupport.makePKI(in: try TestSupport.temporaryDirectory("tapio-new-ca"), nodes: ["node-a"], operators: ["alice"])
        let bundle = s.dir + "/bundle.crt"
        try (read(s.pki + "/ca/ca.crt") + read(newPKI + "/ca/ca.crt")).write(to: URL(fileURLWithPath: bundle))

        // The agent through a connection the test can cut (a network blip).
        let agentTLS = s.dir + "/agent-tls"
        try publish(agentTLS, from: s.pki + "/nodes/node-a")
        let proxy = try TCPProxy(targetPort: s.ingestPort)
        defer { proxy.stop() }
        let (outbox, sender) = try s.agent(node: "node-a", tls: AgentTLSFiles(directory: agentTLS), port: proxy.port)
        defer { sender.drainAndStop(graceSeconds: 1) }
        try deliver(outbox, "old-ca")
        XCTAssertEqual(sender.status.connects, 1)

        // Step 1: both CAs trusted, certificates from the new CA.
        try publish(s.serverTLS, from: newPKI + "/server", ca: bundle)
        try publish(agentTLS, from: newPKI + "/nodes/node-a", ca: bundle)
        XCTAssertTrue(eventually { s.server.metrics.value(#"tapio_server_tls_reloads_total{result="applied"}"#) == 1 })
        XCTAssertEqual(try presentedCertificate(port: s.ingestPort, ca: bundle, client: newPKI + "/operators/alice"),
                       try leaf(newPKI + "/server/tls.crt"))
        // Clients of either CA are accepted on new connections.
        XCTAssertNoThrow(try s.operatorClient(s.pki + "/operators/alice", ca: bundle).json("incidents"))
        XCTAssertNoThrow(try s.operatorClient(newPKI + "/operators/alice", ca: bundle).json("incidents"))
        try deliver(outbox, "both-cas")

        // Step 2: the old CA is no longer trusted.
        try publish(s.serverTLS, from: newPKI + "/server")
        XCTAssertTrue(eventually { s.server.metrics.value(#"tapio_server_tls_reloads_total{result="applied"}"#) == 2 })
        XCTAssertThrowsError(try s.operatorClient(s.pki + "/operators/alice", ca: bundle).json("incidents"),
                             "a new connection with a certificate of the old CA is refused")
        XCTAssertNoThrow(try s.operatorClient(newPKI + "/operators/alice", ca: bundle).json("incidents"))
        // The agent's connection, made with the old CA's certificate, still works.
        try deliver(outbox, "old-connection")
        XCTAssertEqual(sender.status.connects, 1)

        // Cut it: the agent reconnects with the files it has now (the old ones would be refused).
        proxy.cut()
        try deliver(outbox, "new-connection")
        XCTAssertEqual(sender.status.connects, 2)
        XCTAssertEqual(s.server.metrics.value(#"tapio_server_tls_reloads_total{result="refused"}"#), 0)
    }

    /// A bad new set (a key of another certificate, a file that is not PEM)
    /// is refused, logged and counted; new connections keep the current one.
    func testABadNewFileSetIsRefusedAndTheCurrentCertificateStays() throws {
        let s = try OperableServer()
        defer { s.stop() }
        let current = try leaf(s.pki + "/server/tls.crt")
        func presented() throws -> [UInt8] {
            try presentedCertificate(port: s.ingestPort, ca: s.pki + "/ca/ca.crt", client: s.pki + "/operators/alice")
        }

        // A key that belongs to another certificate.
        try publish(s.serverTLS, from: s.pki + "/server", key: s.pki + "/nodes/node-a/tls.key")
        XCTAssertTrue(eventually { s.server.metrics.value(#"tapio_server_tls_reloads_total{result="refused"}"#) == 1 })
        XCTAssertTrue(s.logs.contains { $0.contains("TLS files changed but cannot be used") && $0.contains("tls.key") }, "\(s.logs)")
        XCTAssertEqual(try presented(), current)
        XCTAssertNoThrow(try s.operatorClient(s.pki + "/operators/alice").json("incidents"))

        // A certificate file that is not PEM: refused once, however long it stays.
        try publish(s.serverTLS, from: s.pki + "/server", certificate: Array("not a certificate\n".utf8))
        XCTAssertTrue(eventually { s.server.metrics.value(#"tapio_server_tls_reloads_total{result="refused"}"#) == 2 })
        XCTAssertEqual(try presented(), current)
        let applied = s.server.metrics.value(#"tapio_server_tls_reloads_total{result="applied"}"#)
        XCTAssertEqual(applied, 0)

        // A good set again.
        _ = try DevelopmentPKI.initialize(directory: s.pki, nodes: [], operators: [])
        try publish(s.serverTLS, from: s.pki + "/server")
        XCTAssertTrue(eventually { s.server.metrics.value(#"tapio_server_tls_reloads_total{result="applied"}"#) == 1 })
        XCTAssertEqual(try presented(), try leaf(s.pki + "/server/tls.crt"))
        XCTAssertEqual(s.server.metrics.value(#"tapio_server_tls_reloads_total{result="refused"}"#), 2)
    }

    /// Files rewritten in place one at a time (not an atomic swap): the
    /// moment between the new certificate and the new key is not refused.
    func testFilesRewrittenOneAtATimeAreTakenWhenComplete() throws {
        let s = try OperableServer(plainFiles: true)
        defer { s.stop() }
        for round in 1...3 {
            // tapio certs init replaces tls.crt, then tls.key, each by rename.
            _ = try DevelopmentPKI.initialize(directory: s.pki, nodes: [], operators: [])
            XCTAssertTrue(eventually { s.server.metrics.value(#"tapio_server_tls_reloads_total{result="applied"}"#) >= round })
            XCTAssertTrue(try eventually {
                try presentedCertificate(port: s.ingestPort, ca: s.pki + "/ca/ca.crt", client: s.pki + "/operators/alice") == leaf(s.pki + "/server/tls.crt")
            })
        }
        XCTAssertEqual(s.server.metrics.value(#"tapio_server_tls_reloads_total{result="refused"}"#), 0)
    }

    // MARK: helpers

    private func deliver(_ outbox: Outbox, _ comm: String, file: StaticString = #filePath, line: UInt = #line) throws {
        for pid in 1...5 { outbox.add(event(UInt32(pid), comm: comm)) }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 }, "\(comm): stored and acknowledged", file: file, line: line)
    }

    private func read(_ path: String) throws -> Data {
        try Data(contentsOf: URL(fileURLWithPath: path))
    }

    /// The DER of the first certificate in a PEM file.
    private func leaf(_ path: String) throws -> [UInt8] {
        try NIOSSLCertificate.fromPEMFile(path)[0].toDERBytes()
    }

    /// Publishes a secret the way the kubelet does: the files in a new
    /// directory, `..data` switched to it by one rename, the names links into `..data`.
    private func publish(_ dir: String, from source: String, ca: String? = nil, key: String? = nil, certificate: [UInt8]? = nil) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let version = "..\(UUID().uuidString)"
        try fm.createDirectory(atPath: dir + "/" + version, withIntermediateDirectories: false)
        try (certificate.map { Data($0) } ?? read(source + "/tls.crt")).write(to: URL(fileURLWithPath: dir + "/" + version + "/tls.crt"))
        try read(key ?? source + "/tls.key").write(to: URL(fileURLWithPath: dir + "/" + version + "/tls.key"))
        try read(ca ?? source + "/ca.crt").write(to: URL(fileURLWithPath: dir + "/" + version + "/ca.crt"))
        try? fm.removeItem(atPath: dir + "/..data_tmp")
        try fm.createSymbolicLink(atPath: dir + "/..data_tmp", withDestinationPath: version)
        guard rename(dir + "/..data_tmp", dir + "/..data") == 0 else { throw TestSupportError("rename ..data failed") }
        for name in ["tls.crt", "tls.key", "ca.crt"] where (try? fm.destinationOfSymbolicLink(atPath: dir + "/" + name)) == nil {
            try fm.createSymbolicLink(atPath: dir + "/" + name, withDestinationPath: "..data/" + name)
        }
    }

    /// Completes a TLS handshake as `client` (an identity directory) trusting
    /// `ca`, and returns the DER of the certificate the server presented.
    private func presentedCertificate(port: Int, ca: String, client: String) throws -> [UInt8] {
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv13
        config.trustRoots = .file(ca)
        config.certificateChain = try NIOSSLCertificate.fromPEMFile(client + "/tls.crt").map { .certificate($0) }
        config.privateKey = .privateKey(try NIOSSLPrivateKey(file: client + "/tls.key", format: .pem))
        let context = try NIOSSLContext(configuration: config)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        let handshake = group.next().makePromise(of: NIOSSLCertificate?.self)
        let channel = try ClientBootstrap(group: group)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: context, serverHostname: "localhost"))
                    try channel.pipeline.syncOperations.addHandler(HandshakeWaiter(promise: handshake))
                }
            }
            .connect(host: "127.0.0.1", port: port).wait()
        defer { try? channel.close().wait() }
        guard let certificate = try handshake.futureResult.wait() else { throw TestSupportError("no server certificate") }
        return try certificate.toDERBytes()
    }
}

/// The server's certificate, taken when the handshake completes (a listener
/// may close the connection right after, e.g. for the client's role).
private final class HandshakeWaiter: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    let promise: EventLoopPromise<NIOSSLCertificate?>
    private var done = false
    init(promise: EventLoopPromise<NIOSSLCertificate?>) { self.promise = promise }
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if !done, case .handshakeCompleted = event as? TLSUserEvent {
            done = true
            promise.succeed(try? context.pipeline.syncOperations.handler(type: NIOSSLClientHandler.self).peerCertificate)
        }
        context.fireUserInboundEventTriggered(event)
    }
    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if !done { done = true; promise.fail(error) }
    }
    func channelInactive(context: ChannelHandlerContext) {
        if !done { done = true; promise.fail(TestSupportError("closed before the handshake completed")) }
        context.fireChannelInactive()
    }
}

/// A server with its /metrics listener, TLS files published like a Kubernetes
/// secret volume, checks and reloads every 100 ms, and its log lines kept.
private final class OperableServer {
    let dir: String
    let pki: String
    let dataDir: String
    let serverTLS: String
    let configuration: ServerConfiguration
    let server: TapioServer
    let ingestPort: Int
    let queryPort: Int
    let metricsPort: Int
    private let capture = LogCapture()
    private var stopped = false

    init(plainFiles: Bool = false, dataDir: String? = nil, shutdownGrace: ServerConfiguration.TimeAmount = .seconds(2)) throws {
        dir = try TestSupport.temporaryDirectory("tapio-operability")
        pki = try TestSupport.makePKI(in: dir, nodes: ["node-a", "node-b"], operators: ["alice"])
        self.dataDir = dataDir ?? dir + "/data"
        if plainFiles {
            serverTLS = pki + "/server"
        } else {
            serverTLS = dir + "/server-tls"
            let fm = FileManager.default
            try fm.createDirectory(atPath: serverTLS + "/..first", withIntermediateDirectories: true)
            for name in ["tls.crt", "tls.key", "ca.crt"] {
                try fm.copyItem(atPath: pki + "/server/" + name, toPath: serverTLS + "/..first/" + name)
                try fm.createSymbolicLink(atPath: serverTLS + "/" + name, withDestinationPath: "..data/" + name)
            }
            try fm.createSymbolicLink(atPath: serverTLS + "/..data", withDestinationPath: "..first")
        }
        var config = ServerConfiguration(dataDirectory: self.dataDir, tls: TLSFiles(directory: serverTLS))
        config.ingestPort = 0
        config.queryPort = 0
        config.metricsHost = "127.0.0.1"
        config.metricsPort = 0
        config.shutdownGrace = shutdownGrace
        configuration = config
        var ops = ServerConfiguration.Operations()
        ops.tlsReloadInterval = .milliseconds(100)
        ops.storeCheckInterval = .milliseconds(100)
        let capture = self.capture
        var logger = Logger(label: "tapio-server-test") { _ in capture }
        logger.logLevel = .info
        server = try TapioServer(configuration: config, operations: ops, logger: logger)
        let addresses = try server.start()
        ingestPort = addresses.ingest.port!
        queryPort = addresses.query.port!
        metricsPort = addresses.metrics!.port!
    }

    var logs: [String] { capture.lines }

    func stop() {
        guard !stopped else { return }
        stopped = true
        server.shutdown()
    }

    deinit { stop() }

    func nodeTLS(_ node: String) -> AgentTLSFiles { AgentTLSFiles(directory: pki + "/nodes/" + node) }

    func agent(node: String, tls: AgentTLSFiles, port: Int? = nil) throws -> (Outbox, Sender) {
        let outbox = try Outbox(node: node, epoch: UInt64(wallClockNs()), spoolDirectory: nil)
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(port ?? ingestPort), serverName: "localhost", tls: tls,
                                          node: node, bootId: "test", capabilities: ["process_exec"], degraded: [])
        config.maximumBackoffMs = 200
        var logger = Logger(label: "tapio-agent-test")
        logger.logLevel = .critical
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        sender.start()
        return (outbox, sender)
    }

    func operatorClient(_ identity: String, ca: String? = nil) throws -> QueryClient {
        try QueryClient(host: "127.0.0.1", port: queryPort, ca: ca ?? identity + "/ca.crt",
                        certificate: identity + "/tls.crt", key: identity + "/tls.key")
    }
}

private final class LogCapture: LogHandler, @unchecked Sendable {
    private let stored = Mutex<[String]>([])
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    var lines: [String] { stored.withLock { $0 } }
    func log(event: LogEvent) {
        record(level: event.level, message: event.message, metadata: event.metadata)
    }

    private func record(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?) {
        let all = self.metadata.merging(metadata ?? [:]) { $1 }
        stored.withLock { $0.append("\(level) \(message) \(all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))") }
    }
}

/// A TCP forwarder on 127.0.0.1 whose connections the test can cut.
private final class TCPProxy: @unchecked Sendable {
    let port: Int
    private let listener: Int32
    private let targetPort: Int
    private let sockets = Mutex<[Int32]>([])

    init(targetPort: Int) throws {
        self.targetPort = targetPort
        let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.listener = listener
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, len) } }
        guard bound == 0, listen(listener, 16) == 0 else { throw TestSupportError("proxy: cannot listen") }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(listener, $0, &len) } }
        port = Int(UInt16(bigEndian: addr.sin_port))
        let thread = Thread { [self] in acceptLoop() }
        thread.start()
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 { return }
            let upstream = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var addr = sockaddr_in()
            addr.sin_family = sa_family_t(AF_INET)
            addr.sin_addr.s_addr = inet_addr("127.0.0.1")
            addr.sin_port = UInt16(targetPort).bigEndian
            let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(upstream, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            guard rc == 0 else { close(client); close(upstream); continue }
            sockets.withLock { $0 += [client, upstream] }
            for (from, to) in [(client, upstream), (upstream, client)] {
                Thread {
                    var buffer = [UInt8](repeating: 0, count: 16384)
                    while true {
                        let n = read(from, &buffer, buffer.count)
                        if n <= 0 { break }
                        var sent = 0
                        while sent < n {
                            let w = buffer[sent..<n].withUnsafeBytes { send(to, $0.baseAddress, n - sent, Int32(MSG_NOSIGNAL)) }
                            if w <= 0 { break }
                            sent += w
                        }
                        if sent < n { break }
                    }
                    shutdown(from, Int32(SHUT_RDWR))
                    shutdown(to, Int32(SHUT_RDWR))
                }.start()
            }
        }
    }

    /// Ends every forwarded connection (both sides see it closed).
    func cut() {
        for fd in sockets.withLock({ s in defer { s = [] }; return s }) { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        cut()
    }
}
