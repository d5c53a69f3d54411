import Foundation
import Synchronization
import TapioWire

/// Recognizes the agent's own network traffic among what the kernel reports:
/// its connection to the server (connects, resets, retransmits, latency,
/// drops, from both ends when the server runs on this node), its DNS lookups
/// and listeners, so that they are not reported as the workload's.
///
/// Events that carry a process (tcp_connect, tcp_listen, dns) are the agent's
/// when their pid is the agent's. The kernel reports the pid in the initial
/// PID namespace, which in a pod is not getpid(): the agent learns it by
/// opening (and closing at once) a loopback listener of its own and reading
/// the pid off the tcp_listen record of that port. Aggregates keyed by flow
/// carry no process: they are the agent's when one end is the server's
/// ingest address and the other a socket of the agent's (its cgroup, learned
/// the same way, or a local port its connects were seen to use).
public final class SelfTraffic: Sendable {
    private struct State {
        var pid: UInt32?
        var cgroups = Set<UInt64>()
        /// Loopback ports the agent listened on to learn its pid.
        var probePorts = Set<UInt16>()
        /// Ports the agent listens on (metrics).
        var listenPorts = Set<UInt16>()
        var serverAddresses = Set<IPAddress>()
        /// Local ports of the agent's connects to the server (the latest 64).
        var localPorts: [UInt16] = []
        var localAddresses = Set<IPAddress>()
    }

    public let serverPort: UInt16
    /// The agent's network namespace (0 when unknown).
    public let netns: UInt32
    private let state = Mutex(State())

    public init(serverHost: String, serverPort: UInt16) {
        self.serverPort = serverPort
        var st = stat()
        netns = stat("/proc/self/ns/net", &st) == 0 ? UInt32(truncatingIfNeeded: st.st_ino) : 0
        let literal = IPAddress(serverHost.hasPrefix("[") && serverHost.hasSuffix("]") ? String(serverHost.dropFirst().dropLast()) : serverHost)
        // In the initial PID namespace getpid() is what the kernel reports.
        var pidns = stat()
        let initial = stat("/proc/self/ns/pid", &pidns) == 0 && pidns.st_ino == 0xEFFF_FFFC
        let pid = initial ? UInt32(getpid()) : nil
        state.withLock { s in
            if let literal { s.serverAddresses.insert(literal) }
            s.pid = pid
        }
    }

    /// The agent's pid as the kernel reports it, once known.
    public var pid: UInt32? { state.withLock { $0.pid } }
    /// Whether the agent knows its pid and at least one cgroup of its own.
    public var identified: Bool { state.withLock { $0.pid != nil && !$0.cgroups.isEmpty } }

    public func addListenPort(_ port: UInt16) {
        state.withLock { _ = $0.listenPorts.insert(port) }
    }

    /// Opens and closes a loopback listener whose tcp_listen records name
    /// this process (see the type's description). Returns its port.
    @discardableResult
    public func probe() -> UInt16? {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { return nil }
        defer { close(s) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &addr) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, len) == 0 && getsockname(s, $0, &len) == 0 }
        }
        guard bound else { return nil }
        let port = UInt16(bigEndian: addr.sin_port)
        state.withLock { _ = $0.probePorts.insert(port) }
        guard listen(s, 1) == 0 else { return nil }
        return port
    }

    /// Whether `event` is the agent's own traffic; learns from it as it goes.
    public func isOwn(_ event: TapioEvent) -> Bool {
        switch event.detail {
        case .tcpListen(let address, let port, _):
            return state.withLock { s in
                // The probe's listener, or the metrics endpoint's (it listens
                // before the kernel programs are read): ports this process holds.
                let probe = s.probePorts.contains(port) && address == IPAddress("127.0.0.1")
                if probe || s.listenPorts.contains(port), sameNetns(event), event.netns != 0 {
                    s.pid = event.pid
                }
                guard let pid = s.pid, event.pid == pid else { return false }
                if event.cgroupId != 0 { s.cgroups.insert(event.cgroupId) }
                return true
            }
        case .tcpConnect(let flow, _, _, _, _):
            return state.withLock { s in
                guard let pid = s.pid, event.pid == pid else { return false }
                if event.cgroupId != 0 { s.cgroups.insert(event.cgroupId) }
                if flow.destinationPort == serverPort, let server = flow.destination {
                    s.serverAddresses.insert(server)
                    if flow.sourcePort != 0, !s.localPorts.contains(flow.sourcePort) {
                        s.localPorts.append(flow.sourcePort)
                        if s.localPorts.count > 64 { s.localPorts.removeFirst() }
                    }
                }
                return true
            }
        case .dns:
            return state.withLock { s in s.pid.map { event.pid == $0 } ?? false }
        case .tcpReset(let flow, _, _, _), .tcpRetransmit(let flow, _, _), .tcpLatency(let flow, _, _, _, _, _), .packetDrop(_, _, let flow, _, _, _):
            return state.withLock { s in ownFlow(flow, event, &s) }
        default:
            return false
        }
    }

    private func sameNetns(_ event: TapioEvent) -> Bool {
        netns == 0 || event.netns == 0 || event.netns == netns
    }

    private func ownFlow(_ flow: Flow, _ event: TapioEvent, _ s: inout State) -> Bool {
        let ownCgroup = event.cgroupId != 0 && s.cgroups.contains(event.cgroupId)
        if ownCgroup, sameNetns(event), s.listenPorts.contains(flow.sourcePort) { return true }
        func isServer(_ address: IPAddress?, _ port: UInt16) -> Bool {
            guard port == serverPort, let address else { return false }
            return s.serverAddresses.isEmpty || s.serverAddresses.contains(address)
        }
        // The end that is not the server.
        let other: (address: IPAddress?, port: UInt16)
        let agentEndIsSource: Bool
        if isServer(flow.destination, flow.destinationPort) {
            other = (flow.source, flow.sourcePort)
            agentEndIsSource = true
        } else if isServer(flow.source, flow.sourcePort) {
            other = (flow.destination, flow.destinationPort)
            agentEndIsSource = false
        } else {
            return false
        }
        // The agent's socket (its cgroup) to the server.
        if ownCgroup, agentEndIsSource, sameNetns(event) {
            if let a = other.address, other.port != 0 { s.localAddresses.insert(a) }
            return true
        }
        let knownAddress = other.address.map { s.localAddresses.isEmpty || s.localAddresses.contains($0) } ?? true
        // Either end of one of the agent's connections, by its local port.
        if other.port != 0, s.localPorts.contains(other.port), knownAddress { return true }
        // A reset for the agent's SYN to a server port nothing listens on
        // (no socket, so no cgroup): the SYN's ephemeral port is kept as 0.
        if event.cgroupId == 0, other.port == 0, !agentEndIsSource, knownAddress { return true }
        return false
    }
}
