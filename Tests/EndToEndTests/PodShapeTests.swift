import Foundation
import TapioTestSupport
import TapioWire
import XCTest

/// The agent run in the shape the DaemonSet gives it, read from
/// deploy/kubernetes/base/agent.yaml so the two cannot drift: its own mount,
/// PID, cgroup, network, IPC and UTS namespaces (no hostPID, no hostNetwork),
/// a fresh /proc and /sys with the container's own cgroup view, uid 0 with a
/// capability bounding set of exactly the manifest's `add` list, no new
/// privileges, a read-only root, and the manifest's hostPaths bind-mounted at
/// their mountPaths. Built with unshare, nsenter, setpriv and mount (util-linux)
/// rather than a container runtime: crun under podman's defaults refuses
/// setrlimit on this kind of machine, and the kernel-facing shape is the same.
///
/// A workload in kubepods-style cgroups (cgroup v2 and, on a v1/hybrid host,
/// the v1 memory, cpu and cpuacct hierarchies) execs and exits, connects over
/// TCP, asks dnsmasq a name and is OOM-killed by its memory limit; each of
/// those kinds must reach the server attributed to the pod, with no program
/// degraded.
///
/// Not reproduced: the runtime's seccomp profile (RuntimeDefault), and the
/// pod metadata source — the agent reads a --metadata-file mounted read-only
/// at /run/tapio-test (standing in for the Kubernetes API) instead of the API.
/// hostPaths outside /sys, /proc and /dev (spool, TLS, data) are directories
/// of the test standing in for the node's, at the same mountPaths.
final class PodShapeTests: XCTestCase {
    private var dir = ""
    private var pki = ""
    private var server: ChildProcess?
    private var sandbox: ChildProcess?
    private var dnsmasq: ChildProcess?
    private var cleanups: [() -> Void] = []
    private let node = "pod-node"

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        for tool in ["/usr/bin/unshare", "/usr/bin/nsenter", "/usr/bin/setpriv", "/usr/sbin/ip", "/usr/sbin/dnsmasq", "/usr/bin/python3"]
        where !FileManager.default.isExecutableFile(atPath: tool) {
            throw TestSupportError("\(tool) is missing (make deps installs the Makefile's TEST_PACKAGES)")
        }
        dir = try TestSupport.temporaryDirectory("tapio-podshape")
        pki = try TestSupport.makePKI(in: dir, nodes: [node])
    }

    override func tearDown() {
        // unshare --kill-child: killing it kills the namespace's init (the agent) and so the namespace.
        sandbox?.stop(signal: SIGKILL)
        dnsmasq?.stop(signal: SIGKILL)
        server?.stop()
        for c in cleanups.reversed() { c() }
        if !dir.isEmpty {
            _ = try? TestSupport.run("/usr/bin/umount", ["-R", "-l", dir + "/root"])
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    /// The workload in cgroup v2 (and on a hybrid host also in the v1 controllers), as kubelet on a v2 host places pods.
    func testTheAgentInTheDaemonSetsShapeAttributesAWorkloadsEventsToItsPodWithNoProgramDegraded() throws {
        try runWorkloadInThePodShape(inUnified: true)
    }

    /// The workload only in the v1 controllers, as kubelet on a cgroup v1 host places pods: every
    /// task's v2 id is the host's root, and only the v1 hierarchies name the container.
    func testOnAV1HostTheAgentInTheDaemonSetsShapeAttributesAWorkloadOnlyInV1Cgroups() throws {
        guard HostHierarchies.here().memory != nil else {
            throw XCTSkip("no cgroup v1 memory hierarchy here: a cgroup v2 host has no v1-only placement")
        }
        try runWorkloadInThePodShape(inUnified: false)
    }

    private func runWorkloadInThePodShape(inUnified: Bool) throws {
        // TAPIO_AGENT_MANIFEST: try a changed manifest without editing the shipped one.
        let manifest = ProcessInfo.processInfo.environment["TAPIO_AGENT_MANIFEST"] ?? TestSupport.packageRoot + "/deploy/kubernetes/base/agent.yaml"
        let shape = try AgentPodShape.load(manifest)
        XCTAssertFalse(shape.privileged, "the DaemonSet is not privileged")
        XCTAssertEqual(shape.dropped, ["ALL"])

        let hierarchies = HostHierarchies.here()
        guard hierarchies.unified != nil else { throw TestSupportError("no cgroup2 mount on this host") }
        let tag = "\(getpid())-\(UInt32.random(in: 0..<1_000_000))"
        let base = "/tapio-podshape-\(tag)"

        // The agent's own pod: its container cgroup becomes its cgroup namespace's root.
        let agentCgroups = try makeCgroups(hierarchies, base + "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod\(UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "_")).slice/cri-containerd-\(String(repeating: "a1", count: 32)).scope")
        // The workload's pod, as kubelet's systemd driver lays it out in every hierarchy.
        let uid = UUID().uuidString.lowercased()
        let containerId = String(format: "%08x", UInt32.random(in: 0...UInt32.max)) + String(repeating: "c0ffee01", count: 7)
        let podCgroup = base + "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod\(uid.replacingOccurrences(of: "-", with: "_")).slice"
        let workload = try makeCgroups(hierarchies, podCgroup + "/cri-containerd-\(containerId).scope", unified: inUnified)
        // The OOM: the container's memory limit (v1 on a hybrid host, else v2's memory.max).
        if let memory = workload.first(where: { $0.hasPrefix(hierarchies.memory ?? "\0") }) {
            try "48M".write(toFile: memory + "/memory.limit_in_bytes", atomically: false, encoding: .utf8)
        } else if let v2 = workload.first(where: { $0.hasPrefix(hierarchies.unified!) }) {
            try? "+memory".write(toFile: (v2 as NSString).deletingLastPathComponent + "/cgroup.subtree_control", atomically: false, encoding: .utf8)
            try "48M".write(toFile: v2 + "/memory.max", atomically: false, encoding: .utf8)
        }

        // The pod's own network namespace, joined to the host by a veth pair.
        let net = try makeNetwork(tag)
        let ingest = TestSupport.freePort(), queryPort = TestSupport.freePort()
        server = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--data-dir", dir + "/data", "--tls-dir", pki + "/server", "--listen", "\(net.hostAddress):\(ingest)",
            "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "off",
        ], logPath: dir + "/server.log")
        func query(_ arguments: [String]) throws -> JSONValue {
            let r = try TestSupport.run(try TestSupport.product("tapio"),
                                        ["--server", "127.0.0.1:\(queryPort)", "--tls-dir", pki + "/operators/alice"] + arguments + ["-o", "json"])
            guard r.status == 0 else { throw TestSupportError("tapio \(arguments) failed: \(r.stderr)") }
            return try JSONValue.parse(Array(r.stdout.utf8))
        }

        // The pod metadata the agent attributes with.
        let pod = "checkout-7d9f8b6c5-pz4kq", namespace = "shop"
        let podList = """
            {"kind": "PodList", "apiVersion": "v1", "items": [{
              "metadata": {"name": "\(pod)", "namespace": "\(namespace)", "uid": "\(uid)", "labels": {"app": "checkout"}},
              "spec": {"nodeName": "\(node)", "containers": [{"name": "checkout"}]},
              "status": {"phase": "Running", "podIP": "10.42.0.31", "podIPs": [{"ip": "10.42.0.31"}], "qosClass": "Burstable",
                         "containerStatuses": [{"name": "checkout", "containerID": "containerd://\(containerId)"}]}
            }]}
            """
        try FileManager.default.createDirectory(atPath: dir + "/metadata", withIntermediateDirectories: true)
        try podList.write(toFile: dir + "/metadata/pods.json", atomically: true, encoding: .utf8)

        // The node's side of the manifest's non-kernel hostPaths, and the node's certificate where the manifest expects it.
        let fakeHost = dir + "/node"
        var mounts: [(source: String, target: String, readOnly: Bool)] = []
        for m in shape.mounts {
            let kernel = ["/sys", "/proc", "/dev"].contains { m.hostPath == $0 || m.hostPath.hasPrefix($0 + "/") }
            let source = kernel ? m.hostPath : fakeHost + m.hostPath
            if !kernel { try FileManager.default.createDirectory(atPath: source, withIntermediateDirectories: true) }
            mounts.append((source, m.mountPath, m.readOnly))
        }
        mounts.append((dir + "/metadata", "/run/tapio-test", true))
        let tlsMount = try XCTUnwrap(shape.mounts.first { $0.mountPath == "/etc/tapio/tls" }, "the manifest mounts the node's TLS directory")
        try FileManager.default.copyItem(atPath: pki + "/nodes/" + node, toPath: fakeHost + tlsMount.hostPath + "/" + node)

        // Capabilities: exactly the manifest's, less any this machine cannot grant at all.
        let available = Self.boundingSet()
        let granted = shape.capabilities.filter { available.contains($0) }
        let missing = Set(shape.capabilities).subtracting(granted)
        XCTAssertTrue(missing.isSubset(of: ["SYS_RESOURCE"]), "this machine cannot grant \(missing)")

        // The manifest's args, with this test's server and node name.
        var arguments = shape.args.filter { a in !["--server", "--node-name", "--tls-dir"].contains { a.hasPrefix($0 + "=") || a == $0 } }
        arguments += ["--server=\(net.hostAddress):\(ingest)", "--server-name=localhost", "--node-name=\(node)",
                      "--tls-dir=/etc/tapio/tls/\(node)", "--metadata-file=/run/tapio-test/pods.json", "--batch-max-delay-ms=100"]
        let script = try sandboxScript(shape: shape, hierarchies: hierarchies, mounts: mounts, capabilities: granted, arguments: arguments)
        try script.write(toFile: dir + "/sandbox.sh", atomically: true, encoding: .utf8)
        var namespaces = ["--mount", "--cgroup", "--ipc", "--uts"]
        if !shape.hostPID { namespaces.append("--pid") }
        let enter = agentCgroups.map { "echo $$ > \($0)/cgroup.procs" }.joined(separator: " && ")
        let netns = shape.hostNetwork ? "" : "/usr/bin/nsenter --net=/run/netns/\(net.namespace) -- "
        sandbox = try ChildProcess("/bin/sh", ["-c", "\(enter) && exec \(netns)/usr/bin/unshare \(namespaces.joined(separator: " ")) --fork --kill-child --propagation private -- /bin/sh \(dir)/sandbox.sh"],
                                   logPath: dir + "/agent.log")

        var nodes: [JSONValue] = []
        let up = eventually(timeout: 60) {
            nodes = (try? query(["nodes"]))?["nodes"]?.arrayValue ?? []
            return nodes.first?["connected"] == .bool(true)
        }
        XCTAssertTrue(up, "agent connected; agent log:\n\(sandbox!.log)\nserver log:\n\(server!.log)")
        guard up else { return }
        XCTAssertEqual(nodes.first?["degraded"], .array([]), "no degraded program; agent log:\n\(sandbox!.log)")
        XCTAssertFalse(sandbox!.log.contains("degraded"), sandbox!.log)
        // The agent runs with exactly the granted capabilities.
        if let agentPid = Self.descendants(of: sandbox!.pid).last {
            XCTAssertEqual(Self.effectiveCapabilities(of: agentPid), Set(granted), "agent pid \(agentPid)")
        } else {
            XCTFail("no agent process below \(sandbox!.pid)")
        }

        // The workload: exec/exit, a TCP connection, a DNS query, then an OOM kill.
        let dnsServer = "127.53.\(Int.random(in: 1...254)).\(Int.random(in: 1...254))"
        dnsmasq = try ChildProcess("/usr/sbin/dnsmasq", [
            "--no-daemon", "--port=53", "--listen-address=\(dnsServer)", "--bind-interfaces", "--no-resolv", "--no-hosts",
            "--address=/checkout.tapio.test/10.1.2.3", "--pid-file=\(dir)/dnsmasq.pid", "--user=root",
        ], logPath: dir + "/dnsmasq.log")
        usleep(300_000)
        let python = """
            import socket, struct, random
            l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen(1)
            c = socket.create_connection(l.getsockname()); a, _ = l.accept(); c.close(); a.close()
            q = struct.pack(">HHHHHH", random.randint(1, 65535), 0x0100, 1, 0, 0, 0)
            for label in "checkout.tapio.test".split("."):
                q += bytes([len(label)]) + label.encode()
            q += b"\\x00" + struct.pack(">HH", 1, 1)
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
            s.sendto(q, ("\(dnsServer)", 53)); s.recv(512)
            """
        try python.write(toFile: dir + "/workload.py", atomically: true, encoding: .utf8)
        let shell = dir + "/tpwork-" + String(UInt32.random(in: 0..<1_000_000))
        try FileManager.default.createSymbolicLink(atPath: shell, withDestinationPath: "/bin/sh")
        let join = workload.map { "echo $$ > \($0)/cgroup.procs" }.joined(separator: " && ")
        let run = try TestSupport.run(shell, ["-c", "\(join) && /usr/bin/python3 \(dir)/workload.py && exec tail /dev/zero"], timeout: 60)
        XCTAssertEqual(run.status, 128 + SIGKILL, "the workload is OOM-killed: \(run)")

        // memory_pressure: the limit hits, read from the container's memory cgroup files.
        let wanted: Set<String> = ["process_exec", "process_exit", "tcp_connect", "dns", "oom_kill", "memory_pressure"]
        var attributed: [JSONValue] = []
        let arrived = try eventually(timeout: 30) {
            attributed = try query(["events", "--pod", pod, "--limit", "10000"])["events"]?.arrayValue ?? []
            return wanted.isSubset(of: Set(attributed.compactMap { $0["kind"]?.stringValue }))
        }
        let kinds = Set(attributed.compactMap { $0["kind"]?.stringValue })
        XCTAssertTrue(arrived, "missing \(wanted.subtracting(kinds)) among events attributed to \(pod); agent log:\n\(sandbox!.log)")
        for kind in wanted {
            guard let e = attributed.first(where: { $0["kind"]?.stringValue == kind }) else { continue }
            XCTAssertEqual(e["namespace"], .string(namespace), "\(kind): \(e)")
            XCTAssertEqual(e["container_id"], .string(containerId), "\(kind): \(e)")
            XCTAssertEqual(e["node"], .string(node), "\(kind): \(e)")
        }
        if let dns = attributed.first(where: { $0["kind"]?.stringValue == "dns" }) {
            XCTAssertEqual(dns["name"], .string("checkout.tapio.test"), "\(dns)")
        }
        // Nothing of the workload's shell went unattributed once it joined the pod's cgroups
        // (its exec precedes that). Its comm is unique to this run.
        let comm = String((shell as NSString).lastPathComponent.prefix(15))
        let all = try query(["events", "--limit", "100000"])["events"]?.arrayValue ?? []
        let stray = all.filter { $0["comm"]?.stringValue == comm && $0["kind"]?.stringValue != "process_exec" && $0["pod"]?.stringValue != pod }
        XCTAssertTrue(stray.isEmpty, "workload events without the pod: \(stray.prefix(5))")
    }

    // MARK: - the sandbox

    /// The shell script run as the new PID namespace's init: builds the
    /// container's root (the host's /usr and Swift runtime read-only, a fresh
    /// /proc and /sys with the container's own cgroup view, the manifest's
    /// hostPaths), then becomes the agent with the manifest's capabilities.
    private func sandboxScript(shape: AgentPodShape, hierarchies: HostHierarchies, mounts: [(source: String, target: String, readOnly: Bool)],
                               capabilities: [String], arguments: [String]) throws -> String {
        let root = dir + "/root"
        try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
        let agent = try TestSupport.product("tapio-agent")
        let swiftRuntime = try Self.swiftRuntimeDirectory(of: agent)
        func q(_ s: String) -> String { "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'" }
        var lines = ["set -eu", "R=\(q(root))", "mount --make-rprivate /", "mount -t tmpfs -o mode=755 rootfs \"$R\""]
        // The image: the host's /usr (libbpf, OpenSSL, util-linux) and the Swift runtime, read-only.
        for d in ["/usr", swiftRuntime] {
            lines += ["mkdir -p \"$R\"\(q(d))", "mount --rbind \(q(d)) \"$R\"\(q(d))", "mount -o remount,bind,ro \"$R\"\(q(d))"]
        }
        for l in ["/bin", "/sbin", "/lib", "/lib64"] {
            if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: l) { lines.append("ln -s \(q(target)) \"$R\"\(l)") }
        }
        lines += ["mkdir -p \"$R/etc\"", "cp /etc/passwd /etc/group /etc/hosts /etc/ld.so.cache \"$R/etc/\"",
                  "touch \"$R/tapio-agent\"", "mount --bind \(q(agent)) \"$R/tapio-agent\""]
        lines += ["mkdir \"$R/dev\"", "mount -t tmpfs -o mode=755 dev \"$R/dev\""]
        for n in ["null", "zero", "random", "urandom"] { lines += ["touch \"$R/dev/\(n)\"", "mount --bind /dev/\(n) \"$R/dev/\(n)\""] }
        // The container's own /proc (its PID namespace) and /sys, where /sys/fs/cgroup shows only its cgroup namespace.
        lines += ["mkdir \"$R/proc\" \"$R/sys\"", "mount -t proc proc \"$R/proc\"", "mount -t sysfs -o ro sysfs \"$R/sys\""]
        if hierarchies.unified == "/sys/fs/cgroup" {
            lines.append("mount -t cgroup2 -o ro cgroup2 \"$R/sys/fs/cgroup\"")
        } else {
            lines.append("mount -t tmpfs -o mode=755 cgroup \"$R/sys/fs/cgroup\"")
            for (name, options) in hierarchies.v1 {
                lines += ["mkdir \"$R/sys/fs/cgroup/\(name)\"", "mount -t cgroup -o ro,\(options) cgroup \"$R/sys/fs/cgroup/\(name)\""]
            }
            lines += ["mkdir \"$R/sys/fs/cgroup/unified\"", "mount -t cgroup2 -o ro cgroup2 \"$R/sys/fs/cgroup/unified\""]
            lines.append("mount -o remount,ro \"$R/sys/fs/cgroup\"")
        }
        // The manifest's volumes.
        for m in mounts {
            lines += ["mkdir -p \"$R\"\(q(m.target)) 2>/dev/null || test -d \"$R\"\(q(m.target))", "mount --rbind \(q(m.source)) \"$R\"\(q(m.target))"]
            if m.readOnly { lines.append("mount -o remount,bind,ro \"$R\"\(q(m.target))") }
        }
        if shape.readOnlyRootFilesystem { lines += ["mount -o remount,bind,ro \"$R/etc\" 2>/dev/null || true", "mount -o remount,ro \"$R\""] }
        let caps = capabilities.map { "+" + $0.lowercased() }.joined(separator: ",")
        var setpriv = ["/usr/bin/setpriv", "--reuid=\(shape.runAsUser ?? 0)", "--regid=0", "--clear-groups", "--bounding-set=-all" + (caps.isEmpty ? "" : "," + caps)]
        if !shape.allowPrivilegeEscalation { setpriv.append("--no-new-privs") }
        lines.append("exec chroot \"$R\" " + setpriv.map(q).joined(separator: " ") + " -- /tapio-agent " + arguments.map(q).joined(separator: " "))
        return lines.joined(separator: "\n") + "\n"
    }

    /// Makes a cgroup at `relative` in every hierarchy the workload needs; returns their directories.
    private func makeCgroups(_ h: HostHierarchies, _ relative: String, unified: Bool = true) throws -> [String] {
        var out: [String] = []
        for mount in [unified ? h.unified : nil] + h.v1.map { h.root + "/" + $0.name } {
            guard let mount else { continue }
            var path = mount
            for part in relative.split(separator: "/") {
                path += "/" + part
                if mkdir(path, 0o755) == 0 {
                    let made = path
                    cleanups.append {
                        _ = eventually(timeout: 5) { rmdir(made) == 0 || errno == ENOENT }
                    }
                } else if errno != EEXIST {
                    throw TestSupportError("mkdir \(path): \(String(cString: strerror(errno)))")
                }
            }
            out.append(path)
        }
        return out
    }

    private func makeNetwork(_ tag: String) throws -> (namespace: String, hostAddress: String) {
        let n = Int.random(in: 0..<250)
        let namespace = "tapio-ps-\(tag)"
        let hostSide = "tpsh\(getpid() % 10000)\(n % 10)", podSide = "tpsc\(getpid() % 10000)\(n % 10)"
        let (hostAddress, podAddress) = ("10.231.\(n).1", "10.231.\(n).2")
        let steps: [[String]] = [
            ["netns", "add", namespace],
            ["link", "add", hostSide, "type", "veth", "peer", "name", podSide, "netns", namespace],
            ["addr", "add", hostAddress + "/30", "dev", hostSide],
            ["link", "set", hostSide, "up"],
            ["-n", namespace, "addr", "add", podAddress + "/30", "dev", podSide],
            ["-n", namespace, "link", "set", podSide, "up"],
            ["-n", namespace, "link", "set", "lo", "up"],
        ]
        cleanups.append {
            _ = try? TestSupport.run("/usr/sbin/ip", ["link", "del", hostSide])
            _ = try? TestSupport.run("/usr/sbin/ip", ["netns", "del", namespace])
        }
        for step in steps {
            let r = try TestSupport.run("/usr/sbin/ip", step)
            guard r.status == 0 else { throw TestSupportError("ip \(step.joined(separator: " ")): \(r.stderr)") }
        }
        return (namespace, hostAddress)
    }

    /// The directory of the Swift runtime the agent is linked against (its RUNPATH), e.g. /opt/swift/usr/lib/swift/linux.
    private static func swiftRuntimeDirectory(of binary: String) throws -> String {
        let r = try TestSupport.run("/usr/bin/ldd", [binary])
        for line in r.stdout.split(separator: "\n") where line.contains("libswiftCore.so") {
            if let path = line.split(separator: " ").first(where: { $0.hasPrefix("/") }) {
                return (String(path) as NSString).deletingLastPathComponent
            }
        }
        throw TestSupportError("cannot find the Swift runtime of \(binary): \(r.stdout)")
    }

    private static let capabilityNames: [Int: String] = [
        12: "NET_ADMIN", 21: "SYS_ADMIN", 24: "SYS_RESOURCE", 38: "PERFMON", 39: "BPF", 19: "SYS_PTRACE", 0: "CHOWN", 1: "DAC_OVERRIDE",
    ]

    private static func capabilities(_ field: String, pid: pid_t) -> Set<String>? {
        guard let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }),
              let mask = UInt64(line.split(separator: "\t").last ?? "", radix: 16) else { return nil }
        var out = Set<String>()
        for bit in 0..<64 where mask & (1 << UInt64(bit)) != 0 { out.insert(capabilityNames[bit] ?? "cap\(bit)") }
        return out
    }

    static func boundingSet() -> Set<String> { capabilities("CapBnd", pid: getpid()) ?? [] }
    static func effectiveCapabilities(of pid: pid_t) -> Set<String>? { capabilities("CapEff", pid: pid) }

    /// Every process below `pid`, depth first (the agent is the last: unshare → sh → chroot/setpriv → agent).
    static func descendants(of pid: pid_t) -> [pid_t] {
        var out: [pid_t] = []
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")) ?? []
        for task in tasks {
            let text = (try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/children", encoding: .utf8)) ?? ""
            for child in text.split(separator: " ").compactMap({ pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }) {
                out.append(child)
                out += descendants(of: child)
            }
        }
        return out
    }
}

/// What the DaemonSet's agent container is granted, from the manifest itself.
struct AgentPodShape {
    struct Mount { var name: String; var hostPath: String; var mountPath: String; var readOnly: Bool }
    var capabilities: [String] = []
    var dropped: [String] = []
    var hostPID = false
    var hostNetwork = false
    var privileged = false
    var allowPrivilegeEscalation = true
    var readOnlyRootFilesystem = false
    var runAsUser: Int?
    var mounts: [Mount] = []
    var args: [String] = []

    /// Reads the agent DaemonSet from a multi-document YAML file (with Debian's python3-yaml).
    static func load(_ path: String) throws -> AgentPodShape {
        let script = """
            import json, sys, yaml
            docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get("kind") == "DaemonSet"]
            print(json.dumps(docs[0]))
            """
        let r = try TestSupport.run("/usr/bin/python3", ["-c", script, path])
        guard r.status == 0 else { throw TestSupportError("reading \(path): \(r.stderr)") }
        let ds = try JSONValue.parse(Array(r.stdout.utf8))
        guard let spec = ds["spec"]?["template"]?["spec"],
              let container = spec["containers"]?.arrayValue?.first(where: { $0["name"] == .string("tapio-agent") }) else {
            throw TestSupportError("\(path): no tapio-agent container in the DaemonSet")
        }
        var shape = AgentPodShape()
        shape.hostPID = spec["hostPID"] == .bool(true)
        shape.hostNetwork = spec["hostNetwork"] == .bool(true)
        let security = container["securityContext"]
        shape.privileged = security?["privileged"] == .bool(true)
        shape.allowPrivilegeEscalation = security?["allowPrivilegeEscalation"] != .bool(false)
        shape.readOnlyRootFilesystem = security?["readOnlyRootFilesystem"] == .bool(true)
        shape.runAsUser = security?["runAsUser"]?.intValue.map(Int.init)
        shape.capabilities = security?["capabilities"]?["add"]?.arrayValue?.compactMap(\.stringValue) ?? []
        shape.dropped = security?["capabilities"]?["drop"]?.arrayValue?.compactMap(\.stringValue) ?? []
        shape.args = container["args"]?.arrayValue?.compactMap(\.stringValue) ?? []
        var hostPaths: [String: String] = [:]
        for v in spec["volumes"]?.arrayValue ?? [] {
            if let name = v["name"]?.stringValue, let p = v["hostPath"]?["path"]?.stringValue { hostPaths[name] = p }
        }
        for m in container["volumeMounts"]?.arrayValue ?? [] {
            guard let name = m["name"]?.stringValue, let mountPath = m["mountPath"]?.stringValue else { continue }
            guard let hostPath = hostPaths[name] else { throw TestSupportError("\(path): volume \(name) is not a hostPath; teach PodShapeTests its kind") }
            shape.mounts.append(Mount(name: name, hostPath: hostPath, mountPath: mountPath, readOnly: m["readOnly"] == .bool(true)))
        }
        return shape
    }
}

/// This host's cgroup hierarchies, as the test makes cgroups in them.
struct HostHierarchies {
    var root = "/sys/fs/cgroup"
    var unified: String?
    /// v1 controller mounts the container sees too: (directory name under root, mount options).
    var v1: [(name: String, options: String)] = []

    static func here() -> HostHierarchies {
        var h = HostHierarchies()
        let info = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        for line in info.split(separator: "\n") {
            let f = line.split(separator: " ").map(String.init)
            guard let dash = f.firstIndex(of: "-"), dash + 3 < f.count, f[4].hasPrefix("/sys/fs/cgroup") else { continue }
            if f[dash + 1] == "cgroup2", h.unified == nil { h.unified = f[4] }
            if f[dash + 1] == "cgroup", f[4].hasPrefix("/sys/fs/cgroup/") {
                let controllers = f[dash + 3].split(separator: ",").filter { ["memory", "cpu", "cpuacct"].contains($0) }
                if !controllers.isEmpty { h.v1.append((String(f[4].dropFirst("/sys/fs/cgroup/".count)), controllers.joined(separator: ","))) }
            }
        }
        return h
    }

    var memory: String? { v1.first { $0.options.split(separator: ",").contains("memory") }.map { root + "/" + $0.name } }
}
