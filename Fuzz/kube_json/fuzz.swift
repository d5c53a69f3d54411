// Kubernetes JSON into pods (Sources/TapioAttribution/KubernetesObjects.swift,
// PodInfo.swift, PodIndex.swift): a PodList, List or Pod as the API or a
// metadata file gives it, and a watch event line.
//
// Input: one JSON document.
import Foundation
import TapioAttribution

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let document = Data(bytes(data, size))
    let index = PodIndex(retention: 0)

    if let (pods, _) = try? KubeDocument.pods(from: document) {
        let infos = pods.compactMap(PodInfo.init)
        index.replaceAll(infos)
        for info in infos {
            _ = index.pod(uid: info.uid)
            _ = index.pod(namespace: info.namespace, name: info.name)
            for ip in info.ips { _ = index.pod(ip: ip) }
            for c in info.containers {
                if let id = c.id { _ = index.pod(containerId: id) }
                if let id = c.lastTermination?.containerId { _ = index.pod(containerId: id) }
            }
            _ = info.isFinished
        }
        _ = index.allPods
    }

    // A watch line, applied the way KubernetesAPISource.watch applies it.
    if let event = try? JSONDecoder().decode(KubeWatchEvent.self, from: document) {
        switch (event.type, event.object) {
        case (.added, .pod(let pod)), (.modified, .pod(let pod)):
            if let info = PodInfo(pod) { index.upsert(info) }
        case (.deleted, .pod(let pod)):
            if let uid = pod.metadata?.uid { index.remove(uid: uid) }
        default:
            break
        }
        index.sweep()
    }
    _ = try? JSONDecoder().decode(KubeStatus.self, from: document)
    return 0
}
