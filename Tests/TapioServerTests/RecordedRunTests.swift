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
