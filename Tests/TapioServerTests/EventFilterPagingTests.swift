@testable import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// Filters the store does not apply itself (`pods`, `podPrefix`) are applied
/// after it, page by page: the answer is the same as filtering every stored
/// event, whatever the page size, also when many events share one time.
final class EventFilterPagingTests: XCTestCase {
    func testPagedFilteringAnswersAsFilteringEveryEvent() throws {
        let h = try ServerHarness(nodes: ["node-a"])
        let (outbox, sender) = try h.agent(node: "node-a")
        defer { sender.drainAndStop(graceSeconds: 0) }
        let t0 = wallClockNs() - 60_000_000_000
        let pods = ["api-1", "web-1", "api-2", "web-2", "web-3"]
        for i in 0..<40 {
            // Runs of four events at one time, so pages end inside a run.
            let time = t0 + Int64(i / 4) * 1_000_000
            outbox.add(TapioEvent(kind: .processExit, timeNs: time, pid: UInt32(1000 + i), comm: "p", pod: pods[(i * 7) % pods.count],
                                  namespace: "shop", detail: .exit(exitCode: 0, signal: 0, coreDumped: false)))
        }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        let all = try h.server.store.events(EventQuery(limit: 1000))
        XCTAssertEqual(all.count, 40)

        for (prefix, names) in [("api-", nil), (nil, ["web-1", "web-3"]), ("web", ["web-2", "api-1"]), ("zzz", nil)] as [(String?, [String]?)] {
            for limit in [1, 2, 3, 5, 8, 40] {
                for pageSize in [1, 3, 4, 7, 100] {
                    let query = EventQuery(pods: names, podPrefix: prefix, limit: limit)
                    let expected = Array(all.filter(query.matches).suffix(limit)).map(\.pid)
                    let got = try QueryExecutor.filtered(query, store: h.server.store, scanLimit: 1000, pageSize: pageSize).map(\.pid)
                    XCTAssertEqual(Set(got), Set(expected), "prefix \(prefix ?? "-") pods \(names ?? []) limit \(limit) page \(pageSize)")
                    XCTAssertEqual(got.count, expected.count)
                }
            }
        }
    }
}
