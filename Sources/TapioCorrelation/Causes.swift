import TapioWire

/// A kernel observation that can be a cause (before it is linked to anything).
enum Signal: String, Sendable, Comparable, Codable {
    case oomKill, exit, listenerClosed, firewallDrop, packetLoss, dnsFailure, cpuThrottle, memoryPressure, diskFull
    /// A path's round trips far above their usual (`SlowPathRule`).
    case networkLatency
    /// A process started: weak evidence of a noisy neighbour.
    case workloadStart
    /// A listener opened: not a cause, but how a restart is told from an outage.
    case listenerOpened
    /// CPU throttling or memory pressure of a cgroup that is no pod's (a
    /// node-level or system cgroup): the node is short of the resource. Not
    /// a candidate of its own while a neighbour on the node can be named.
    case nodeContention
    /// CPU time a pod used (kept in `CPUUsageLog`, not as cause events): as
    /// a neighbour's evidence, what it consumed.
    case cpuUsage
    /// Tasks waiting for a CPU (PSI) while their cgroup was not held to its
    /// own quota: a pod's, or the node's (its root cgroup, else
    /// /proc/pressure/cpu, else more runnable tasks than CPUs). Starvation
    /// evidence, not a cause by itself.
    case cpuPressure

    static func < (a: Signal, b: Signal) -> Bool { a.rawValue < b.rawValue }
}

/// A cause event, immutable once made and kept in one shared box: the
/// analysis filters, groups and sorts cause events on every pass over an
/// incident, and a copy then costs one reference instead of one per field.
struct CauseEvent: Sendable, Codable {
    private final class Storage: Sendable {
        let signal: Signal
        let entity: String
        let quality: Double
        let observed: ObservedEvent
        let addresses: Set<String>
        let port: UInt16
        let summary: String
        let serverEndpoint: Endpoint?
        let clientAddress: IPAddress?
        let netfilter: Bool

        init(signal: Signal, entity: String, quality: Double, observed: ObservedEvent, addresses: Set<String>, port: UInt16, summary: String,
             serverEndpoint: Endpoint?, clientAddress: IPAddress?) {
            self.signal = signal
            self.entity = entity
            self.quality = quality
            self.observed = observed
            self.addresses = addresses
            self.port = port
            self.summary = summary
            self.serverEndpoint = serverEndpoint
            self.clientAddress = clientAddress
            if case .packetDrop(let reason, _, _, _, _, _) = observed.event.detail {
                netfilter = isNetfilterReason(reason)
            } else {
                netfilter = false
            }
        }
    }

    private let storage: Storage

    var signal: Signal { storage.signal }
    var entity: String { storage.entity }
    /// How the entity was resolved (metadata factor).
    var quality: Double { storage.quality }
    var observed: ObservedEvent { storage.observed }
    /// Addresses that identify the cause on the wire: the pod's IPs, a
    /// listener's address, a dropped packet's endpoints.
    var addresses: Set<String> { storage.addresses }
    /// A listener's port, a dropped packet's destination port; 0 unknown.
    var port: UInt16 { storage.port }
    var summary: String { storage.summary }
    /// For a dropped packet: its server end and its client's address.
    var serverEndpoint: Endpoint? { storage.serverEndpoint }
    var clientAddress: IPAddress? { storage.clientAddress }

    init(signal: Signal, entity: String, quality: Double, observed: ObservedEvent, addresses: Set<String>, port: UInt16, summary: String,
         serverEndpoint: Endpoint? = nil, clientAddress: IPAddress? = nil) {
        storage = Storage(signal: signal, entity: entity, quality: quality, observed: observed, addresses: addresses, port: port, summary: summary,
                          serverEndpoint: serverEndpoint, clientAddress: clientAddress)
    }

    var timeNs: Int64 { storage.observed.timeNs }
    /// Dropped by netfilter (an iptables/nftables rule).
    var netfilter: Bool { storage.netfilter }
    var node: String { storage.observed.node }

    // The checkpoint's shape of the struct this was before.
    private enum CodingKeys: String, CodingKey { case signal, entity, quality, observed, addresses, port, summary, serverEndpoint, clientAddress }

    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(signal: try c.decode(Signal.self, forKey: .signal), entity: try c.decode(String.self, forKey: .entity),
                  quality: try c.decode(Double.self, forKey: .quality), observed: try c.decode(ObservedEvent.self, forKey: .observed),
                  addresses: try c.decode(Set<String>.self, forKey: .addresses), port: try c.decode(UInt16.self, forKey: .port),
                  summary: try c.decode(String.self, forKey: .summary),
                  serverEndpoint: try c.decodeIfPresent(Endpoint.self, forKey: .serverEndpoint),
                  clientAddress: try c.decodeIfPresent(IPAddress.self, forKey: .clientAddress))
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(signal, forKey: .signal)
        try c.encode(entity, forKey: .entity)
        try c.encode(quality, forKey: .quality)
        try c.encode(observed, forKey: .observed)
        try c.encode(addresses, forKey: .addresses)
        try c.encode(port, forKey: .port)
        try c.encode(summary, forKey: .summary)
        try c.encodeIfPresent(serverEndpoint, forKey: .serverEndpoint)
        try c.encodeIfPresent(clientAddress, forKey: .clientAddress)
    }
}

/// Whether a drop reason names netfilter: `reason.uppercased()` contains
/// NETFILTER. Kernel drop reasons are ASCII, searched as bytes; anything
/// else goes the Foundation way, as before.
func isNetfilterReason(_ reason: String) -> Bool {
    let found: Bool? = reason.utf8.withContiguousStorageIfAvailable { bytes -> Bool? in
        guard bytes.allSatisfy({ $0 < 0x80 }) else { return nil }
        let needle: [UInt8] = Array("NETFILTER".utf8)
        guard bytes.count >= needle.count else { return false }
        outer: for start in 0...(bytes.count - needle.count) {
            for k in 0..<needle.count {
                let b = bytes[start + k]
                if (b >= 0x61 && b <= 0x7a ? b - 0x20 : b) != needle[k] { continue outer }
            }
            return true
        }
        return false
    } ?? nil
    return found ?? reason.uppercased().contains("NETFILTER")
}

/// Recent cause events per entity, bounded by count and age.
struct CauseStore: Sendable, Codable {
    private(set) var byEntity: [String: [CauseEvent]] = [:]
    /// Entities with signals per node (noisy neighbour search).
    private(set) var entitiesByNode: [String: Set<String>] = [:]
    /// (node, pid) → time of the process's exit, any status, and whether it
    /// was asked to stop (SIGTERM, SIGINT) or exited with 0.
    private(set) var exits: [String: ProcessExit] = [:]

    struct ProcessExit: Sendable, Equatable, Codable {
        var timeNs: Int64
        var planned: Bool
    }

    /// Returns whether the entity is new among the node's entities with causes.
    @discardableResult
    mutating func add(_ c: CauseEvent, limit: Int) -> Bool {
        // In place: the list is never copied out of the dictionary.
        Self.insert(c, into: &byEntity[c.entity, default: []], limit: limit)
        if entitiesByNode[c.node]?.contains(c.entity) != true {
            entitiesByNode[c.node, default: []].insert(c.entity)
            return true
        }
        return false
    }

    private static func insert(_ c: CauseEvent, into list: inout [CauseEvent], limit: Int) {
        // Usually in time order; a late event is inserted in place.
        if let last = list.last, ObservedEvent.precedes(c.observed, last.observed) {
            let i = list.firstIndex { ObservedEvent.precedes(c.observed, $0.observed) } ?? list.count
            list.insert(c, at: i)
        } else {
            list.append(c)
        }
        // Over the limit, the oldest events after the first quarter go: a
        // long-running cause keeps when it began and what it does now.
        if list.count > limit {
            let head = limit / 4
            list.removeSubrange(head..<(head + list.count - limit))
        }
    }

    mutating func exited(node: String, pid: UInt32, timeNs: Int64, planned: Bool) {
        exits["\(node)/\(pid)"] = ProcessExit(timeNs: timeNs, planned: planned)
    }

    func exitTime(node: String, pid: UInt32) -> Int64? { exits["\(node)/\(pid)"]?.timeNs }

    func processExit(node: String, pid: UInt32) -> ProcessExit? { exits["\(node)/\(pid)"] }

    /// Whether a process closed its listener on purpose: it was still running
    /// (it closed the socket itself, a graceful shutdown) or it exited on a
    /// stop request. A crash, an OOM kill or SIGKILL is not on purpose.
    func closedOnPurpose(node: String, pid: UInt32) -> Bool {
        exits["\(node)/\(pid)"]?.planned ?? true
    }

    func events(of entity: String, from: Int64, to: Int64) -> [CauseEvent] {
        (byEntity[entity] ?? []).filter { $0.timeNs >= from && $0.timeNs <= to }
    }

    /// Returns whether any entity's cause events changed.
    @discardableResult
    mutating func prune(before t: Int64) -> Bool {
        var changed = false
        for k in byEntity.keys.sorted() {
            let kept = byEntity[k]!.filter { $0.timeNs >= t }
            if kept.count != byEntity[k]!.count { changed = true }
            if kept.isEmpty { byEntity[k] = nil } else if kept.count != byEntity[k]!.count { byEntity[k] = kept }
        }
        for (node, ents) in entitiesByNode {
            let kept = ents.filter { byEntity[$0] != nil }
            entitiesByNode[node] = kept.isEmpty ? nil : kept
        }
        exits = exits.filter { $0.value.timeNs >= t }
        return changed
    }
}

/// The CPU time agents report per cgroup (`cpu_throttle` with usage), kept
/// compactly: per node the root's usage (the node's) and per pod its
/// cgroups' usage, summed per bucket, plus a few recent samples as evidence.
/// Usage arrives every second for every busy pod of every node, healthy or
/// not, so it is not kept as cause events.
struct CPUUsageLog: Sendable, Codable {
    struct NodeBucket: Sendable, Codable {
        var usageNs: UInt64 = 0
        var intervalNs: UInt64 = 0
    }

    struct Pod: Sendable, Codable {
        /// bucket → cgroup path → usage, ns.
        var buckets: [Int64: [String: UInt64]] = [:]
        /// The first sample of its current run of samples (it began to
        /// consume then) and the latest samples, oldest first.
        var runStart: CauseEvent?
        var recent: [CauseEvent] = []
    }

    static let recentSamples = 4
    /// node → bucket → the node's usage (its root's samples).
    private(set) var nodes: [String: [Int64: NodeBucket]] = [:]
    /// node → pod entity → its usage.
    private(set) var pods: [String: [String: Pod]] = [:]

    mutating func addNode(_ node: String, bucket: Int64, usageNs: UInt64, intervalNs: UInt64) {
        nodes[node, default: [:]][bucket, default: NodeBucket()].usageNs += usageNs
        nodes[node]![bucket]!.intervalNs += intervalNs
    }

    /// `gapNs`: samples further apart than this are separate runs.
    mutating func addPod(_ sample: CauseEvent, bucket: Int64, cgroup: String, usageNs: UInt64, gapNs: Int64) {
        // In place: a pod's buckets are never copied out of the dictionary.
        Self.add(sample, to: &pods[sample.node, default: [:]][sample.entity, default: Pod()], bucket: bucket, cgroup: cgroup, usageNs: usageNs, gapNs: gapNs)
    }

    private static func add(_ sample: CauseEvent, to p: inout Pod, bucket: Int64, cgroup: String, usageNs: UInt64, gapNs: Int64) {
        p.buckets[bucket, default: [:]][cgroup, default: 0] += usageNs
        if let last = p.recent.last, sample.timeNs - last.timeNs <= gapNs {} else { p.runStart = sample }
        p.recent.append(sample)
        if p.recent.count > CPUUsageLog.recentSamples { p.recent.removeFirst(p.recent.count - CPUUsageLog.recentSamples) }
    }

    /// Whether `node`'s agent reported usage (its root) in buckets `from...to`.
    func reports(node: String, from: Int64, to: Int64) -> Bool {
        nodes[node]?.keys.contains { $0 >= from && $0 <= to } ?? false
    }

    /// The node's usage and the time it covers in buckets `from...to`.
    func node(_ node: String, from: Int64, to: Int64) -> NodeBucket {
        var out = NodeBucket()
        for (b, v) in nodes[node] ?? [:] where b >= from && b <= to {
            out.usageNs += v.usageNs
            out.intervalNs += v.intervalNs
        }
        return out
    }

    /// Pods of `node` with usage.
    func pods(of node: String) -> [String] { (pods[node] ?? [:]).keys.sorted() }

    /// A pod's usage in buckets `from...to`: that of its largest cgroup (a
    /// pod cgroup holds its containers').
    func usage(node: String, pod: String, from: Int64, to: Int64) -> UInt64 {
        var byCgroup: [String: UInt64] = [:]
        for (b, cgroups) in pods[node]?[pod]?.buckets ?? [:] where b >= from && b <= to {
            for (c, u) in cgroups { byCgroup[c, default: 0] += u }
        }
        return byCgroup.values.max() ?? 0
    }

    /// Samples of a pod to show as evidence: when its run began and the latest.
    func samples(node: String, pod: String) -> [CauseEvent] {
        guard let p = pods[node]?[pod] else { return [] }
        let start = p.runStart.map { s in p.recent.contains { $0.observed == s.observed } ? [] : [s] } ?? []
        return start + p.recent
    }

    mutating func prune(beforeBucket b: Int64) {
        for n in nodes.keys.sorted() {
            let kept = nodes[n]!.filter { $0.key >= b }
            nodes[n] = kept.isEmpty ? nil : kept
        }
        for n in pods.keys.sorted() {
            var byPod = pods[n]!
            for e in byPod.keys.sorted() {
                byPod[e]!.buckets = byPod[e]!.buckets.filter { $0.key >= b }
                if byPod[e]!.buckets.isEmpty { byPod[e] = nil }
            }
            pods[n] = byPod.isEmpty ? nil : byPod
        }
    }
}

/// An address and port: a server's end of a flow.
struct Endpoint: Sendable, Hashable, Comparable, Codable {
    var address: IPAddress
    var port: UInt16

    /// Nil without an address or with port 0 (unknown).
    init?(_ address: IPAddress?, _ port: UInt16) {
        guard let address, port != 0 else { return nil }
        self.address = address
        self.port = port
    }

    static func < (a: Endpoint, b: Endpoint) -> Bool { (a.address, a.port) < (b.address, b.port) }
}

/// What got through to server endpoints whose packets netfilter drops, per
/// bucket: connections established and responses measured, with the client
/// addresses that saw them. How a rule that drops every packet of a flow is
/// told from loss of a fraction: with loss the same clients still get through.
/// Only endpoints with netfilter drops are watched (from their first drop
/// on, which is all the reading looks at), so memory follows the drops, not
/// the cluster's traffic.
struct DeliveryLog: Sendable, Codable {
    struct Bucket: Sendable, Codable {
        var count: UInt64 = 0
        var clients: Set<IPAddress> = []
        /// More clients than kept: any client may have got through.
        var overflow = false
    }

    static let maxClients = 64
    private(set) var byServer: [Endpoint: [Int64: Bucket]] = [:]
    /// Endpoint → the bucket of its latest netfilter drop.
    private(set) var watched: [Endpoint: Int64] = [:]

    mutating func watch(_ server: Endpoint, bucket: Int64) {
        if (watched[server] ?? .min) < bucket { watched[server] = bucket }
    }

    mutating func add(server: Endpoint, client: IPAddress?, bucket: Int64, count: UInt64) {
        guard watched[server] != nil else { return }
        var b = byServer[server]?[bucket] ?? Bucket()
        b.count += count
        if let c = client, !b.clients.contains(c) {
            if b.clients.count < DeliveryLog.maxClients { b.clients.insert(c) } else { b.overflow = true }
        }
        byServer[server, default: [:]][bucket] = b
    }

    /// Whether anything got through to `server` in buckets `from...to`; from
    /// one of `clients` when given.
    func delivered(server: Endpoint, from: Int64, to: Int64, clients: Set<IPAddress>?) -> Bool {
        guard let buckets = byServer[server] else { return false }
        for (i, b) in buckets where i >= from && i <= to && b.count > 0 {
            guard let clients else { return true }
            if b.overflow || !b.clients.isDisjoint(with: clients) { return true }
        }
        return false
    }

    mutating func prune(beforeBucket b: Int64) {
        watched = watched.filter { $0.value >= b }
        for k in byServer.keys.sorted() {
            let kept = byServer[k]!.filter { $0.key >= b }
            byServer[k] = kept.isEmpty || watched[k] == nil ? nil : kept
        }
    }
}

/// One line naming an event: `<time> <node> <kind> <summary>`.
func evidenceLine(_ e: ObservedEvent, _ summary: String) -> String {
    "\(rfc3339(ns: e.timeNs)) \(e.node) \(e.event.kind.name) \(summary)"
}

/// A short human description of an event, for timelines and evidence.
func summarize(_ o: ObservedEvent, entity: String) -> String {
    let e = o.event
    let who = e.comm.isEmpty ? entity : "\(entity) (\(e.comm)\(e.pid != 0 ? " pid \(e.pid)" : ""))"
    func peer(_ f: Flow) -> String { "\(f.destination?.description ?? "?"):\(f.destinationPort)" }
    switch e.detail {
    case .none: return who
    case .exec(let filename): return "\(who) started \(filename)"
    case .exit(let code, let signal, _):
        return signal != 0 ? "\(who) killed by signal \(signal)" : "\(who) exited with code \(code)"
    case .oomKill(_, let victimComm, _, _, let anon, _):
        return "\(entity): OOM killer chose \(victimComm.isEmpty ? e.comm : victimComm)\(anon > 0 ? " (anon rss \(anon / 1024) MiB)" : "")"
    case .tcpConnect(let f, let outcome, _, _, let count):
        return "\(who) connect to \(peer(f)) \(outcome.name)\(count > 1 ? " ×\(count)" : "")"
    case .tcpListen(let a, let port, let open):
        return "\(who) \(open ? "listens on" : "stopped listening on") \(a?.description ?? "*"):\(port)"
    case .tcpReset(let f, let sent, _, let count):
        return "\(who) \(sent ? "sent" : "received") reset \(sent ? "to" : "from") \(peer(f))\(count > 1 ? " ×\(count)" : "")"
    case .tcpRetransmit(let f, let count, _):
        return "\(who) retransmitted \(count) segments to \(peer(f))"
    case .tcpLatency(let f, let srtt, let responses, let total, _, _):
        let avg = responses == 0 ? 0 : Double(total / UInt64(responses)) / 1e6
        return "\(who) to \(peer(f)): response \(round3(avg)) ms, srtt \(Double(srtt) / 1000) ms"
    case .packetDrop(let reason, let count, let f, _, _, _):
        return "\(count) packets \(f.source?.description ?? "?") → \(peer(f)) dropped: \(reason)"
    case .dns(let name, _, let rcode, _, _, _, _, _):
        return "\(who) lookup \(name): \(dnsRcodeName(rcode))"
    case .cpuThrottle(let periods, let throttled, _, let intervalNs, _, let usage):
        var parts: [String] = []
        if throttled > 0 || usage == nil { parts.append("throttled in \(throttled)/\(periods) periods") }
        if let usage {
            let cpus = intervalNs == 0 ? 0 : Double(usage.usageNs) / Double(intervalNs)
            parts.append("used \(round3(cpus)) CPU" + (usage.node.map { " of \($0.cpus)" } ?? ""))
            if let p = usage.pressure ?? usage.node?.pressure, p.someAvg10Permille > 0 { parts.append("waited for CPU \(Double(p.someAvg10Permille) / 10)%") }
        }
        return "\(who) " + parts.joined(separator: ", ")
    case .memoryPressure(let source, _, let usage, let limit, let psi, _, _):
        return "\(who) memory pressure (\(source)): \(usage / 1_048_576)/\(limit / 1_048_576) MiB, psi \(Double(psi) / 10)%"
    case .ioError(let error, let syscall, let count, _):
        return "\(who) \(syscall) failed \(errnoName(error))\(count > 1 ? " ×\(count)" : "")"
    }
}
