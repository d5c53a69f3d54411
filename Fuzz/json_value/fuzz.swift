// JSON text into a JSONValue (Sources/TapioWire/JSONValue.swift) and back:
// what the CLI does with a query answer and the server with stored details.
//
// Input: JSON text (or anything else).
import TapioWire

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard let value = try? JSONValue.parse(bytes(data, size)) else { return 0 }
    _ = value.stringValue
    _ = value.intValue
    _ = value.arrayValue
    _ = value["kind"]
    for pretty in [false, true] {
        let text = value.serialized(pretty: pretty)
        guard let again = try? JSONValue.parse(Array(text.utf8)) else {
            fatalError("serialized JSON does not parse: \(text)")
        }
        require(jsonEquivalent(again, value), "JSON changes in a serialize/parse round trip: \(text)")
    }
    return 0
}
