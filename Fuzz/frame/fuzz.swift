// Frame header decoding and stream reassembly (Sources/TapioWire/Frame.swift),
// as the agent's reader and the server's decoder use them on untrusted bytes.
//
// Input: byte 0 picks the maximum payload the receiver allows and how the rest
// is split into pieces; the rest is the byte stream.
import TapioWire

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = bytes(data, size)
    guard let control = input.first else { return 0 }
    let stream = Array(input.dropFirst())
    let maximums: [UInt32] = [0, 1, 16, 4096, FrameHeader.defaultMaximumPayload, UInt32.max]
    let maximum = maximums[Int(control & 0x07) % maximums.count]

    // The header alone: a parsed header writes back to the bytes it came from.
    if stream.count >= FrameHeader.size {
        // Parse from a slice that does not start at index 0, as the NIO decoder does.
        let header = stream[0..<FrameHeader.size]
        if let parsed = try? FrameHeader.parse(header, maximumPayload: maximum) {
            require(parsed.length <= maximum, "accepted a length above the maximum")
            var written: [UInt8] = []
            parsed.write(into: &written)
            require(written == Array(header), "header does not round-trip")
        }
        if stream.count > FrameHeader.size + 1 {
            _ = try? FrameHeader.parse(stream[1..<(1 + FrameHeader.size)], maximumPayload: maximum)
        }
    }

    // The stream, fed in pieces of a size the control byte picks (1…16 bytes,
    // or all at once), read frame by frame until it needs more or throws.
    let piece = control >> 4 == 0 ? max(stream.count, 1) : Int(control >> 4)
    var assembler = FrameAssembler(maximumPayload: maximum)
    var frames: [Frame] = []
    var offset = 0
    var failed = false
    while offset < stream.count && !failed {
        let end = min(offset + piece, stream.count)
        assembler.append(stream[offset..<end])
        offset = end
        do {
            while let frame = try assembler.next() {
                require(frame.payload.count <= Int(maximum), "frame above the maximum")
                frames.append(frame)
            }
        } catch {
            failed = true
        }
    }
    // Every frame read re-encodes to the bytes it was read from.
    if !failed {
        var consumed = 0
        for frame in frames {
            let bytes = frame.encoded()
            let original = Array(stream[consumed..<(consumed + bytes.count)])
            // Flags are carried in the header but not kept in a Frame.
            var expected = original
            expected[4] = 0
            require(bytes == expected, "frame does not re-encode to its bytes")
            consumed += bytes.count
        }
    }
    return 0
}
