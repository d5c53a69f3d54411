import Foundation
import Logging
import NIOCore
import NIOPosix
import Synchronization
import TapioNATS
import TapioTestSupport
import XCTest

/// A fake server on loopback that speaks enough NATS to get through the
/// handshake and then sends what a real server never would: the client must
/// refuse it with a clear error, close only that connection, and not crash.
/// (The one case where the real server cannot be used: it does not misbehave.)
final class MalformedServerTests: XCTestCase {
    /// What the fake server does once a client connected.
    enum Script: Sendable {
        /// INFO, then these bytes instead of a PONG.
        case garbageInHandshake(String)
        /// A normal handshake; at the first SUB, a valid MSG for it written one
        /// byte per TCP write, then these bytes.
        case splitMessageThenGarbage(String)
        /// A normal handshake, then no answer to anything.
        case silentAfterHandshake
    }

    final class Counter: Sendable {
        let value = Mutex(0)
    }

    private final class FakeServer: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        typealias OutboundOut = ByteBuffer
        let script: Script
        let connections: Counter
        private var received = ""
        private var answered = false

        init(script: Script, connections: Counter) {
            self.script = script
            self.connections = connections
        }

        func channelActive(context: ChannelHandlerContext) {
            let info = #"INFO {"server_id":"FAKE","server_name":"fake","version":"0.0.0","max_payload":1048576,"headers":true}"# + "\r\n"
            context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: info)), promise: nil)
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            received += String(buffer: unwrapInboundIn(data))
            switch script {
            case .garbageInHandshake(let garbage):
                if received.contains("PING\r\n"), !answered {
                    answered = true
                    context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: garbage)), promise: nil)
                }
            case .silentAfterHandshake:
                if received.contains("PING\r\n"), !answered {
                    answered = true
                    context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "PONG\r\n")), promise: nil)
                }
            case .splitMessageThenGarbage(let garbage):
                if received.hasPrefix("CONNECT"), received.contains("PING\r\n"), !answered {
                    answered = true
                    context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: "PONG\r\n")), promise: nil)
                }
                guard let range = received.range(of: "SUB split ") else { return }
                let rest = received[range.upperBound...]
                guard let end = rest.firstIndex(of: "\r\n".first!) ?? rest.firstIndex(of: "\r"), let sid = Int(rest[..<end]) else { return }
                received = ""
                let headers = "NATS/1.0\r\nSplit: yes\r\n\r\n"
                let message = "HMSG split \(sid) \(headers.utf8.count) \(headers.utf8.count + 5)\r\n\(headers)hello\r\n"
                for byte in message.utf8 {
                    var one = context.channel.allocator.buffer(capacity: 1)
                    one.writeInteger(byte)
                    context.writeAndFlush(wrapOutboundOut(one), promise: nil)
                }
                context.writeAndFlush(wrapOutboundOut(ByteBuffer(string: garbage)), promise: nil)
            }
        }
    }

    private func withFakeServer(_ script: Script, _ body: (Int, Counter) async throws -> Void) async throws {
        let connections = Counter()
        let group = MultiThreadedEventLoopGroup.singleton
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                connections.value.withLock { $0 += 1 }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(FakeServer(script: script, connections: connections))
                }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        do {
            try await body(channel.localAddress!.port!, connections)
        } catch {
            try? await channel.close()
            throw error
        }
        try await channel.close()
    }

    func testGarbageInsteadOfTheHandshakesPongFailsTheConnectWithTheReason() async throws {
        try await withFakeServer(.garbageInHandshake("HELLO WORLD\r\n")) { port, _ in
            var config = NATSClient.Configuration(servers: [NATSServerAddress(host: "127.0.0.1", port: port)])
            config.connectTimeout = .seconds(5)
            do {
                _ = try await NATSClient.connect(config)
                XCTFail("connected to a server that sent garbage")
            } catch NATSError.cannotConnect(let reasons) {
                XCTAssertEqual(reasons.count, 1)
                XCTAssertTrue(reasons[0].contains("unknown operation 'HELLO WORLD'"), reasons[0])
            }
        }
    }

    func testASplitMessageArrivesWholeAndGarbageAfterItClosesOnlyThatConnection() async throws {
        try await withFakeServer(.splitMessageThenGarbage("MSG split 2 not-a-size\r\n")) { port, connections in
            var config = NATSClient.Configuration(servers: [NATSServerAddress(host: "127.0.0.1", port: port)])
            config.reconnect = .rounds(1)
            config.reconnectWait = .milliseconds(50)
            var logger = Logger(label: "tapio.nats.test")
            logger.logLevel = .critical
            let client = try await NATSClient.connect(config, logger: logger)
            let subscription = try client.subscribe("split")
            let message = await receive(1, from: subscription).first
            XCTAssertEqual(message?.string, "hello")
            XCTAssertEqual(message?.headers?["Split"], "yes")
            // Then the garbage: that connection closes with the decoder's reason,
            // and the client reconnects (to the same fake server) and resubscribes.
            let reconnected = eventually(timeout: 20) { client.reconnectCount >= 1 }
            XCTAssertTrue(reconnected, "no reconnect after the garbage; last error: \(String(describing: client.lastError))")
            guard case NATSError.protocolViolation(let why)? = client.lastError as? NATSError else {
                return XCTFail("last error: \(String(describing: client.lastError))")
            }
            XCTAssertTrue(why.contains("size 'not-a-size' is not a number"), why)
            XCTAssertGreaterThanOrEqual(connections.value.withLock { $0 }, 2)
            // The resubscription got the split message again on the new connection.
            let again = await receive(1, from: subscription).first
            XCTAssertEqual(again?.string, "hello")
            await client.close()
            XCTAssertTrue(client.isClosed)
        }
    }

    func testAServerThatStopsAnsweringPingsIsDroppedAfterTheAllowedNumber() async throws {
        try await withFakeServer(.silentAfterHandshake) { port, _ in
            var config = NATSClient.Configuration(servers: [NATSServerAddress(host: "127.0.0.1", port: port)])
            config.pingInterval = .milliseconds(100)
            config.maxPingsOutstanding = 2
            config.reconnect = .off
            var logger = Logger(label: "tapio.nats.test")
            logger.logLevel = .critical
            let client = try await NATSClient.connect(config, logger: logger)
            let closed = eventually(timeout: 10) { client.isClosed }
            XCTAssertTrue(closed, "the client stayed on a server that answers no PING")
            guard case NATSError.timeout(let what)? = client.lastError as? NATSError else {
                return XCTFail("last error: \(String(describing: client.lastError))")
            }
            XCTAssertTrue(what.contains("2 PINGs"), what)
            do {
                try await client.publish("x", string: "after close")
                XCTFail("published on a closed client")
            } catch NATSError.closed {}
        }
    }
}
