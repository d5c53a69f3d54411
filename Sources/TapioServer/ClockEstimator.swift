import TapioStore
import TapioWire

/// Estimates an agent's clock offset from NTP-style exchanges on its live
/// connection. For one exchange (t1 server send, t2 agent receive, t3 agent
/// send, t4 server receive):
///
///     offset = ((t2 − t1) + (t3 − t4)) / 2      (agent − server)
///     delay  = (t4 − t1) − (t3 − t2)
///
/// and the true offset lies within offset ± delay/2. Of the most recent
/// samples the one with the lowest delay wins: queueing only ever adds delay,
/// so the fastest exchange is the least distorted.
public struct ClockEstimator: Sendable, Equatable {
    public struct Sample: Sendable, Equatable {
        public var offsetNs: Int64
        public var delayNs: Int64
        public var receivedNs: Int64
    }

    /// How many recent samples are kept.
    public let window: Int
    public private(set) var samples: [Sample] = []

    public init(window: Int = 8) {
        self.window = window
    }

    /// Adds one exchange; returns false (and ignores it) when the timestamps are
    /// inconsistent (negative delay: the agent answered before it was asked).
    @discardableResult
    public mutating func add(t1: Int64, t2: Int64, t3: Int64, t4: Int64) -> Bool {
        let delay = (t4 &- t1) &- (t3 &- t2)
        guard delay >= 0, t3 >= t2 else { return false }
        let offset = ((t2 &- t1) &+ (t3 &- t4)) / 2
        samples.append(Sample(offsetNs: offset, delayNs: delay, receivedNs: t4))
        if samples.count > window { samples.removeFirst(samples.count - window) }
        return true
    }

    /// The correction to apply, nil before the first sample.
    public var correction: ClockCorrection? {
        guard let best = samples.min(by: { $0.delayNs < $1.delayNs }) else { return nil }
        return ClockCorrection(offsetNs: best.offsetNs, errorNs: (best.delayNs + 1) / 2)
    }
}
