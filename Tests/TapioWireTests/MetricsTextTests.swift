import Foundation
import TapioWire
import XCTest

/// The hand-written Prometheus text renderer: histograms as Prometheus reads
/// them, and the process families from /proc/self.
final class MetricsTextTests: XCTestCase {
    func testAHistogramIsWrittenWithCumulativeBucketsInclusiveUpperBoundsSumAndCount() {
        let h = MetricsHistogram(bounds: [0.1, 1, 10])
        for v in [0.05, 0.1, 0.5, 1, 20] { h.observe(v) }
        var m = MetricsText()
        m.add("tapio_test_seconds", "A test.", histogram: h)
        XCTAssertEqual(m.text, """
            # HELP tapio_test_seconds A test.
            # TYPE tapio_test_seconds histogram
            tapio_test_seconds_bucket{le="0.1"} 2
            tapio_test_seconds_bucket{le="1"} 4
            tapio_test_seconds_bucket{le="10"} 4
            tapio_test_seconds_bucket{le="+Inf"} 5
            tapio_test_seconds_sum 21.65
            tapio_test_seconds_count 5

            """)
    }

    func testAnEmptyHistogramExistsAtZeroAndLabelsComeBeforeLe() {
        var m = MetricsText()
        m.add("tapio_test_seconds", "A test.", histogram: [([("method", "events")], MetricsHistogram(bounds: [1]).snapshot)])
        XCTAssertEqual(m.text, """
            # HELP tapio_test_seconds A test.
            # TYPE tapio_test_seconds histogram
            tapio_test_seconds_bucket{method="events",le="1"} 0
            tapio_test_seconds_bucket{method="events",le="+Inf"} 0
            tapio_test_seconds_sum{method="events"} 0
            tapio_test_seconds_count{method="events"} 0

            """)
    }

    func testNanosecondsAreObservedInSeconds() {
        let h = MetricsHistogram(bounds: [0.001, 1])
        h.observe(nanoseconds: 2_000_000)
        XCTAssertEqual(h.snapshot.counts, [0, 1])
        XCTAssertEqual(h.snapshot.sum, 0.002, accuracy: 1e-12)
    }

    func testTheProcessFamiliesAreReadFromProc() throws {
        var m = MetricsText()
        m.addProcessMetrics()
        func value(_ name: String) -> Double? {
            m.text.split(separator: "\n").first { $0.hasPrefix(name + " ") }.flatMap { Double($0.split(separator: " ")[1]) }
        }
        XCTAssertGreaterThan(value("process_resident_memory_bytes") ?? 0, 1_048_576)
        XCTAssertGreaterThan(value("process_open_fds") ?? 0, 2)
        XCTAssertGreaterThanOrEqual(value("process_max_fds") ?? 0, value("process_open_fds") ?? .infinity)
        XCTAssertNotNil(value("process_cpu_seconds_total"))
        // Started in the past, after 2020.
        let start = try XCTUnwrap(value("process_start_time_seconds"))
        XCTAssertGreaterThan(start, 1_577_836_800)
        XCTAssertLessThanOrEqual(start, Date().timeIntervalSince1970 + 1)
        XCTAssertTrue(m.text.contains("# TYPE process_cpu_seconds_total counter\n"))
    }
}
