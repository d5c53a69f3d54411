@testable import TapioClickHouse
import XCTest

/// The text forms without a server: what the ClickHouse tests rely on.
final class TabSeparatedTests: XCTestCase {
    static let hostile = [
        "", "plain", "tab\there", "new\nline", "cr\r", "quote'd", "double\"", "back\\slash", "\\N", "\\x27", "\\t literal",
        "nul\u{0}byte", "é ü ß", "\u{FFFD}\u{FFFD}", "😀 emoji", String(repeating: "long-", count: 10_000), "\\", "'", "\t\n\\'",
    ]

    func testEveryStringSurvivesARowAndBack() throws {
        var data: [UInt8] = []
        for s in Self.hostile { TabSeparated.appendRow([s, "x", s], to: &data) }
        let rows = try TabSeparated.rows(data, columns: 3)
        XCTAssertEqual(rows.map { $0[0] }, Self.hostile)
        XCTAssertEqual(rows.map { $0[2] }, Self.hostile)
        XCTAssertEqual(rows.map { $0[1] }, Array(repeating: "x", count: Self.hostile.count))
    }

    func testClickHousesOwnEscapesAreRead() throws {
        // As 18.16 writes them: \' for a quote, \b \f, and \xHH from other writers.
        let rows = try TabSeparated.rows(Array("a\\'b\\\\c\\td\t\\b\\f\\x41\\x7e\n".utf8), columns: 2)
        XCTAssertEqual(rows, [["a'b\\c\td", "\u{8}\u{C}A~"]])
    }

    func testARowWithTheWrongNumberOfFieldsIsAnError() {
        XCTAssertThrowsError(try TabSeparated.rows(Array("a\tb\n".utf8), columns: 3)) { error in
            XCTAssertEqual("\(error)", "row 1 has 2 fields, expected 3")
        }
        XCTAssertThrowsError(try TabSeparated.rows(Array("a\tb".utf8), columns: 2))
        XCTAssertThrowsError(try TabSeparated.rows(Array("a\\".utf8), columns: 1))
        XCTAssertThrowsError(try TabSeparated.rows(Array("a\\xZZ\n".utf8), columns: 1))
    }

    func testStringLiteralsEscapeWhatEndsThem() {
        XCTAssertEqual(sqlString("it's a \\ test\n"), "'it\\'s a \\\\ test\\n'")
        XCTAssertEqual(sqlString("plain"), "'plain'")
    }

    func testClickHouseErrorTextsOfOldAndNewServersAreReadAsCodeAndMessage() {
        let old = ClickHouseError.parse(body: "Code: 60, e.displayText() = DB::Exception: Table default.nope doesn't exist., e.what() = DB::Exception\n")
        XCTAssertEqual(old.code, 60)
        XCTAssertEqual(old.message, "Table default.nope doesn't exist.")
        let new = ClickHouseError.parse(body: "Code: 60. DB::Exception: Table default.nope does not exist. (UNKNOWN_TABLE) (version 23.8.1.1)\n")
        XCTAssertEqual(new.code, 60)
        XCTAssertEqual(new.message, "Table default.nope does not exist. (UNKNOWN_TABLE)")
        XCTAssertEqual(ClickHouseError.parse(body: "").message, "(no message)")
    }

    func testDaysAreUTCDatesWithinWhatADateHolds() {
        XCTAssertEqual(ClickHouseEventStore.dateText(days: ClickHouseEventStore.day(ns: 0)), "1970-01-01")
        XCTAssertEqual(ClickHouseEventStore.dateText(days: ClickHouseEventStore.day(ns: 1_796_601_599_999_999_999)), "2026-12-06")
        XCTAssertEqual(ClickHouseEventStore.dateText(days: ClickHouseEventStore.day(ns: 1_796_601_600_000_000_000)), "2026-12-07")
        XCTAssertEqual(ClickHouseEventStore.dateText(days: ClickHouseEventStore.day(ns: -1)), "1970-01-01")
        XCTAssertEqual(ClickHouseEventStore.dateText(days: ClickHouseEventStore.day(ns: .max)), "2105-12-31")
        XCTAssertEqual(ClickHouseEventStore.dateText(days: 11_016), "2000-02-29")
    }
}
