import NIOCore
import TapioWire

/// Cuts the TLS plaintext into frames. The header is validated (magic,
/// version, type, and the length against the maximum) before any payload is
/// buffered; a bad header fails the channel, which closes that one connection.
public struct FrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = Frame

    public let maximumPayload: UInt32

    public init(maximumPayload: UInt32) {
        self.maximumPayload = maximumPayload
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard buffer.readableBytes >= FrameHeader.size,
              let headerBytes = buffer.getBytes(at: buffer.readerIndex, length: FrameHeader.size)
        else { return .needMoreData }
        let header = try FrameHeader.parse(headerBytes, maximumPayload: maximumPayload)
        guard buffer.readableBytes >= FrameHeader.size + Int(header.length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: FrameHeader.size)
        let payload = buffer.readBytes(length: Int(header.length))!
        context.fireChannelRead(wrapInboundOut(Frame(type: header.type, payload: payload)))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue {}
        return .needMoreData
    }
}

public struct FrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = Frame

    public init() {}

    public func encode(data: Frame, out: inout ByteBuffer) throws {
        var header: [UInt8] = []
        FrameHeader(type: data.type, length: UInt32(data.payload.count)).write(into: &header)
        out.writeBytes(header)
        out.writeBytes(data.payload)
    }
}
