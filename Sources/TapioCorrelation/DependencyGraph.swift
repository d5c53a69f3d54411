import TapioWire

/// Who talks to whom, learned from observed connections and DNS answers:
/// edges client entity → server entity (what `tapio services` shows).
public struct DependencyGraph: Sendable, Equatable, Codable {
    /// One client → server dependency.
    public struct Edge: Sendable, Equatable, Codable {
        public var client: String
        public var server: String
        /// Connection attempts seen (established and failed).
        public var connects: UInt64 = 0
        /// Failed attempts by outcome name (`refused`, `timeout`, …).
        public var failures: [String: UInt64] = [:]
        /// Server ports connected to.
        public var ports: Set<UInt16> = []
        /// Connect latency of established connections, ns.
        public var connectLatency = LatencySummary()
        /// Request → response time, ns (from tcp_latency).
        public var responseLatency = LatencySummary()
        /// The path's usual round-trip time (tcp_latency's srtt), learned
        /// only from samples that were not elevated. Absent from checkpoints
        /// written before it was kept.
        public var roundTrip: RoundTripBaseline?
        public var firstSeenNs: Int64
        public var lastSeenNs: Int64

        public var failureCount: UInt64 { failures.values.reduce(0, +) }

        public var json: JSONValue {
            var f: [String: JSONValue] = [:]
            for (k, v) in failures { f[k] = .int(Int64(clamping: v)) }
            return .object([
                "client": .string(client), "server": .string(server),
                "connects": .int(Int64(clamping: connects)), "failures": .int(Int64(clamping: failureCount)), "failures_by_outcome": .object(f),
                "failure_ratio": .double(connects == 0 ? 0 : round3(Double(failureCount) / Double(connects))),
                "ports": .array(ports.sorted().map { .int(Int64(clamping: $0)) }),
                "connect_latency": connectLatency.json, "response_latency": responseLatency.json,
                "srtt_ms": .double(round3((roundTrip?.meanUs ?? 0) / 1000)),
                "first_seen": .string(rfc3339(ns: firstSeenNs)), "last_seen": .string(rfc3339(ns: lastSeenNs)),
            ])
        }
    }

    /// Count, mean, max and quantiles from a log2 histogram (buckets of
    /// powers of two ns): deterministic, bounded memory.
    public struct LatencySummary: Sendable, Equatable, Codable {
        public var count: UInt64 = 0
        public var totalNs: Double = 0
        public var maxNs: UInt64 = 0
        var histogram = [UInt64](repeating: 0, count: 64)

        public init() {}

        public mutating func add(_ ns: UInt64, weight: UInt64 = 1) {
            guard weight > 0 else { return }
            count += weight
            totalNs += Double(ns) * Double(weight)
            maxNs = max(maxNs, ns)
            histogram[ns == 0 ? 0 : 63 - ns.leadingZeroBitCount] += weight
        }

        public var meanNs: Double { count == 0 ? 0 : totalNs / Double(count) }

        /// Upper bound of the histogram bucket holding quantile `q`.
        public func quantileNs(_ q: Double) -> UInt64 {
            guard count > 0 else { return 0 }
            let target = UInt64((Double(count) * q).rounded(.up))
            var seen: UInt64 = 0
            for (i, c) in histogram.enumerated() {
                seen += c
                if seen >= max(target, 1) { return min(i >= 63 ? UInt64.max : (UInt64(1) << (i + 1)) - 1, maxNs) }
            }
            return maxNs
        }

        var json: JSONValue {
            .object(["count": .int(Int64(clamping: count)), "mean_ms": .double(round3(meanNs / 1e6)), "p50_ms": .double(round3(Double(quantileNs(0.5)) / 1e6)),
                     "p99_ms": .double(round3(Double(quantileNs(0.99)) / 1e6)), "max_ms": .double(round3(Double(maxNs) / 1e6))])
        }
    }

    /// An exponentially weighted mean of a path's smoothed RTT, µs.
    public struct RoundTripBaseline: Sendable, Equatable, Codable {
        public var meanUs: Double = 0
        public var samples: UInt64 = 0

        mutating func learn(_ us: Double) {
            samples += 1
            meanUs += (us - meanUs) * max(0.05, 1 / Double(samples))
        }
    }

    /// An edge's key: its two ends, hashed as they are (no string built
    /// per event to look an edge up).
    struct EdgeKey: Hashable, Sendable {
        var client: String
        var server: String

        init(_ client: String, _ server: String) {
            self.client = client
            self.server = server
        }

        /// The key as checkpoints hold it, and the order edges are listed in.
        var text: String { client + "\u{1}" + server }
    }

    private(set) var edgeMap: [EdgeKey: Edge] = [:]
    /// DNS name → the service its answers pointed to.
    public private(set) var names: [String: String] = [:]

    public init() {}

    private enum CodingKeys: String, CodingKey { case edgeMap, names }

    /// The checkpoint's shape of before: edges keyed `client U+0001 server`.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let byText = try c.decode([String: Edge].self, forKey: .edgeMap)
        edgeMap = Dictionary(byText.values.map { (EdgeKey($0.client, $0.server), $0) }, uniquingKeysWith: { a, _ in a })
        names = try c.decode([String: String].self, forKey: .names)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(Dictionary(uniqueKeysWithValues: edgeMap.map { ($0.key.text, $0.value) }), forKey: .edgeMap)
        try c.encode(names, forKey: .names)
    }

    /// Every edge, sorted by client then server.
    public var edges: [Edge] {
        edgeMap.map { ($0.key.text, $0.value) }.sorted { $0.0 < $1.0 }.map(\.1)
    }

    public func edge(client: String, server: String) -> Edge? { edgeMap[EdgeKey(client, server)] }

    public func hasEdge(_ client: String, _ server: String) -> Bool { edgeMap[EdgeKey(client, server)] != nil }

    /// Servers `client` depends on.
    public func dependencies(of client: String) -> [String] {
        edgeMap.filter { $0.key.client == client }.map { ($0.key.text, $0.key.server) }.sorted { $0.0 < $1.0 }.map(\.1)
    }

    /// The position of the edge `client` → `server`, created when new.
    private mutating func slot(client: String, server: String, timeNs: Int64) -> Dictionary<EdgeKey, Edge>.Index {
        let k = EdgeKey(client, server)
        if let i = edgeMap.index(forKey: k) { return i }
        edgeMap[k] = Edge(client: client, server: server, firstSeenNs: timeNs, lastSeenNs: timeNs)
        return edgeMap.index(forKey: k)!
    }

    // The edge is changed in place: copied out of the map and back, its
    // histograms (64 counters each), failures and ports were copied per event.
    mutating func connect(client: String, server: String, port: UInt16, outcome: ConnectOutcome, latencyNs: UInt64, count: UInt32, timeNs: Int64) {
        let i = slot(client: client, server: server, timeNs: timeNs)
        let n = UInt64(max(count, 1))
        edgeMap.values[i].connects += n
        if outcome.isFailure { edgeMap.values[i].failures[outcome.name, default: 0] += n } else { edgeMap.values[i].connectLatency.add(latencyNs, weight: 1) }
        if port != 0 { edgeMap.values[i].ports.insert(port) }
        edgeMap.values[i].firstSeenNs = min(edgeMap.values[i].firstSeenNs, timeNs)
        edgeMap.values[i].lastSeenNs = max(edgeMap.values[i].lastSeenNs, timeNs)
    }

    mutating func response(client: String, server: String, port: UInt16, meanNs: UInt64, responses: UInt32, timeNs: Int64) {
        let i = slot(client: client, server: server, timeNs: timeNs)
        edgeMap.values[i].responseLatency.add(meanNs, weight: UInt64(max(responses, 1)))
        if port != 0 { edgeMap.values[i].ports.insert(port) }
        edgeMap.values[i].firstSeenNs = min(edgeMap.values[i].firstSeenNs, timeNs)
        edgeMap.values[i].lastSeenNs = max(edgeMap.values[i].lastSeenNs, timeNs)
    }

    /// A smoothed RTT sample of the path `client` → `server` (either end's
    /// view) with the mean response time of the same interval. Returns the
    /// path's usual RTT (µs) when the sample is elevated — at least
    /// `rule.floorUs`, `rule.factor` times the usual, and at least
    /// `rule.shareOfResponse` of the response time (the time went on the
    /// wire, not in the server) — and then does not learn from it; nil
    /// otherwise, or while fewer than `rule.minSamples` were learned.
    mutating func roundTrip(client: String, server: String, srttUs: UInt32, responseMeanNs: UInt64, rule: SlowPathRule) -> Double? {
        guard srttUs > 0, let i = edgeMap.index(forKey: EdgeKey(client, server)) else { return nil }
        var b = edgeMap.values[i].roundTrip ?? RoundTripBaseline()
        let us = Double(srttUs)
        if b.samples >= rule.minSamples, us >= rule.floorUs, us >= rule.factor * b.meanUs,
           us * 1000 >= rule.shareOfResponse * Double(responseMeanNs) {
            return b.meanUs
        }
        b.learn(us)
        edgeMap.values[i].roundTrip = b
        return nil
    }

    public var edgeCount: Int { edgeMap.count }

    /// Forgets edges last seen before `seenBeforeNs`; then, past `maxEdges`,
    /// the least recently seen until three quarters of `maxEdges` are left.
    /// Returns how many went.
    @discardableResult
    mutating func forget(seenBeforeNs: Int64, maxEdges: Int) -> Int {
        let before = edgeMap.count
        edgeMap = edgeMap.filter { $0.value.lastSeenNs >= seenBeforeNs }
        if edgeMap.count > maxEdges {
            let newest = edgeMap.map { ($0.value.lastSeenNs, $0.key.text, $0.key) }.sorted { ($0.0, $0.1) > ($1.0, $1.1) }.prefix(maxEdges * 3 / 4)
            edgeMap = Dictionary(uniqueKeysWithValues: newest.map { ($0.2, edgeMap[$0.2]!) })
        }
        return before - edgeMap.count
    }

    mutating func resolved(name: String, service: String) {
        names[name] = service
    }

    /// `{"services": [edges…], "names": {dns name: service}}`.
    public func toJSON() -> JSONValue {
        var n: [String: JSONValue] = [:]
        for (k, v) in names { n[k] = .string(v) }
        return .object(["services": .array(edges.map(\.json)), "names": .object(n)])
    }
}
