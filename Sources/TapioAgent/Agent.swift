import Foundation
import Logging
import TapioWire

/// tapio-agent: kernel programs → outbox → sender. `run()` blocks until
/// `requestStop()`, then shuts down in reverse order: stop reading the ring
/// buffer (draining what it holds), seal the last batch, wait (bounded) for
/// the server to acknowledge everything, say goodbye, spool what is left.
public final class Agent: Sendable {
    public static let version = "0.1.0"

    public struct Configuration: Sendable {
        public var node: String
        public var serverHost: String
        public var serverPort: UInt16
        public var serverName: String?
        public var tls: AgentTLSFiles
        public var spoolDirectory: String?
        public var kernel = KernelSource.Configuration()
        public var outbox = Outbox.Limits()
        /// How long shutdown waits for the last acknowledgement.
        public var shutdownGraceSeconds: Double = 5
        /// The agent's clock; skewed only by the fault lab.
        public var clock = AgentClock()

        public init(node: String, serverHost: String, serverPort: UInt16, tls: AgentTLSFiles) {
            self.node = node
            self.serverHost = serverHost
            self.serverPort = serverPort
            self.tls = tls
        }
    }

    public let configuration: Configuration
    public let kernel: KernelSource
    public let outbox: Outbox
    public let sender: Sender
    private let logger: Logger
    private let stopRequested = DispatchSemaphore(value: 0)

    public init(configuration: Configuration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        var kernelConfig = configuration.kernel
        kernelConfig.clock = configuration.clock
        kernel = try KernelSource(configuration: kernelConfig, logger: logger)
        for p in kernel.programs {
            if p.attached {
                logger.info("BPF program running", metadata: ["program": "\(p.name)", "signal": "\(p.capability)"])
            } else {
                logger.warning("BPF program degraded", metadata: ["program": "\(p.name)", "signal": "\(p.capability)", "error": "\(p.error)"])
            }
        }
        outbox = try Outbox(node: configuration.node, epoch: UInt64(wallClockNs()), limits: configuration.outbox, spoolDirectory: configuration.spoolDirectory)
        var senderConfig = Sender.Configuration(
            host: configuration.serverHost, port: configuration.serverPort, serverName: configuration.serverName, tls: configuration.tls,
            node: configuration.node, bootId: Agent.bootId(), capabilities: kernel.capabilities, degraded: kernel.degraded)
        senderConfig.connectTimeoutMs = 5000
        senderConfig.clock = configuration.clock
        sender = Sender(configuration: senderConfig, outbox: outbox, logger: logger)
    }

    public func run() {
        kernel.start(into: outbox)
        sender.start()
        stopRequested.wait()
        logger.info("stopping: draining the ring buffer and the outbox")
        kernel.stop()
        outbox.sealIfDue(nowNs: configuration.clock.now(), force: true)
        sender.drainAndStop(graceSeconds: configuration.shutdownGraceSeconds)
        let left = outbox.unacknowledged
        if left > 0 {
            let unsaved = outbox.spoolRemaining()
            logger.warning("batches not acknowledged at shutdown", metadata: ["batches": "\(left)", "spooled": "\(left - unsaved)", "lost": "\(unsaved)"])
        }
        let stats = outbox.stats
        logger.info("stopped", metadata: ["events_read": "\(kernel.eventsRead)", "batches_sealed": "\(stats.sealedBatches)", "batches_acked": "\(stats.ackedBatches)"])
    }

    public func requestStop() {
        stopRequested.signal()
    }

    static func bootId() -> String {
        (try? String(contentsOfFile: "/proc/sys/kernel/random/boot_id", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
    }
}
