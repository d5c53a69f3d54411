import Synchronization

/// A Prometheus histogram of one quantity in base units (seconds for every
/// histogram Tapio has): fixed upper bounds, a count per bucket, the sum and
/// the count. Observing takes one short lock and no allocation, so it can sit
/// on the storage thread and the event loops; `MetricsText` writes it with
/// cumulative buckets.
public final class MetricsHistogram: Sendable {
    /// What `MetricsText` writes: per-bucket (not cumulative) counts beside
    /// their upper bounds, then the observations above the last bound.
    public struct Snapshot: Sendable, Equatable {
        public var bounds: [Double]
        public var counts: [UInt64]
        public var sum: Double
        public var count: UInt64
    }

    private struct State {
        /// One more than the bounds: the last is "above every bound".
        var counts: [UInt64]
        var sum = 0.0
        var count: UInt64 = 0
    }

    /// Upper bounds, ascending, in the histogram's unit.
    public let bounds: [Double]
    private let state: Mutex<State>

    public init(bounds: [Double]) {
        precondition(!bounds.isEmpty && zip(bounds, bounds.dropFirst()).allSatisfy { $0 < $1 }, "bounds must ascend")
        self.bounds = bounds
        state = Mutex(State(counts: [UInt64](repeating: 0, count: bounds.count + 1)))
    }

    /// Bounds for times from a millisecond to a minute.
    public static let secondsBounds: [Double] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]

    public func observe(_ value: Double) {
        // The first bound at or above the value (le is inclusive); NaN counts
        // in no bucket but +Inf, as Prometheus's clients do.
        var lo = 0, hi = bounds.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if bounds[mid] >= value { hi = mid } else { lo = mid + 1 }
        }
        state.withLock { s in
            s.counts[lo] += 1
            s.sum += value
            s.count += 1
        }
    }

    /// A duration in nanoseconds, observed in seconds.
    public func observe(nanoseconds: Int64) {
        observe(Double(nanoseconds) / 1e9)
    }

    /// Runs `body` and observes how long it took, in seconds (monotonic clock).
    public func time<T>(_ body: () throws -> T) rethrows -> T {
        let start = monotonicNs()
        defer { observe(nanoseconds: monotonicNs() - start) }
        return try body()
    }

    public var snapshot: Snapshot {
        state.withLock { s in
            Snapshot(bounds: bounds, counts: Array(s.counts.prefix(bounds.count)), sum: s.sum, count: s.count)
        }
    }
}
