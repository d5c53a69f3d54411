import TapioAttribution
import XCTest

final class CgroupPathTests: XCTestCase {
    private let id = "6b7e45e136716ed030ebdb79bcc5674204b1abd6cee0add02ea4c2e891e65183"
    private let uid = "80aa3c62-fed5-444c-a63e-a6de52a86843"
    private let uidUnderscores = "80aa3c62_fed5_444c_a63e_a6de52a86843"

    private struct Case {
        var layout: String
        var path: String
        var container: String?
        var runtime: ContainerRuntime?
        var pod: String?
        var qos: String?
        var unit: String?
        var kubernetes: Bool
    }

    func testEveryLayoutGivesItsContainerPodAndQoS() {
        let docker = "d8e1e33309272b4a4267e15f995ff7b6612532240cb61dc03a118659620226f2"
        let cases: [Case] = [
            Case(layout: "containerd/k3s cgroupfs v1 (burstable)", path: "/kubepods/burstable/pod\(uid)/\(id)",
                 container: id, runtime: nil, pod: uid, qos: "Burstable", kubernetes: true),
            Case(layout: "cgroupfs, guaranteed pod directly under kubepods", path: "/kubepods/pod\(uid)/\(id)",
                 container: id, runtime: nil, pod: uid, qos: "Guaranteed", kubernetes: true),
            Case(layout: "cgroupfs besteffort, pod cgroup itself", path: "/kubepods/besteffort/pod\(uid)",
                 container: nil, runtime: nil, pod: uid, qos: "BestEffort", kubernetes: true),
            Case(layout: "containerd systemd v2",
                 path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod\(uidUnderscores).slice/cri-containerd-\(id).scope",
                 container: id, runtime: .containerd, pod: uid, qos: "Burstable", kubernetes: true),
            Case(layout: "containerd systemd, guaranteed",
                 path: "/kubepods.slice/kubepods-pod\(uidUnderscores).slice/cri-containerd-\(id).scope",
                 container: id, runtime: .containerd, pod: uid, qos: "Guaranteed", kubernetes: true),
            Case(layout: "CRI-O systemd",
                 path: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod\(uidUnderscores).slice/crio-\(id).scope",
                 container: id, runtime: .crio, pod: uid, qos: "BestEffort", kubernetes: true),
            Case(layout: "CRI-O conmon is the pod's, not the container's",
                 path: "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod\(uidUnderscores).slice/crio-conmon-\(id).scope",
                 container: nil, runtime: nil, pod: uid, qos: "Burstable", kubernetes: true),
            Case(layout: "Docker cgroupfs", path: "/docker/\(docker)", container: docker, runtime: .docker, kubernetes: false),
            Case(layout: "Docker systemd", path: "/system.slice/docker-\(docker).scope", container: docker, runtime: .docker, kubernetes: false),
            Case(layout: "kubepods with dockershim ids (minikube)", path: "/kubepods/besteffort/podd8aa9a47-ad0f-4bbe-bc12-ab31605d3211/\(docker)",
                 container: docker, runtime: nil, pod: "d8aa9a47-ad0f-4bbe-bc12-ab31605d3211", qos: "BestEffort", kubernetes: true),
            Case(layout: "kubepods systemd with docker ids",
                 path: "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podd8aa9a47_ad0f_4bbe_bc12_ab31605d3211.slice/docker-\(docker).scope",
                 container: docker, runtime: .docker, pod: "d8aa9a47-ad0f-4bbe-bc12-ab31605d3211", qos: "BestEffort", kubernetes: true),
            Case(layout: "kind node in Docker: the inner container wins",
                 path: "/docker/\(docker)/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod\(uidUnderscores).slice/cri-containerd-\(id).scope",
                 container: id, runtime: .containerd, pod: uid, qos: "Burstable", kubernetes: true),
            Case(layout: "static pod: 32-hex config hash", path: "/kubepods/burstable/pod5a3e1c1e0b6a4c8f9d2e7b1a0c3d4e5f/\(id)",
                 container: id, runtime: nil, pod: "5a3e1c1e0b6a4c8f9d2e7b1a0c3d4e5f", qos: "Burstable", kubernetes: true),
            Case(layout: "podman", path: "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-\(id).scope",
                 container: id, runtime: .podman, kubernetes: false),
            Case(layout: "systemd service on the host", path: "/system.slice/kubelet.service", unit: "kubelet.service", kubernetes: false),
            Case(layout: "login session", path: "/user.slice/user-0.slice/session-3.scope", unit: "session-3.scope", kubernetes: false),
            Case(layout: "root cgroup", path: "/", kubernetes: false),
            Case(layout: "plain host path", path: "/process_api/1320a9eb5205d6c366c3dd38cd0a96cf", kubernetes: false),
            Case(layout: "kubepods slice itself", path: "/kubepods.slice/kubepods-burstable.slice", qos: "Burstable", kubernetes: true),
        ]
        for c in cases {
            let info = CgroupPathInfo.parse(c.path)
            XCTAssertEqual(info.containerId, c.container, c.layout)
            XCTAssertEqual(info.runtime, c.runtime, c.layout)
            XCTAssertEqual(info.podUID, c.pod, c.layout)
            XCTAssertEqual(info.qosClass, c.qos, c.layout)
            XCTAssertEqual(info.systemdUnit, c.unit, c.layout)
            XCTAssertEqual(info.isKubernetes, c.kubernetes, c.layout)
            XCTAssertEqual(info.isHost, c.container == nil && c.pod == nil, c.layout)
        }
    }

    /// The crash-loop fixture's StartError message quotes the real cgroup v1
    /// file runc failed to write; the path in it names the fixture's own pod
    /// and container.
    func testTheCgroupV1PathQuotedByARealKubeletMessage() throws {
        let pod = try Fixtures.pod("pod-k3s-containerd-crashloop.json")
        let message = try XCTUnwrap(pod.status?.containerStatuses?.first?.lastState?.terminated?.message)
        let start = try XCTUnwrap(message.range(of: "write /sys/fs/cgroup/"))
        let end = try XCTUnwrap(message.range(of: ": invalid argument"))
        let file = String(message[message.index(start.lowerBound, offsetBy: 6)..<end.lowerBound])
        XCTAssertEqual(file, "/sys/fs/cgroup/cpu,cpuacct/kubepods/burstable/pod\(uid)/\(id)/cpu.cfs_quota_us")

        let info = CgroupPathInfo.parse(file)
        XCTAssertEqual(info.podUID, pod.metadata?.uid)
        XCTAssertEqual(info.containerId, ContainerInfo.splitID(pod.status?.containerStatuses?.first?.containerID).1)
        XCTAssertEqual(info.qosClass, pod.status?.qosClass)
    }

    func testIdentifiersAreValidatedNotGuessed() {
        XCTAssertTrue(CgroupPathInfo.isContainerID(id))
        XCTAssertFalse(CgroupPathInfo.isContainerID(String(id.dropLast())))
        XCTAssertFalse(CgroupPathInfo.isContainerID(id.uppercased()))
        XCTAssertTrue(CgroupPathInfo.isPodUID(uid))
        XCTAssertFalse(CgroupPathInfo.isPodUID(uidUnderscores))
        XCTAssertFalse(CgroupPathInfo.isPodUID("80aa3c62-fed5-444c-a63e-a6de52a8684"))
        // "pod" prefixes that are not pods: a pod-named service, a podman user slice.
        XCTAssertNil(CgroupPathInfo.parse("/system.slice/podinfo.service").podUID)
        XCTAssertNil(CgroupPathInfo.parse("/kubepods/burstable/podnotauid/\(id)").podUID)
    }
}
