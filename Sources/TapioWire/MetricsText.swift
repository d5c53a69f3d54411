/// The Prometheus text exposition format (version 0.0.4), written the way
/// `promtool check metrics` accepts: every family has `# HELP` and `# TYPE`,
/// counters end in `_total`, units are base units in the name's suffix
/// (`_seconds`, `_bytes`), label values are escaped. A family is written even
/// without samples when it has no labels (value 0), so a counter exists from
/// the start instead of appearing at its first increment. Histograms
/// (`MetricsHistogram`) are written with cumulative `_bucket{le=...}` series,
/// `_sum` and `_count`.
///
/// Written by hand rather than with swift-metrics and swift-prometheus: the
/// format is small, the agent must stay free of NIO anyway, and every package
/// dependency costs every build (docs/operations.md, "Metrics and health").
public struct MetricsText: Sendable {
    public enum Kind: String, Sendable {
        case counter, gauge, histogram
    }

    public struct Sample: Sendable {
        public var labels: [(String, String)]
        /// The value as written: integers exactly, whatever their size.
        public var value: String

        public init(_ labels: [(String, String)] = [], _ value: Double) {
            self.labels = labels
            self.value = MetricsText.format(value)
        }

        public init<I: BinaryInteger>(_ labels: [(String, String)] = [], _ value: I) {
            self.labels = labels
            self.value = String(value)
        }

        /// Labels already written as `{name="value",...}` (or "" for none).
        public init<I: BinaryInteger>(rawLabels: String, _ value: I) {
            self.labels = []
            self.rawLabels = rawLabels
            self.value = String(value)
        }

        public var rawLabels = ""
    }

    private var lines: [String] = []

    public init() {}

    /// One family. `samples` empty: one unlabelled sample of 0 when
    /// `unlabelled`, else only HELP and TYPE (a labelled family with no
    /// series yet).
    public mutating func add(_ name: String, _ kind: Kind, _ help: String, _ samples: [Sample], unlabelled: Bool = false) {
        precondition(kind != .counter || name.hasSuffix("_total"), "counter \(name) must end in _total")
        precondition(kind != .histogram, "histogram \(name): add(_:_:histogram:) writes histograms")
        lines.append("# HELP \(name) \(Self.escapeHelp(help))")
        lines.append("# TYPE \(name) \(kind.rawValue)")
        if samples.isEmpty && unlabelled {
            lines.append("\(name) 0")
            return
        }
        for sample in samples {
            if sample.labels.isEmpty {
                lines.append("\(name)\(sample.rawLabels) \(sample.value)")
            } else {
                let labels = sample.labels.map { "\($0.0)=\"\(Self.escapeLabel($0.1))\"" }.joined(separator: ",")
                lines.append("\(name){\(labels)} \(sample.value)")
            }
        }
    }

    /// One unlabelled value.
    public mutating func add(_ name: String, _ kind: Kind, _ help: String, _ value: Double) {
        add(name, kind, help, [Sample([], value)])
    }

    public mutating func add<I: BinaryInteger>(_ name: String, _ kind: Kind, _ help: String, _ value: I) {
        add(name, kind, help, [Sample([], value)])
    }

    /// One histogram family with one series per label set (`[]`: one
    /// unlabelled series). An empty histogram writes its buckets at 0, so the
    /// family exists from the start.
    public mutating func add(_ name: String, _ help: String, histogram series: [(labels: [(String, String)], value: MetricsHistogram.Snapshot)]) {
        lines.append("# HELP \(name) \(Self.escapeHelp(help))")
        lines.append("# TYPE \(name) histogram")
        for (labels, h) in series {
            let prefix = labels.map { "\($0.0)=\"\(Self.escapeLabel($0.1))\"," }.joined()
            var cumulative: UInt64 = 0
            for (bound, count) in zip(h.bounds, h.counts) {
                cumulative += count
                lines.append("\(name)_bucket{\(prefix)le=\"\(Self.format(bound))\"} \(cumulative)")
            }
            lines.append("\(name)_bucket{\(prefix)le=\"+Inf\"} \(h.count)")
            let braces = labels.isEmpty ? "" : "{\(prefix.dropLast())}"
            lines.append("\(name)_sum\(braces) \(Self.format(h.sum))")
            lines.append("\(name)_count\(braces) \(h.count)")
        }
    }

    /// One unlabelled histogram.
    public mutating func add(_ name: String, _ help: String, histogram: MetricsHistogram) {
        add(name, help, histogram: [([], histogram.snapshot)])
    }

    public var text: String { lines.isEmpty ? "" : lines.joined(separator: "\n") + "\n" }

    public static func escapeLabel(_ value: String) -> String {
        var out = ""
        for c in value {
            switch c {
            case "\\": out += "\\\\"
            case "\"": out += "\\\""
            case "\n": out += "\\n"
            default: out.append(c)
            }
        }
        return out
    }

    static func escapeHelp(_ text: String) -> String {
        text.replacingAll("\\", with: "\\\\").replacingAll("\n", with: "\\n")
    }

    /// Integers without a fraction (counters stay exact up to 2^53), the rest as Swift prints them.
    static func format(_ value: Double) -> String {
        if value.isNaN { return "NaN" }
        if value.isInfinite { return value > 0 ? "+Inf" : "-Inf" }
        if value == value.rounded(), abs(value) < 9.0e15 { return String(Int64(value)) }
        return "\(value)"
    }
}

extension String {
    fileprivate func replacingAll(_ target: Character, with replacement: String) -> String {
        var out = ""
        for c in self { if c == target { out += replacement } else { out.append(c) } }
        return out
    }
}
