import Foundation
import TapioCorrelation
import TapioServer
import TapioWire
import XCTest

/// Recorded lab runs (lab/recordings, made by scripts/record-lab-run.py from
/// `tapio-lab` runs on real kernels) replayed through the engine: every fault
/// is answered right at the top, nothing is opened before the fault or on the
/// healthy run, and the replay does not depend on the order events arrived in.
final class RecordedRunTests: XCTestCase {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../../lab/recordings").standardized.path

    func loadAll() throws -> [RecordedRun] {
        let runs = try RecordedRun.loadAll(directory: RecordedRunTests.directory)
        let scenarios = URL(fileURLWithPath: RecordedRunTests.directory).deletingLastPathComponent().appendingPathComponent("scenarios").path
        let names = try FileManager.default.contentsOfDirectory(atPath: scenarios).filter { $0.hasSuffix(".json") }.map { String($0.dropLast(5)) }
        XCTAssertGreaterThanOrEqual(names.count, 16)
        for name in names { XCTAssertTrue(runs.contains { $0.scenario == name }, "no recording of scenario \(name) in \(RecordedRunTests.directory)") }
        return runs
    }

    func testEveryRecordedFaultIsAnsweredAtTheTop() throws {
        for run in try loadAll() {
            XCTAssertGreaterThan(run.log.events.count, 500, "\(name): the recording has its events")
            let engine = run.log.replay()
            let ranked = run.ranked(engine)
            let name = run.name
            let shown = ranked.prefix(3).map { "\($0.entity)/\($0.kind.rawValue) \(String(format: "%.2f", $0.confidence))" }
            if run.isHealthy {
                XCTAssertEqual(engine.incidents.count, 0, "\(name): \(engine.incidents.map(\.title))")
                continue
            }
            XCTAssertEqual(run.accuracy(ranked, k: 1), 1, "\(name): top-1 \(shown), expected \(run.expected)")
            XCTAssertEqual(run.accuracy(ranked, k: 3), 1, "\(name): top-3 \(shown), expected \(run.expected)")
            let early = engine.incidents.filter { $0.openedNs < (run.faultNs ?? .min) - 5_000_000_000 }
            XCTAssertEqual(early.count, 0, "\(name): incidents before the fault: \(early.map(\.title))")
            if let top = ranked.first { XCTAssertGreaterThan(top.confidence, 0.5, "\(name): \(shown)") }
        }
    }

    /// The same log in any arrival order gives the same incidents (the engine
    /// orders by corrected time), and a second replay gives the same bytes.
    func testReplayIsDeterministicAndOrderFree() throws {
        let runs = try loadAll()
        for name in ["cascade", "clock-skew", "noisy-neighbour"] {
            guard let run = runs.first(where: { $0.scenario == name }) else { return XCTFail("no recording of \(name)") }
            let once = run.log.replay().incidentsJSON().serialized()
            XCTAssertEqual(run.log.replay().incidentsJSON().serialized(), once, name)
            var shuffled = run.log
            var rng = SeededGenerator(seed: 20261127)  // reproducible when it fails
            shuffled.events.shuffle(using: &rng)
            XCTAssertEqual(shuffled.replay().incidentsJSON().serialized(), once, "\(name): shuffled arrival")
        }
    }

    /// Deciding within the bucket (`decideWithinBucket`) changes when, not
    /// what: each recording replayed as a live server would see it (events
    /// given to the engine as they arrived, a pass every 250 ms) ends with
    /// the same answers as the replay of the whole log, the right top-1
    /// comes no later than with decisions only at a bucket's end, and no
    /// page names a wrong entity at any pass that did not without it. (Live,
    /// the healthy runs once paged the first rolling restart at its
    /// resolution, when the next restart's close 30 s later made it look
    /// unfinished; the batch replay never showed it.)
    func testDecidingWithinTheBucketChangesWhenNotWhat() throws {
        struct Live {
            var correctS: Double?
            /// After the first kernel event of the right answer (its candidate's first evidence).
            var afterEvidenceS: Double?
            var falsePages: Set<String> = []
            var ranked: [String] = []
        }
        func live(_ run: RecordedRun, early: Bool) -> Live {
            var c = CorrelationConfiguration()
            c.decideWithinBucket = early
            var out = Live()
            let engine = run.log.replayLive(configuration: c) { t, engine in
                let ranked = run.ranked(engine)
                if out.correctS == nil, !run.isHealthy, let f = run.faultNs, run.accuracy(ranked, k: 1) == 1 {
                    out.correctS = Double(t - f) / 1e9
                    out.afterEvidenceS = Double(t - ranked[0].firstSeenNs) / 1e9
                }
                // A page naming another entity than the fault's (on a healthy
                // run: any page). A crash paged at the entity that then
                // crash-loops is the right page, refined later.
                for inc in run.scoredIncidents(engine) where inc.pages {
                    if let top = inc.rootCauses.first, run.expected.contains(where: { $0.entity == top.entity }) { continue }
                    out.falsePages.insert("\(inc.id) \(inc.rootCauses.first.map { "\($0.entity)/\($0.kind.rawValue)" } ?? "-")")
                }
            }
            out.ranked = run.ranked(engine).prefix(3).map { "\($0.entity)/\($0.kind.rawValue)" }
            return out
        }
        var sooner: [Double] = [], later: [Double] = [], soonerAfterEvidence: [Double] = [], laterAfterEvidence: [Double] = []
        for run in try loadAll() {
            let batch = run.ranked(run.log.replay()).prefix(3).map { "\($0.entity)/\($0.kind.rawValue)" }
            let (a, b) = (live(run, early: true), live(run, early: false))
            XCTAssertEqual(a.ranked, batch, "\(run.name): deciding within the bucket, live")
            XCTAssertEqual(b.ranked, batch, "\(run.name): deciding at the bucket's end, live")
            XCTAssertTrue(a.falsePages.isSubset(of: b.falsePages), "\(run.name): pages only with early decisions: \(a.falsePages.subtracting(b.falsePages))")
            if run.isHealthy { XCTAssertEqual(a.falsePages, [], "\(run.name)") }
            guard !run.isHealthy else { continue }
            guard let s = a.correctS, let l = b.correctS else {
                XCTFail("\(run.name): the right top-1 never came live (within the bucket \(String(describing: a.correctS)), at its end \(String(describing: b.correctS)))")
                continue
            }
            XCTAssertLessThanOrEqual(s, l, "\(run.name): deciding within the bucket was later")
            sooner.append(s)
            later.append(l)
            soonerAfterEvidence.append(a.afterEvidenceS ?? .nan)
            laterAfterEvidence.append(b.afterEvidenceS ?? .nan)
        }
        func median(_ x: [Double]) -> Double { let y = x.sorted(); return y.isEmpty ? .nan : y[y.count / 2] }
        print(String(format: "right top-1, live replay of %d fault recordings, median: %.2f s after the fault was injected and %.2f s after the answer's first kernel event deciding within the bucket; %.2f s and %.2f s at its end",
                     sooner.count, median(sooner), median(soonerAfterEvidence), median(later), median(laterAfterEvidence)))
    }

    /// The weights are the ones the calibration chose: the Brier score of the
    /// top-1 confidence over the recordings stays where docs/correlation.md
    /// says it is.
    func testTopOneConfidenceIsCalibrated() throws {
        var total = 0.0
        let runs = try loadAll()
        for run in runs { total += run.topOneBrier(run.ranked(run.log.replay())) }
        XCTAssertLessThan(total / Double(runs.count), 0.1, "Brier score of the top-1 confidence over the recordings")
    }
}

/// SplitMix64: a seeded generator, so a failing shuffle can be replayed.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
