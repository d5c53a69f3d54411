import Foundation

// The subset of the Kubernetes core/v1 API that attribution reads, decoded
// with Codable from the API's own JSON. Every field is optional: objects from
// old clusters, trimmed test files and `kubectl get -o json` all decode, and a
// field this code does not know is ignored.

/// A core/v1 Pod.
public struct KubePod: Codable, Sendable, Equatable {
    public var apiVersion: String?
    public var kind: String?
    public var metadata: KubeObjectMeta?
    public var spec: KubePodSpec?
    public var status: KubePodStatus?

    public init(metadata: KubeObjectMeta? = nil, spec: KubePodSpec? = nil, status: KubePodStatus? = nil) {
        self.apiVersion = "v1"
        self.kind = "Pod"
        self.metadata = metadata
        self.spec = spec
        self.status = status
    }
}

public struct KubeObjectMeta: Codable, Sendable, Equatable {
    public var name: String?
    public var generateName: String?
    public var namespace: String?
    public var uid: String?
    public var resourceVersion: String?
    public var creationTimestamp: String?
    public var deletionTimestamp: String?
    public var labels: [String: String]?
    public var annotations: [String: String]?
    public var ownerReferences: [KubeOwnerReference]?

    public init(name: String? = nil, namespace: String? = nil, uid: String? = nil, labels: [String: String]? = nil,
                ownerReferences: [KubeOwnerReference]? = nil) {
        self.name = name
        self.namespace = namespace
        self.uid = uid
        self.labels = labels
        self.ownerReferences = ownerReferences
    }
}

public struct KubeOwnerReference: Codable, Sendable, Equatable {
    public var apiVersion: String?
    public var kind: String?
    public var name: String?
    public var uid: String?
    public var controller: Bool?

    public init(kind: String, name: String, controller: Bool? = true) {
        self.kind = kind
        self.name = name
        self.controller = controller
    }
}

public struct KubePodSpec: Codable, Sendable, Equatable {
    public var nodeName: String?
    public var hostNetwork: Bool?
    public var containers: [KubeContainer]?
    public var initContainers: [KubeContainer]?
}

public struct KubeContainer: Codable, Sendable, Equatable {
    public var name: String?
    public var image: String?
}

public struct KubePodStatus: Codable, Sendable, Equatable {
    public var phase: String?
    public var reason: String?
    public var hostIP: String?
    public var podIP: String?
    public var podIPs: [KubePodIP]?
    public var qosClass: String?
    public var startTime: String?
    public var containerStatuses: [KubeContainerStatus]?
    public var initContainerStatuses: [KubeContainerStatus]?
    public var ephemeralContainerStatuses: [KubeContainerStatus]?
}

public struct KubePodIP: Codable, Sendable, Equatable {
    public var ip: String?
}

public struct KubeContainerStatus: Codable, Sendable, Equatable {
    public var name: String?
    public var containerID: String?
    public var image: String?
    public var imageID: String?
    public var ready: Bool?
    public var started: Bool?
    public var restartCount: Int?
    public var state: KubeContainerState?
    public var lastState: KubeContainerState?
}

public struct KubeContainerState: Codable, Sendable, Equatable {
    public var running: Running?
    public var waiting: Waiting?
    public var terminated: Terminated?

    public struct Running: Codable, Sendable, Equatable {
        public var startedAt: String?
    }

    public struct Waiting: Codable, Sendable, Equatable {
        public var reason: String?
        public var message: String?
    }

    public struct Terminated: Codable, Sendable, Equatable {
        public var containerID: String?
        public var exitCode: Int?
        public var signal: Int?
        public var reason: String?
        public var message: String?
        public var startedAt: String?
        public var finishedAt: String?
    }
}

/// A PodList (`GET /api/v1/pods`), or a generic `List` as `kubectl get -o json` writes it.
public struct KubePodList: Codable, Sendable, Equatable {
    public var apiVersion: String?
    public var kind: String?
    public var metadata: KubeListMeta?
    public var items: [KubePod]?

    public init(items: [KubePod], resourceVersion: String? = nil) {
        self.apiVersion = "v1"
        self.kind = "PodList"
        self.metadata = KubeListMeta(resourceVersion: resourceVersion)
        self.items = items
    }
}

public struct KubeListMeta: Codable, Sendable, Equatable {
    public var resourceVersion: String?
    public var `continue`: String?

    public init(resourceVersion: String? = nil) {
        self.resourceVersion = resourceVersion
    }
}

/// A meta/v1 Status, as the API sends for errors (and inside a watch `ERROR` event).
public struct KubeStatus: Codable, Sendable, Equatable {
    public var kind: String?
    public var status: String?
    public var message: String?
    public var reason: String?
    public var code: Int?

    public init(kind: String? = "Status", status: String? = nil, message: String? = nil, reason: String? = nil, code: Int? = nil) {
        self.kind = kind
        self.status = status
        self.message = message
        self.reason = reason
        self.code = code
    }
}

/// One line of a watch stream: `{"type":"ADDED","object":{…}}`.
public struct KubeWatchEvent: Decodable, Sendable, Equatable {
    public enum EventType: String, Sendable {
        case added = "ADDED", modified = "MODIFIED", deleted = "DELETED", bookmark = "BOOKMARK", error = "ERROR"
    }

    public enum Object: Sendable, Equatable {
        case pod(KubePod)
        case status(KubeStatus)
    }

    public var type: EventType
    public var object: Object

    enum CodingKeys: String, CodingKey { case type, object }

    public init(type: EventType, object: Object) {
        self.type = type
        self.object = object
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        let raw = try c.decode(String.self, forKey: .type)
        guard let type = EventType(rawValue: raw) else {
            throw DecodingError.dataCorruptedError(forKey: .type, in: c, debugDescription: "unknown watch event type \(raw)")
        }
        self.type = type
        // An ERROR event carries a Status, whose `status` is a string, not a PodStatus.
        object = type == .error ? .status(try c.decode(KubeStatus.self, forKey: .object)) : .pod(try c.decode(KubePod.self, forKey: .object))
    }
}

/// Decoding pods from the documents attribution reads.
public enum KubeDocument {
    /// The pods of a PodList / List, or of a single Pod, and the list's
    /// resourceVersion when it has one.
    public static func pods(from data: Data) throws -> (pods: [KubePod], resourceVersion: String?) {
        struct Probe: Decodable { var kind: String?; var items: [KubePod]? }
        let decoder = JSONDecoder()
        let probe: Probe
        do {
            probe = try decoder.decode(Probe.self, from: data)
        } catch {
            throw AttributionError("not Kubernetes JSON: \(describe(error))")
        }
        if probe.items != nil || probe.kind == "PodList" || probe.kind == "List" {
            let list = try decoder.decode(KubePodList.self, from: data)
            return (list.items ?? [], list.metadata?.resourceVersion)
        }
        if probe.kind == nil || probe.kind == "Pod" {
            return ([try decoder.decode(KubePod.self, from: data)], nil)
        }
        throw AttributionError("expected a PodList, List or Pod, found kind \(probe.kind ?? "?")")
    }

    static func describe(_ error: any Error) -> String {
        switch error {
        case DecodingError.dataCorrupted(let c): return c.debugDescription + path(c.codingPath)
        case DecodingError.typeMismatch(_, let c): return c.debugDescription + path(c.codingPath)
        case DecodingError.valueNotFound(_, let c): return c.debugDescription + path(c.codingPath)
        case DecodingError.keyNotFound(let k, let c): return "missing \(k.stringValue)" + path(c.codingPath)
        default: return "\(error)"
        }
    }

    private static func path(_ keys: [any CodingKey]) -> String {
        keys.isEmpty ? "" : " at " + keys.map { $0.intValue.map { "[\($0)]" } ?? $0.stringValue }.joined(separator: ".")
    }
}
