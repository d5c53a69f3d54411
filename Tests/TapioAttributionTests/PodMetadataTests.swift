import Foundation
import TapioAttribution
import XCTest

final class PodMetadataTests: XCTestCase {
    func testMinikubeDockerPodListDecodes() throws {
        let (pods, _) = try KubeDocument.pods(from: Fixtures.data("pods-minikube-docker.json"))
        XCTAssertEqual(pods.count, 1)
        let pod = try XCTUnwrap(PodInfo(pods[0]))
        XCTAssertEqual(pod.name, "queue-l4dv8")
        XCTAssertEqual(pod.namespace, "default")
        XCTAssertEqual(pod.uid, Fixtures.queueUID)
        XCTAssertEqual(pod.node, "minikube")
        XCTAssertEqual(pod.ips, ["172.17.0.6"])
        XCTAssertEqual(pod.hostIP, "192.168.49.2")
        XCTAssertEqual(pod.qosClass, "BestEffort")
        XCTAssertEqual(pod.labels["app"], "work-queue")
        XCTAssertEqual(pod.owner, PodInfo.Owner(kind: "ReplicaSet", name: "queue"))
        // No pod-template-hash label: a ReplicaSet made on its own, not by a Deployment.
        XCTAssertEqual(pod.workload, PodInfo.Owner(kind: "ReplicaSet", name: "queue"))
        XCTAssertEqual(pod.service, "work-queue")
        XCTAssertEqual(pod.containers.count, 1)
        let c = pod.containers[0]
        XCTAssertEqual(c.name, "queue")
        XCTAssertEqual(c.id, Fixtures.dockerContainer)
        XCTAssertEqual(c.runtime, .docker)
        XCTAssertEqual(c.state, "running")
        XCTAssertTrue(c.ready)
        XCTAssertNil(c.lastTermination)
    }

    func testK3sCrashLoopPodDecodes() throws {
        let pod = try XCTUnwrap(PodInfo(Fixtures.pod("pod-k3s-containerd-crashloop.json")))
        XCTAssertEqual(pod.name, "rabbit")
        XCTAssertEqual(pod.uid, Fixtures.rabbitUID)
        XCTAssertEqual(pod.node, "controlplane")
        XCTAssertEqual(pod.ips, ["10.42.0.9"])
        XCTAssertEqual(pod.qosClass, "Burstable")
        XCTAssertNil(pod.owner)
        XCTAssertEqual(pod.service, "rabbit", "a bare pod with no app label is its own service")
        let c = try XCTUnwrap(pod.containers.first)
        XCTAssertEqual(c.name, "cpu-stress")
        XCTAssertEqual(c.id, Fixtures.crashloopContainer)
        XCTAssertEqual(c.runtime, .containerd)
        XCTAssertEqual(c.state, "waiting")
        XCTAssertEqual(c.stateReason, "CrashLoopBackOff")
        XCTAssertEqual(c.restartCount, 2)
        XCTAssertEqual(c.lastTermination?.reason, "StartError")
        XCTAssertEqual(c.lastTermination?.exitCode, 128)
    }

    func testK3sOOMKilledPodDecodes() throws {
        let pod = try XCTUnwrap(PodInfo(Fixtures.pod("pod-k3s-containerd-oomkilled.json")))
        XCTAssertEqual(pod.name, "elephant")
        XCTAssertEqual(pod.namespace, "default")
        XCTAssertEqual(pod.uid, Fixtures.elephantUID)
        XCTAssertEqual(pod.ips, ["10.42.0.10"])
        let c = try XCTUnwrap(pod.containers.first)
        XCTAssertEqual(c.name, "mem-stress")
        XCTAssertEqual(c.id, Fixtures.oomContainer)
        XCTAssertEqual(c.lastTermination?.reason, "OOMKilled")
        XCTAssertEqual(c.lastTermination?.exitCode, 1)
        XCTAssertEqual(c.lastTermination?.finishedAt, "2024-08-15T15:03:39Z")
        XCTAssertEqual(pod.container(id: Fixtures.oomContainer)?.name, "mem-stress")
    }

    func testMissingFieldsAreTolerated() throws {
        let minimal = #"{"metadata":{"name":"p","uid":"11111111-2222-3333-4444-555555555555"}}"#
        let pod = try XCTUnwrap(PodInfo(KubeDocument.pods(from: Data(minimal.utf8)).pods[0]))
        XCTAssertEqual(pod.namespace, "default")
        XCTAssertEqual(pod.ips, [])
        XCTAssertEqual(pod.containers, [])
        XCTAssertEqual(pod.service, "p")
        // No uid: nothing to key it by.
        XCTAssertNil(PodInfo(try KubeDocument.pods(from: Data(#"{"kind":"Pod","metadata":{"name":"x"}}"#.utf8)).pods[0]))
        // An empty list, and a pod whose status is still empty (just created).
        XCTAssertEqual(try KubeDocument.pods(from: Data(#"{"kind":"PodList","items":null}"#.utf8)).pods.count, 0)
        let pending = #"{"metadata":{"name":"p","namespace":"ns","uid":"11111111-2222-3333-4444-555555555555"},"spec":{"containers":[{"name":"app"}]},"status":{"phase":"Pending"}}"#
        let p = try XCTUnwrap(PodInfo(KubeDocument.pods(from: Data(pending.utf8)).pods[0]))
        XCTAssertEqual(p.containers.map(\.name), ["app"])
        XCTAssertNil(p.containers[0].id)
        XCTAssertThrowsError(try KubeDocument.pods(from: Data(#"{"kind":"Service"}"#.utf8)))
        XCTAssertThrowsError(try KubeDocument.pods(from: Data("{not json".utf8)))
    }

    func testContainerIDPrefixesAreStripped() {
        XCTAssertEqual(ContainerInfo.splitID("containerd://abc").0, .containerd)
        XCTAssertEqual(ContainerInfo.splitID("docker://abc").1, "abc")
        XCTAssertEqual(ContainerInfo.splitID("cri-o://abc").0, .crio)
        XCTAssertEqual(ContainerInfo.splitID("abc").1, "abc")
        XCTAssertNil(ContainerInfo.splitID("").1)
    }

    /// A Deployment's ReplicaSet is `<deployment>-<pod-template-hash>`; the
    /// fixture pod, re-owned that way, names the Deployment.
    func testDeploymentIsDerivedFromTheReplicaSetAndHashLabel() throws {
        var kube = try KubeDocument.pods(from: Fixtures.data("pods-minikube-docker.json")).pods[0]
        kube.metadata?.labels = ["pod-template-hash": "7d4b9c8f6d"]
        kube.metadata?.ownerReferences = [KubeOwnerReference(kind: "ReplicaSet", name: "queue-api-7d4b9c8f6d")]
        let pod = try XCTUnwrap(PodInfo(kube))
        XCTAssertEqual(pod.owner, PodInfo.Owner(kind: "ReplicaSet", name: "queue-api-7d4b9c8f6d"))
        XCTAssertEqual(pod.workload, PodInfo.Owner(kind: "Deployment", name: "queue-api"))
        XCTAssertEqual(pod.service, "queue-api")

        XCTAssertEqual(PodInfo.serviceName(labels: ["app.kubernetes.io/name": "a", "app": "b"], workload: nil, podName: "p"), "a")
        XCTAssertEqual(PodInfo.serviceName(labels: ["k8s-app": "kube-dns"], workload: nil, podName: "coredns-x"), "kube-dns")
        XCTAssertEqual(PodInfo.serviceName(labels: [:], workload: .init(kind: "StatefulSet", name: "db"), podName: "db-0"), "db")
        XCTAssertEqual(PodInfo.serviceName(labels: [:], workload: .init(kind: "Node", name: "n1"), podName: "etcd-n1"), "etcd-n1")
        // A hash label that does not match the owner's suffix changes nothing.
        XCTAssertEqual(PodInfo.workload(owner: .init(kind: "ReplicaSet", name: "web-abc"), labels: ["pod-template-hash": "xyz"]),
                       .init(kind: "ReplicaSet", name: "web-abc"))
    }

    func testWatchEventsDecodePodsAndErrorStatuses() throws {
        let pod = try String(decoding: Fixtures.data("pod-k3s-containerd-oomkilled.json"), as: UTF8.self)
        let added = try JSONDecoder().decode(KubeWatchEvent.self, from: Data(#"{"type":"ADDED","object":\#(pod)}"#.utf8))
        XCTAssertEqual(added.type, .added)
        guard case .pod(let p) = added.object else { return XCTFail("not a pod") }
        XCTAssertEqual(p.metadata?.name, "elephant")
        let gone = #"{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 1 (2)","reason":"Expired","code":410}}"#
        let error = try JSONDecoder().decode(KubeWatchEvent.self, from: Data(gone.utf8))
        XCTAssertEqual(error.object, .status(KubeStatus(kind: "Status", status: "Failure", message: "too old resource version: 1 (2)", reason: "Expired", code: 410)))
    }
}
