import Foundation
import TapioClient
import TapioQueryAPI
import TapioWire

/// Where the programs and files of a run come from.
public struct LabOptions: Sendable {
    /// tapio-server and tapio-agent (default: beside tapio-lab).
    public var binDirectory: String
    /// lab/: scenarios, topologies, service scripts.
    public var labDirectory: String
    /// Recorded runs go to `<runsDirectory>/<scenario>-<timestamp>/`.
    public var runsDirectory: String
    /// Print the lab's timeline to stderr as it happens.
    public var verbose: Bool
    /// Seconds between incident polls while a fault is active.
    public var pollInterval: Double = 0.25
    /// Run the server as docs/scaling.md's distributed mode (nats-server,
    /// clickhouse-server, one ingest, correlate and query replica each)
    /// instead of one `tapio-server --data-dir` (Distributed.swift).
    public var distributed = false

    public init(binDirectory: String, labDirectory: String, runsDirectory: String, verbose: Bool) {
        self.binDirectory = binDirectory
        self.labDirectory = labDirectory
        self.runsDirectory = runsDirectory
        self.verbose = verbose
    }
}

/// One scenario, end to end: build the nodes, start server, agents, DNS,
/// services and load, inject the faults on schedule, ask the server what it
/// saw, score it, and remove everything it created — also when it fails or
/// is interrupted (the state file lets `tapio-lab cleanup` finish a run that
/// was killed).
public final class LabRun: @unchecked Sendable {
    public let scenario: Scenario
    public let options: LabOptions
    public let plan: LabPlan
    let timeline: LabTimeline
    let state: LabState
    let supervisor = Supervisor()
    var services: [String: ManagedService] = [:]
    var infra: [String: Child] = [:]
    /// Asked for incidents and timelines: the server, or the correlate replica.
    var client: QueryClient?
    /// Asked for events in the distributed mode: the query replica (nil: `client`).
    var eventsClient: QueryClient?
    var queryPort = 0
    /// The distributed mode's roles' /metrics and /readyz ports, by role.
    var roleMetricsPorts: [String: Int] = [:]
    var notes: [String] = []
    var originalQuota: [String: String] = [:]
    var helpers: [Child] = []
    /// Called about every 200 ms while the load runs (warmup and observation):
    /// how a soak samples the server's and agents' resources.
    var onTick: ((LabRun) -> Void)?
    /// Whether the report reads every event of the run back (the baseline and
    /// events.json); a long soak leaves it out.
    var collectEvents = true

    public init(scenario: Scenario, options: LabOptions) throws {
        guard geteuid() == 0 else { throw LabError("tapio-lab needs root (network namespaces, cgroups, BPF)") }
        self.scenario = scenario
        self.options = options
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "yyyyMMdd-HHmmss"
        var dir = options.runsDirectory + "/" + scenario.name + "-" + f.string(from: Date())
        if FileManager.default.fileExists(atPath: dir) { dir += "-\(getpid())" }
        let id = String(format: "%06x", UInt32.random(in: 0..<0xFF_FFFF))
        plan = LabPlan(scenario: scenario, id: id, runDirectory: dir, labDirectory: options.labDirectory)
        timeline = LabTimeline(echo: options.verbose)
        try Shell.mkdir(dir + "/logs")
        state = try LabState(id: id, scenario: scenario.name, runDirectory: dir)
    }

    /// Runs the scenario and returns its report; everything created is gone when it returns or throws.
    public func run() throws -> RunReport {
        var report: RunReport?
        var failure: Error?
        do {
            report = try runScenario()
        } catch {
            failure = error
        }
        teardown()
        if let failure { throw failure }
        return report!
    }

    private func runScenario() throws -> RunReport {
        let s = scenario
        timeline.note("run \(plan.id): scenario \(s.name), \(s.topology.nodes.count) nodes, \(s.services.count) services, data in \(plan.runDirectory)")
        try buildNetwork()
        try buildCgroups()
        try buildVolumes()
        try startServer()
        try startAgents()
        try startDNS()
        for spec in s.services { try prepare(spec) }
        supervisor.start()
        for spec in s.services where spec.startsWithRun { try services[spec.name]!.start() }
        timeline.note("services started: \(s.services.filter(\.startsWithRun).map { "\($0.name)@\($0.node)" }.joined(separator: ", "))")
        try startLoad()

        // Warmup: steady load, the engine learns its baseline.
        let warmupEnd = Date(timeIntervalSinceNow: s.timing.warmupS)
        while Date() < warmupEnd {
            onTick?(self)
            try LabSignals.sleep(min(0.2, max(0, warmupEnd.timeIntervalSinceNow)))
        }

        // Faults on schedule; the server is polled for incidents meanwhile.
        let faultStartNs = Shell.nowNs()
        timeline.note(s.faults.isEmpty ? "observing \(Int(s.timing.observeS)) s (no fault)" : "first fault window opens; observing \(Int(s.timing.observeS)) s")
        var pending = s.faults.sorted { $0.atS < $1.atS }
        var active: [(fault: FaultSpec, until: Double?, revert: () -> Void)] = []
        var detectS: Double?
        var top1S: Double?
        var top1AfterEvidenceS: Double?
        var lastPoll = -1.0
        let expectedFaultNs = faultStartNs + Int64((s.faults.map(\.atS).min() ?? 0) * 1e9)
        while true {
            let elapsed = Double(Shell.nowNs() - faultStartNs) / 1e9
            if elapsed >= s.timing.observeS { break }
            while let f = pending.first, f.atS <= elapsed {
                pending.removeFirst()
                let revert = try inject(f)
                active.append((f, f.durationS.map { f.atS + $0 }, revert))
            }
            for (i, a) in active.enumerated().reversed() where a.until.map({ $0 <= elapsed }) ?? false {
                a.revert()
                active.remove(at: i)
            }
            if elapsed - lastPoll >= options.pollInterval {
                lastPoll = elapsed
                let incidents = Scoring.scored(queryIncidents(), healthy: s.isHealthy)
                let reported = Scoring.reported(incidents: incidents, sinceNs: expectedFaultNs - 5_000_000_000)
                if detectS == nil, !reported.isEmpty || (!incidents.isEmpty && s.isHealthy) {
                    let first = incidents.compactMap(Scoring.detectedNs).filter { $0 >= expectedFaultNs - 5_000_000_000 }.min()
                    detectS = max(0, Double((first ?? Shell.nowNs()) - expectedFaultNs) / 1e9)
                    timeline.note("server reports an incident: \(reported.first.map { "\($0.entity)/\($0.kind)" } ?? "no root cause yet")")
                }
                if top1S == nil, Scoring.topOneCorrect(expected: s.expected, reported: reported) {
                    let now = Shell.nowNs()
                    top1S = max(0, Double(now - expectedFaultNs) / 1e9)
                    top1AfterEvidenceS = Scoring.firstEvidenceNs(of: reported[0], in: incidents).map { max(0, Double(now - $0) / 1e9) }
                    timeline.note("server's top-1 is correct: \(reported[0].entity)/\(reported[0].kind)")
                }
            }
            onTick?(self)
            try LabSignals.sleep(0.05)
        }
        for a in active.reversed() { a.revert() }
        let endNs = Shell.nowNs()
        timeline.note("observation over; asking the server")
        for node in s.topology.nodes {
            // An agent that died mid-run (or was stopped by something outside
            // the lab) leaves the engine blind on its node: say so.
            if let a = infra["agent-\(node.name)"], !a.isRunning {
                notes.append("tapio-agent for \(node.name) ended during the run (\(a.exitDescription)); see \(plan.runDirectory)/logs/agent-\(node.name).log")
            }
        }
        try LabSignals.sleep(1.5)  // let the last batches arrive
        let known = self.nodes(timeoutSeconds: 5)
        if options.distributed, roleMetric("ingest", "tapio_node_clock_offset_seconds").isEmpty {
            timeline.note("clock offsets: not known in the distributed mode (the ingest replica's /metrics has no tapio_node_clock_offset_seconds)")
        } else if !known.isEmpty {
            // What the server estimated each agent's clock to be off by (a node's
            // `clock_offset_ms` shows here when it reached the agent).
            timeline.note("clock offsets the server estimated: " + known.sorted { $0.node < $1.node }.map {
                String(format: "%@ %+.1f ms", $0.node, Double($0.clockOffsetNs) / 1e6)
            }.joined(separator: ", "))
        }

        // In the distributed mode the events reach ClickHouse through the
        // stream; the baseline reads them from there.
        if options.distributed, collectEvents { waitForEventsWritten(timeout: 15) }

        // The answer, the baseline, the timeline of the top incident.
        let incidents = queryIncidents(final: true)
        let since = expectedFaultNs - 5_000_000_000
        let scored = Scoring.scored(incidents, healthy: s.isHealthy)
        let reported = Scoring.reported(incidents: scored, sinceNs: s.isHealthy ? 0 : since)
        let before = s.isHealthy ? 0 : incidents.filter { (Scoring.openedNs($0) ?? .max) < since }.count
        if top1S == nil, Scoring.topOneCorrect(expected: s.expected, reported: reported) {
            top1S = max(0, Double(endNs - expectedFaultNs) / 1e9)
            top1AfterEvidenceS = Scoring.firstEvidenceNs(of: reported[0], in: incidents).map { max(0, Double(endNs - $0) / 1e9) }
        }
        let events = collectEvents ? queryEvents(sinceNs: state.current.items.isEmpty ? 0 : runStartNs, untilNs: endNs) : []
        let entities = entityMap()
        let baseline = Scoring.baseline(events: events.filter { $0.timeNs >= loadStartNs },
                                        scope: s.baselineScope) { e in
            entities.entity(of: e)
        }
        var serverTimeline: [QueryIncident.TimelineEntry] = []
        if let top = incidents.first(where: { (Scoring.openedNs($0) ?? .max) >= (s.isHealthy ? 0 : since) }) {
            serverTimeline = (try? liveClient?.timeline(id: top.id, timeoutSeconds: 10))??.timeline ?? []
        }
        let load = LoadSummary(file: plan.runDirectory + "/load.txt")
        if load.ok == 0 { notes.append("the load never got a successful answer: the lab's services did not come up (see \(plan.runDirectory)/logs)") }
        let report = RunReport(
            scenario: s.name, expected: s.expected, reported: reported,
            ac1: Scoring.accuracy(expected: s.expected, reported: reported, k: 1),
            ac3: Scoring.accuracy(expected: s.expected, reported: reported, k: 3),
            timeToDetectS: s.isHealthy ? nil : detectS, timeToTop1S: s.isHealthy ? nil : top1S,
            timeToTop1AfterEvidenceS: s.isHealthy ? nil : top1AfterEvidenceS,
            incidents: incidents.count, paging: incidents.filter(Scoring.pages).count, incidentsBeforeFault: before,
            baseline: baseline,
            baselineAc1: Scoring.accuracy(expected: s.expected, reported: baseline, k: 1),
            baselineAc3: Scoring.accuracy(expected: s.expected, reported: baseline, k: 3),
            notes: notes, runDirectory: plan.runDirectory, labTimeline: timeline.all,
            serverIncidents: incidents, serverTimeline: serverTimeline, load: load, healthy: s.isHealthy,
            mode: options.distributed ? "distributed" : "single")
        try? Shell.write(report.json.serialized(pretty: true) + "\n", to: plan.runDirectory + "/report.json")
        try? Shell.write(report.text, to: plan.runDirectory + "/report.txt")
        if collectEvents { try? Shell.write(QueryCoding.string(EventsAnswer(events: events)) + "\n", to: plan.runDirectory + "/events.json") }
        return report
    }

    var runStartNs: Int64 = 0
    var loadStartNs: Int64 = 0

    // MARK: network

    private func ip(_ netns: String, _ args: [String]) throws {
        try Shell.check(["ip", "-n", netns] + args)
    }

    private func buildNetwork() throws {
        runStartNs = Shell.nowNs()
        let fab = plan.fabricNetns
        try Shell.check(["ip", "netns", "add", fab])
        try state.add(.init(kind: "netns", name: fab))
        try ip(fab, ["link", "set", "lo", "up"])
        try ip(fab, ["link", "add", "br0", "type", "bridge"])
        try ip(fab, ["addr", "add", "\(LabPlan.dnsIP)/\(LabPlan.prefixLength)", "dev", "br0"])
        try ip(fab, ["link", "set", "br0", "up"])
        for (i, node) in scenario.topology.nodes.enumerated() {
            let ns = plan.netns(node: node.name)
            try Shell.check(["ip", "netns", "add", ns])
            try state.add(.init(kind: "netns", name: ns))
            // Created inside the fabric namespace, so no interface ever appears in the host's.
            let host = "v\(i)"
            try ip(fab, ["link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns])
            try ip(fab, ["link", "set", host, "master", "br0", "up"])
            try ip(ns, ["link", "set", "lo", "up"])
            try ip(ns, ["link", "set", "eth0", "up"])
            try ip(ns, ["addr", "add", "\(plan.nodeIP(node.name))/\(LabPlan.prefixLength)", "dev", "eth0"])
            // The node routes for its pods, as a node does (a bridge CNI's cni0 and forwarding).
            try Shell.check(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
            try ip(ns, ["link", "add", "cni0", "type", "bridge"])
            try ip(ns, ["addr", "add", "\(plan.podGateway(node.name))/\(LabPlan.podPrefixLength)", "dev", "cni0"])
            try ip(ns, ["link", "set", "cni0", "up"])
            // The load client and the DNS server reach the pods through their node.
            try ip(fab, ["route", "add", plan.podCIDR(node.name), "via", plan.nodeIP(node.name)])
        }
        for node in scenario.topology.nodes {
            let ns = plan.netns(node: node.name)
            // Host-gateway routes: every other node's pod CIDR via that node's address.
            for other in scenario.topology.nodes where other.name != node.name {
                try ip(ns, ["route", "add", plan.podCIDR(other.name), "via", plan.nodeIP(other.name)])
            }
            for svc in scenario.services where svc.node == node.name {
                // The pod: its own namespace, a veth to the node's cni0, an address from the node's pod CIDR.
                let pod = plan.podNetns(svc.name)
                try Shell.check(["ip", "netns", "add", pod])
                try state.add(.init(kind: "netns", name: pod))
                let veth = plan.podVeth(svc.name)
                try ip(ns, ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod])
                try ip(ns, ["link", "set", veth, "master", "cni0", "up"])
                try ip(pod, ["link", "set", "lo", "up"])
                try ip(pod, ["link", "set", "eth0", "up"])
                try ip(pod, ["addr", "add", "\(plan.serviceIP(svc.name))/\(LabPlan.podPrefixLength)", "dev", "eth0"])
                try ip(pod, ["route", "add", "default", "via", plan.podGateway(node.name)])
            }
        }
        // ClusterIP services, as kube-proxy programs every node. Bridged pod
        // traffic passes iptables too (br_netfilter), as kube-proxy requires,
        // so a client next to an endpoint is answered through the DNAT.
        let rules = plan.serviceRules
        for node in scenario.topology.nodes where !rules.isEmpty {
            let ns = plan.netns(node: node.name)
            Shell.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])
            for rule in rules { try Shell.check(["ip", "netns", "exec", ns, "iptables", "-t", "nat"] + rule) }
        }
        if !rules.isEmpty {
            timeline.note("services: " + scenario.services.compactMap { s in plan.clusterIP(s.name).map { "\(s.name) \($0):\(s.effectivePort!) -> \(plan.endpoints(s.name).map { plan.serviceIP($0) }.joined(separator: ", "))" } }.joined(separator: "; ") + " (iptables DNAT, statistic random, on every node)")
        }
        timeline.note("network: bridge in \(fab), nodes \(scenario.topology.nodes.map { "\($0.name)=\(plan.nodeIP($0.name)) pods \(plan.podCIDR($0.name))" }.joined(separator: ", ")); pods \(scenario.services.map { "\($0.name)=\(plan.serviceIP($0.name))" }.joined(separator: " "))")
    }

    // MARK: cgroups

    private func makeCgroup(_ mount: String, _ relative: String) throws -> String {
        var path = mount
        for component in relative.split(separator: "/") {
            path += "/" + component
            if !FileManager.default.fileExists(atPath: path) {
                guard Foundation.mkdir(path, 0o755) == 0 || errno == EEXIST else {
                    throw LabError("cannot create cgroup \(path): \(String(cString: strerror(errno)))")
                }
                // The shared parent (tapio-lab) is left for others; everything below is this run's.
                if path.count > mount.count + "/tapio-lab".count { try state.add(.init(kind: "cgroup", name: path)) }
            }
        }
        return path
    }

    private func buildCgroups() throws {
        guard FileManager.default.fileExists(atPath: LabPlan.cgroup2Mount + "/cgroup.procs") else {
            throw LabError("no cgroup2 filesystem at \(LabPlan.cgroup2Mount)")
        }
        _ = try makeCgroup(LabPlan.cgroup2Mount, plan.infraCgroup)
        for node in scenario.topology.nodes {
            _ = try makeCgroup(LabPlan.cgroup2Mount, plan.nodeCgroup(node.name))
            if let pct = node.cpuLimitPct {
                let dir = try makeCgroup(LabPlan.cgroupV1Mounts["cpu"]!, plan.nodeCgroup(node.name))
                try Shell.write("\(Int(pct * 1000))", to: dir + "/cpu.cfs_quota_us")
            }
            if let mb = node.memoryLimitMb {
                let dir = try makeCgroup(LabPlan.cgroupV1Mounts["memory"]!, plan.nodeCgroup(node.name))
                try Shell.write("\(mb << 20)", to: dir + "/memory.limit_in_bytes")
            }
        }
        for svc in scenario.services {
            _ = try makeCgroup(LabPlan.cgroup2Mount, plan.containerCgroup(svc.name))
            let mem = try makeCgroup(LabPlan.cgroupV1Mounts["memory"]!, plan.containerCgroup(svc.name))
            let cpu = try makeCgroup(LabPlan.cgroupV1Mounts["cpu"]!, plan.containerCgroup(svc.name))
            if let mb = svc.memoryLimitMb {
                try Shell.write("\(mb << 20)", to: LabPlan.cgroupV1Mounts["memory"]! + "/" + plan.podCgroup(svc.name) + "/memory.limit_in_bytes")
            }
            if let pct = svc.cpuLimitPct {
                try Shell.write("\(Int(pct * 1000))", to: LabPlan.cgroupV1Mounts["cpu"]! + "/" + plan.podCgroup(svc.name) + "/cpu.cfs_quota_us")
            }
            _ = (mem, cpu)
        }
    }

    func containerCgroups(_ service: String) -> [String] {
        [LabPlan.cgroup2Mount + "/" + plan.containerCgroup(service),
         LabPlan.cgroupV1Mounts["memory"]! + "/" + plan.containerCgroup(service),
         LabPlan.cgroupV1Mounts["cpu"]! + "/" + plan.containerCgroup(service)]
    }

    var infraCgroups: [String] { [LabPlan.cgroup2Mount + "/" + plan.infraCgroup] }

    func volume(_ service: String) -> String { plan.runDirectory + "/volumes/" + service }

    private func buildVolumes() throws {
        for svc in scenario.services {
            let dir = volume(svc.name)
            try Shell.mkdir(dir)
            if let mb = svc.volumeMb {
                try Shell.check(["mount", "-t", "tmpfs", "-o", "size=\(mb)m,mode=0755", "tapio-lab-\(plan.id)", dir])
                try state.add(.init(kind: "mount", name: dir))
            }
        }
    }

    // MARK: server and agents

    func startInfra(_ name: String, _ argv: [String], netns: String? = nil, stopOrder: Int = 0) throws -> Child {
        let p = try Spawner.spawn(argv, netns: netns, cgroups: infraCgroups, log: plan.runDirectory + "/logs/\(name).log")
        try state.addProcess(name: name, pid: p.pid, stopOrder: stopOrder)
        infra[name] = p
        return p
    }

    private func startServer() throws {
        if options.distributed { return try startDistributed() }
        let pki = plan.runDirectory + "/pki"
        _ = try DevelopmentPKI.initialize(directory: pki, nodes: scenario.topology.nodes.map(\.name), operators: ["lab"])
        let ingest = LabRun.freePort()
        queryPort = LabRun.freePort()
        _ = try startInfra("tapio-server", [
            options.binDirectory + "/tapio-server", "--data-dir", plan.runDirectory + "/data", "--tls-dir", pki + "/server",
            "--listen", "127.0.0.1:\(ingest)", "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "off",
        ], stopOrder: 2)
        ingestPort = ingest
        client = try QueryClient(host: "127.0.0.1", port: queryPort, ca: pki + "/operators/lab/ca.crt",
                                 certificate: pki + "/operators/lab/tls.crt", key: pki + "/operators/lab/tls.key")
        // Probe the port first: QueryClient's failed connect trips a debug
        // assertion in NIO (a leaked promise), so it must never fail to connect.
        let deadline = Date(timeIntervalSinceNow: 20)
        while !LabRun.portOpen(queryPort) || (try? client!.nodes(timeoutSeconds: 2)) == nil {
            guard Date() < deadline, infra["tapio-server"]!.isRunning else {
                throw LabError("tapio-server did not come up; see \(plan.runDirectory)/logs/tapio-server.log")
            }
            try LabSignals.sleep(0.2)
        }
        timeline.note("tapio-server up: ingest 127.0.0.1:\(ingest), query 127.0.0.1:\(queryPort), data \(plan.runDirectory)/data")
    }

    var ingestPort = 0

    /// The agent's options the lab uses that not every agent build has yet.
    private func agentFlags() -> Set<String> {
        let r = Shell.run([options.binDirectory + "/tapio-agent", "--help-hidden"])
        var flags = Set<String>()
        for flag in ["--metadata-file", "--lab-clock-offset-ms"] where r.output.contains(flag) { flags.insert(flag) }
        return flags
    }

    private func startAgents() throws {
        let flags = agentFlags()
        let created = ISO8601DateFormatter().string(from: Date())
        try Shell.mkdir(plan.runDirectory + "/metadata")
        if !flags.contains("--metadata-file") {
            notes.append("tapio-agent has no --metadata-file yet: pods are not attributed by the agent; the lab maps cgroups to services itself for the baseline")
        }
        for node in scenario.topology.nodes {
            let meta = plan.runDirectory + "/metadata/\(node.name).json"
            try Shell.write(plan.podList(node: node.name, createdAt: created).serialized(pretty: true) + "\n", to: meta)
            var argv = [
                options.binDirectory + "/tapio-agent", "--server", "127.0.0.1:\(ingestPort)", "--server-name", "localhost",
                "--node-name", node.name, "--tls-dir", plan.runDirectory + "/pki/nodes/" + node.name,
                "--data-dir", plan.runDirectory + "/agent/" + node.name, "--spool-dir", plan.runDirectory + "/spool/" + node.name,
                "--cgroup-root", plan.agentCgroupRoot(node.name), "--batch-max-delay-ms", "100",
            ]
            if flags.contains("--metadata-file") { argv += ["--metadata-file", meta] }
            if let offset = node.clockOffsetMs, offset != 0 {
                if flags.contains("--lab-clock-offset-ms") {
                    argv.append(LabPlan.clockOffsetArgument(ms: offset))
                } else {
                    notes.append("tapio-agent has no --lab-clock-offset-ms yet: node \(node.name) runs without its \(offset) ms clock offset")
                }
            }
            _ = try startInfra("agent-\(node.name)", argv, stopOrder: 1)
        }
        let names = Set(scenario.topology.nodes.map(\.name))
        let deadline = Date(timeIntervalSinceNow: 40)
        while true {
            let up = Set(nodes().filter(\.connected).map(\.node))
            if names.isSubset(of: up) { break }
            for n in names where infra["agent-\(n)"]?.isRunning == false {
                throw LabError("tapio-agent for \(n) exited; see \(plan.runDirectory)/logs/agent-\(n).log")
            }
            guard Date() < deadline else { throw LabError("agents not connected after 40 s: \(names.subtracting(up).sorted())") }
            try LabSignals.sleep(0.25)
        }
        timeline.note("agents connected: \(names.sorted().joined(separator: ", "))")
    }

    // MARK: DNS

    var dnsDir: String { plan.runDirectory + "/dns" }

    private func startDNS() throws {
        try Shell.mkdir(dnsDir)
        try Shell.write(plan.hostsFile, to: dnsDir + "/hosts")
        try Shell.write("", to: dnsDir + "/servers")
        try Shell.write("""
            # The lab's cluster DNS: answers <service>.\(scenario.topology.effectiveDomain) from the hosts
            # file, NXDOMAIN for other names in the zone; hosts and servers are re-read on SIGHUP.
            no-resolv
            no-hosts
            no-poll
            listen-address=\(LabPlan.dnsIP)
            bind-interfaces
            addn-hosts=\(dnsDir)/hosts
            servers-file=\(dnsDir)/servers
            local=/\(scenario.topology.effectiveDomain)/
            no-negcache
            log-queries
            log-facility=\(dnsDir)/dnsmasq.log
            pid-file=\(dnsDir)/dnsmasq.pid
            user=root

            """, to: dnsDir + "/dnsmasq.conf")
        _ = try startInfra("dnsmasq", dnsArgv, netns: plan.fabricNetns)
        // A broken upstream the SERVFAIL fault points a name at.
        _ = try startInfra("bad-dns", ["/usr/bin/python3", options.labDirectory + "/services/bad_dns.py",
                                       "--listen", "\(LabPlan.dnsIP):\(LabPlan.badDNSPort)"], netns: plan.fabricNetns)
        timeline.note("dnsmasq at \(LabPlan.dnsIP) serving \(scenario.services.count) names in \(scenario.topology.effectiveDomain)")
    }

    func reloadDNS() {
        if let p = infra["dnsmasq"], p.isRunning { kill(p.pid, SIGHUP) }
    }

    /// Records added to the cluster DNS while the run goes on (a scaled-up replica's address).
    var extraHosts: [String] = []

    /// The DNS hosts file now: every service's record and the added ones.
    var hostsFile: String { plan.hostsFile + extraHosts.map { $0 + "\n" }.joined() }

    private var dnsArgv: [String] { ["/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=\(dnsDir)/dnsmasq.conf"] }

    /// Stops dnsmasq (SIGTERM), waits `downS` and starts it again.
    func restartDNS(downS: Double) throws {
        if let old = infra["dnsmasq"] {
            old.terminate(grace: 2)
            state.removeProcess(pid: old.pid)
        }
        try LabSignals.sleep(downS)
        _ = try startInfra("dnsmasq", dnsArgv, netns: plan.fabricNetns)
    }

    /// Whether the service listens on its port within `timeout` seconds (ss in its node).
    func waitForListener(_ svc: ServiceSpec, timeout: Double) -> Bool {
        guard let port = svc.effectivePort else { return true }
        let deadline = Date(timeIntervalSinceNow: timeout)
        while Date() < deadline {
            let r = Shell.run(["ip", "netns", "exec", plan.podNetns(svc.name), "ss", "-Hltn", "sport", "=", ":\(port)"])
            if r.output.contains(plan.serviceIP(svc.name) + ":\(port)") { return true }
            if (try? LabSignals.sleep(0.1)) == nil { return false }
        }
        return false
    }

    // MARK: services and load

    private func prepare(_ spec: ServiceSpec) throws {
        let dir = plan.runDirectory + "/services/" + spec.name
        try Shell.mkdir(dir)
        let ip = plan.serviceIP(spec.name)
        let port = spec.effectivePort ?? 0
        var argv: [String]
        switch spec.type {
        case .nginx:
            let up = scenario.service(spec.upstream!)!
            for t in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] { try Shell.mkdir(dir + "/" + t) }
            try Shell.write("""
                worker_processes 1;
                daemon off;
                master_process on;
                pid \(dir)/nginx.pid;
                error_log \(plan.runDirectory)/logs/\(spec.name).error.log warn;
                events { worker_connections 1024; }
                http {
                    access_log off;
                    client_body_temp_path \(dir)/body;
                    proxy_temp_path \(dir)/proxy;
                    fastcgi_temp_path \(dir)/fastcgi;
                    uwsgi_temp_path \(dir)/uwsgi;
                    scgi_temp_path \(dir)/scgi;
                    # The upstream is resolved through the lab DNS at request time (valid 1 s).
                    resolver \(LabPlan.dnsIP) valid=1s ipv6=off;
                    resolver_timeout 1s;
                    proxy_connect_timeout 1s;
                    proxy_read_timeout 3s;
                    server {
                        listen \(ip):\(port);
                        location / {
                            set $upstream http://\(plan.dnsName(up.name)):\(up.effectivePort ?? 80);
                            proxy_pass $upstream;
                        }
                    }
                }

                """, to: dir + "/nginx.conf")
            argv = ["/usr/sbin/nginx", "-e", plan.runDirectory + "/logs/\(spec.name).error.log", "-p", dir, "-c", dir + "/nginx.conf"]
        case .api:
            let up = scenario.service(spec.upstream!)!
            try Shell.write("{\"service\": \"\(spec.name)\", \"upstream\": \"\(plan.dnsName(up.name))\"}\n", to: dir + "/config.json")
            argv = ["/usr/bin/python3", options.labDirectory + "/services/api.py", "--listen", "\(ip):\(port)", "--dns", LabPlan.dnsIP,
                    "--redis-name", plan.dnsName(up.name), "--redis-port", String(up.effectivePort ?? 6379),
                    ] + (up.type == .redis ? [] : ["--upstream-http"]) + [  // an api calling another api (or nginx) over HTTP
                    "--work-ms", String(spec.workMs ?? 0), "--blob-bytes", String(spec.blobBytes ?? 0),
                    "--echo-bytes", String(spec.echoBytes ?? 0), "--config", dir + "/config.json"]
        case .redis:
            argv = ["/usr/bin/redis-server", "--bind", ip, "--port", String(port), "--protected-mode", "no", "--save", "",
                    "--daemonize", "no", "--dir", volume(spec.name), "--logfile", "", "--maxmemory-policy", "noeviction"]
            argv += spec.volumeMb != nil ? ["--appendonly", "yes", "--appendfsync", "everysec"] : ["--appendonly", "no"]
        case .command:
            argv = spec.argv!.map { a in
                var a = a
                // {ip:<service>} and {port:<service>}: another service's pod
                // address, as a client in a cluster is given its peer's.
                for other in scenario.services {
                    a = a.replacingOccurrences(of: "{ip:\(other.name)}", with: plan.serviceIP(other.name))
                        .replacingOccurrences(of: "{port:\(other.name)}", with: String(other.effectivePort ?? 0))
                }
                return a.replacingOccurrences(of: "{lab}", with: options.labDirectory)
                    .replacingOccurrences(of: "{ip}", with: ip)
                    .replacingOccurrences(of: "{port}", with: String(port))
                    .replacingOccurrences(of: "{volume}", with: volume(spec.name))
                    .replacingOccurrences(of: "{dns}", with: LabPlan.dnsIP)
                    .replacingOccurrences(of: "{run}", with: plan.runDirectory)
            }
        }
        let managed = ManagedService(name: spec.name, argv: argv, netns: plan.podNetns(spec.name), cgroups: containerCgroups(spec.name),
                                     log: plan.runDirectory + "/logs/\(spec.name).log", restarts: spec.restarts, state: state, timeline: timeline)
        services[spec.name] = managed
        supervisor.add(managed)
    }

    private func startLoad() throws {
        let target = scenario.service(scenario.load.target)!
        loadStartNs = Shell.nowNs()
        _ = try startInfra("loadgen", [
            "/usr/bin/python3", options.labDirectory + "/services/loadgen.py",
            "--target", "\(plan.serviceIP(target.name)):\(target.effectivePort!)", "--path", scenario.load.path ?? "/",
            "--rate", String(scenario.load.ratePerS), "--seed", String(scenario.effectiveSeed),
            "--timeout", String(scenario.load.timeoutS ?? 2), "--out", plan.runDirectory + "/load.txt",
        ], netns: plan.fabricNetns)
        let deadline = Date(timeIntervalSinceNow: 30)
        while LoadSummary(file: plan.runDirectory + "/load.txt").ok == 0 {
            guard Date() < deadline else {
                throw LabError("no successful request within 30 s of starting the load; see \(plan.runDirectory)/logs and load.txt")
            }
            try LabSignals.sleep(0.25)
        }
        timeline.note("load: \(scenario.load.ratePerS) req/s open loop (seed \(scenario.effectiveSeed)) to \(target.name); first answer ok")
    }

    // MARK: queries

    var incidentsUnsupported = false

    /// The process that answers incidents: the server, or the correlate replica.
    var serverName: String { options.distributed ? "tapio-correlate" : "tapio-server" }

    /// The query client while the server runs (nil after it died: a query then would not connect).
    var liveClient: QueryClient? { infra[serverName]?.isRunning == true ? client : nil }

    /// The client for `events`: the query replica in the distributed mode.
    var liveEventsClient: QueryClient? {
        guard options.distributed else { return liveClient }
        return infra["tapio-query"]?.isRunning == true ? eventsClient : nil
    }

    /// The agents as the server knows them: its `nodes` answer, or in the
    /// distributed mode the ingest replica's /metrics.
    func nodes(timeoutSeconds: Int64 = 2) -> [QueryNode] {
        if options.distributed { return distributedNodes() }
        return (try? liveClient?.nodes(timeoutSeconds: timeoutSeconds))??.nodes ?? []
    }

    func queryIncidents(final: Bool = false) -> [QueryIncident] {
        guard let client = liveClient, !incidentsUnsupported else {
            if final, infra[serverName]?.isRunning != true { notes.append("\(serverName) is not running at the end of the run") }
            return []
        }
        do {
            return try client.incidents(status: "all", timeoutSeconds: 10).incidents
        } catch {
            let text = "\(error)"
            if text.contains("unknown query method") || text.contains("code 7") {
                incidentsUnsupported = true
                notes.append("the server has no `incidents` query yet (\(text)): scored as no incidents")
            } else if final {
                notes.append("incidents query failed: \(text)")
            }
            return []
        }
    }

    func queryEvents(sinceNs: Int64, untilNs: Int64) -> [QueryEvent] {
        guard let client = liveEventsClient else { return [] }
        do {
            return try client.events(["since_ns": String(sinceNs), "until_ns": String(untilNs), "limit": "100000"], timeoutSeconds: 30).events
        } catch {
            notes.append("events query failed: \(error)")
            return []
        }
    }

    /// Maps an event to its lab service: by the pod the agent attributed,
    /// else by the cgroup id (the inode of the service's cgroup2 directory),
    /// else by the pod a dropped packet was addressed to.
    struct EntityMap {
        var byPod: [String: String]
        var byCgroup: [Int64: String]

        func entity(of e: QueryEvent) -> String? {
            if let pod = e.pod, let s = byPod[pod] { return s }
            if let id = e.cgroupId, let s = byCgroup[id] { return s }
            // A packet dropped before any socket (netfilter, a qdisc) has no
            // task; the server names the pod it was addressed to.
            if let s = e.dstPeer?.service, !s.isEmpty { return s }
            if let pod = e.dstPeer?.pod, let s = byPod[pod] { return s }
            return nil
        }
    }

    func entityMap() -> EntityMap {
        var byCgroup: [Int64: String] = [:]
        for svc in scenario.services {
            var st = stat()
            if lstat(LabPlan.cgroup2Mount + "/" + plan.containerCgroup(svc.name), &st) == 0 { byCgroup[Int64(st.st_ino)] = svc.name }
        }
        // A replica is its Deployment's service, as the engine names it.
        let app = { (service: String) in self.scenario.service(service)?.app ?? service }
        for (id, s) in byCgroup { byCgroup[id] = app(s) }
        return EntityMap(byPod: Dictionary(uniqueKeysWithValues: plan.pods.map { ($0.name, app($0.service)) }), byCgroup: byCgroup)
    }

    // MARK: teardown

    private func teardown() {
        supervisor.stop()
        for h in helpers where h.isRunning { kill(h.pid, SIGKILL) }
        infra["loadgen"]?.terminate(grace: 2)
        for s in services.values { s.stop() }
        Cleaner.cleanup(state) { [timeline] in timeline.note($0) }
        for c in infra.values + helpers { _ = c.isRunning }  // reap
        // Remove the shared parents when no other run uses them.
        for mount in [LabPlan.cgroup2Mount] + LabPlan.cgroupV1Mounts.values.sorted() { rmdir(mount + "/tapio-lab") }
        timeline.note(state.items.isEmpty ? "cleaned up: namespaces, cgroups, mounts, rules and processes removed" :
            "cleanup incomplete: \(state.items.count) items left in \(state.path); run `tapio-lab cleanup`")
    }

    /// True when something accepts TCP connections on 127.0.0.1:`port`.
    static func portOpen(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }

    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        return Int(UInt16(bigEndian: addr.sin_port))
    }
}
