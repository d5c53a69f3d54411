import TapioWire

/// An entity as resolved from an event or an address, with how sure the
/// resolution is (the metadata factor).
struct EntityRef: Sendable, Equatable, Codable {
    var name: String
    /// 1 resolved through the inventory, lower for weaker evidence (a pod
    /// name without inventory, a DNS name, a host process, a bare address).
    var quality: Double
    var pod: PodEntry?
    var isService: Bool
}

/// A pod of the inventory as the topology's indexes hold it: shared, not
/// copied per lookup (every event resolves its entity), with its entity
/// computed once.
final class PodEntry: Sendable, Equatable, Codable {
    let info: PodInfo
    /// `Topology.serviceName(info)`.
    let service: String

    init(_ info: PodInfo) {
        self.info = info
        service = Topology.serviceName(info)
    }

    static func == (a: PodEntry, b: PodEntry) -> Bool { a === b || a.info == b.info }

    convenience init(from decoder: Decoder) throws {
        self.init(try decoder.singleValueContainer().decode(PodInfo.self))
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(info)
    }
}

/// What the engine knows of the cluster's shape, fed as data: pods from the
/// agents' inventories, names from DNS answers, listeners seen opening.
struct Topology: Sendable, Codable {
    private var podsByNode: [String: [PodInfo]] = [:]
    private var byIP: [String: PodEntry] = [:]
    private var byContainer: [String: PodEntry] = [:]
    private var byNamespacedName: [String: PodEntry] = [:]
    private var byName: [String: PodEntry] = [:]
    /// Address → the DNS name that last answered it.
    private(set) var nameByIP: [String: String] = [:]
    /// DNS name → addresses of its last answer.
    private(set) var addressesByName: [String: [String]] = [:]
    /// Entity → nodes it was seen on (events, inventory).
    private(set) var entityNodes: [String: Set<String>] = [:]
    /// Address → the entity seen serving on it, for addresses outside the
    /// inventory (host processes, the lab without pod metadata).
    private(set) var ownerByIP: [String: String] = [:]
    /// Entity → ports it listened on.
    private(set) var listenPorts: [String: Set<UInt16>] = [:]
    /// Ports seen serving anywhere: listeners, connects' destinations, the
    /// server end of measured flows. Which end of a connection is the server
    /// when the kernel's record does not say (a reset's flow keeps both ports).
    private(set) var serverPorts: Set<UInt16> = []
    /// Addresses' text, remembered: the engine looks addresses up by their
    /// text on every network event and every DNS answer, and formatting
    /// them was about 9 % of a replay. Not part of checkpoints.
    private var addressTexts: [IPAddress: String] = [:]
    static let maxAddressTexts = 65_536

    // Checkpoints hold what they held before the remembered texts.
    private enum CodingKeys: String, CodingKey {
        case podsByNode, byIP, byContainer, byNamespacedName, byName, nameByIP, addressesByName, entityNodes, ownerByIP, listenPorts, serverPorts
    }

    /// `address.description`, remembered (bounded: a flood of addresses
    /// starts the memo afresh).
    mutating func text(of address: IPAddress) -> String {
        if let t = addressTexts[address] { return t }
        let t = address.description
        if addressTexts.count >= Topology.maxAddressTexts { addressTexts.removeAll(keepingCapacity: true) }
        addressTexts[address] = t
        return t
    }

    mutating func replace(node: String, pods: [PodInfo]) {
        podsByNode[node] = pods
        byIP.removeAll(keepingCapacity: true)
        byContainer.removeAll(keepingCapacity: true)
        byNamespacedName.removeAll(keepingCapacity: true)
        byName.removeAll(keepingCapacity: true)
        // A node speaks only for its own pods: keys two nodes claim map to none.
        var entries: [String: PodEntry] = [:]  // node/uid/name → one entry per pod
        func entry(_ p: PodInfo) -> PodEntry {
            let key = p.node + "\u{0}" + p.uid + "\u{0}" + p.namespace + "/" + p.name
            if let e = entries[key], e.info == p { return e }
            let e = PodEntry(p)
            entries[key] = e
            return e
        }
        byIP = PodClaims(podsByNode, keys: \.ips).index.mapValues(entry)
        byContainer = PodClaims(podsByNode, keys: { $0.containerIds.map(Topology.shortContainerId) }).index.mapValues(entry)
        byNamespacedName = PodClaims(podsByNode, keys: { [$0.namespace + "/" + $0.name] }).index.mapValues(entry)
        for n in podsByNode.keys.sorted() {
            for p in podsByNode[n]! {
                let e = entry(p)
                byName[p.name] = e
                entityNodes[e.service, default: []].insert(p.node.isEmpty ? n : p.node)
            }
        }
    }

    /// The contract's entity of a pod: its service, else labels, else owner, else its name.
    static func serviceName(_ p: PodInfo) -> String {
        if !p.service.isEmpty { return p.service }
        if let s = p.labels["app.kubernetes.io/name"], !s.isEmpty { return s }
        if let s = p.labels["app"], !s.isEmpty { return s }
        if !p.ownerName.isEmpty { return p.ownerName }
        return p.name
    }

    /// `containerd://abc…` and `abc…` name the same container.
    static func shortContainerId(_ id: String) -> String {
        // Every event asks: the usual bare id (no ':') costs one byte scan,
        // not a Foundation search.
        // A prefixed one (containerd://…) is cut after its first "://" by
        // bytes too: no Foundation search either (it was 5 % of a replay).
        guard id.utf8.withContiguousStorageIfAvailable({ $0.contains(UInt8(ascii: ":")) }) ?? id.utf8.contains(UInt8(ascii: ":")) else { return id }
        let cut: Int?? = id.utf8.withContiguousStorageIfAvailable { b -> Int?? in
            guard b.allSatisfy({ $0 < 0x80 }) else { return .none }  // not ASCII: as before
            guard b.count >= 3 else { return .some(nil) }
            for i in 0...(b.count - 3) where b[i] == UInt8(ascii: ":") && b[i + 1] == UInt8(ascii: "/") && b[i + 2] == UInt8(ascii: "/") {
                return .some(i + 3)
            }
            return .some(nil)
        } ?? .none
        switch cut {
        case .some(.some(let i)):
            return String(decoding: id.utf8.dropFirst(i), as: UTF8.self)
        case .some(.none):
            return id
        case .none:
            let colon = id.utf8.contains(UInt8(ascii: ":"))
            guard colon, let r = id.range(of: "://") else { return id }
            return String(id[r.upperBound...])
        }
    }

    func pod(ip: String) -> PodInfo? { byIP[ip]?.info }

    func isService(_ entity: String) -> Bool {
        podsByNode.values.contains { $0.contains { Topology.serviceName($0) == entity } }
    }

    /// Addresses of the pods of `entity` (a service or pod name).
    func addresses(of entity: String) -> Set<String> {
        var out = Set<String>()
        for pods in podsByNode.values {
            for p in pods where Topology.serviceName(p) == entity || p.name == entity { out.formUnion(p.ips) }
        }
        return out
    }

    func nodes(of entity: String) -> Set<String> { entityNodes[entity] ?? [] }

    /// Whether `node`'s inventory lists pods.
    func hasPods(node: String) -> Bool { !(podsByNode[node]?.isEmpty ?? true) }

    /// The entity the event is about: the process's pod's service, else the
    /// pod, else `<comm>@<node>`; for a socket event without attribution,
    /// the owner of its local address.
    func entity(of e: ObservedEvent, localAddress: IPAddress? = nil) -> EntityRef {
        entity(of: e, localAddressText: localAddress?.description)
    }

    /// `entity(of:localAddress:)` with the address's text remembered.
    mutating func resolve(of e: ObservedEvent, localAddress: IPAddress?) -> EntityRef {
        entity(of: e, localAddressText: localAddress.map { text(of: $0) })
    }

    private func entity(of e: ObservedEvent, localAddressText: String?) -> EntityRef {
        if let r = attributed(e) { return r }
        if let a = localAddressText, let p = byIP[a] {
            return EntityRef(name: p.service, quality: 0.8, pod: p, isService: true)
        }
        return host(e)
    }

    /// The event's pod (through its container or its pod's name), if it names one.
    private func attributed(_ e: ObservedEvent) -> EntityRef? {
        let ev = e.event
        if !ev.containerId.isEmpty, let p = byContainer[Topology.shortContainerId(ev.containerId)] {
            return EntityRef(name: p.service, quality: 1, pod: p, isService: true)
        }
        if !ev.pod.isEmpty {
            if let p = byNamespacedName[ev.namespace + "/" + ev.pod] {
                return EntityRef(name: p.service, quality: 1, pod: p, isService: true)
            }
            if let p = byName[ev.pod] {
                return EntityRef(name: p.service, quality: 0.9, pod: p, isService: true)
            }
            return EntityRef(name: ev.pod, quality: 0.6, pod: nil, isService: false)
        }
        return nil
    }

    /// A process no pod claims: `<comm>@<node>`.
    private func host(_ e: ObservedEvent) -> EntityRef {
        let ev = e.event
        return EntityRef(name: (ev.comm.isEmpty ? "host" : ev.comm) + "@" + e.node, quality: 0.3, pod: nil, isService: false)
    }

    /// The entity behind a peer address: its pod's service, else the DNS name
    /// that answered it, else the address itself.
    func entity(address: IPAddress?) -> EntityRef {
        guard let a = address else { return EntityRef(name: "unknown", quality: 0, pod: nil, isService: false) }
        return entity(addressText: a.description)
    }

    /// `entity(address:)` with the address's text remembered.
    mutating func resolve(address: IPAddress?) -> EntityRef {
        guard let a = address else { return EntityRef(name: "unknown", quality: 0, pod: nil, isService: false) }
        return entity(addressText: text(of: a))
    }

    private func entity(addressText text: String) -> EntityRef {
        if let p = byIP[text] { return EntityRef(name: p.service, quality: 1, pod: p, isService: true) }
        if let o = ownerByIP[text] { return EntityRef(name: o, quality: 0.6, pod: nil, isService: false) }
        if let n = nameByIP[text] { return EntityRef(name: n, quality: 0.5, pod: nil, isService: false) }
        return EntityRef(name: text, quality: 0.3, pod: nil, isService: false)
    }

    /// The service a DNS name points to (through its last answer), if any.
    func service(ofName name: String) -> String? {
        guard let ips = addressesByName[name] else { return nil }
        if ips.count == 1 { return byIP[ips[0]]?.service }  // nothing to sort
        for ip in ips.sorted() {
            if let p = byIP[ip] { return p.service }
        }
        return nil
    }

    mutating func learnAnswer(name: String, answers: [IPAddress], limit: Int = .max) {
        guard !answers.isEmpty else { return }
        var ips: [String] = []
        ips.reserveCapacity(answers.count)
        for a in answers { ips.append(text(of: a)) }
        // A flood of distinct names or addresses starts the maps afresh
        // rather than growing them without bound.
        if addressesByName[name] == nil, addressesByName.count >= limit { addressesByName.removeAll(keepingCapacity: true) }
        if nameByIP.count + ips.count > limit { nameByIP.removeAll(keepingCapacity: true) }
        // The same answer as last time (the usual case) changes nothing but
        // what the bound above may have cleared: no writes then.
        if addressesByName[name] != ips { addressesByName[name] = ips }
        for ip in ips where nameByIP[ip] != name { nameByIP[ip] = name }
    }

    /// `limit`: the most entities kept. An exec storm of random process
    /// names (`<comm>@<node>` each) would otherwise grow the map for ever:
    /// past it the entities no pod claims go first (their next event brings
    /// them back), then everything (the inventory brings the pods back).
    mutating func sawEntity(_ entity: String, node: String, limit: Int = .max) {
        if entityNodes[entity]?.contains(node) == true { return }
        if entityNodes[entity] == nil, entityNodes.count >= limit {
            entityNodes = entityNodes.filter { !$0.key.contains("@") }
            if entityNodes.count >= limit { entityNodes.removeAll(keepingCapacity: true) }
        }
        entityNodes[entity, default: []].insert(node)
    }

    /// `entity` serves on `address` (a listener bound to it, the server end
    /// of a measured flow); addresses in the inventory keep their pod.
    mutating func sawServer(_ entity: String, address: IPAddress?, limit: Int = .max) {
        guard let a = address, !a.isUnspecified else { return }
        let t = text(of: a)
        if byIP[t] == nil && ownerByIP[t] != entity {
            if ownerByIP[t] == nil, ownerByIP.count >= limit { ownerByIP.removeAll(keepingCapacity: true) }
            ownerByIP[t] = entity
        }
    }

    mutating func sawListener(_ entity: String, port: UInt16) {
        if port != 0 { listenPorts[entity, default: []].insert(port) }
        sawServerPort(port)
    }

    mutating func sawServerPort(_ port: UInt16) {
        if port != 0 && !serverPorts.contains(port) { serverPorts.insert(port) }
    }
}
