import Foundation
import TapioAttribution
import TapioTestSupport
import TapioWire
import XCTest

/// cgroup id → path and pid → cgroup against real cgroup2 directories made
/// for the test under the host's cgroup2 mount, with a real process moved in.
/// Needs root; skips otherwise (fails under TAPIO_REQUIRE_BPF=1, like the BPF tests).
final class CgroupResolverTests: XCTestCase {
    private var mount = ""
    private var root = ""   // relative to the mount
    private var made: [String] = []
    private var child: Process?

    private let container = Fixtures.crashloopContainer
    private let uid = Fixtures.rabbitUID

    override func setUpWithError() throws {
        let reason: String?
        if geteuid() != 0 {
            reason = "not root"
        } else if let m = CgroupMount.cgroup2MountPoint() {
            mount = m
            reason = access(m, W_OK) == 0 ? nil : "\(m) is not writable"
        } else {
            reason = "no cgroup2 mount in /proc/self/mountinfo"
        }
        if let reason {
            if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but cgroup tests cannot run: \(reason)") }
            throw XCTSkip("needs root and a writable cgroup2 mount: \(reason)")
        }
        root = "/tapio-attribution-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    }

    override func tearDown() {
        if let child, child.isRunning { kill(child.processIdentifier, SIGKILL); child.waitUntilExit() }
        for dir in made.reversed() { rmdir(mount + dir) }
    }

    private func mkcgroup(_ relative: String) throws -> UInt64 {
        var path = ""
        for part in relative.split(separator: "/") {
            path += "/" + part
            if !made.contains(path) {
                guard mkdir(mount + path, 0o755) == 0 || errno == EEXIST else {
                    throw TestSupportError("mkdir \(mount + path): \(String(cString: strerror(errno)))")
                }
                made.append(path)
            }
        }
        return try XCTUnwrap(CgroupIDResolver.inode(of: mount + relative))
    }

    func testIdsResolveToPathsAndRemovedCgroupsAreForgotten() throws {
        let containerPath = root + "/kubepods/burstable/pod\(uid)/\(container)"
        let id = try mkcgroup(containerPath)
        let resolver = CgroupIDResolver(configuration: .init(mountPoint: mount, scope: root, minimumRefreshInterval: 3600))

        XCTAssertEqual(resolver.path(for: id), containerPath)
        XCTAssertEqual(resolver.path(for: try XCTUnwrap(CgroupIDResolver.inode(of: mount + root))), root)
        XCTAssertEqual(resolver.statistics.walks, 1)

        // A cgroup made after the walk is not found until the rate limit allows another walk.
        let laterPath = root + "/kubepods/besteffort/pod\(Fixtures.elephantUID)/\(Fixtures.oomContainer)"
        let later = try mkcgroup(laterPath)
        XCTAssertNil(resolver.path(for: later))
        XCTAssertEqual(resolver.statistics.walks, 1, "rate limited")
        resolver.refresh()
        XCTAssertEqual(resolver.path(for: later), laterPath)

        // Removed: the cached entry is checked and dropped, not returned.
        XCTAssertEqual(rmdir(mount + laterPath), 0)
        made.removeAll { $0 == laterPath }
        XCTAssertNil(resolver.path(for: later))
        XCTAssertEqual(resolver.statistics.stale, 1)

        let eager = CgroupIDResolver(configuration: .init(mountPoint: mount, scope: root, minimumRefreshInterval: 0))
        XCTAssertEqual(eager.path(for: id), containerPath)
        let third = try mkcgroup(root + "/system.slice/kubelet.service")
        XCTAssertEqual(eager.path(for: third), root + "/system.slice/kubelet.service", "a miss walks again at once without a rate limit")
    }

    func testAProcessInAPodCgroupIsAttributedByCgroupIdAndByPid() throws {
        let containerPath = root + "/kubepods/burstable/pod\(uid)/\(container)"
        let id = try mkcgroup(containerPath)
        let hostId = try mkcgroup(root + "/system.slice/kubelet.service")

        let index = PodIndex()
        index.replaceAll(try KubeDocument.pods(from: Fixtures.podListJSON()).pods.compactMap(PodInfo.init))
        let resolver = CgroupIDResolver(configuration: .init(mountPoint: mount, scope: root))
        let attributor = Attributor(index: index, resolver: resolver)

        let expected = Attribution(containerId: container, containerName: "cpu-stress", pod: "rabbit", namespace: "default",
                                   podUID: uid, service: "rabbit", cgroupPath: containerPath)
        XCTAssertEqual(attributor.attribute(cgroupId: id, pid: 0), expected)
        XCTAssertEqual(attributor.attribute(cgroupId: hostId, pid: 0).service, "kubelet.service")
        XCTAssertTrue(attributor.attribute(cgroupId: hostId, pid: 0).isHost)

        // A real process moved into the container's cgroup: its /proc/<pid>/cgroup says where it is.
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: "/bin/sleep")
        sleeper.arguments = ["30"]
        try sleeper.run()
        child = sleeper
        let pid = UInt32(sleeper.processIdentifier)
        try Data(String(pid).utf8).write(to: URL(fileURLWithPath: mount + containerPath + "/cgroup.procs"))
        let entries = try XCTUnwrap(ProcCgroup.read(pid: Int32(pid)))
        XCTAssertTrue(entries.contains { $0.isUnified && $0.path == containerPath }, "\(entries)")

        XCTAssertEqual(attributor.attribute(cgroupId: 0, pid: pid), expected)
        XCTAssertEqual(attributor.cachedEntries.pids, 1)
        var event = TapioEvent(kind: .processExec, timeNs: 0, pid: pid, cgroupId: id)
        attributor.attribute(&event)
        XCTAssertEqual([event.containerId, event.pod, event.namespace], [container, "rabbit", "default"])

        // The process exits: sweep forgets its pid, then the cgroup once it is removed.
        kill(sleeper.processIdentifier, SIGKILL)
        sleeper.waitUntilExit()
        attributor.sweep()
        XCTAssertEqual(attributor.cachedEntries.pids, 0)
        XCTAssertTrue(eventually(timeout: 5) { rmdir(mount + containerPath) == 0 })
        made.removeAll { $0 == containerPath }
        attributor.sweep()
        XCTAssertEqual(attributor.cachedEntries.cgroups, 1, "only the host cgroup is left")
        XCTAssertEqual(attributor.attribute(cgroupId: id, pid: 0), Attribution())
    }

    /// The ring-buffer reader's memo answers what the caches and the pod
    /// metadata would, and stops answering as soon as either changes.
    func testTheMemoAnswersAsTheCachesAndFollowsTheirChanges() throws {
        let containerPath = root + "/kubepods/burstable/pod\(uid)/\(container)"
        let id = try mkcgroup(containerPath)
        let hostId = try mkcgroup(root + "/system.slice/kubelet.service")
        let index = PodIndex()
        let resolver = CgroupIDResolver(configuration: .init(mountPoint: mount, scope: root))
        // No procfs: the made-up pids below must not find real processes.
        var configuration = Attributor.Configuration()
        configuration.readsProc = false
        let attributor = Attributor(index: index, resolver: resolver, configuration: configuration)
        let memo = AttributionMemo()
        func viaMemo(cgroupId: UInt64, pid: UInt32) -> [String] {
            var event = TapioEvent(kind: .processExit, timeNs: 0, pid: pid, cgroupId: cgroupId)
            attributor.attribute(&event, memoryCgroupId: 0, memo: memo)
            return [event.containerId, event.pod, event.namespace]
        }
        // No pod metadata yet: the container is known, its pod is not.
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [container, "", ""])
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [container, "", ""])
        XCTAssertEqual(memo.hits, 1, "the second event of the same process is answered from the memo")
        // The pod's metadata arrives: the very next event has it.
        index.replaceAll(try KubeDocument.pods(from: Fixtures.podListJSON()).pods.compactMap(PodInfo.init))
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [container, "rabbit", "default"])
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [container, "rabbit", "default"])
        XCTAssertEqual(memo.hits, 2)
        // Another process of the same container, and a host process, each their own answer.
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4343), [container, "rabbit", "default"])
        XCTAssertEqual(viaMemo(cgroupId: hostId, pid: 4444), ["", "", ""])
        // Every answer through the memo equals the one without it.
        for (cgroupId, pid) in [(id, UInt32(4242)), (id, 4343), (hostId, 4444)] {
            let plain = attributor.attribute(cgroupId: cgroupId, pid: pid)
            XCTAssertEqual(viaMemo(cgroupId: cgroupId, pid: pid), [plain.containerId, plain.pod, plain.namespace])
        }
        // The pod is deleted (still answered for its retention), then forgotten:
        // the memo does not keep answering for it.
        index.remove(uid: uid)
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [container, "rabbit", "default"])
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [container, "rabbit", "default"])
        index.sweep(now: .now + .seconds(3600))
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [container, "", ""])
        // The container's cgroup goes: once the sweep forgets it, so does the memo.
        XCTAssertTrue(eventually(timeout: 5) { rmdir(mount + containerPath) == 0 })
        made.removeAll { $0 == containerPath }
        attributor.sweep()
        XCTAssertEqual(attributor.attribute(cgroupId: id, pid: 0), Attribution())
        let hits = memo.hits
        // Its process is still remembered by pid (records read after an exit need that).
        let plain = attributor.attribute(cgroupId: id, pid: 4242)
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4242), [plain.containerId, plain.pod, plain.namespace])
        XCTAssertEqual(memo.hits, hits, "answered by the caches, not by the memo's older answer")
        XCTAssertEqual(viaMemo(cgroupId: id, pid: 4343), [plain.containerId, plain.pod, plain.namespace])
    }
}
