import Foundation
import TapioAttribution
import XCTest

final class AttributorTests: XCTestCase {
    private func fixtureIndex(retention: Double = 120) throws -> PodIndex {
        let index = PodIndex(retention: retention)
        index.replaceAll(try KubeDocument.pods(from: Fixtures.podListJSON()).pods.compactMap(PodInfo.init))
        return index
    }

    func testProcCgroupLinesParseForV1AndV2() {
        let text = """
        12:memory:/kubepods/burstable/pod\(Fixtures.elephantUID)/\(Fixtures.oomContainer)
        11:cpu,cpuacct:/kubepods/burstable/pod\(Fixtures.elephantUID)/\(Fixtures.oomContainer)
        1:name=systemd:/kubepods/burstable/pod\(Fixtures.elephantUID)/\(Fixtures.oomContainer)
        0::/
        garbage
        """
        let entries = ProcCgroup.parse(text)
        XCTAssertEqual(entries.count, 4)
        XCTAssertEqual(entries[1].controllers, ["cpu", "cpuacct"])
        XCTAssertTrue(entries[3].isUnified)
        XCTAssertEqual(entries[3].path, "/")
        // Hybrid host: v2 says "/", v1 says where the container is.
        XCTAssertEqual(ProcCgroup.identify(entries)?.info.containerId, Fixtures.oomContainer)
        // v2 only.
        let v2 = ProcCgroup.parse("0::/kubepods.slice/kubepods-pod\(Fixtures.rabbitUID.replacingOccurrences(of: "-", with: "_")).slice/cri-containerd-\(Fixtures.crashloopContainer).scope\n")
        XCTAssertEqual(ProcCgroup.identify(v2)?.info.podUID, Fixtures.rabbitUID)
        // A path with a colon in it stays whole.
        XCTAssertEqual(ProcCgroup.parse("0::/a:b\n").first?.path, "/a:b")
    }

    func testThisProcessHasReadableCgroups() throws {
        let entries = try XCTUnwrap(ProcCgroup.read(pid: getpid()))
        XCTAssertFalse(entries.isEmpty)
        XCTAssertNil(ProcCgroup.read(pid: Int32.max))
    }

    func testAHostPidIsReadFromProcfsAndRememberedBriefly() throws {
        let attributor = Attributor(index: PodIndex(), resolver: nil, configuration: .init(hostPidTTL: 60))
        let me = UInt32(getpid())
        let a = attributor.attribute(cgroupId: 0, pid: me)
        XCTAssertTrue(a.isHost, "the test runs outside any container: \(a)")
        XCTAssertEqual(a.cgroupPath, ProcCgroup.identify(try XCTUnwrap(ProcCgroup.read(pid: getpid())))?.path)
        XCTAssertEqual(attributor.cachedEntries.pids, 1)
        attributor.processExited(pid: me)
        XCTAssertEqual(attributor.cachedEntries.pids, 0)
        XCTAssertEqual(attributor.attribute(cgroupId: 0, pid: 0), Attribution())
    }

    func testCgroup2MountIsFoundInMountinfo() {
        let mountinfo = """
        31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
        """
        XCTAssertEqual(CgroupMount.cgroup2MountPoint(mountinfo: mountinfo), "/sys/fs/cgroup/unified")
        XCTAssertEqual(CgroupMount.cgroup2MountPoint(mountinfo: "29 1 0:26 / /host\\040root/cgroup rw - cgroup2 cgroup2 rw\n"), "/host root/cgroup")
        XCTAssertNil(CgroupMount.cgroup2MountPoint(mountinfo: "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"))
    }

    func testPathsAttributeToFixturePodsByContainerThenByPod() throws {
        let attributor = Attributor(index: try fixtureIndex(), resolver: nil)
        let oom = attributor.attribute(cgroupPath: "/kubepods/burstable/pod\(Fixtures.elephantUID)/\(Fixtures.oomContainer)")
        XCTAssertEqual(oom, Attribution(containerId: Fixtures.oomContainer, containerName: "mem-stress", pod: "elephant", namespace: "default",
                                        podUID: Fixtures.elephantUID, service: "elephant",
                                        cgroupPath: "/kubepods/burstable/pod\(Fixtures.elephantUID)/\(Fixtures.oomContainer)"))
        // The pause (sandbox) container is not in the status: the pod is still known from the UID.
        let sandbox = String(repeating: "ab", count: 32)
        let pause = attributor.attribute(cgroupPath: "/kubepods/besteffort/pod\(Fixtures.queueUID)/\(sandbox)")
        XCTAssertEqual([pause.pod, pause.containerName, pause.containerId, pause.service], ["queue-l4dv8", "", sandbox, "work-queue"])
        // Docker on the host, unknown to Kubernetes: a container without a pod.
        let bare = attributor.attribute(cgroupPath: "/system.slice/docker-\(sandbox).scope")
        XCTAssertEqual([bare.containerId, bare.pod], [sandbox, ""])
        XCTAssertFalse(bare.isHost)
        XCTAssertTrue(attributor.attribute(cgroupPath: "/user.slice/user-0.slice/session-1.scope").isHost)
    }

    func testMetadataArrivingLaterAttributesLaterEvents() throws {
        let index = PodIndex()
        let attributor = Attributor(index: index, resolver: nil)
        let path = "/kubepods/burstable/pod\(Fixtures.rabbitUID)/\(Fixtures.crashloopContainer)"
        XCTAssertEqual(attributor.attribute(cgroupPath: path).pod, "")
        index.upsert(try XCTUnwrap(PodInfo(Fixtures.pod("pod-k3s-containerd-crashloop.json"))))
        XCTAssertEqual(attributor.attribute(cgroupPath: path).pod, "rabbit")
    }

    func testPodIPMapSkipsHostNetworkAndFinishedPodsAndFollowsReuse() throws {
        let index = try fixtureIndex(retention: 0)
        let attributor = Attributor(index: index, resolver: nil)
        XCTAssertEqual(attributor.pod(ip: "10.42.0.10")?.name, "elephant")
        XCTAssertEqual(attributor.pod(ip: "172.17.0.6")?.name, "queue-l4dv8")
        XCTAssertNil(attributor.pod(ip: "192.30.201.6"), "the host IP is no pod's")

        var host = try XCTUnwrap(PodInfo(Fixtures.pod("pod-k3s-containerd-crashloop.json")))
        host.uid = "99999999-0000-0000-0000-000000000000"
        host.name = "kube-proxy-abc"
        host.hostNetwork = true
        host.ips = ["192.30.201.6"]
        index.upsert(host)
        XCTAssertNil(index.pod(ip: "192.30.201.6"))

        // elephant finishes; a new pod gets its IP; the old one's deletion must not unmap it.
        var done = try XCTUnwrap(index.pod(uid: Fixtures.elephantUID))
        done.phase = "Failed"
        index.upsert(done)
        XCTAssertNil(index.pod(ip: "10.42.0.10"))
        var next = done
        next.uid = "12345678-0000-0000-0000-000000000000"
        next.name = "elephant-2"
        next.phase = "Running"
        index.upsert(next)
        index.remove(uid: Fixtures.elephantUID)
        XCTAssertEqual(index.pod(ip: "10.42.0.10")?.name, "elephant-2")
        index.sweep()
        XCTAssertNil(index.pod(uid: Fixtures.elephantUID), "retention 0: gone after a sweep")
    }

    func testStaticPodsAreFoundByTheirConfigHash() throws {
        let json = """
        {"metadata":{"name":"etcd-node1","namespace":"kube-system","uid":"c0ffee00-1111-2222-3333-444444444444",
         "annotations":{"kubernetes.io/config.mirror":"5a3e1c1e0b6a4c8f9d2e7b1a0c3d4e5f"},
         "labels":{"component":"etcd"},"ownerReferences":[{"kind":"Node","name":"node1","controller":true}]},
         "spec":{"nodeName":"node1","hostNetwork":true},"status":{"phase":"Running","podIP":"10.0.0.5"}}
        """
        let index = PodIndex()
        index.upsert(try XCTUnwrap(PodInfo(KubeDocument.pods(from: Data(json.utf8)).pods[0])))
        let a = Attributor(index: index, resolver: nil).attribute(cgroupPath: "/kubepods/burstable/pod5a3e1c1e0b6a4c8f9d2e7b1a0c3d4e5f/\(Fixtures.oomContainer)")
        XCTAssertEqual([a.pod, a.namespace, a.service], ["etcd-node1", "kube-system", "etcd-node1"])
    }
}
