// Every top-level message other than EventBatch (Fuzz/event_batch has that
// one) decoded from untrusted bytes into the Swift model
// (Sources/TapioWire/Messages.swift).
//
// Input: byte 0 selects the message, the rest is its payload. A payload that
// decodes must encode to something that decodes to the same value.
import TapioWire

private func check<M: Equatable>(_ bytes: [UInt8], _ decode: ([UInt8]) throws -> M, _ encode: (M) -> [UInt8]) {
    guard let value = try? decode(bytes) else { return }
    let again: M
    do {
        again = try decode(encode(value))
    } catch {
        fatalError("a decoded \(M.self) does not decode after encoding: \(error)")
    }
    require(again == value, "\(M.self) changes in an encode/decode round trip")
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    guard size > 0 else { return 0 }
    let payload = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    switch data[0] % 10 {
    case 0: check(payload, Hello.decode) { $0.encoded() }
    case 1: check(payload, HelloAck.decode) { $0.encoded() }
    case 2: check(payload, Ack.decode) { $0.encoded() }
    case 3: check(payload, TimeSync.decode) { $0.encoded() }
    case 4: check(payload, Heartbeat.decode) { $0.encoded() }
    case 5: check(payload, WireError.decode) { $0.encoded() }
    case 6: check(payload, Goodbye.decode) { $0.encoded() }
    case 7: check(payload, QueryRequest.decode) { $0.encoded() }
    case 8:
        check(payload, QueryResponse.decode) { $0.encoded() }
        // The CLI parses the JSON of a response.
        if let response = try? QueryResponse.decode(payload), let json = try? JSONValue.parse(response.json) {
            _ = json.serialized(pretty: true)
        }
    default:
        check(payload, Inventory.decode) { $0.encoded() }
    }
    return 0
}
