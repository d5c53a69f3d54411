import Foundation
import Logging
import TapioAttribution
import Synchronization
import TapioWire

/// tapio-agent: kernel programs → outbox → sender. `run()` blocks until
/// `requestStop()`, then shuts down in reverse order: stop reading the ring
/// buffer (draining what it holds), seal the last batch, wait (bounded) for
/// the server to acknowledge everything, say goodbye, spool what is left
/// (and count what does not fit).
public final class Agent: Sendable {
    public static let version = TapioVersion.current

    public struct Configuration: Sendable {
        public var node: String
        public var serverHost: String
        public var serverPort: UInt16
        public var serverName: String?
        public var tls: AgentTLSFiles
        public var spoolDirectory: String?
        /// The data directory (`--data-dir`): locked against a second agent,
        /// and home of the crash counters (and of the carried drop counts when
        /// there is no spool). nil: no lock, no crash counters (tests).
        public var dataDirectory: String?
        public var kernel = KernelSource.Configuration()
        public var outbox = Outbox.Limits()
        /// How long shutdown waits for the last acknowledgement.
        public var shutdownGraceSeconds: Double = 5
        /// The agent's clock; skewed only by the fault lab.
        public var clock = AgentClock()
        /// Pod metadata from a file in the Kubernetes API's PodList format.
        public var metadataFile: String?
        /// Pod metadata from the Kubernetes API (in a pod: service account, this node's pods, watched).
        public var kubernetesAPI: KubernetesAPIConfiguration?
        /// Ready (`/readyz`) while a session is open or ended less than this
        /// long ago: a server restart, which agents ride out in seconds with
        /// their batches spooled, does not make every agent not ready at once.
        public var readinessGraceSeconds: Double = 60
        /// Leave the agent's own traffic (its connection to the server, its
        /// DNS lookups and listeners) out of what it reports.
        public var filterOwnTraffic = true
        /// procfs of the host's PID namespace, read only when a kernel cgroup
        /// id names no container (`--host-proc`); nil: /host/proc when it is
        /// mounted (the DaemonSet mounts the host's /proc there, without
        /// hostPID), else /proc.
        public var hostProc: String?

        public init(node: String, serverHost: String, serverPort: UInt16, tls: AgentTLSFiles) {
            self.node = node
            self.serverHost = serverHost
            self.serverPort = serverPort
            self.tls = tls
        }
    }

    /// True in the host's PID namespace (0xEFFFFFFC: the kernel's PROC_PID_INIT_INO).
    static var inInitialPIDNamespace: Bool {
        var st = stat()
        return stat("/proc/self/ns/pid", &st) == 0 && st.st_ino == 0xEFFF_FFFC
    }

    public let configuration: Configuration
    public let kernel: KernelSource
    public let outbox: Outbox
    public let sender: Sender
    public let pods: PodIndex
    public let attributor: Attributor
    /// Recognizes the agent's own network traffic among the kernel's events.
    public let selfTraffic: SelfTraffic
    private let metadata: MetadataFileSource?
    private let kubernetes: KubernetesAPISource?
    private let logger: Logger
    private let stopRequested = DispatchSemaphore(value: 0)
    /// Held for the process's life: no second agent on the same data directory.
    private let dataDirectoryLock: AgentDataDirectory?
    /// The kernel programs' reader is running (set by run(), cleared on stop).
    private let reading = Atomic<Bool>(false)

    public init(configuration: Configuration, logger: Logger) throws {
        self.configuration = configuration
        self.logger = logger
        // Before anything else: a second agent on this directory stops here.
        dataDirectoryLock = try configuration.dataDirectory.map { try AgentDataDirectory(path: $0) }
        var kernelConfig = configuration.kernel
        kernelConfig.clock = configuration.clock
        let selfTraffic = SelfTraffic(serverHost: configuration.serverHost, serverPort: configuration.serverPort)
        self.selfTraffic = selfTraffic
        if configuration.filterOwnTraffic {
            kernelConfig.isOwnTraffic = { selfTraffic.isOwn($0) }
        }
        pods = PodIndex()
        // Kernel cgroup ids are ids in the HOST's hierarchies: resolve them
        // there, never in this (possibly namespaced) mount's view.
        let hosts = HostCgroups.detect(configured: configuration.kernel.hostCgroupfs)
        var scope = "/"
        if let mount = hosts.unified, let root = configuration.kernel.cgroupRoot, root.hasPrefix(mount) {
            scope = String(root.dropFirst(mount.count))
            if scope.isEmpty { scope = "/" }
        }
        let resolver = hosts.unified.map { CgroupIDResolver(configuration: .init(mountPoint: $0, scope: scope)) }
        let memoryResolver = hosts.memory.map { CgroupIDResolver(configuration: .init(mountPoint: $0, scope: scope)) }
        var attribution = Attributor.Configuration(
            procRoot: configuration.hostProc ?? (FileManager.default.fileExists(atPath: "/host/proc/self") ? "/host/proc" : "/proc"))
        // Our own PID namespace's /proc would answer for the wrong processes.
        attribution.readsProc = attribution.procRoot != "/proc" || Agent.inInitialPIDNamespace
        logger.info("host view", metadata: ["cgroups": "\(hosts)", "proc": "\(attribution.readsProc ? attribution.procRoot : "none")"])
        let attributor = Attributor(index: pods, resolver: resolver, memoryResolver: memoryResolver, configuration: attribution)
        self.attributor = attributor
        if let file = configuration.metadataFile {
            let source = MetadataFileSource(path: file, index: pods)
            do {
                _ = try source.reloadIfChanged()
            } catch {
                throw KernelSourceError("--metadata-file \(file): \(error)")
            }
            metadata = source
        } else {
            metadata = nil
        }
        let index = pods
        kubernetes = configuration.kubernetesAPI.map { KubernetesAPISource(configuration: $0, index: index) }
        // Only the ring-buffer reader attributes (every record and harvest
        // goes through its thread), so one memo serves it without a lock.
        let memo = AttributionMemo()
        kernel = try KernelSource(configuration: kernelConfig, logger: logger) { event, memoryCgroupId in
            attributor.attribute(&event, memoryCgroupId: memoryCgroupId, memo: memo)
            if event.kind == .processExit { attributor.processExited(pid: event.pid) }
        }
        for p in kernel.programs {
            if p.attached {
                logger.info("BPF program running", metadata: ["program": "\(p.name)", "signal": "\(p.capability)"])
            } else {
                logger.warning("BPF program degraded", metadata: ["program": "\(p.name)", "signal": "\(p.capability)", "error": "\(p.error)"])
            }
        }
        outbox = try Outbox(node: configuration.node, epoch: UInt64(wallClockNs()), limits: configuration.outbox, spoolDirectory: configuration.spoolDirectory,
                            stateDirectory: configuration.dataDirectory)
        if let left = outbox.recovered {
            let killed = left.killed.values.reduce(0, &+)
            logger.warning("the previous agent process did not stop cleanly; what it read and never kept is reported as dropped (agent_killed)", metadata: [
                "epoch": "\(left.epoch)", "events_read": "\(left.read.reduce(0, &+))", "agent_killed": "\(killed)",
                "unreported_drops": "\(left.unreported.values.reduce(0, &+) &- killed)"])
        }
        if let problem = outbox.countersProblem {
            logger.warning("no crash counters: what a crash loses will not be counted", metadata: ["error": "\(problem)"])
        }
        var senderConfig = Sender.Configuration(
            host: configuration.serverHost, port: configuration.serverPort, serverName: configuration.serverName, tls: configuration.tls,
            node: configuration.node, bootId: Agent.bootId(), capabilities: kernel.capabilities, degraded: kernel.degraded)
        senderConfig.connectTimeoutMs = 5000
        senderConfig.clock = configuration.clock
        sender = Sender(configuration: senderConfig, outbox: outbox, logger: logger)
    }

    public func run() {
        metadata?.start(interval: 1)
        kubernetes?.start()
        publishInventory()
        outbox.startSpooler()
        kernel.start(into: outbox)
        reading.store(true, ordering: .relaxed)
        identifySelf()
        sender.start()
        // Housekeeping until asked to stop: attribution caches, the inventory.
        while stopRequested.wait(timeout: .now() + 1) == .timedOut {
            attributor.sweep()
            publishInventory()
        }
        metadata?.stop()
        kubernetes?.stop()
        logger.info("stopping: draining the ring buffer and the outbox")
        reading.store(false, ordering: .relaxed)
        kernel.stop()
        outbox.sealIfDue(nowNs: configuration.clock.now(), force: true)
        sender.drainAndStop(graceSeconds: configuration.shutdownGraceSeconds)
        outbox.stopSpooler()
        // Whatever is not acknowledged stays in the spool for the next start;
        // events that do not fit are counted, and counts no kept batch carries
        // are saved for the next start to report.
        let left = outbox.unacknowledged
        let lostEvents = outbox.spoolRemaining()
        if left > 0 {
            logger.warning("batches not acknowledged at shutdown", metadata: [
                "batches": "\(left)", "spooled": "\(outbox.unacknowledged)", "lost_events": "\(lostEvents)",
                "spool": "\(configuration.spoolDirectory ?? (configuration.dataDirectory == nil ? "none: lost events are counted only in this log" : "none: lost events are counted and reported by the next start"))"])
        }
        let unaccounted = outbox.closeCrashCounters()
        if !unaccounted.isEmpty {
            logger.warning("events read and neither kept nor counted at shutdown", metadata: ["events": "\(unaccounted.values.reduce(0, +))"])
        }
        let stats = outbox.stats
        logger.info("stopped", metadata: ["events_read": "\(kernel.eventsRead)", "batches_sealed": "\(stats.sealedBatches)", "batches_acked": "\(stats.ackedBatches)"])
    }

    /// Learns the agent's pid and cgroup as the kernel reports them before
    /// the first connect, so the first connect is already recognized as the
    /// agent's own (bounded wait; without it later ones still are).
    private func identifySelf() {
        guard configuration.filterOwnTraffic, selfTraffic.probe() != nil else { return }
        let listenerRuns = kernel.programs.contains { $0.capability == "tcp_listen" && $0.attached }
        guard listenerRuns, configuration.kernel.cgroupRoot == nil else { return }
        let deadline = monotonicNs() + 2_000_000_000
        while !selfTraffic.identified, monotonicNs() < deadline { Thread.sleep(forTimeInterval: 0.01) }
        if selfTraffic.identified {
            logger.debug("own traffic recognized", metadata: ["pid": "\(selfTraffic.pid ?? 0)"])
        } else {
            logger.warning("could not learn this process's pid as the kernel reports it; its own connects may be reported until it does")
        }
    }

    /// `/healthz`: the process serves. No probe restarts the agent on a lost
    /// server: it keeps observing and spools.
    public func liveness() -> MetricsEndpoint.Health {
        MetricsEndpoint.Health(ok: true, reason: "ok")
    }

    /// `/readyz`: the kernel programs are loaded and read, and a session with
    /// the server is open or ended less than `readinessGraceSeconds` ago.
    /// Not ready before the first session: an agent that never reached the
    /// server (a wrong certificate, node name or address) is not ready.
    public func readiness(nowNs: Int64 = monotonicNs()) -> MetricsEndpoint.Health {
        Agent.readiness(reading: reading.load(ordering: .relaxed),
                        programAttached: kernel.programs.contains { $0.attached && !$0.name.hasPrefix("cgroup ") },
                        session: sender.status, graceSeconds: configuration.readinessGraceSeconds, nowNs: nowNs)
    }

    /// The readiness rule on its inputs.
    public static func readiness(reading: Bool, programAttached: Bool, session status: Sender.Status, graceSeconds: Double,
                                 nowNs: Int64) -> MetricsEndpoint.Health {
        guard reading else { return .init(ok: false, reason: "kernel programs not being read") }
        guard programAttached else { return .init(ok: false, reason: "no BPF program attached") }
        if status.connected { return .init(ok: true, reason: "ok") }
        guard let last = status.lastConnectedNs else {
            return .init(ok: false, reason: status.refused ? status.lastError : "not connected to the server yet")
        }
        let ago = Double(nowNs - last) / 1e9
        if ago < graceSeconds {
            return .init(ok: true, reason: "ok (disconnected \(Int(ago)) s ago, reconnecting)")
        }
        return .init(ok: false, reason: "disconnected from the server for \(Int(ago)) s" + (status.refused ? " (\(status.lastError))" : ""))
    }

    private let inventoryGeneration = Mutex<UInt64>(.max)

    /// Hands the sender this node's pods when they changed.
    private func publishInventory() {
        let generation = pods.generation
        let changed = inventoryGeneration.withLock { last -> Bool in
            defer { last = generation }
            return last != generation
        }
        guard changed else { return }
        let node = configuration.node
        let list = pods.allPods.filter { $0.node.isEmpty || $0.node == node }.map { p in
            TapioWire.PodInfo(uid: p.uid, name: p.name, namespace: p.namespace, node: node, ips: p.hostNetwork ? [] : p.ips,
                              service: p.service, ownerKind: p.workload?.kind ?? p.owner?.kind ?? "", ownerName: p.workload?.name ?? p.owner?.name ?? "",
                              labels: p.labels, containerIds: p.containers.compactMap(\.id))
        }
        sender.setInventory(Inventory(pods: list))
    }

    public func requestStop() {
        stopRequested.signal()
    }

    static func bootId() -> String {
        ProcFile.text("/proc/sys/kernel/random/boot_id")?.trimmingCharacters(in: .whitespacesAndNewlines) ?? ""
    }
}
