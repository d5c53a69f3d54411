import Foundation
import Logging
import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

/// The network signals, made to happen with real kernel mechanisms between two
/// network namespaces joined by a veth pair: a closed port, an iptables DROP,
/// random loss, a listener killed, a slow server, a connect storm.
final class NetworkTests: XCTestCase {
    private var names: [String] = []
    private let suffix = String(getpid() % 100_000)
    private var client: String { "tpc\(suffix)" }
    private var server: String { "tps\(suffix)" }
    private let clientIP = "10.199.0.1"
    private let serverIP = "10.199.0.2"

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        try sh("""
            ip netns add \(client) && ip netns add \(server)
            ip link add tpv\(suffix)a netns \(client) type veth peer name tpv\(suffix)b netns \(server)
            ip -n \(client) addr add \(clientIP)/24 dev tpv\(suffix)a && ip -n \(client) link set tpv\(suffix)a up && ip -n \(client) link set lo up
            ip -n \(server) addr add \(serverIP)/24 dev tpv\(suffix)b && ip -n \(server) link set tpv\(suffix)b up && ip -n \(server) link set lo up
            """)
        names = [client, server]
    }

    override func tearDown() {
        for n in names { _ = try? TestSupport.run("/bin/sh", ["-c", "ip netns pids \(n) | xargs -r kill -9; ip netns del \(n)"]) }
    }

    @discardableResult
    private func sh(_ script: String, timeout: Double = 60) throws -> String {
        let r = try TestSupport.run("/bin/sh", ["-ec", script], timeout: timeout)
        guard r.status == 0 else { throw TestSupportError("shell failed (\(r.status)): \(script)\n\(r.stderr)") }
        return r.stdout
    }

    private func inClient(_ python: String) throws -> String {
        try sh("ip netns exec \(client) /usr/bin/python3 -c '\(python)'")
    }

    private func observe(_ body: () throws -> Void) throws -> [TapioEvent] {
        var config = KernelSource.Configuration()
        config.intervalNs = 300_000_000
        config.netEventsPerSecond = 0
        let source = try KernelSource(configuration: config, logger: Logger(label: "test"))
        var limits = Outbox.Limits()
        limits.maxMemoryBytes = 512 << 20
        let outbox = try Outbox(node: "t", epoch: 1, limits: limits, spoolDirectory: nil)
        source.start(into: outbox)
        usleep(300_000)
        try body()
        usleep(900_000)
        source.stop()
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        return try KernelSourceTests.drain(outbox)
    }

    private func involvesServer(_ f: Flow) -> Bool {
        f.destination == IPAddress(serverIP) || f.source == IPAddress(serverIP)
    }

    func testRefusedConnectsAreAggregatedWithResetsAndNoSocketDrops() throws {
        let events = try observe {
            _ = try inClient("""
                import socket
                for _ in range(20):
                    s = socket.socket()
                    try: s.connect(("\(serverIP)", 7001))
                    except ConnectionRefusedError: pass
                    s.close()
                """)
        }
        var refused: UInt32 = 0, rstSent: UInt32 = 0, rstReceived: UInt32 = 0, noSocket: UInt32 = 0, refusedEvents = 0
        for e in events {
            switch e.detail {
            case .tcpConnect(let f, .refused, _, let error, let n) where f.destination == IPAddress(serverIP) && f.destinationPort == 7001:
                refused += n
                refusedEvents += 1
                XCTAssertEqual(error, ECONNREFUSED)
                XCTAssertEqual(e.comm, "python3")
            case .tcpReset(let f, let sent, _, let n) where involvesServer(f):
                if sent { rstSent += n } else { rstReceived += n }
            case .packetDrop("NO_SOCKET", let n, let f, 6, _, _) where involvesServer(f):
                noSocket += n
            default: break
            }
        }
        XCTAssertEqual(refused, 20, "every attempt counted, in a few aggregated events")
        XCTAssertEqual(rstSent, 20)
        XCTAssertEqual(rstReceived, 20)
        XCTAssertEqual(noSocket, 20)
        // This test's attempts only: other connects on the host (a lab
        // running beside it) are none of its business.
        XCTAssertLessThan(refusedEvents, 20, "20 refused attempts come in fewer events")
    }

    func testFirewallDropGivesTimeoutsAndNetfilterDrops() throws {
        try sh("ip netns exec \(server) iptables -A INPUT -p tcp --dport 7002 -j DROP")
        let events = try observe {
            _ = try inClient("""
                import socket
                s = socket.socket(); s.settimeout(1.0)
                try: s.connect(("\(serverIP)", 7002))
                except OSError: pass
                """)
        }
        let timeout = events.first {
            if case .tcpConnect(let f, .timeout, let latency, _, _) = $0.detail { return f.destinationPort == 7002 && latency >= 900_000_000 }
            return false
        }
        XCTAssertNotNil(timeout, "a timeout after the caller's 1 s")
        let drops = events.contains {
            if case .packetDrop("NETFILTER_DROP", let n, let f, 6, _, _) = $0.detail { return n >= 1 && f.destinationPort == 7002 }
            return false
        }
        XCTAssertTrue(drops, "the SYNs dropped by iptables, by the kernel's reason name")
    }

    func testListenerOpenedThenKilledAndLossGivesRetransmitsAndLatency() throws {
        // A server that answers each request after 20 ms; 10 % loss on the
        // server's input. 200 separate 1 kB segments (TCP_NODELAY; a large send
        // would cross the veth as one GSO packet) all get through with
        // probability 0.9^200 ≈ 7e-10.
        try sh("ip netns exec \(server) iptables -A INPUT -p tcp --dport 7003 -m statistic --mode random --probability 0.1 -j DROP")
        let serverScript = """
            import socket, time
            l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            l.bind(("\(serverIP)", 7003)); l.listen(8)
            c, _ = l.accept()
            while True:
                d = c.recv(65536)
                if not d: break
                time.sleep(0.02); c.sendall(d)
            """
        let events = try observe {
            try sh("ip netns exec \(server) /usr/bin/python3 -c '\(serverScript)' > /dev/null 2>&1 & echo $! > /tmp/tapio-net-\(suffix).pid; sleep 0.5")
            _ = try inClient("""
                import socket
                s = socket.create_connection(("\(serverIP)", 7003), timeout=30)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(20):
                    for _ in range(10): s.sendall(b"x" * 1000)
                    got = 0
                    while got < 10000: got += len(s.recv(65536))
                s.close()
                """)
            try sh("kill -9 $(cat /tmp/tapio-net-\(suffix).pid); rm -f /tmp/tapio-net-\(suffix).pid; sleep 0.3")
        }
        let listens = events.compactMap { e -> Bool? in
            if case .tcpListen(_, 7003, let open) = e.detail { return open } else { return nil }
        }
        XCTAssertEqual(listens, [true, false], "listen open, then closed when its process was killed")
        let retransmits = events.reduce(UInt32(0)) { sum, e in
            if case .tcpRetransmit(let f, let n, _) = e.detail, involvesServer(f) { return sum + n } else { return sum }
        }
        XCTAssertGreaterThan(retransmits, 0, "10 % loss makes the sender retransmit")
        let slow = events.contains {
            if case .tcpLatency(let f, _, let responses, let total, _, _) = $0.detail, f.destinationPort == 7003, responses > 0 {
                return total / UInt64(responses) >= 20_000_000
            }
            return false
        }
        XCTAssertTrue(slow, "request → response time shows the 20 ms server")
    }

    /// A storm of connects folded in the kernel: the counts add up to what was
    /// attempted (the CPU cost is measured by `make bench`, not asserted here).
    func testConnectStormCountsAddUp() throws {
        let attempted = try observe {
            let out = try sh("""
                for i in 1 2; do ip netns exec \(client) /usr/bin/python3 -c '
                import socket, sys, time
                n = 0; other = 0; end = time.time() + 2
                try:
                    while time.time() < end:
                        s = socket.socket()
                        try:
                            s.connect(("\(serverIP)", 7004))
                        except ConnectionRefusedError:
                            n += 1
                        except OSError as e:
                            other += 1
                            if other <= 3: print("connect:", e, file=sys.stderr)
                        s.close()
                finally:
                    print("refused", n, "other", other, flush=True)' 2>&1 & done; wait
                """)
            storm = 0
            for line in out.split(separator: "\n") {
                let words = line.split(separator: " ")
                if words.count == 4, words[0] == "refused", let n = UInt32(words[1]) { storm += n }
            }
            stormOutput = out
        }
        let counted = attempted.reduce(UInt32(0)) { sum, e in
            if case .tcpConnect(let f, .refused, _, _, let n) = e.detail, f.destinationPort == 7004 { return sum + n } else { return sum }
        }
        XCTAssertGreaterThan(storm, 10_000, "the storm ran: \(stormOutput)")
        XCTAssertEqual(counted, storm, "every refused attempt counted (\(stormOutput))")
        XCTAssertLessThan(attempted.filter { $0.kind == .tcpConnect }.count, 100, "aggregated: a handful of events, not \(storm)")
    }

    private var storm: UInt32 = 0
    private var stormOutput = ""
}
