import Foundation
import TapioTestSupport
import TapioWire
import XCTest

/// Every signal of the catalog made to happen with a real kernel mechanism by
/// processes in two "pods" (a network namespace and a kubelet-style cgroup
/// each, described in a --metadata-file), and found through
/// `tapio events -o json` with its kind, fields, pod and namespace.
final class SignalsEndToEndTests: XCTestCase {
    private var dir = ""
    private var pki = ""
    private var ingestPort = 0
    private var queryPort = 0
    private var server: ChildProcess?
    private var agent: ChildProcess?
    private let tag = String(getpid() % 100_000)
    private var cleanup: [String] = []

    private let clientIP = "10.198.0.1"
    private let serverIP = "10.198.0.2"
    private var clientNS: String { "tpe2ec\(tag)" }
    private var serverNS: String { "tpe2es\(tag)" }
    private var base: String { "tapio-e2e-signals-\(tag)" }
    private func podCgroup(_ uid: String) -> String { "\(base)/kubepods/burstable/pod\(uid)/\(String(repeating: String(uid.prefix(2)), count: 32))" }
    private let clientUID = "c1c1c1c1-0000-4000-8000-000000000001"
    private let serverUID = "d2d2d2d2-0000-4000-8000-000000000002"

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        dir = try TestSupport.temporaryDirectory("tapio-e2e-signals")
        pki = try TestSupport.makePKI(in: dir, nodes: ["sig-node"])
        ingestPort = TestSupport.freePort()
        queryPort = TestSupport.freePort()
        let c = podCgroup(clientUID), s = podCgroup(serverUID)
        cleanup.append("""
            for ns in \(clientNS) \(serverNS); do ip netns pids $ns 2>/dev/null | xargs -r kill -9; ip netns del $ns 2>/dev/null; done
            umount \(dir)/full 2>/dev/null
            for h in unified cpu memory; do find /sys/fs/cgroup/$h/\(base) -depth -type d -exec rmdir {} \\; 2>/dev/null; done
            true
            """)
        try sh("""
            for h in unified cpu memory; do mkdir -p /sys/fs/cgroup/$h/\(c) /sys/fs/cgroup/$h/\(s); done
            echo 5000 > /sys/fs/cgroup/cpu/\(c)/cpu.cfs_quota_us
            echo 48M > /sys/fs/cgroup/memory/\(s)/memory.limit_in_bytes
            ip netns add \(clientNS); ip netns add \(serverNS)
            ip link add tpe\(tag)a netns \(clientNS) type veth peer name tpe\(tag)b netns \(serverNS)
            ip -n \(clientNS) addr add \(clientIP)/24 dev tpe\(tag)a; ip -n \(clientNS) link set tpe\(tag)a up; ip -n \(clientNS) link set lo up
            ip -n \(serverNS) addr add \(serverIP)/24 dev tpe\(tag)b; ip -n \(serverNS) link set tpe\(tag)b up; ip -n \(serverNS) link set lo up
            ip netns exec \(serverNS) iptables -A INPUT -p tcp --dport 7102 -j DROP
            mkdir -p \(dir)/full; mount -t tmpfs -o size=128k tmpfs \(dir)/full
            """)
        let pods = """
            {"kind": "PodList", "apiVersion": "v1", "items": [
             {"metadata": {"name": "shop-client", "namespace": "signals", "uid": "\(clientUID)", "labels": {"app": "client"}},
              "spec": {"nodeName": "sig-node", "containers": [{"name": "c"}]},
              "status": {"phase": "Running", "podIP": "\(clientIP)", "containerStatuses": [{"name": "c", "containerID": "containerd://\(String(repeating: String(clientUID.prefix(2)), count: 32))"}]}},
             {"metadata": {"name": "shop-server", "namespace": "signals", "uid": "\(serverUID)", "labels": {"app": "server"}},
              "spec": {"nodeName": "sig-node", "containers": [{"name": "s"}]},
              "status": {"phase": "Running", "podIP": "\(serverIP)", "containerStatuses": [{"name": "s", "containerID": "containerd://\(String(repeating: String(serverUID.prefix(2)), count: 32))"}]}}
            ]}
            """
        try pods.write(toFile: dir + "/pods.json", atomically: true, encoding: .utf8)
    }

    override func tearDown() {
        agent?.stop()
        server?.stop()
        for c in cleanup { _ = try? TestSupport.run("/bin/sh", ["-c", c]) }
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    @discardableResult
    private func sh(_ script: String, timeout: Double = 60) throws -> String {
        let r = try TestSupport.run("/bin/sh", ["-ec", script], timeout: timeout)
        guard r.status == 0 else { throw TestSupportError("shell failed (\(r.status)): \(script)\n\(r.stderr)") }
        return r.stdout
    }

    /// Runs `script` (sh) inside a pod: its cgroups first (ip netns exec
    /// remounts /sys, hiding the cgroup trees), then its network namespace.
    private func inPod(_ uid: String, _ ns: String, _ script: String) throws {
        try sh("sh -c 'for h in unified cpu memory; do echo $$ > /sys/fs/cgroup/$h/\(podCgroup(uid))/cgroup.procs; done; exec ip netns exec \(ns) sh -c \"\(script)\"'", timeout: 60)
    }

    private func query(_ arguments: [String]) throws -> JSONValue {
        let r = try TestSupport.run(try TestSupport.product("tapio"),
                                    ["--server", "127.0.0.1:\(queryPort)", "--tls-dir", pki + "/operators/alice"] + arguments + ["-o", "json"])
        guard r.status == 0 else { throw TestSupportError("tapio \(arguments) failed: \(r.stderr)") }
        return try JSONValue.parse(Array(r.stdout.utf8))
    }

    func testEverySignalReachesTheCLIWithItsPod() throws {
        server = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--data-dir", dir + "/data", "--tls-dir", pki + "/server",
            "--listen", "127.0.0.1:\(ingestPort)", "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "off",
        ], logPath: dir + "/server.log")
        agent = try ChildProcess(try TestSupport.product("tapio-agent"), [
            "--server", "127.0.0.1:\(ingestPort)", "--node-name", "sig-node", "--tls-dir", pki + "/nodes/sig-node", "--server-name", "localhost",
            "--metadata-file", dir + "/pods.json", "--batch-max-delay-ms", "100", "--data-dir", dir + "/agent",
        ], logPath: dir + "/agent.log")
        XCTAssertTrue(eventually(timeout: 30) { (try? self.query(["nodes"]))?["nodes"]?.arrayValue?.first?["connected"] == .bool(true) }, agent!.log)

        // Server pod: a listener (killed later), a DNS server answering NXDOMAIN, a memory hog.
        try sh("""
            sh -c 'for h in unified cpu memory; do echo $$ > /sys/fs/cgroup/$h/\(podCgroup(serverUID))/cgroup.procs; done;
              exec ip netns exec \(serverNS) /usr/bin/python3 -c "import socket,time
            l=socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind((\\"\(serverIP)\\", 7101)); l.listen(8)
            c,_=l.accept()
            while True:
              d=c.recv(65536)
              if not d: break
              time.sleep(0.02); c.sendall(d)
            time.sleep(120)
            "' > /dev/null 2>&1 & echo $! > \(dir)/listener.pid
            sh -c 'for h in unified cpu memory; do echo $$ > /sys/fs/cgroup/$h/\(podCgroup(serverUID))/cgroup.procs; done;
              exec ip netns exec \(serverNS) /usr/sbin/dnsmasq --no-daemon --port=53 --listen-address=\(serverIP) --bind-interfaces --no-resolv --no-hosts --address=/gone.signals.test/ --user=root --pid-file=\(dir)/dns.pid' > /dev/null 2>&1 &
            sleep 0.5
            """)
        let q = """
            import socket, struct, time
            # refused: nothing on 7100
            for _ in range(5):
                s = socket.socket()
                try: s.connect(("\(serverIP)", 7100))
                except OSError: pass
                s.close()
            # timeout: iptables drops 7102
            s = socket.socket(); s.settimeout(1.0)
            try: s.connect(("\(serverIP)", 7102))
            except OSError: pass
            # requests to a 20 ms server: latency
            s = socket.create_connection(("\(serverIP)", 7101), timeout=10)
            for _ in range(10):
                s.sendall(b"x" * 1000); s.recv(65536)
            s.close()
            # DNS NXDOMAIN
            q = struct.pack(">HHHHHH", 77, 0x0100, 1, 0, 0, 0) + b"\\x04gone\\x07signals\\x04test\\x00" + struct.pack(">HH", 1, 1)
            d = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); d.settimeout(2); d.sendto(q, ("\(serverIP)", 53))
            try: d.recv(512)
            except OSError: pass
            # disk full: ENOSPC
            import os
            f = os.open("\(dir)/full/fill", os.O_WRONLY | os.O_CREAT)
            for _ in range(40):
                try: os.write(f, b"x" * 16384)
                except OSError: pass
            # CPU past the 5 % quota
            end = time.time() + 1.2
            while time.time() < end: pass
            """
        try q.write(toFile: dir + "/client.py", atomically: true, encoding: .utf8)
        try inPod(clientUID, clientNS, "exec /usr/bin/python3 \(dir)/client.py")
        try sh("kill -9 $(cat \(dir)/listener.pid)")
        // Memory pressure (and an OOM kill) in the server pod.
        try? inPod(serverUID, serverNS, "exec tail /dev/zero")

        let expectations: [(kind: String, pod: String, check: (JSONValue) -> Bool)] = [
            ("tcp_connect", "shop-client", { $0["outcome"] == .string("refused") && $0["dst_port"]?.intValue == 7100 && $0["dst_pod"] == .string("shop-server") }),
            ("tcp_connect", "shop-client", { $0["outcome"] == .string("timeout") && $0["dst_port"]?.intValue == 7102 }),
            ("tcp_listen", "shop-server", { $0["state"] == .string("open") && $0["port"]?.intValue == 7101 }),
            ("tcp_listen", "shop-server", { $0["state"] == .string("closed") && $0["port"]?.intValue == 7101 }),
            ("tcp_reset", "", { $0["direction"] != nil }),
            ("tcp_latency", "shop-client", { ($0["response_ns_avg"]?.intValue ?? 0) >= 20_000_000 }),
            ("packet_drop", "", { $0["reason"] == .string("NETFILTER_DROP") && $0["dst_pod"] == .string("shop-server") }),
            ("dns", "shop-client", { $0["name"] == .string("gone.signals.test") && $0["rcode"] == .string("NXDOMAIN") }),
            ("io_error", "shop-client", { $0["errno"] == .string("ENOSPC") && ($0["count"]?.intValue ?? 0) >= 1 }),
            ("cpu_throttle", "shop-client", { ($0["throttled_periods"]?.intValue ?? 0) > 0 }),
            ("memory_pressure", "shop-server", { $0["source"] == .string("limit") }),
            ("oom_kill", "shop-server", { $0["victim_comm"] == .string("tail") }),
            ("process_exit", "shop-server", { $0["signal"]?.intValue == 9 }),
        ]
        var missing: [String] = []
        XCTAssertTrue(try eventually(timeout: 20) {
            missing = []
            let events = try query(["events", "--since", "5m", "--limit", "100000"])["events"]?.arrayValue ?? []
            for (kind, pod, check) in expectations {
                let found = events.contains { e in
                    e["kind"] == .string(kind) && (pod.isEmpty || (e["pod"] == .string(pod) && e["namespace"] == .string("signals"))) && check(e)
                }
                if !found { missing.append("\(kind) \(pod)") }
            }
            return missing.isEmpty
        }, "not found through tapio events: \(missing)\nagent log:\n\(agent!.log.suffix(3000))")
    }
}
