// EventBatch from untrusted bytes (Sources/TapioWire/Messages.swift), then
// what the server does with every event of a batch it accepted
// (Sources/TapioStore/EventStore.swift): the detail fields as a JSON object,
// serialized, and the event's time in RFC 3339.
//
// Input: the payload of an EventBatch frame, as the agent sends it.
import TapioWire

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = bytes(data, size)

    // The count from the top-level fields alone, and the limited decode.
    let counted = try? EventBatch.eventCount(encoded: input)
    if let counted {
        require(counted >= 0 && counted <= input.count / 2, "\(counted) events counted in \(input.count) bytes")
    }
    let limited = try? EventBatch.decode(input, maxEvents: 16)

    guard let batch = try? EventBatch.decode(input) else {
        require(limited == nil, "decode(_:maxEvents:) accepted what decode(_:) refuses")
        return 0
    }
    // A batch that decodes has exactly the events its top-level fields count,
    // and the limit refuses it exactly when it holds more.
    require(counted == batch.events.count, "eventCount \(String(describing: counted)) for a batch of \(batch.events.count) events")
    require((limited != nil) == (batch.events.count <= 16), "maxEvents 16 misjudged a batch of \(batch.events.count) events")
    if let limited { require(limited == batch, "decode(_:maxEvents:) differs from decode(_:)") }
    if !batch.events.isEmpty {
        require((try? EventBatch.decode(input, maxEvents: batch.events.count - 1)) == nil, "a batch over the limit was accepted")
    }

    // What storing a batch does with each event.
    for event in batch.events {
        let detail = JSONValue.object(event.detailFields)
        let text = detail.serialized()
        _ = rfc3339(ns: event.timeNs)
        _ = event.kind.name
        // The stored detail is read back by queries: it must parse again, to
        // the same values.
        guard let parsed = try? JSONValue.parse(Array(text.utf8)) else {
            fatalError("detail JSON does not parse: \(text)")
        }
        require(jsonEquivalent(parsed, detail), "detail JSON changes when parsed again: \(text)")
    }

    // The agent's own encoding of what was decoded decodes to the same batch.
    let again: EventBatch
    do {
        again = try EventBatch.decode(batch.encoded())
    } catch {
        fatalError("a decoded batch does not decode after encoding: \(error)")
    }
    require(again == batch, "EventBatch changes in an encode/decode round trip")
    return 0
}
