import ArgumentParser
import Dispatch
import Foundation
import Logging
import TapioAgent
import TapioAttribution
import TapioWire

struct AgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tapio-agent",
        abstract: "Watches this node's kernel with eBPF and streams events to tapio-server over mutual TLS.",
        version: TapioVersion.current)

    @Option(help: "Server ingest address, HOST:PORT.")
    var server: String
    @Option(help: "This node's name; must be the CN of the client certificate.")
    var nodeName: String
    @Option(help: "Directory with ca.crt, tls.crt, tls.key (cert-manager secret layout).")
    var tlsDir: String?
    @Option(help: "CA certificate (PEM) the server must chain to.")
    var tlsCa: String?
    @Option(help: "Client certificate (PEM).")
    var tlsCert: String?
    @Option(help: "Client private key (PEM).")
    var tlsKey: String?
    @Option(help: "Name the server certificate must carry (default: the host of --server).")
    var serverName: String?
    @Option(help: "This agent's own directory: its spool (spool/), crash counters and lock; no two agents may share one.")
    var dataDir = "/var/lib/tapio-agent"
    @Option(help: "Directory where every sealed batch is kept (checksummed, synced) until the server acknowledges it, across crashes and restarts (default: spool/ in --data-dir).")
    var spoolDir: String?
    @Flag(help: "Keep unacknowledged batches in memory only: what a stop or crash loses is counted and reported by the next start, not kept.")
    var noSpool = false
    @Option(help: "Observe only tasks below this cgroup2 directory.")
    var cgroupRoot: String?
    @Option(help: "The host's cgroupfs root as mounted in the agent's container (default: /host/sys/fs/cgroup when it is a cgroup mount, else this mount namespace's cgroup mounts).")
    var hostCgroupfs: String?
    @Option(help: "The host's procfs as mounted in the agent's container, read only when a cgroup id names no container (default: /host/proc when mounted, else /proc).")
    var hostProc: String?
    @Option(help: "HTTP /metrics, /healthz (liveness) and /readyz (readiness) listener, HOST:PORT, or 'off'.")
    var metricsListen = "off"
    @Option(help: "Pod metadata from this file (Kubernetes PodList JSON), re-read when it changes.")
    var metadataFile: String?
    @Flag(inversion: .prefixedNo, help: "Pod metadata from the Kubernetes API (default: on in a pod when there is no --metadata-file).")
    var kubernetesApi: Bool?
    @Option(help: "Events per batch at most (lowered to the server's limit when it announces one).")
    var batchMaxEvents = 512
    @Option(help: "Encoded bytes per batch at most (lowered to the server's frame limit).")
    var batchMaxBytes = 1 << 20
    @Option(help: "Milliseconds an event may wait for its batch.")
    var batchMaxDelayMs = 200
    @Option(help: "Seconds to wait for the last acknowledgement on shutdown.")
    var shutdownGrace: Double = 5
    @Option(help: ArgumentHelp("Shift this agent's clock by this many ms (fault lab only).", visibility: .hidden))
    var labClockOffsetMs: Int64 = 0
    @Option(help: "Seconds /readyz stays ready after the connection to the server is lost (at least 30).")
    var readinessGrace: Double = 60
    @Flag(inversion: .prefixedNo, help: "Leave the agent's own connection to the server, DNS lookups and listeners out of what it reports.")
    var filterOwnTraffic = true
    @Option(name: .customLong("ring-buffer"), help: ArgumentHelp("A ring buffer's size, NAME=BYTES (process, net or dns; a power of two, a multiple of the page size, K/M suffixes allowed); repeatable.", valueName: "name=bytes"))
    var ringBuffers: [String] = []
    @Option(help: "Bytes waiting in a ring buffer before each new record wakes the reader (0: 1/16 of the ring); below it the reader drains the ring every --read-interval-ms.")
    var wakeupBytes: UInt32 = 0
    @Option(help: "Longest a record of a quiet ring buffer waits to be read, in ms.")
    var readIntervalMs: Int32 = 50
    @Option(help: ArgumentHelp("Benchmark only: emit one event per getppid() of tasks with this comm (make bench).", visibility: .hidden))
    var benchStormComm: String?
    @Option(name: .customLong("disable"), help: ArgumentHelp("An event kind not to report, by name (e.g. cpu_throttle, dns); repeatable. Its kernel programs skip it, or its cgroup files' events are left out.", valueName: "kind"))
    var disabledKinds: [String] = []
    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel = "info"

    func run() throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "tapio-agent")
        let tls: AgentTLSFiles
        if let dir = tlsDir {
            tls = AgentTLSFiles(directory: dir)
        } else if let ca = tlsCa, let cert = tlsCert, let key = tlsKey {
            tls = AgentTLSFiles(ca: ca, certificate: cert, key: key)
        } else {
            throw ValidationError("give --tls-dir, or all of --tls-ca, --tls-cert and --tls-key")
        }
        let (host, port) = try parseHostPort(server)
        var config = Agent.Configuration(node: nodeName, serverHost: host, serverPort: UInt16(port), tls: tls)
        config.serverName = serverName
        if noSpool, spoolDir != nil { throw ValidationError("--no-spool and --spool-dir exclude each other") }
        config.dataDirectory = dataDir
        config.spoolDirectory = noSpool ? nil : (spoolDir ?? dataDir + "/spool")
        config.kernel.cgroupRoot = cgroupRoot
        for name in disabledKinds {
            guard let kind = EventKind(name: name), kind != .unspecified else {
                throw ValidationError("--disable \(name): not an event kind (\(EventKind.allCases.filter { $0 != .unspecified }.map(\.name).joined(separator: ", ")))")
            }
            config.kernel.disabledKinds.insert(kind)
        }
        config.kernel.hostCgroupfs = hostCgroupfs
        config.hostProc = hostProc
        for spec in ringBuffers {
            let parts = spec.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, ["process", "net", "dns"].contains(parts[0]), let bytes = parseByteSize(parts[1]) else {
                throw ValidationError("--ring-buffer \(spec): expected process=BYTES, net=BYTES or dns=BYTES")
            }
            guard bytes >= 4096, bytes & (bytes - 1) == 0, bytes <= 1 << 30 else {
                throw ValidationError("--ring-buffer \(spec): the size must be a power of two between 4K and 1G")
            }
            config.kernel.ringBufferBytes[parts[0]] = UInt32(bytes)
        }
        config.kernel.wakeupBytes = wakeupBytes
        config.kernel.readIntervalMs = max(1, min(readIntervalMs, 1000))
        config.kernel.benchStormComm = benchStormComm
        config.metadataFile = metadataFile
        let inPod = ProcessInfo.processInfo.environment["KUBERNETES_SERVICE_HOST"] != nil
        if kubernetesApi ?? (inPod && metadataFile == nil) {
            config.kubernetesAPI = try KubernetesAPIConfiguration.inCluster(nodeName: nodeName, connector: Agent.kubernetesConnector)
        }
        config.outbox.maxEvents = max(1, batchMaxEvents)
        config.outbox.maxBatchBytes = max(4096, batchMaxBytes)
        config.outbox.maxDelayNs = Int64(max(1, batchMaxDelayMs)) * 1_000_000
        config.shutdownGraceSeconds = shutdownGrace
        config.readinessGraceSeconds = max(30, readinessGrace)
        config.filterOwnTraffic = filterOwnTraffic
        config.clock = AgentClock(offsetNs: labClockOffsetMs * 1_000_000)

        signal(SIGTERM, SIG_IGN)
        signal(SIGINT, SIG_IGN)
        signal(SIGPIPE, SIG_IGN)
        let agent = try Agent(configuration: config, logger: logger)
        var sources: [DispatchSourceSignal] = []
        for sig in [SIGTERM, SIGINT] {
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler { agent.requestStop() }
            source.resume()
            sources.append(source)
        }
        var endpoint: MetricsEndpoint?
        if metricsListen != "off" {
            let (mhost, mport) = try parseHostPort(metricsListen)
            endpoint = try MetricsEndpoint(host: mhost, port: UInt16(mport), render: { agent.metricsText() },
                                           live: { agent.liveness() }, ready: { agent.readiness() })
            endpoint?.start()
            agent.selfTraffic.addListenPort(endpoint!.port)
            logger.info("metrics listening", metadata: ["address": "\(mhost):\(endpoint!.port)"])
        }
        agent.run()
        endpoint?.stop()
        _ = sources
    }
}

AgentCommand.main()

/// "4096", "64K", "4M", "1G" in bytes.
func parseByteSize(_ text: String) -> Int? {
    let units: [Character: Int] = ["K": 1 << 10, "k": 1 << 10, "M": 1 << 20, "m": 1 << 20, "G": 1 << 30, "g": 1 << 30]
    if let last = text.last, let unit = units[last] {
        return Int(text.dropLast()).map { $0 * unit }
    }
    return Int(text)
}
