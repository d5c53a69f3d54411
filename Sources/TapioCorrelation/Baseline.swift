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
        /// Kinds with attempts: every attempt, failed or not.
        var attempts: Double = 0
        /// Fired within the bucket (`Engine.decideEarly`): its close fires
        /// whatever share the rest of the bucket brings, as the early
        /// decision promised.
        var firedEarly = false

        init(index: Int64) { self.index = index }

        // Checkpoints written before attempts were counted still load.
        enum CodingKeys: String, CodingKey { case index, count, level, samples, events, fired, attempts, firedEarly }
        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            index = try c.decode(Int64.self, forKey: .index)
            count = try c.decode(Double.self, forKey: .count)
            level = try c.decode(Double.self, forKey: .level)
            samples = try c.decode(Int.self, forKey: .samples)
            events = try c.decode([ObservedEvent].self, forKey: .events)
            fired = try c.decode(Bool.self, forKey: .fired)
            attempts = try c.decodeIfPresent(Double.self, forKey: .attempts) ?? 0
            firedEarly = try c.decodeIfPresent(Bool.self, forKey: .firedEarly) ?? false
        }
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
    /// Kinds with attempts: the failed share per bucket, learned like the
    /// count (buckets without attempts teach nothing).
    var shareMean: Double = 0
    var shareLearned: Int = 0
    /// The bucket the series began in: its attempts before the first
    /// failure were not counted, so its share teaches nothing.
    var shareFrom: Int64 = .min

    /// `quietBuckets`: buckets the engine has watched before this series'
    /// first event, in which it was zero (counts learn them as zeros, so a
    /// first failure is not its own baseline).
    /// `succeededBefore` (kinds with attempts): the engine saw this pair's
    /// attempts succeed before the first failure, so the quiet buckets
    /// count as a failed share of 0 (a name that stops resolving is not its
    /// own baseline); otherwise the share is learned from the next bucket on.
    init(key: SeriesKey, edgeFrom: String?, edgeTo: String?, bucket: Int64, quietBuckets: Int64, succeededBefore: Bool = false) {
        self.key = key
        self.edgeFrom = edgeFrom
        self.edgeTo = edgeTo
        if !key.kind.isLevel && quietBuckets > 0 {
            learned = Int(min(quietBuckets, 1_000_000))
            lastLearned = bucket - 1
        }
        if key.kind.hasAttempts {
            shareFrom = bucket
            if succeededBefore && quietBuckets > 0 { shareLearned = Int(min(quietBuckets, 1_000_000)) }
        }
    }

    enum CodingKeys: String, CodingKey { case key, edgeFrom, edgeTo, buckets, mean, variance, learned, lastLearned, firing, lastTouched, shareMean, shareLearned, shareFrom }
    init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        key = try c.decode(SeriesKey.self, forKey: .key)
        edgeFrom = try c.decodeIfPresent(String.self, forKey: .edgeFrom)
        edgeTo = try c.decodeIfPresent(String.self, forKey: .edgeTo)
        buckets = try c.decode([Bucket].self, forKey: .buckets)
        mean = try c.decode(Double.self, forKey: .mean)
        variance = try c.decode(Double.self, forKey: .variance)
        learned = try c.decode(Int.self, forKey: .learned)
        lastLearned = try c.decodeIfPresent(Int64.self, forKey: .lastLearned)
        firing = try c.decode(Bool.self, forKey: .firing)
        lastTouched = try c.decode(Int64.self, forKey: .lastTouched)
        shareMean = try c.decodeIfPresent(Double.self, forKey: .shareMean) ?? 0
        shareLearned = try c.decodeIfPresent(Int.self, forKey: .shareLearned) ?? 0
        shareFrom = try c.decodeIfPresent(Int64.self, forKey: .shareFrom) ?? .min
    }

    mutating func observe(bucket: Int64, count: Double, level: Double?, event: ObservedEvent, keepEvents: Int) {
        if buckets.last?.index != bucket { buckets.append(Bucket(index: bucket)) }
        let i = buckets.count - 1
        buckets[i].count += count
        if key.kind.hasAttempts { buckets[i].attempts += count }
        if let level {
            buckets[i].level = buckets[i].samples == 0 ? level : max(buckets[i].level, level)
            buckets[i].samples += 1
        }
        if buckets[i].events.count < keepEvents { buckets[i].events.append(event) }
        lastTouched = bucket
    }

    /// Attempts that did not fail (kinds with attempts), in `bucket`: the
    /// series' event count and activity are unchanged. A bucket with only
    /// successes is kept only while it is the newest: once a later bucket
    /// begins (events come in time order) and no window still to be closed
    /// reaches it (`window`, the kind's window in buckets), its share (0) is
    /// learned and it is dropped, as a bucket of zero failures it teaches
    /// the count baseline nothing a gap does not. So a pair that failed once
    /// and then talks for an hour keeps one bucket, not 1 800.
    mutating func succeeded(bucket: Int64, count: Double, window: Int, alpha: Double) {
        if let last = buckets.last, last.index >= bucket {
            // This bucket, or (rarely: a pass's events come in time order) an older one if kept.
            if let i = buckets.lastIndex(where: { $0.index == bucket }) { buckets[i].attempts += count }
            return
        }
        if let last = buckets.last, last.count == 0, last.samples == 0, last.index <= bucket - Int64(max(window, 1)) {
            if !last.fired { learnShare(last, alpha: alpha) }
            buckets.removeLast()
        }
        var b = Bucket(index: bucket)
        b.attempts = count
        buckets.append(b)
    }

    /// The early decision fired in `bucket`: its close fires too.
    mutating func firedEarly(in bucket: Int64) {
        if let i = buckets.lastIndex(where: { $0.index == bucket }) { buckets[i].firedEarly = true }
    }

    private mutating func learnShare(_ b: Bucket, alpha: Double) {
        guard key.kind.hasAttempts, b.attempts > 0, b.index > shareFrom else { return }
        let share = min(1, b.count / b.attempts)
        let a = max(alpha, 1 / Double(shareLearned + 1))
        shareMean += a * (share - shareMean)
        shareLearned += 1
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
            if !first.fired {
                learn(first.count, alpha: t.alpha)
                learnShare(first, alpha: t.alpha)
            }
            lastLearned = first.index
            buckets.removeFirst()
        }
        learnZeros(until: leaving, alpha: t.alpha)
        var sum = 0.0, attempts = 0.0, early = false
        for b in buckets where b.index <= index {
            sum += b.count
            attempts += b.attempts
            if b.index == index && b.firedEarly { early = true }
        }
        let mu = mean * Double(w)
        let sd = (variance * Double(w)).squareRoot()
        var fire = mayFire && sum >= t.floor && sum > t.factor * mu && sum > mu + t.deviations * sd
        // More traffic at the same failed share is no symptom. A share not
        // learned yet (a first failure) does not hold a symptom back.
        if fire, !early, key.kind.hasAttempts, shareLearned > 0, attempts > 0 {
            fire = min(1, sum / attempts) >= t.shareFactor * shareMean + t.shareRise
        }
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
