import CTapioTLS
import Foundation
import NIOCore
import NIOPosix
import NIOSSL
import TapioWire

/// The ingest benchmark's two halves (`tapio-server bench-ingest`,
/// `tapio-server bench-sink`; `make bench` with BENCH=ingest):
///
/// - a load generator that speaks the real protocol the way agents do — the
///   agent's OpenSSL client (CTapioTLS), its own node certificate per
///   simulated agent, protocol-2 hello, an inventory, time-sync answers, then
///   batches of a realistic mix of kinds with pods and aggregates within the
///   server's window — and counts acknowledgements and their latency;
/// - a decode-only sink: TLS, frames, `EventBatch.decode`, an ack at once —
///   the ceiling any server with this wire can reach on this machine.
///
/// Batches are encoded once per agent (a few templates) and stamped with
/// their sequence and base time when sent (two protobuf fields appended:
/// the last occurrence of a scalar field wins), so the generator costs
/// little next to what it measures.
public enum IngestBench {
    public struct Agent: Sendable {
        public var node: String
        public var tls: TLSFiles
        public init(node: String, tls: TLSFiles) {
            self.node = node
            self.tls = tls
        }
    }

    public struct Options: Sendable {
        public var host = "127.0.0.1"
        public var port: UInt16 = 7400
        public var serverName: String? = "localhost"
        public var agents: [Agent] = []
        public var seconds: Double = 10
        public var batchEvents = 512
        /// Events per second over all agents; nil: as fast as acks allow.
        public var rate: Double?
        public init() {}
    }

    public struct Result: Sendable {
        public var seconds: Double = 0
        public var batchesSent = 0
        public var batchesAcked = 0
        public var eventsAcked = 0
        public var wireBytes = 0
        public var batchEvents = 512
        /// Ack latency of every acknowledged batch, ns.
        public var latenciesNs: [Int64] = []
        public var errors: [String] = []

        public func percentile(_ p: Double) -> Double {
            guard !latenciesNs.isEmpty else { return .nan }
            let sorted = latenciesNs.sorted()
            return Double(sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]) / 1e6
        }

        /// `key=value` lines for scripts/bench.sh, then nothing else.
        public var report: String {
            let rate = seconds > 0 ? Double(eventsAcked) / seconds : 0
            return String(format: "seconds=%.2f\nbatches_sent=%d\nbatches_acked=%d\nevents_acked=%d\nevents_per_second=%.0f\nack_p50_ms=%.1f\nack_p99_ms=%.1f\nwire_bytes_per_event=%.1f\nerrors=%d\n",
                          seconds, batchesSent, batchesAcked, eventsAcked, rate, percentile(0.5), percentile(0.99),
                          batchesSent == 0 ? 0 : Double(wireBytes) / Double(batchesSent * batchEvents), errors.count)
                + errors.prefix(4).map { "error=\($0)\n" }.joined()
        }
    }

    /// Runs every agent on its own thread for `options.seconds`, then waits
    /// (at most 10 s) for the acks of what was sent.
    public static func run(_ options: Options) -> Result {
        let results = Results()
        let start = DispatchTime.now().uptimeNanoseconds
        let threads = options.agents.enumerated().map { (i, agent) in
            Thread {
                var r = Result()
                do { try runAgent(agent, index: i, options: options, into: &r) } catch { r.errors.append("\(agent.node): \(error)") }
                results.append(r)
            }
        }
        for t in threads { t.start() }
        while results.all.count < threads.count { usleep(20_000) }
        var total = Result()
        total.batchEvents = options.batchEvents
        total.seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        for r in results.all {
            total.batchesSent += r.batchesSent
            total.batchesAcked += r.batchesAcked
            total.eventsAcked += r.eventsAcked
            total.wireBytes += r.wireBytes
            total.latenciesNs += r.latenciesNs
            total.errors += r.errors
            total.seconds = min(total.seconds, r.seconds > 0 ? r.seconds : total.seconds)
        }
        return total
    }

    private final class Results: @unchecked Sendable {
        private let lock = NSLock()
        private var list: [Result] = []
        func append(_ r: Result) { lock.withLock { list.append(r) } }
        var all: [Result] { lock.withLock { list } }
    }

    struct BenchError: Error, CustomStringConvertible {
        var description: String
        init(_ d: String) { description = d }
    }

    private final class Connection {
        let tls: OpaquePointer
        var assembler = FrameAssembler()
        var buffer = [UInt8](repeating: 0, count: 256 << 10)

        init(_ agent: Agent, options: Options) throws {
            var err = [CChar](repeating: 0, count: 512)
            guard let t = tapio_tls_connect(options.host, options.port, options.serverName, agent.tls.ca, agent.tls.certificate, agent.tls.key, 10_000, &err, err.count) else {
                throw BenchError(String(cBuffer: err))
            }
            tls = t
        }
        deinit { tapio_tls_close(tls) }

        func send(_ type: FrameType, _ payload: [UInt8]) throws {
            let bytes = Frame(type: type, payload: payload).encoded()
            let n = bytes.withUnsafeBytes { tapio_tls_write_all(tls, $0.baseAddress, $0.count, 10_000) }
            guard n == bytes.count else { throw BenchError(String(cString: tapio_tls_error(tls))) }
        }

        func receive(timeoutMs: Int32) throws -> Frame? {
            if let f = try assembler.next() { return f }
            let n = buffer.withUnsafeMutableBytes { tapio_tls_read(tls, $0.baseAddress, $0.count, timeoutMs) }
            switch n {
            case 0: return nil
            case -2: throw BenchError("server closed the connection")
            case ..<0: throw BenchError(String(cString: tapio_tls_error(tls)))
            default:
                assembler.append(buffer[0..<n])
                return try assembler.next()
            }
        }
    }

    private static func runAgent(_ agent: Agent, index: Int, options: Options, into r: inout Result) throws {
        let c = try Connection(agent, options: options)
        let epoch = UInt64(wallClockNs())
        try c.send(.hello, Hello(node: agent.node, agentVersion: "tapio-bench", bootId: UUID().uuidString, capabilities: ["bench"], streamEpoch: epoch).encoded())
        var window = 0
        while window == 0 {
            guard let f = try c.receive(timeoutMs: 10_000) else { throw BenchError("no hello-ack within 10 s") }
            switch f.type {
            case .helloAck: window = max(1, Int(try HelloAck.decode(f.payload).windowBatches))
            case .error: throw BenchError("refused: \(try WireError.decode(f.payload).message)")
            default: continue
            }
        }
        let workload = Workload(node: agent.node, index: index, nodes: options.agents.count)
        try c.send(.inventory, Inventory(pods: workload.pods).encoded())
        let templates = (0..<8).map { workload.batchTemplate(epoch: epoch, seed: UInt64($0), events: options.batchEvents) }

        var sentAt: [UInt64: UInt64] = [:]
        var sequence: UInt64 = 0
        let start = DispatchTime.now().uptimeNanoseconds
        let end = start + UInt64(options.seconds * 1e9)
        let perAgentRate = options.rate.map { $0 / Double(options.agents.count) / Double(options.batchEvents) }  // batches/s
        r.latenciesNs.reserveCapacity(Int(options.seconds * 4000))

        func handle(_ f: Frame) throws {
            switch f.type {
            case .ack:
                let ack = try Ack.decode(f.payload)
                if let t = sentAt.removeValue(forKey: ack.sequence) {
                    r.latenciesNs.append(Int64(DispatchTime.now().uptimeNanoseconds - t))
                    r.batchesAcked += 1
                    r.eventsAcked += options.batchEvents
                }
            case .timeSync:
                var s = try TimeSync.decode(f.payload)
                s.t2 = wallClockNs()
                s.t3 = wallClockNs()
                try c.send(.timeSync, s.encoded())
            case .error:
                throw BenchError("server error: \(try WireError.decode(f.payload).message)")
            default:
                break
            }
        }

        while true {
            let now = DispatchTime.now().uptimeNanoseconds
            if now >= end { break }
            var due = sentAt.count < window
            if let rate = perAgentRate {
                let allowed = UInt64(Double(now - start) / 1e9 * rate) + 1
                due = due && sequence < allowed
            }
            if due {
                sequence += 1
                var payload = templates[Int(sequence) % templates.count]
                appendVarintField(3, sequence, to: &payload)
                appendVarintField(4, UInt64(bitPattern: wallClockNs() - 2_000_000), to: &payload)
                sentAt[sequence] = DispatchTime.now().uptimeNanoseconds
                try c.send(.eventBatch, payload)
                r.batchesSent += 1
                r.wireBytes += payload.count + FrameHeader.size
                // Take what already arrived without waiting.
                while let f = try c.receive(timeoutMs: 0) { try handle(f) }
            } else if let f = try c.receive(timeoutMs: perAgentRate == nil ? 100 : 1) {
                try handle(f)
            }
        }
        r.seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
        // Rate over the sending period; the tail's acks still give latencies.
        let tail = DispatchTime.now().uptimeNanoseconds + 10_000_000_000
        let eventsInPeriod = r.eventsAcked
        while !sentAt.isEmpty, DispatchTime.now().uptimeNanoseconds < tail {
            if let f = try c.receive(timeoutMs: 100) { try handle(f) }
        }
        r.eventsAcked = eventsInPeriod
        try? c.send(.goodbye, Goodbye(reason: "bench done", lastSequence: sequence).encoded())
    }

    static func appendVarintField(_ field: UInt64, _ value: UInt64, to out: inout [UInt8]) {
        for var x in [field << 3, value] {
            while x >= 0x80 {
                out.append(UInt8(x & 0x7f) | 0x80)
                x >>= 7
            }
            out.append(UInt8(x))
        }
    }

    /// One simulated node: its pods (addresses 10.<node>.0.<pod>, services
    /// shared by every node's replicas) and batches that look like a busy
    /// node's: mostly connects, latency aggregates and DNS, some process
    /// churn, a few retransmits, drops, resets, throttling and pressure.
    struct Workload {
        let node: String
        let index: Int
        let nodes: Int
        static let services = ["web", "api", "redis", "db", "cache", "auth", "queue", "search"]

        var pods: [PodInfo] {
            Self.services.enumerated().map { (i, s) in
                PodInfo(uid: "uid-\(node)-\(s)", name: "\(s)-\(node)", namespace: "bench", node: node, ips: [address(node: index, pod: i)],
                        service: s, ownerKind: "ReplicaSet", ownerName: s, labels: ["app": s], containerIds: [containerId(i)])
            }
        }

        func address(node: Int, pod: Int) -> String { "10.\(node + 1).0.\(pod + 10)" }
        func containerId(_ pod: Int) -> String { String(repeating: String(format: "%02x", (index * 16 + pod) & 0xff), count: 32) }

        func batchTemplate(epoch: UInt64, seed: UInt64, events count: Int) -> [UInt8] {
            var rng = SplitMix(seed: seed &* 7919 &+ UInt64(index) &+ 1)
            var events: [TapioEvent] = []
            events.reserveCapacity(count)
            for i in 0..<count {
                let p = Int(rng.next() % UInt64(Self.services.count))
                let peerNode = Int(rng.next() % UInt64(nodes))
                let peerPod = Int(rng.next() % UInt64(Self.services.count))
                let src = IPAddress(address(node: index, pod: p))
                let dst = IPAddress(address(node: peerNode, pod: peerPod))
                let flow = Flow(source: src, destination: dst, sourcePort: UInt16(32768 + rng.next() % 28000), destinationPort: UInt16(6000 + peerPod))
                let roll = rng.next() % 1000
                let detail: TapioEvent.Detail
                let kind: EventKind
                switch roll {
                case 0..<380: (kind, detail) = (.tcpConnect, .tcpConnect(flow: flow, outcome: .established, latencyNs: 150_000 + rng.next() % 300_000, error: 0, count: 1))
                case 380..<400: (kind, detail) = (.tcpConnect, .tcpConnect(flow: flow, outcome: .refused, latencyNs: 40_000, error: 111, count: UInt32(1 + rng.next() % 3)))
                case 400..<560: (kind, detail) = (.tcpLatency, .tcpLatency(flow: flow, srttUs: UInt32(80 + rng.next() % 400), responses: UInt32(1 + rng.next() % 50),
                                                                          responseNsTotal: 2_000_000 + rng.next() % 8_000_000, responseNsMax: 900_000, intervalNs: 1_000_000_000))
                case 560..<720:
                    let rcode: Int32 = rng.next() % 50 == 0 ? 3 : 0
                    (kind, detail) = (.dns, .dns(name: "\(Self.services[peerPod]).bench.svc.cluster.local", qtype: 1, rcode: rcode, latencyNs: 300_000 + rng.next() % 700_000,
                                                 server: IPAddress("10.96.0.10"), serverPort: 53, id: UInt16(truncatingIfNeeded: rng.next()), answers: rcode == 0 ? [dst].compactMap { $0 } : []))
                case 720..<800: (kind, detail) = (.processExec, .exec(filename: "/usr/bin/\(["curl", "sh", "python3", "date"][Int(rng.next() % 4)])"))
                case 800..<880: (kind, detail) = (.processExit, .exit(exitCode: 0, signal: 0, coreDumped: false))
                case 880..<920: (kind, detail) = (.tcpRetransmit, .tcpRetransmit(flow: flow, count: UInt32(1 + rng.next() % 4), intervalNs: 1_000_000_000))
                case 920..<950: (kind, detail) = (.packetDrop, .packetDrop(reason: "NETFILTER_DROP", count: UInt32(1 + rng.next() % 3), flow: flow, ipProtocol: 6, ifindex: 2, intervalNs: 1_000_000_000))
                case 950..<970: (kind, detail) = (.tcpReset, .tcpReset(flow: flow, sent: rng.next() % 2 == 0, state: 1, count: 1))
                case 970..<990: (kind, detail) = (.cpuThrottle, .cpuThrottle(periods: 10, throttledPeriods: 1 + rng.next() % 3, throttledNs: 2_000_000, intervalNs: 1_000_000_000, cgroup: ""))
                default: (kind, detail) = (.memoryPressure, .memoryPressure(source: "high", count: 1, usageBytes: 200 << 20, limitBytes: 256 << 20, psiSomeAvg10Permille: 20,
                                                                           intervalNs: 1_000_000_000, cgroup: ""))
                }
                events.append(TapioEvent(kind: kind, timeNs: Int64(i) * 4_000, pid: UInt32(1000 + p * 100 + Int(rng.next() % 50)), ppid: 1, uid: 0,
                                         comm: Self.services[p], cgroupId: UInt64(10_000 + index * 100 + p), netns: UInt32(4_026_532_000 + p),
                                         containerId: containerId(p), pod: "\(Self.services[p])-\(node)", namespace: "bench", detail: detail))
            }
            // Sequence 0 and base time 0 are left out of the encoding; the
            // sender appends both.
            return EventBatch(node: node, epoch: epoch, sequence: 0, events: events).encoded()
        }
    }

    struct SplitMix {
        var state: UInt64
        init(seed: UInt64) { state = seed }
        mutating func next() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
    }
}

/// The decode-only sink: mutual TLS (the server's own context), frames,
/// hello → hello-ack, every batch decoded into `EventBatch` and acknowledged
/// at once. No store, no engine: the wire's ceiling on this machine.
public final class DecodeSink: Sendable {
    private let group: MultiThreadedEventLoopGroup
    private let channel: Channel

    public init(tls: TLSFiles, host: String, port: Int, window: UInt32 = ServerConfiguration.Limits().windowBatches) throws {
        let files = TLSReloader.Contents(certificate: try Self.read(tls.certificate), key: try Self.read(tls.key), ca: try Self.read(tls.ca))
        let context = try TapioServer.makeTLSContext(files, closeGrace: ServerConfiguration.Limits().closeGrace)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, System.coreCount))
        self.group = group
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandlers([
                        NIOSSLServerHandler(context: context),
                        ByteToMessageHandler(FrameDecoder(maximumPayload: FrameHeader.defaultMaximumPayload)),
                        MessageToByteHandler(FrameEncoder()),
                        SinkHandler(window: window),
                    ])
                }
            }
            .bind(host: host, port: port).wait()
    }

    public var port: Int { channel.localAddress?.port ?? 0 }

    public func close() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }

    private static func read(_ path: String) throws -> [UInt8] {
        guard let d = FileManager.default.contents(atPath: path) else { throw IngestBench.BenchError("cannot read \(path)") }
        return [UInt8](d)
    }

    private final class SinkHandler: ChannelInboundHandler {
        typealias InboundIn = Frame
        typealias OutboundOut = Frame
        let window: UInt32

        init(window: UInt32) {
            self.window = window
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let frame = unwrapInboundIn(data)
            do {
                switch frame.type {
                case .hello:
                    _ = try Hello.decode(frame.payload)
                    let ack = HelloAck(maxFrameBytes: FrameHeader.defaultMaximumPayload, windowBatches: window, ackedSequence: 0, serverVersion: "decode-sink", maxBatchEvents: 4096)
                    context.writeAndFlush(wrapOutboundOut(Frame(type: .helloAck, payload: ack.encoded())), promise: nil)
                case .eventBatch:
                    let batch = try EventBatch.decode(frame.payload, maxEvents: 4096)
                    context.writeAndFlush(wrapOutboundOut(Frame(type: .ack, payload: Ack(epoch: batch.epoch, sequence: batch.sequence).encoded())), promise: nil)
                case .goodbye:
                    context.close(promise: nil)
                default:
                    break
                }
            } catch {
                context.close(promise: nil)
            }
        }
    }
}
