import Foundation

/// Every tunable of the engine, with documented defaults. The confidence
/// weights and pattern priors are what calibration on lab runs sets
/// (docs/correlation.md, "Calibration").
public struct CorrelationConfiguration: Sendable, Equatable {
    /// Width of one rate bucket. Symptoms are decided when a bucket closes.
    public var bucketNs: Int64 = 2_000_000_000
    /// How far behind the newest time events may arrive and still be placed
    /// in order (agents batch, clocks are skewed). The watermark is
    /// `advance(toNs:)` minus this.
    /// Measured over the lab's runs (server arrival minus corrected event
    /// time, 33,289 events): median 0.17 s, p99 1.02 s, max 1.30 s — the
    /// agents harvest aggregates once a second and batch for 0.2 s.
    public var allowedLatenessNs: Int64 = 1_500_000_000
    /// Decide a symptom within its bucket as soon as what has arrived
    /// already fires (`CorrelationEngine.decideEarly`), instead of only at
    /// the bucket's end. The same symptoms either way; only sooner.
    public var decideWithinBucket = true
    /// Answer an open incident from its last evaluation when nothing it
    /// depends on changed since (Reuse.swift); off evaluates every open
    /// incident at every bucket's close, as before. The same answers either way.
    var reuseEvaluations = true
    /// Check every such reuse against a fresh evaluation and stop the
    /// process on a difference: on in debug builds (the tests), where it
    /// costs what evaluating every time did; off in release builds.
    #if DEBUG
    var checkReuse = true
    #else
    var checkReuse = false
    #endif
    /// Buckets after the first event during which baselines learn and no
    /// symptom fires.
    public var warmupBuckets: Int = 5
    /// An incident resolves after this long without any of its symptoms firing.
    public var quietPeriodNs: Int64 = 30_000_000_000
    /// A listener closed on purpose (SIGTERM, SIGINT, exit 0, or closed by
    /// the running process) and open again within this long is a restart:
    /// the refusals in between are churn and open no incident. An incident
    /// led by such a close is held back this long while a restart may come.
    public var restartGraceNs: Int64 = 3_000_000_000
    /// Cause events are taken up to this long after the last symptom's onset
    /// (sampled signals such as cgroup counters are read once a second).
    public var causeLagNs: Int64 = 5_000_000_000
    /// The same for causes the kernel reports as they happen (an OOM kill, an
    /// exit, a closed listener), plus both clocks' uncertainty: a symptom's
    /// aggregate is stamped with the start of the interval (1 s) it covers.
    public var eventCauseLagNs: Int64 = 1_000_000_000
    /// Causes are looked for this far before the incident's first symptom.
    public var causeLookbackNs: Int64 = 120_000_000_000
    /// Abnormal exits of one entity within `crashLoopWindowNs` that make a
    /// crash loop rather than a crash: restarted and crashed again (when
    /// Kubernetes, too, reports CrashLoopBackOff).
    public var crashLoopExits: Int = 2
    public var crashLoopWindowNs: Int64 = 120_000_000_000
    /// The clock uncertainty assumed for events whose node has no sample yet.
    public var unknownClockErrorNs: Int64 = 1_000_000_000
    /// Time proximity decays as exp(−gap / timeDecayNs) once the gap between
    /// a cause and its symptom exceeds their clock uncertainty.
    public var timeDecayNs: Int64 = 10_000_000_000
    /// When a path's round-trip time is a `network_latency` cause.
    public var slowPath = SlowPathRule()
    /// A cpu_throttle sample with this share of throttled periods is a cause.
    public var throttleCauseRatio: Double = 0.2
    /// A memory_pressure sample is a cause at this PSI some avg10 (percent)
    /// or this usage/limit ratio.
    public var memoryPressureCausePsi: Double = 10
    public var memoryPressureCauseUsage: Double = 0.9
    /// An incident pages (`Incident.pages`) only when its best observed
    /// candidate has at least this confidence. The confidences are
    /// calibrated, so below 0.5 the named cause is more likely wrong than
    /// right; on the recorded lab runs every right top-1 scored 0.83 or more
    /// (docs/correlation.md, "Paging").
    public var pagingFloor: Double = 0.5
    /// A victim's starvation (its node throttled or under memory pressure,
    /// its own memory PSI) counts for its symptoms from this long before the
    /// first of them: a shortage shows in latency after a few buckets.
    public var starvationLeadNs: Int64 = 10_000_000_000
    /// Samples of a shortage (sent once a second while it lasts) this close
    /// together are one shortage: it began where such a run began.
    public var starvationGapNs: Int64 = 5_000_000_000
    /// How far a neighbour's consumption may lie outside the victim's
    /// starvation and still overlap it: cgroup counters are sampled once a
    /// second and stamped with the start of their interval.
    public var neighbourSlackNs: Int64 = 2_000_000_000
    /// Where agents report CPU usage (`cpu_throttle` with usage: the node's
    /// root is reported every interval), a neighbour is named for a CPU
    /// shortage only when it consumed the CPU: over the shortage (± the
    /// slack) its pod used at least this share of what the whole node used
    /// (0.25: a quarter; on a node held to half a CPU, an eighth of a CPU) ...
    public var neighbourCPUShare: Double = 0.25
    /// ... or at least this many CPUs on average while it was the largest
    /// consumer of the node's pods other than the victims (a big node, where
    /// one busy pod is a small share).
    public var neighbourCPUCores: Double = 0.5
    /// Waiting for a CPU at this PSI "some avg10" (percent) is starvation:
    /// a victim's cgroup not throttled by its own quota, or the node's.
    /// Without PSI the node counts as short when more tasks are runnable
    /// than it has CPUs.
    public var cpuPressureStarvationPsi: Double = 25
    /// Root-cause candidates kept per incident.
    public var maxCandidates: Int = 5
    /// Evidence events kept per candidate and representative events per symptom.
    public var maxEvidence: Int = 5
    /// Resolved incidents kept (oldest dropped first).
    public var maxResolvedIncidents: Int = 1000
    /// A series with no event for this long is dropped (memory stays bounded
    /// by the entities active recently).
    public var forgetSeriesAfterNs: Int64 = 3_600_000_000_000
    /// A dependency (client → server edge) not seen for this long is
    /// forgotten, and past `maxGraphEdges` the least recently seen go first
    /// (down to three quarters of it): a workload that talks to ever new
    /// addresses does not grow the graph (about 1 KiB an edge, in every
    /// checkpoint) without bound.
    public var forgetEdgeAfterNs: Int64 = 86_400_000_000_000
    public var maxGraphEdges: Int = 50_000
    /// Addresses remembered by the name that answered them or the entity
    /// seen serving on them, each map; past it, that map starts afresh
    /// (traffic and answers teach it again). Also the most entities whose
    /// nodes are remembered (host processes go first).
    public var maxLearnedAddresses: Int = 262_144
    /// Cause events kept per entity (older ones dropped first).
    public var maxCauseEventsPerEntity: Int = 512
    /// (client, name) pairs whose last DNS answer is remembered, to tell a
    /// retried lookup from a failed one; past it, answers older than a
    /// minute are forgotten, and under a flood of distinct names the oldest
    /// until a quarter of the room is free (about 100 bytes an entry).
    public var maxDNSAnswerEntries: Int = 65_536

    public var thresholds: [SymptomKind: SymptomThreshold] = SymptomThreshold.defaults
    public var weights = ConfidenceWeights()
    public var priors = PatternPriors()

    public init() {}

    func threshold(_ kind: SymptomKind) -> SymptomThreshold {
        thresholds[kind] ?? SymptomThreshold(floor: 3)
    }
}

/// When a rate or level is a symptom: the value in the last window must
/// reach `floor` and exceed both `factor` × baseline and baseline +
/// `deviations` × its standard deviation. The baseline is an exponentially
/// weighted mean and variance per bucket (weight `alpha`, with a running mean
/// while fewer than 1/alpha buckets have been seen).
public struct SymptomThreshold: Sendable, Equatable {
    /// Absolute floor: events per window for counts, the level itself for
    /// levels (latency in ms, throttled share 0…1).
    public var floor: Double
    public var factor: Double
    public var deviations: Double
    /// Buckets summed for counts (levels use one bucket).
    public var windowBuckets: Int
    public var alpha: Double
    /// Kinds with attempts (`SymptomKind.hasAttempts`): the window's failed
    /// share must also reach `shareFactor` × its baseline share +
    /// `shareRise` (a share from 0 to 1).
    public var shareFactor: Double
    public var shareRise: Double

    public init(floor: Double, factor: Double = 3, deviations: Double = 4, windowBuckets: Int = 1, alpha: Double = 0.05,
                shareFactor: Double = 1.5, shareRise: Double = 0.01) {
        self.floor = floor
        self.factor = factor
        self.deviations = deviations
        self.windowBuckets = windowBuckets
        self.alpha = alpha
        self.shareFactor = shareFactor
        self.shareRise = shareRise
    }

    public static let defaults: [SymptomKind: SymptomThreshold] = [
        .connectRefused: SymptomThreshold(floor: 3),
        .connectTimeout: SymptomThreshold(floor: 2),
        .connectErrors: SymptomThreshold(floor: 3),
        .resets: SymptomThreshold(floor: 5),
        .retransmits: SymptomThreshold(floor: 10),
        .packetDrops: SymptomThreshold(floor: 10),
        .dnsErrors: SymptomThreshold(floor: 3),
        .latency: SymptomThreshold(floor: 20, factor: 3),
        // Exits are rare: counted over 30 s so a crash loop of one exit every
        // few seconds is seen, one crash alone is not.
        .exits: SymptomThreshold(floor: 3, windowBuckets: 15, alpha: 0.01),
        .throttling: SymptomThreshold(floor: 0.25, factor: 2),
        .ioErrors: SymptomThreshold(floor: 3),
    ]
}

/// The weights of the logistic combination:
/// confidence = 1 / (1 + exp(−(bias + Σ weight·value))).
public struct ConfidenceWeights: Sendable, Equatable {
    public var bias: Double = -5.98
    public var timeProximity: Double = 1.54
    public var topologyMatch: Double = 0.11
    public var metadataMatch: Double = 2.44
    public var symptomsExplained: Double = 1.05
    public var patternPrior: Double = 0.93
    public var deepest: Double = 1.14
    public var observedCause: Double = 1.36
    /// `contradicted` is 1 only when the kernel saw what rules the kind out
    /// (a firewall DROP while the same clients still get through). Set, not
    /// fitted: two recordings show it; −4 divides the odds by about 55.
    public var contradicted: Double = -4

    public init() {}

    public init(vector: [Double]) {
        precondition(vector.count == ConfidenceWeights.factorNames.count + 1)
        bias = vector[0]
        timeProximity = vector[1]
        topologyMatch = vector[2]
        metadataMatch = vector[3]
        symptomsExplained = vector[4]
        patternPrior = vector[5]
        deepest = vector[6]
        observedCause = vector[7]
        contradicted = vector[8]
    }

    /// The factor names, in the order of `vector` after the bias.
    public static let factorNames = ["time_proximity", "topology_match", "metadata_match", "symptoms_explained", "pattern_prior", "deepest", "observed_cause", "contradicted"]

    /// bias, then the weights in `factorNames` order.
    public var vector: [Double] {
        [bias, timeProximity, topologyMatch, metadataMatch, symptomsExplained, patternPrior, deepest, observedCause, contradicted]
    }

    public func weight(_ name: String) -> Double {
        guard let i = ConfidenceWeights.factorNames.firstIndex(of: name) else { return 0 }
        return vector[i + 1]
    }

    /// bias + Σ weight·value over factor values by name (a missing one is 0).
    public func logit(_ values: [String: Double]) -> Double {
        ConfidenceWeights.factorNames.reduce(bias) { $0 + weight($1) * (values[$1] ?? 0) }
    }

    /// The confidence these weights give factor values by name.
    public func confidence(_ values: [String: Double]) -> Double {
        1 / (1 + exp(-logit(values)))
    }
}

/// When a tcp_latency sample says the network path itself is slow: its
/// smoothed RTT at least `floorUs`, `factor` times the path's usual RTT
/// (learned from `minSamples` samples or more), and at least
/// `shareOfResponse` of the response time measured in the same interval.
/// The floor lies above what a delayed ACK adds to a request's RTT when its
/// server is merely slow (40 ms on Linux); the share keeps a server that
/// answers slowly — its RTT padded by delayed ACKs — from reading as a slow
/// path: there the response time is many times the RTT.
public struct SlowPathRule: Sendable, Equatable {
    public var floorUs: Double = 50_000
    public var factor: Double = 4
    public var minSamples: UInt64 = 5
    public var shareOfResponse: Double = 0.5

    public init() {}
}

/// How typical a cause kind is for a symptom kind (0…1). A pair not listed
/// has `unlisted`.
public struct PatternPriors: Sendable, Equatable {
    public var table: [CauseKind: [SymptomKind: Double]] = [
        .oomKill: [.connectRefused: 0.9, .connectErrors: 0.7, .resets: 0.7, .exits: 0.8, .connectTimeout: 0.3, .latency: 0.3],
        .crash: [.connectRefused: 0.8, .connectErrors: 0.6, .resets: 0.6, .exits: 0.7, .connectTimeout: 0.2],
        .crashLoop: [.connectRefused: 0.85, .connectErrors: 0.6, .resets: 0.6, .exits: 0.9, .connectTimeout: 0.2],
        .listenerClosed: [.connectRefused: 0.9, .connectErrors: 0.4, .resets: 0.4],
        .firewallDrop: [.connectTimeout: 0.9, .retransmits: 0.7, .packetDrops: 0.8, .connectErrors: 0.5, .latency: 0.3, .dnsErrors: 0.3],
        .packetLoss: [.retransmits: 0.9, .latency: 0.7, .packetDrops: 0.8, .connectTimeout: 0.5, .resets: 0.3],
        .dnsFailure: [.dnsErrors: 0.95],
        .cpuThrottle: [.latency: 0.85, .throttling: 0.9, .connectTimeout: 0.3],
        .memoryPressure: [.latency: 0.6, .exits: 0.4, .throttling: 0.2],
        .diskFull: [.ioErrors: 0.95, .exits: 0.6, .connectErrors: 0.6, .resets: 0.6, .latency: 0.5, .connectRefused: 0.5],
        .noisyNeighbour: [.latency: 0.8, .throttling: 0.7, .connectTimeout: 0.4, .retransmits: 0.2],
        .networkLatency: [.latency: 0.9, .connectTimeout: 0.4, .retransmits: 0.3],
    ]
    public var unlisted: Double = 0.05

    public init() {}

    public func prior(_ cause: CauseKind, _ symptom: SymptomKind) -> Double {
        table[cause]?[symptom] ?? unlisted
    }
}
