import Foundation
import TapioAttribution
import TapioTestSupport
import TapioWire
import XCTest

/// Attribution by the kernel's v1 memory-controller cgroup id, against real v1
/// memory cgroups made under the host's memory mount: on a hybrid host the
/// cgroup2 tree is empty (every task's v2 id is the root's), so the v1 id is
/// what names the container without a /proc read per event. The id is the
/// inode of the cgroup's directory in the v1 memory mount — kernfs numbers
/// cgroup1 hierarchies' nodes the same way as cgroup2's (checked against
/// name_to_handle_at on this machine's 6.18 kernel: handle id == st_ino).
/// Needs root and a v1 memory hierarchy; skips otherwise (fails under TAPIO_REQUIRE_BPF=1
/// only when not root: a cgroup-v2-only host has no v1 ids to resolve).
final class MemoryCgroupTests: XCTestCase {
    private var memoryMount = ""
    private var v2Mount: String?
    private var root = ""   // relative to the memory mount
    private var made: [String] = []
    private var child: Process?

    private let container = Fixtures.oomContainer
    private let uid = Fixtures.elephantUID

    override func setUpWithError() throws {
        guard geteuid() == 0 else {
            if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but v1 memory cgroup tests need root") }
            throw XCTSkip("needs root to make v1 memory cgroups")
        }
        let hierarchies = HostCgroups.detect()
        guard let memory = hierarchies.memory, access(memory, W_OK) == 0 else {
            throw XCTSkip("no writable cgroup v1 memory hierarchy on this host (cgroup v2 only): nothing to resolve")
        }
        memoryMount = memory
        v2Mount = hierarchies.unified
        root = "/tapio-memory-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    }

    override func tearDown() {
        if let child, child.isRunning { kill(child.processIdentifier, SIGKILL); child.waitUntilExit() }
        for dir in made.reversed() {
            _ = eventually(timeout: 5) { rmdir(memoryMount + dir) == 0 || errno == ENOENT }
        }
    }

    private func mkcgroup(_ relative: String) throws -> UInt64 {
        var path = ""
        for part in relative.split(separator: "/") {
            path += "/" + part
            if !made.contains(path) {
                guard mkdir(memoryMount + path, 0o755) == 0 || errno == EEXIST else {
                    throw TestSupportError("mkdir \(memoryMount + path): \(String(cString: strerror(errno)))")
                }
                made.append(path)
            }
        }
        return try XCTUnwrap(CgroupIDResolver.inode(of: memoryMount + relative))
    }

    private func fixtureIndex() throws -> PodIndex {
        let index = PodIndex()
        index.replaceAll(try KubeDocument.pods(from: Fixtures.podListJSON()).pods.compactMap(PodInfo.init))
        return index
    }

    func testAMemoryCgroupIdNamesThePodWhenTheV2IdIsAHostCgroupWithoutReadingProc() throws {
        let containerPath = root + "/kubepods/burstable/pod\(uid)/\(container)"
        let memoryId = try mkcgroup(containerPath)
        let hostMemoryId = try mkcgroup(root + "/system.slice/kubelet.service")
        let memoryResolver = CgroupIDResolver(configuration: .init(mountPoint: memoryMount, scope: root))
        // The v2 id of every task on a hybrid host: the (empty) unified root, a host cgroup.
        let v2Resolver = v2Mount.map { CgroupIDResolver(configuration: .init(mountPoint: $0, scope: "/", maximumDepth: 0)) }
        let v2Root = v2Mount.flatMap { CgroupIDResolver.inode(of: $0) } ?? 0
        // A procfs with nothing in it: any answer below comes from the ids.
        let noProc = NSTemporaryDirectory() + "/tapio-no-proc-\(getpid())"
        try FileManager.default.createDirectory(atPath: noProc, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: noProc) }
        let attributor = Attributor(index: try fixtureIndex(), resolver: v2Resolver, memoryResolver: memoryResolver,
                                    configuration: .init(procRoot: noProc, exitedPidGrace: 0.2))

        // A real process in the container's memory cgroup, so a /proc read would also find it.
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: "/bin/sleep")
        sleeper.arguments = ["30"]
        try sleeper.run()
        child = sleeper
        let pid = UInt32(sleeper.processIdentifier)
        try Data(String(pid).utf8).write(to: URL(fileURLWithPath: memoryMount + containerPath + "/cgroup.procs"))

        let expected = Attribution(containerId: container, containerName: "mem-stress", pod: "elephant", namespace: "default",
                                   podUID: uid, service: "elephant", cgroupPath: containerPath)
        XCTAssertEqual(attributor.attribute(cgroupId: v2Root, memoryCgroupId: memoryId, pid: pid), expected)
        var event = TapioEvent(kind: .processExec, timeNs: 0, pid: pid, cgroupId: v2Root)
        attributor.attribute(&event, memoryCgroupId: memoryId)
        XCTAssertEqual([event.containerId, event.pod, event.namespace], [container, "elephant", "default"])
        XCTAssertEqual(memoryResolver.statistics.walks, 1, "the second event was a cache hit")

        // A host memory cgroup is a host answer (its unit), final without /proc.
        let host = attributor.attribute(cgroupId: v2Root, memoryCgroupId: hostMemoryId, pid: 0)
        XCTAssertTrue(host.isHost)
        XCTAssertEqual(host.service, "kubelet.service")

        // A record of another ring (network, DNS) carries no memory id: the pid the ids
        // named is remembered, also just after the process exited and was reaped.
        kill(sleeper.processIdentifier, SIGKILL)
        sleeper.waitUntilExit()
        attributor.processExited(pid: pid)
        XCTAssertEqual(attributor.attribute(cgroupId: v2Root, memoryCgroupId: 0, pid: pid).pod, "elephant")
        usleep(300_000)
        attributor.sweep()
        XCTAssertEqual(attributor.cachedEntries.pids, 0, "forgotten after the grace")
        XCTAssertEqual(attributor.attribute(cgroupId: v2Root, memoryCgroupId: 0, pid: pid).pod, "")

        // The cgroup is removed: sweep forgets the id, and it no longer resolves.
        XCTAssertTrue(eventually(timeout: 5) { rmdir(memoryMount + containerPath) == 0 })
        made.removeAll { $0 == containerPath }
        attributor.sweep()
        XCTAssertEqual(attributor.attribute(cgroupId: v2Root, memoryCgroupId: memoryId, pid: 0).containerId, "")
    }

    func testWithoutAMemoryIdTheHostProcOfThePidStillNamesTheContainer() throws {
        let containerPath = root + "/kubepods/burstable/pod\(uid)/\(container)"
        _ = try mkcgroup(containerPath)
        let attributor = Attributor(index: try fixtureIndex(), resolver: nil,
                                    memoryResolver: CgroupIDResolver(configuration: .init(mountPoint: memoryMount, scope: root)))
        let sleeper = Process()
        sleeper.executableURL = URL(fileURLWithPath: "/bin/sleep")
        sleeper.arguments = ["30"]
        try sleeper.run()
        child = sleeper
        let pid = UInt32(sleeper.processIdentifier)
        try Data(String(pid).utf8).write(to: URL(fileURLWithPath: memoryMount + containerPath + "/cgroup.procs"))
        let byPid = attributor.attribute(cgroupId: 0, memoryCgroupId: 0, pid: pid)
        XCTAssertEqual([byPid.containerId, byPid.pod], [container, "elephant"])
        XCTAssertEqual(attributor.cachedEntries.pids, 1)
        // Read from a procfs the agent may not read (its own PID namespace's): nothing.
        var blind = Attributor.Configuration()
        blind.readsProc = false
        XCTAssertEqual(Attributor(index: try fixtureIndex(), resolver: nil, configuration: blind).attribute(cgroupId: 0, pid: pid), Attribution())
    }

    func testCgroupCountersWithoutAV2IdAreAttributedByTheirPath() throws {
        let attributor = Attributor(index: try fixtureIndex(), resolver: nil)
        let path = "/kubepods/burstable/pod\(uid)/\(container)"
        var event = TapioEvent(kind: .memoryPressure, timeNs: 0, cgroupId: 0, detail: .memoryPressure(
            source: "limit", count: 3, usageBytes: 1 << 20, limitBytes: 1 << 20, psiSomeAvg10Permille: 0, intervalNs: 1_000_000_000, cgroup: path))
        attributor.attribute(&event)
        XCTAssertEqual([event.pod, event.namespace, event.containerId], ["elephant", "default", container])
        var host = TapioEvent(kind: .cpuThrottle, timeNs: 0, cgroupId: 0, detail: .cpuThrottle(
            periods: 10, throttledPeriods: 2, throttledNs: 5, intervalNs: 1, cgroup: "/system.slice/kubelet.service"))
        attributor.attribute(&host)
        XCTAssertEqual(host.pod, "")
    }

    func testAV2IdThatNamesAContainerWinsOverTheMemoryId() throws {
        let memoryId = try mkcgroup(root + "/kubepods/burstable/pod\(uid)/\(container)")
        let v2Path = "/kubepods/besteffort/pod\(Fixtures.rabbitUID)/\(Fixtures.crashloopContainer)"
        // The v2 side from a recorded path: the v2 resolver is not needed to prove the order.
        let attributor = Attributor(index: try fixtureIndex(), resolver: nil,
                                    memoryResolver: CgroupIDResolver(configuration: .init(mountPoint: memoryMount, scope: root)))
        XCTAssertEqual(attributor.attribute(cgroupId: 0, memoryCgroupId: memoryId, pid: 0).pod, "elephant")
        XCTAssertEqual(attributor.attribute(cgroupPath: v2Path).pod, "rabbit")
        // Ids of two hierarchies may be equal numbers: an unknown v2 id does not borrow the memory entry.
        XCTAssertEqual(attributor.attribute(cgroupId: memoryId, memoryCgroupId: 0, pid: 0), Attribution())
    }
}

/// Finding the host's hierarchies from mountinfo texts recorded on the kinds of host the agent meets.
final class HostCgroupsTests: XCTestCase {
    /// This machine (hybrid: systemd's empty cgroup2 at `unified`, v1 controllers beside it), seen from a pod
    /// whose manifest binds the host's /sys/fs/cgroup at /host/sys/fs/cgroup, with its own cgroup2 at /sys/fs/cgroup.
    let hybridInPod = """
    600 500 0:70 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
    610 500 0:28 / /host/sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
    611 610 0:29 / /host/sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
    612 610 0:30 / /host/sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
    613 610 0:32 / /host/sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
    614 610 0:37 / /host/sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
    615 610 0:38 / /host/sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
    """
    let v2InPod = """
    600 500 0:70 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
    610 500 0:26 / /host/sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate
    """
    let debianHost = """
    31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
    32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
    """

    func testInAPodTheHostMountIsUsedNotThePodsOwnCgroupView() {
        XCTAssertEqual(HostCgroups.detect(mountinfo: hybridInPod),
                       HostCgroups(root: "/host/sys/fs/cgroup", unified: "/host/sys/fs/cgroup/unified", memory: "/host/sys/fs/cgroup/memory",
                                   cpu: "/host/sys/fs/cgroup/cpu", cpuacct: "/host/sys/fs/cgroup/cpuacct"))
        XCTAssertEqual(HostCgroups.detect(mountinfo: v2InPod), HostCgroups(root: "/host/sys/fs/cgroup", unified: "/host/sys/fs/cgroup"))
        XCTAssertEqual(HostCgroups.detect(configured: "/host/sys/fs/cgroup/", mountinfo: v2InPod).unified, "/host/sys/fs/cgroup")
    }

    func testOnTheHostTheFirstMountsOfEachKindAreUsed() {
        XCTAssertEqual(HostCgroups.detect(mountinfo: debianHost),
                       HostCgroups(root: "/sys/fs/cgroup", unified: "/sys/fs/cgroup/unified", memory: "/sys/fs/cgroup/memory",
                                   cpu: "/sys/fs/cgroup/cpu,cpuacct", cpuacct: "/sys/fs/cgroup/cpu,cpuacct"))
        XCTAssertEqual(HostCgroups.detect(mountinfo: "29 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"),
                       HostCgroups(root: "/sys/fs/cgroup", unified: "/sys/fs/cgroup"))
        XCTAssertTrue(HostCgroups.detect(configured: "/nowhere", mountinfo: debianHost).isEmpty)
    }
}
