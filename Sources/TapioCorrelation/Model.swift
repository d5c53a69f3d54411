import TapioWire

/// One event of the merged stream, placed on the server's clock.
///
/// `timeNs` is the corrected time (agent time minus the node's clock offset);
/// the true time lies within `timeNs ± errorNs`. `errorNs` is −1 when the
/// node has no clock sample yet (the engine then assumes
/// `Configuration.unknownClockErrorNs`).
public struct ObservedEvent: Sendable, Equatable, Codable {
    public var node: String
    public var timeNs: Int64
    public var errorNs: Int64
    /// The agent's event, kept in one shared box: the engine copies an
    /// observed event into its queue, series, cause lists and incidents, and
    /// a copy then costs one reference instead of one per string field.
    private var box: EventBox
    public var event: TapioEvent {
        _read { yield box.event }
        set { box = EventBox(newValue) }
    }

    private final class EventBox: Sendable {
        let event: TapioEvent
        init(_ event: TapioEvent) { self.event = event }
    }

    public init(node: String, timeNs: Int64, errorNs: Int64, event: TapioEvent) {
        self.node = node
        self.timeNs = timeNs
        self.errorNs = errorNs
        self.box = EventBox(event)
    }

    /// From the agent's own wall time (`event.timeNs`) and the node's clock
    /// correction: `clockOffsetNs` is agent clock minus server clock.
    public init(node: String, agentEvent event: TapioEvent, clockOffsetNs: Int64, clockErrorNs: Int64) {
        self.node = node
        self.timeNs = event.timeNs &- clockOffsetNs
        self.errorNs = clockErrorNs
        self.box = EventBox(event)
    }

    private enum CodingKeys: String, CodingKey { case node, timeNs, errorNs, event }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(node: try c.decode(String.self, forKey: .node), timeNs: try c.decode(Int64.self, forKey: .timeNs),
                  errorNs: try c.decode(Int64.self, forKey: .errorNs), event: try c.decode(TapioEvent.self, forKey: .event))
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(node, forKey: .node)
        try c.encode(timeNs, forKey: .timeNs)
        try c.encode(errorNs, forKey: .errorNs)
        try c.encode(box.event, forKey: .event)
    }

    public static func == (a: ObservedEvent, b: ObservedEvent) -> Bool {
        a.timeNs == b.timeNs && a.errorNs == b.errorNs && a.node == b.node && (a.box === b.box || a.box.event == b.box.event)
    }

    /// A total order on content, so that events with equal times are
    /// processed in the same order whatever order they arrived in.
    static func precedes(_ a: ObservedEvent, _ b: ObservedEvent) -> Bool {
        if a.timeNs != b.timeNs { return a.timeNs < b.timeNs }
        if a.node != b.node { return a.node < b.node }
        let x = a.event, y = b.event
        if x.kind != y.kind { return x.kind.rawValue < y.kind.rawValue }
        if x.pid != y.pid { return x.pid < y.pid }
        if x.cgroupId != y.cgroupId { return x.cgroupId < y.cgroupId }
        if x.comm != y.comm { return x.comm < y.comm }
        if x.pod != y.pod { return x.pod < y.pod }
        if x.containerId != y.containerId { return x.containerId < y.containerId }
        if a.errorNs != b.errorNs { return a.errorNs < b.errorNs }
        if x.detail == y.detail { return false }
        return String(describing: x.detail) < String(describing: y.detail)
    }
}

/// What a symptom is: a rate (or level) of one entity that left its baseline
/// (docs/correlation-contract.md, "Symptom kinds").
public enum SymptomKind: String, Sendable, CaseIterable, Comparable, Codable {
    case connectRefused = "connect_refused"
    case connectTimeout = "connect_timeout"
    case connectErrors = "connect_errors"
    case resets
    case retransmits
    case packetDrops = "packet_drops"
    case dnsErrors = "dns_errors"
    case latency
    case exits
    case throttling
    case ioErrors = "io_errors"

    public static func < (a: SymptomKind, b: SymptomKind) -> Bool { a.rawValue < b.rawValue }

    /// A level (latency, throttled share) rather than a count per window.
    public var isLevel: Bool { self == .latency || self == .throttling }

    /// A count of failed attempts whose successes the engine sees too
    /// (lookups answered, connections established): its series also counts
    /// every attempt, and fires only when the failed share rises, not when
    /// more traffic brings more failures at the same share
    /// (docs/correlation.md, "Symptoms").
    public var hasAttempts: Bool {
        self == .dnsErrors || self == .connectRefused || self == .connectTimeout || self == .connectErrors
    }

    /// The unit of `Symptom.baseline`.
    public var baselineUnit: String {
        switch self {
        case .latency: return "ms"
        case .throttling: return "ratio"
        default: return "per_second"
        }
    }
}

/// What a root cause is (docs/correlation-contract.md, "Root-cause kinds").
public enum CauseKind: String, Sendable, CaseIterable, Comparable, Codable {
    case oomKill = "oom_kill"
    case crash
    case crashLoop = "crash_loop"
    case listenerClosed = "listener_closed"
    case firewallDrop = "firewall_drop"
    case packetLoss = "packet_loss"
    case dnsFailure = "dns_failure"
    case cpuThrottle = "cpu_throttle"
    case memoryPressure = "memory_pressure"
    case diskFull = "disk_full"
    case noisyNeighbour = "noisy_neighbour"
    /// The network path to a service is slow: round trips many times their
    /// usual while the server's own answer time is not (a saturated link,
    /// a deep queue, a slow hop).
    case networkLatency = "network_latency"

    public static func < (a: CauseKind, b: CauseKind) -> Bool { a.rawValue < b.rawValue }
}

/// One named input of a confidence: `value` in [0, 1] and the weight it
/// carries in the logistic combination.
public struct Factor: Sendable, Equatable, Codable {
    public var name: String
    public var value: Double
    public var weight: Double

    public init(name: String, value: Double, weight: Double) {
        self.name = name
        self.value = value
        self.weight = weight
    }

    var json: JSONValue {
        .object(["name": .string(name), "value": .double(round3(value)), "weight": .double(round3(weight))])
    }
}

func round3(_ x: Double) -> Double { (x * 1000).rounded() / 1000 }

/// FNV-1a, 64 bits: stable across processes and platforms (Swift's Hasher is not).
func fnv1a(_ s: String) -> UInt64 {
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for b in s.utf8 {
        h ^= UInt64(b)
        h = h &* 0x100_0000_01b3
    }
    return h
}

func hex16(_ v: UInt64) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: 16 - s.count) + s
}
