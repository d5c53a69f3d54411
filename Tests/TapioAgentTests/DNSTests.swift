import Foundation
import Logging
import TapioAgent
import TapioTestSupport
import TapioWire
import XCTest

/// DNS answers parsed in the kernel (cgroup_skb) from real dnsmasq replies.
final class DNSTests: XCTestCase {
    private var dnsmasq: ChildProcess?

    override func tearDown() {
        dnsmasq?.stop(signal: SIGKILL)
    }

    /// One query from Python's socket API; returns when answered or after `timeout`.
    private func query(_ name: String, server: String, port: Int, timeout: Double = 1) throws {
        let script = """
            import socket, struct, random
            q = struct.pack(">HHHHHH", random.randint(1, 65535), 0x0100, 1, 0, 0, 0)
            for label in "\(name)".split("."):
                q += bytes([len(label)]) + label.encode()
            q += b"\\x00" + struct.pack(">HH", 1, 1)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(\(timeout))
            s.sendto(q, ("\(server)", \(port)))
            try:
                s.recv(512)
            except OSError:
                pass  # no answer: timed out, or ICMP port unreachable
            """
        XCTAssertEqual(try TestSupport.run("/usr/bin/python3", ["-c", script]).status, 0)
    }

    func testAnswersNXDOMAINAndTimeoutsAreReportedWithNamesAndLatency() throws {
        try TestSupport.requireBPF()
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/dnsmasq") else {
            if TestSupport.bpfRequired { throw TestSupportError("dnsmasq is not installed (make installs dnsmasq-base)") }
            throw XCTSkip("dnsmasq is not installed")
        }
        let dir = try TestSupport.temporaryDirectory("tapio-dns")
        // The program watches port 53: a loopback address of our own keeps
        // this dnsmasq apart from any other resolver on the machine.
        let port = 53
        let server = "127.53.\(Int.random(in: 1...254)).\(Int.random(in: 1...254))"
        dnsmasq = try ChildProcess("/usr/sbin/dnsmasq", [
            "--no-daemon", "--port=53", "--listen-address=\(server)", "--bind-interfaces", "--no-resolv", "--no-hosts",
            "--address=/good.tapio.test/10.1.2.3", "--address=/missing.tapio.test/", "--pid-file=\(dir)/pid", "--user=root",
        ], logPath: dir + "/dnsmasq.log")
        usleep(300_000)
        var config = KernelSource.Configuration()
        config.intervalNs = 200_000_000
        let source = try KernelSource(configuration: config, logger: Logger(label: "test"))
        XCTAssertTrue(source.capabilities.contains("dns"), "\(source.degraded)")
        let outbox = try Outbox(node: "t", epoch: 1, spoolDirectory: nil)
        source.start(into: outbox)
        usleep(200_000)
        try query("good.tapio.test", server: server, port: port)
        try query("missing.tapio.test", server: server, port: port)
        // Nothing listens there: no answer ever, a timeout reported after 5 s.
        try query("lost.tapio.test", server: "127.54.0.1", port: port, timeout: 0.2)
        // Other programs on this machine may query too: wait for these three names.
        let names: Set<String> = ["good.tapio.test", "missing.tapio.test", "lost.tapio.test"]
        var events: [TapioEvent] = []
        func name(_ e: TapioEvent) -> String? { if case .dns(let n, _, _, _, _, _, _, _) = e.detail { return n } else { return nil } }
        XCTAssertTrue(eventually(timeout: 12) {
            events += self.dnsEvents(outbox).filter { name($0).map(names.contains) ?? false }
            return Set(events.compactMap(name)) == names
        }, "got \(events)")
        source.stop()
        func find(_ n: String) -> TapioEvent? { events.first { name($0) == n } }
        guard case .dns(_, let qtype, let rcode, let latency, let answerServer, let serverPort, _, let answers)? = find("good.tapio.test")?.detail else {
            return XCTFail("no event for good.tapio.test: \(events)")
        }
        XCTAssertEqual(qtype, 1)
        XCTAssertEqual(rcode, 0)
        XCTAssertEqual(answers, [IPAddress("10.1.2.3")!])
        XCTAssertEqual(answerServer, IPAddress(server))
        XCTAssertEqual(Int(serverPort), port)
        XCTAssertGreaterThan(latency, 0)
        XCTAssertEqual(find("good.tapio.test")?.comm, "python3")
        guard case .dns(_, _, let nx, _, _, _, _, _)? = find("missing.tapio.test")?.detail else { return XCTFail("no NXDOMAIN event") }
        XCTAssertEqual(nx, 3, "NXDOMAIN")
        guard case .dns(_, _, let lost, let waited, _, _, _, _)? = find("lost.tapio.test")?.detail else { return XCTFail("no timeout event") }
        XCTAssertEqual(lost, -1, "timeout")
        XCTAssertGreaterThanOrEqual(waited, 5_000_000_000)
    }

    /// DNS events sealed since the last call (acknowledging what was read).
    private func dnsEvents(_ outbox: Outbox) -> [TapioEvent] {
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        var out: [TapioEvent] = []
        for payload in outbox.sealedPayloadsForTesting() {
            guard let batch = try? EventBatch.decode(payload) else { continue }
            out += batch.events.filter { $0.kind == .dns }
            outbox.acknowledgeForTesting(epoch: batch.epoch, sequence: batch.sequence)
        }
        return out
    }
}
