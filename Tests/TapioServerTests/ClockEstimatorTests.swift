import TapioServer
import XCTest

final class ClockEstimatorTests: XCTestCase {
    func testOffsetAndErrorFromOneExchange() throws {
        var c = ClockEstimator()
        // Agent 250 ms ahead; 2 ms each way; agent holds it 1 ms.
        let t1: Int64 = 1_000_000_000
        let t2 = t1 + 2_000_000 + 250_000_000
        let t3 = t2 + 1_000_000
        let t4 = t3 - 250_000_000 + 2_000_000
        XCTAssertTrue(c.add(t1: t1, t2: t2, t3: t3, t4: t4))
        let correction = try XCTUnwrap(c.correction)
        XCTAssertEqual(correction.offsetNs, 250_000_000)
        XCTAssertEqual(correction.errorNs, 2_000_000)
    }

    func testLowestDelaySampleWinsAndAsymmetryStaysWithinTheBound() throws {
        var c = ClockEstimator()
        let trueOffset: Int64 = -400_000_000
        // A slow, asymmetric exchange (9 ms out, 1 ms back)...
        c.add(t1: 0, t2: 9_000_000 + trueOffset, t3: 9_000_000 + trueOffset, t4: 10_000_000)
        // ...then a fast symmetric one.
        c.add(t1: 100_000_000, t2: 100_100_000 + trueOffset, t3: 100_100_000 + trueOffset, t4: 100_200_000)
        let correction = try XCTUnwrap(c.correction)
        XCTAssertEqual(correction.offsetNs, trueOffset)
        XCTAssertEqual(correction.errorNs, 100_000)
        // The slow sample alone was 4 ms off: inside its own ±5 ms bound.
        var slow = ClockEstimator()
        slow.add(t1: 0, t2: 9_000_000 + trueOffset, t3: 9_000_000 + trueOffset, t4: 10_000_000)
        let s = try XCTUnwrap(slow.correction)
        XCTAssertLessThanOrEqual(abs(s.offsetNs - trueOffset), s.errorNs)
    }

    func testInconsistentSamplesAreIgnoredAndOldOnesAge() {
        var c = ClockEstimator(window: 2)
        XCTAssertFalse(c.add(t1: 10, t2: 5, t3: 4, t4: 12), "t3 before t2")
        XCTAssertNil(c.correction)
        c.add(t1: 0, t2: 1, t3: 1, t4: 2)
        c.add(t1: 10, t2: 20, t3: 20, t4: 30)
        c.add(t1: 40, t2: 50, t3: 50, t4: 60)
        XCTAssertEqual(c.samples.count, 2)
        XCTAssertEqual(c.correction?.errorNs, 10, "the 2 ns sample aged out")
    }
}
