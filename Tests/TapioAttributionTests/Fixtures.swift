import Foundation
import TapioAttribution
import XCTest

/// The recorded Kubernetes objects in Fixtures/ (copied from
/// shared/fixtures/kubernetes: real `kubectl get -o json` captures, see its README).
enum Fixtures {
    static var directory: String {
        Bundle.module.url(forResource: "Fixtures", withExtension: nil)!.path
    }

    static func data(_ name: String) throws -> Data {
        try Data(contentsOf: URL(fileURLWithPath: directory + "/" + name))
    }

    static func pod(_ name: String) throws -> KubePod {
        try JSONDecoder().decode(KubePod.self, from: data(name))
    }

    /// All three fixtures' pods as one PodList document.
    static func podListJSON(_ transform: (inout [KubePod]) -> Void = { _ in }) throws -> Data {
        var pods = try KubeDocument.pods(from: data("pods-minikube-docker.json")).pods
        pods.append(try pod("pod-k3s-containerd-crashloop.json"))
        pods.append(try pod("pod-k3s-containerd-oomkilled.json"))
        transform(&pods)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        return try encoder.encode(KubePodList(items: pods, resourceVersion: "42"))
    }

    static let crashloopContainer = "6b7e45e136716ed030ebdb79bcc5674204b1abd6cee0add02ea4c2e891e65183"
    static let oomContainer = "720b7253bb461abb6c528b4bfd1fe3d647aeb2f5ab51ddba873ec973c4b975b1"
    static let dockerContainer = "d8e1e33309272b4a4267e15f995ff7b6612532240cb61dc03a118659620226f2"
    static let rabbitUID = "80aa3c62-fed5-444c-a63e-a6de52a86843"
    static let elephantUID = "0ab05b0a-e122-4153-8415-ee2b772d6148"
    static let queueUID = "d8aa9a47-ad0f-4bbe-bc12-ab31605d3211"
}
