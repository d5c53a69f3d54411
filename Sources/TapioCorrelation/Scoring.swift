import Foundation

/// The logistic combination of named factors into a probability.
public func confidence(of factors: [Factor], bias: Double) -> Double {
    let z = factors.reduce(bias) { $0 + $1.weight * $1.value }
    return 1 / (1 + exp(-z))
}

/// A known answer of a lab run: the root cause that was injected.
public struct KnownAnswer: Sendable, Equatable {
    public var entity: String
    public var kind: CauseKind

    public init(entity: String, kind: CauseKind) {
        self.entity = entity
        self.kind = kind
    }
}

public enum Calibration {
    /// The Brier score of top-1 confidences against known answers: the mean
    /// of (confidence − correct)² over runs; 0 is perfect, 0.25 is what
    /// always answering 0.5 scores. A fault run with no candidate counts as a
    /// certain miss (1); a healthy run (answer nil) with no candidate as a
    /// certain hit (0), with one as a wrong top-1 (confidence²).
    public static func brierScore(runs: [(top: RootCause?, answer: KnownAnswer?)]) -> Double {
        guard !runs.isEmpty else { return 0 }
        var total = 0.0
        for r in runs {
            switch (r.top, r.answer) {
            case (nil, nil): total += 0
            case (nil, .some): total += 1
            case (.some(let top), nil): total += top.confidence * top.confidence
            case (.some(let top), .some(let a)):
                let y = top.entity == a.entity && top.kind == a.kind ? 1.0 : 0.0
                total += (top.confidence - y) * (top.confidence - y)
            }
        }
        return total / Double(runs.count)
    }

    /// The Brier score every sample's confidence under `weights` gets.
    public static func brierScore(_ samples: [Sample], weights: ConfidenceWeights) -> Double {
        brierScore(samples.map { (weights.confidence($0.values), $0.correct) })
    }

    /// The Brier score of (probability, outcome) pairs.
    public static func brierScore(_ pairs: [(confidence: Double, correct: Bool)]) -> Double {
        guard !pairs.isEmpty else { return 0 }
        return pairs.reduce(0) { $0 + ($1.confidence - ($1.correct ? 1 : 0)) * ($1.confidence - ($1.correct ? 1 : 0)) } / Double(pairs.count)
    }

    /// The highest-confidence candidate over the incidents of a run.
    public static func top(of incidents: [Incident]) -> RootCause? {
        incidents.compactMap(\.rootCauses.first).max { ($0.confidence, $1.entity, $1.kind.rawValue) < ($1.confidence, $0.entity, $0.kind.rawValue) }
    }

    /// A labelled candidate for fitting: its factor values and whether it was the right answer.
    public struct Sample: Sendable, Equatable {
        public var values: [String: Double]
        public var correct: Bool

        public init(values: [String: Double], correct: Bool) {
            self.values = values
            self.correct = correct
        }

        public init(candidate: RootCause, answer: KnownAnswer?) {
            var v: [String: Double] = [:]
            for f in candidate.factors { v[f.name] = f.value }
            values = v
            correct = answer.map { $0.entity == candidate.entity && $0.kind == candidate.kind } ?? false
        }
    }

    /// Platt scaling: fits `a` and `b` in σ(a·z + b), z being the logit the
    /// weights give each sample, and returns the weights scaled by `a` with
    /// the bias moved by `b`. Two parameters instead of eight, and the order
    /// of candidates (so every ranking) is kept when `a` > 0: what few lab
    /// runs can support.
    public static func fitScale(_ samples: [Sample], weights: ConfidenceWeights, iterations: Int = 4000,
                                learningRate: Double = 0.5) -> ConfidenceWeights {
        guard !samples.isEmpty else { return weights }
        let z: [Double] = samples.map { weights.logit($0.values) }
        let y: [Double] = samples.map { $0.correct ? 1 : 0 }
        // Standardize z for a well-conditioned descent, then map back.
        let mean = z.reduce(0, +) / Double(z.count)
        let sd = max(1e-6, (z.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(z.count)).squareRoot())
        var a = 1.0, b = 0.0
        let n = Double(z.count)
        for _ in 0..<iterations {
            var ga = 0.0, gb = 0.0
            for i in z.indices {
                let x = (z[i] - mean) / sd
                let p = 1 / (1 + exp(-(a * x + b)))
                ga += (p - y[i]) * x
                gb += p - y[i]
            }
            a -= learningRate * ga / n
            b -= learningRate * gb / n
        }
        // σ(a·(z − mean)/sd + b) = σ(A·z + B) with A = a/sd, B = b − a·mean/sd.
        let scale = a / sd
        var out = ConfidenceWeights(vector: weights.vector.map { $0 * scale })
        out.bias = weights.bias * scale + b - a * mean / sd
        return out
    }

    /// Fits the weights by logistic regression (batch gradient descent on the
    /// log loss with a small L2 penalty, from `start`): what calibration on
    /// lab runs does. Deterministic: fixed steps, no randomness.
    public static func fit(_ samples: [Sample], start: ConfidenceWeights = ConfidenceWeights(), iterations: Int = 2000,
                           learningRate: Double = 0.5, l2: Double = 0.01) -> ConfidenceWeights {
        guard !samples.isEmpty else { return start }
        let names = ConfidenceWeights.factorNames
        var w = start.vector
        let x: [[Double]] = samples.map { s in [1] + names.map { s.values[$0] ?? 0 } }
        let y: [Double] = samples.map { $0.correct ? 1 : 0 }
        let n = Double(samples.count)
        for _ in 0..<iterations {
            var grad = [Double](repeating: 0, count: w.count)
            for i in 0..<x.count {
                var z = 0.0
                for j in 0..<w.count { z += w[j] * x[i][j] }
                let p = 1 / (1 + exp(-z))
                for j in 0..<w.count { grad[j] += (p - y[i]) * x[i][j] }
            }
            for j in 0..<w.count {
                let penalty = j == 0 ? 0 : l2 * w[j]
                w[j] -= learningRate * (grad[j] / n + penalty)
            }
        }
        return ConfidenceWeights(vector: w)
    }
}
