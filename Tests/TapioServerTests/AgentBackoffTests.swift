import Foundation
import Logging
import Synchronization
import TapioAgent
import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

/// A refused agent backs off (exponentially, to a minute) and says so once;
/// an agent that merely cannot reach the server keeps retrying quickly.
final class AgentBackoffTests: XCTestCase {
    private var harness: ServerHarness!

    override func setUpWithError() throws {
        harness = try ServerHarness()
    }

    override func tearDown() {
        harness = nil
    }

    /// Counts the sender's warnings.
    final class Warnings: @unchecked Sendable {
        let lines = Mutex<[String]>([])
        var all: [String] { lines.withLock { $0 } }

        func logger() -> Logger {
            Logger(label: "tapio-agent-test") { _ in Handler(sink: self) }
        }

        struct Handler: LogHandler {
            let sink: Warnings
            var metadata: Logger.Metadata = [:]
            var logLevel: Logger.Level = .warning
            subscript(metadataKey key: String) -> Logger.Metadata.Value? {
                get { metadata[key] }
                set { metadata[key] = newValue }
            }
            func log(event: LogEvent) {
            record(level: event.level, message: event.message, metadata: event.metadata)
        }

        private func record(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?) {
                let error = metadata?["error"].map { " \($0)" } ?? ""
                sink.lines.withLock { $0.append("\(message)\(error)") }
            }
        }
    }

    private func sender(node: String, claiming: String? = nil, tls: AgentTLSFiles? = nil, port: Int? = nil, logger: Logger) throws -> Sender {
        let outbox = try Outbox(node: claiming ?? node, epoch: UInt64(wallClockNs()), limits: Outbox.Limits(), spoolDirectory: nil)
        let config = Sender.Configuration(host: "127.0.0.1", port: UInt16(port ?? harness.ingestPort), serverName: "localhost",
                                          tls: tls ?? harness.nodeTLS(node), node: claiming ?? node, bootId: "test",
                                          capabilities: ["process_exec"], degraded: [])
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        sender.start()
        return sender
    }

    func testAnAgentRefusedAtHelloBacksOffAndLogsOnce() throws {
        let warnings = Warnings()
        // node-a's certificate, hello says node-b: an error frame answers the hello.
        let sender = try sender(node: "node-a", claiming: "node-b", logger: warnings.logger())
        Thread.sleep(forTimeInterval: 8)
        let status = sender.status
        sender.drainAndStop(graceSeconds: 0)
        // 1 s, 2 s, 4 s (±20 %): at most 4 attempts in 8 s. Reconnecting
        // every 100 ms would have made about 80.
        let rejected = harness.server.metrics.value("tapio_server_connections_rejected_total{reason=\"protocol\"}")
        XCTAssertGreaterThanOrEqual(status.refusals, 2, "\(status)")
        XCTAssertLessThanOrEqual(status.refusals, 5, "\(status)")
        XCTAssertLessThanOrEqual(rejected, 5)
        XCTAssertEqual(status.refusals, status.connectFailures, "every failure was a refusal: \(status)")
        XCTAssertTrue(status.refused)
        XCTAssertEqual(status.connects, 0)
        XCTAssertTrue(status.lastError.contains("certificate names node node-a but hello says node-b"), status.lastError)
        let refusals = warnings.all.filter { $0.contains("node-b") }
        XCTAssertEqual(refusals.count, 1, "one warning for one reason, not one per attempt: \(warnings.all)")
    }

    func testAnAgentWhoseCertificateTheServerRejectsBacksOff() throws {
        let other = try TestSupport.temporaryDirectory("tapio-other-ca")
        defer { try? FileManager.default.removeItem(atPath: other) }
        let otherPKI = try TestSupport.makePKI(in: other, nodes: ["node-a"])
        // Trusts the real server; presents a certificate the server's CA did not issue.
        let tls = AgentTLSFiles(ca: harness.pki + "/ca/ca.crt", certificate: otherPKI + "/nodes/node-a/tls.crt", key: otherPKI + "/nodes/node-a/tls.key")
        let warnings = Warnings()
        let sender = try sender(node: "node-a", tls: tls, logger: warnings.logger())
        Thread.sleep(forTimeInterval: 8)
        let status = sender.status
        sender.drainAndStop(graceSeconds: 0)
        XCTAssertGreaterThanOrEqual(status.refusals, 2, "\(status)")
        XCTAssertLessThanOrEqual(status.connectFailures, 5, "\(status)")
        XCTAssertEqual(status.refusals, status.connectFailures, "\(status)")
        XCTAssertEqual(warnings.all.count, 1, "\(warnings.all)")
    }

    func testAnAgentThatCannotReachTheServerRetriesQuicklyWithoutRepeatingItself() throws {
        let warnings = Warnings()
        // Nothing listens on this port: an ordinary failure, not a refusal.
        let sender = try sender(node: "node-a", port: TestSupport.freePort(), logger: warnings.logger())
        XCTAssertTrue(eventually(timeout: 20) { sender.status.connectFailures >= 5 }, "\(sender.status)")
        let status = sender.status
        sender.drainAndStop(graceSeconds: 0)
        XCTAssertEqual(status.refusals, 0)
        XCTAssertFalse(status.refused)
        XCTAssertEqual(warnings.all.count, 1, "\(warnings.all)")
    }

    func testAConnectedAgentIsNeitherRefusedNorWaiting() throws {
        // A good agent: connected, not refused, no retry pending.
        let (_, sender) = try harness.agent(node: "node-a")
        defer { sender.drainAndStop(graceSeconds: 0) }
        XCTAssertTrue(eventually { sender.status.connected })
        XCTAssertFalse(sender.status.refused)
        XCTAssertEqual(sender.status.refusals, 0)
        XCTAssertNotNil(sender.status.lastConnectedNs)
        XCTAssertEqual(sender.status.retryInMs, 0)
    }
}
