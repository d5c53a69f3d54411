/// Which series a symptom belongs to: the entity where it is measured, what
/// is measured, and the peer it concerns ("" for the entity itself).
struct SeriesKey: Sendable, Hashable, Comparable, Codable {
    var observer: String
    var kind: SymptomKind
    var peer: String

    static func < (a: SeriesKey, b: SeriesKey) -> Bool {
        (a.observer, a.kind.rawValue, a.peer) < (b.observer, b.kind.rawValue, b.peer)
    }

    var text: String { "\(observer)|\(kind.rawValue)|\(peer)" }
}

/// The outcome of closing one bucket of a series.
struct BucketVerdict: Sendable, Codable {
    var firing: Bool
    /// Events in the window (counts) or elevated events (levels).
    var count: Double
    /// Baseline per bucket (counts) or level, before this bucket.
    var baseline: Double
    /// The value compared: window sum or level.
    var value: Double
    /// Events of the window, earliest first (a few).
    var events: [ObservedEvent]
}

/// One entity's rate (or level) series for one symptom kind, with its own
/// baseline: exponentially weighted mean and variance per bucket.
struct Series: Sendable, Codable {
    struct Bucket: Sendable, Codable {
        var index: Int64
        var count: Double = 0
        var level: Double = 0
        var samples: Int = 0
        var events: [ObservedEvent] = []
        /// Part of a window that fired: never learned.
        var fired = false
    }

    let key: SeriesKey
    /// Direction of the dependency the symptom is on: client → server.
    var edgeFrom: String?
    var edgeTo: String?
    var buckets: [Bucket] = []
    var mean: Double = 0
    var variance: Double = 0
    var learned: Int = 0
    var lastLearned: Int64?
    var firing = false
    var lastTouched: Int64 = .min

    /// `quietBuckets`: buckets the engine has watched before this series'
    /// first event, in which it was zero (counts learn them as zeros, so a
    /// first failure is not its own baseline).
    init(key: SeriesKey, edgeFrom: String?, edgeTo: String?, bucket: Int64, quietBuckets: Int64) {
        self.key = key
        self.edgeFrom = edgeFrom
        self.edgeTo = edgeTo
        if !key.kind.isLevel && quietBuckets > 0 {
            learned = Int(min(quietBuckets, 1_000_000))
            lastLearned = bucket - 1
        }
    }

    mutating func observe(bucket: Int64, count: Double, level: Double?, event: ObservedEvent, keepEvents: Int) {
        if buckets.last?.index != bucket { buckets.append(Bucket(index: bucket)) }
        let i = buckets.count - 1
        buckets[i].count += count
        if let level {
            buckets[i].level = buckets[i].samples == 0 ? level : max(buckets[i].level, level)
            buckets[i].samples += 1
        }
        if buckets[i].events.count < keepEvents { buckets[i].events.append(event) }
        lastTouched = bucket
    }

    private mutating func learn(_ x: Double, alpha: Double) {
        let a = max(alpha, 1 / Double(learned + 1))
        let diff = x - mean
        let incr = a * diff
        mean += incr
        variance = (1 - a) * (variance + diff * incr)
        learned += 1
    }

    /// Decides bucket `index` (the newest closed one). Levels compare the
    /// bucket's level and learn from it when it is not a symptom. Counts sum
    /// the window and learn a bucket only once it has left the window, so a
    /// change building up over the window (a crash loop) is not its own
    /// baseline; buckets of a firing window are never learned.
    mutating func close(_ index: Int64, threshold t: SymptomThreshold, mayFire: Bool) -> BucketVerdict? {
        if key.kind.isLevel {
            buckets.removeAll { $0.index < index }
            guard let b = buckets.last, b.index == index, b.samples > 0 else {
                firing = false
                return nil
            }
            let sd = variance.squareRoot()
            let fire = mayFire && b.level >= t.floor && b.level > t.factor * mean && b.level > mean + t.deviations * sd
            let verdict = BucketVerdict(firing: fire, count: Double(b.samples), baseline: mean, value: b.level, events: b.events)
            if !fire { learn(b.level, alpha: t.alpha) }
            firing = fire
            return verdict
        }
        let w = Int64(max(t.windowBuckets, 1))
        let leaving = index - w
        while let first = buckets.first, first.index <= leaving {
            learnZeros(until: first.index - 1, alpha: t.alpha)
            if !first.fired { learn(first.count, alpha: t.alpha) }
            lastLearned = first.index
            buckets.removeFirst()
        }
        learnZeros(until: leaving, alpha: t.alpha)
        let sum = buckets.reduce(0) { $0 + ($1.index <= index ? $1.count : 0) }
        let mu = mean * Double(w)
        let sd = (variance * Double(w)).squareRoot()
        let fire = mayFire && sum >= t.floor && sum > t.factor * mu && sum > mu + t.deviations * sd
        if fire { for i in buckets.indices { buckets[i].fired = true } }
        firing = fire
        return BucketVerdict(firing: fire, count: sum, baseline: mean, value: sum, events: buckets.flatMap(\.events))
    }

    /// Empty buckets after the last one learned, up to `until`, count as zeros.
    private mutating func learnZeros(until: Int64, alpha: Double) {
        guard let last = lastLearned else {
            lastLearned = until
            return
        }
        guard until > last else { return }
        for _ in 0..<min(until - last, 400) { learn(0, alpha: alpha) }
        lastLearned = until
    }

    /// No activity in the window and not firing: the series may leave the
    /// set checked every bucket (its baseline decays lazily).
    func idle(at index: Int64, threshold t: SymptomThreshold) -> Bool {
        let w = key.kind.isLevel ? 1 : max(t.windowBuckets, 1)
        return !firing && lastTouched <= index - Int64(w)
    }
}
