import Foundation
import TapioWire
import XCTest

/// IPAddress keeps two integers, not a byte array: its bytes, text, order,
/// equality and encoding are those of the bytes.
final class IPAddressTests: XCTestCase {
    let samples = ["0.0.0.0", "10.0.2.7", "10.0.2.70", "255.255.255.255", "1.2.3.4", "::", "::1", "fd00::7", "fe80::1:2:3:4",
                   "a00:207::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db8::ff00:42:8329"]

    func testBytesAndTextRoundTrip() throws {
        for text in samples {
            let a = try XCTUnwrap(IPAddress(text), text)
            XCTAssertEqual(a.description, text, "text of \(text)")
            XCTAssertEqual(IPAddress(bytes: a.bytes), a)
            XCTAssertEqual(a.bytes.count, a.isIPv4 ? 4 : 16)
            XCTAssertEqual(a.isUnspecified, a.bytes.allSatisfy { $0 == 0 })
            let decoded = try JSONDecoder().decode(IPAddress.self, from: JSONEncoder().encode(a))
            XCTAssertEqual(decoded, a)
        }
        XCTAssertEqual(IPAddress("10.0.2.7")?.bytes, [10, 0, 2, 7])
        XCTAssertNil(IPAddress(bytes: [1, 2, 3]))
        XCTAssertThrowsError(try JSONDecoder().decode(IPAddress.self, from: Data(#"{"bytes":[1,2,3]}"#.utf8)))
    }

    func testAMappedIPv6AddressIsItsIPv4Address() throws {
        let raw: [UInt8] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 2, 7]
        XCTAssertEqual(IPAddress(family: 10, raw: raw), IPAddress("10.0.2.7"))
        XCTAssertEqual(IPAddress(family: 2, raw: [10, 0, 2, 7, 9, 9]), IPAddress("10.0.2.7"))
    }

    func testOrderAndEqualityAreThoseOfTheBytes() throws {
        let all = try samples.map { try XCTUnwrap(IPAddress($0)) }
        for a in all {
            for b in all {
                XCTAssertEqual(a < b, a.bytes.lexicographicallyPrecedes(b.bytes), "\(a) < \(b)")
                XCTAssertEqual(a == b, a.bytes == b.bytes, "\(a) == \(b)")
                if a == b { XCTAssertEqual(a.hashValue, b.hashValue) }
            }
        }
        // 10.0.2.7 and 0a00:0207:: share their first four bytes: the shorter first.
        XCTAssertLessThan(try XCTUnwrap(IPAddress("10.0.2.7")), try XCTUnwrap(IPAddress("a00:207::")))
    }
}
