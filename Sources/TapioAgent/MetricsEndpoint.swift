import Foundation
import Logging
import Synchronization

/// The agent's `/metrics` (Prometheus text) and `/healthz`, served from one
/// thread with plain sockets: the agent stays free of an HTTP stack, and a
/// scrape every few seconds needs no more.
public final class MetricsEndpoint: @unchecked Sendable {
    private let fd: Int32
    private let render: @Sendable () -> String
    private let healthy: @Sendable () -> Bool
    private let stopped = Atomic<Bool>(false)
    public let port: UInt16

    /// Binds `host:port` (port 0 picks one).
    public init(host: String, port: UInt16, render: @escaping @Sendable () -> String, healthy: @escaping @Sendable () -> Bool) throws {
        self.render = render
        self.healthy = healthy
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &result) == 0, let ai = result else {
            throw ConnectionError("--metrics-listen: cannot resolve \(host)")
        }
        defer { freeaddrinfo(result) }
        let s = socket(ai.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw ConnectionError("--metrics-listen: socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(s, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, listen(s, 16) == 0 else {
            let message = String(cString: strerror(errno))
            close(s)
            throw ConnectionError("--metrics-listen \(host):\(port): \(message)")
        }
        var addr = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &len) } }
        let bound = withUnsafePointer(to: &addr) { p -> UInt16 in
            p.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
        }
        fd = s
        self.port = bound
    }

    public func start() {
        let thread = Thread { [self] in serve() }
        thread.name = "tapio-metrics"
        thread.start()
    }

    public func stop() {
        stopped.store(true, ordering: .relaxed)
        shutdown(fd, Int32(SHUT_RDWR))
        close(fd)
    }

    private func serve() {
        while !stopped.load(ordering: .relaxed) {
            let client = accept(fd, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                return
            }
            handle(client)
            close(client)
        }
    }

    private func handle(_ client: Int32) {
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 4096)
        var request: [UInt8] = []
        // Read the request head (bounded); the body, if any, is ignored.
        while request.count < 16384 {
            let n = read(client, &buffer, buffer.count)
            if n <= 0 { break }
            request += buffer[0..<n]
            if request.count >= 4, request.suffix(4) == [13, 10, 13, 10] { break }
        }
        let line = String(decoding: request.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let path = line.split(separator: " ").dropFirst().first.map(String.init) ?? "/"
        let (status, body): (String, String)
        switch path {
        case "/metrics": (status, body) = ("200 OK", render())
        case "/healthz": (status, body) = healthy() ? ("200 OK", "ok\n") : ("503 Service Unavailable", "not connected\n")
        default: (status, body) = ("404 Not Found", "not found\n")
        }
        let response = "HTTP/1.1 \(status)\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
        var bytes = Array(response.utf8)
        var sent = 0
        while sent < bytes.count {
            let n = bytes.withUnsafeMutableBytes { send(client, $0.baseAddress! + sent, $0.count - sent, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += n
        }
    }
}

extension Agent {
    /// Prometheus text: what was read, sent and acknowledged, what was lost
    /// and why, and which programs run.
    public func metricsText() -> String {
        let stats = outbox.stats
        let status = sender.status
        var lines: [String] = []
        func metric(_ name: String, _ type: String, _ samples: [(String, String)]) {
            lines.append("# TYPE \(name) \(type)")
            for (labels, value) in samples { lines.append("\(name)\(labels) \(value)") }
        }
        metric("tapio_agent_events_read_total", "counter", [("", "\(kernel.eventsRead)")])
        metric("tapio_agent_batches_sealed_total", "counter", [("", "\(stats.sealedBatches)")])
        metric("tapio_agent_batches_acked_total", "counter", [("", "\(stats.ackedBatches)")])
        metric("tapio_agent_batches_sent_total", "counter", [("", "\(status.batchesSent)")])
        metric("tapio_agent_batch_bytes_sent_total", "counter", [("", "\(status.batchBytesSent)")])
        metric("tapio_agent_unacknowledged_batches", "gauge", [("", "\(stats.unacknowledged)")])
        metric("tapio_agent_outbox_memory_bytes", "gauge", [("", "\(stats.memoryBytes)")])
        metric("tapio_agent_spool_bytes", "gauge", [("", "\(stats.spoolBytes)")])
        metric("tapio_agent_connected", "gauge", [("", status.connected ? "1" : "0")])
        metric("tapio_agent_connects_total", "counter", [("", "\(status.connects)")])
        metric("tapio_agent_connect_failures_total", "counter", [("", "\(status.connectFailures)")])
        metric("tapio_agent_dropped_events_total", "counter",
               stats.drops.sorted { ($0.kind.rawValue, $0.reason) < ($1.kind.rawValue, $1.reason) }
                   .map { ("{kind=\"\($0.kind.name)\",reason=\"\($0.reason)\"}", "\($0.count)") })
        metric("tapio_agent_program_attached", "gauge",
               kernel.programs.map { ("{program=\"\($0.name)\",signal=\"\($0.capability)\"}", $0.attached ? "1" : "0") })
        return lines.joined(separator: "\n") + "\n"
    }
}
