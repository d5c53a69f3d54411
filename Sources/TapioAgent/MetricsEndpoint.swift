import CTapioBPF
import Foundation
import Logging
import Synchronization
import TapioWire

/// The agent's `/metrics` (Prometheus text), `/healthz` (liveness) and
/// `/readyz` (readiness), served with plain sockets: the agent stays free of
/// an HTTP stack. One thread multiplexes every connection with poll(2), so a
/// client that connects and sends nothing (or sends slowly) never delays
/// another: each connection has a read deadline, and at most
/// `maximumConnections` are open at once (the oldest is closed to make room).
public final class MetricsEndpoint: @unchecked Sendable {
    public struct Health: Sendable {
        public var ok: Bool
        /// One line saying why (or "ok").
        public var reason: String
        public init(ok: Bool, reason: String) {
            self.ok = ok
            self.reason = reason
        }
    }

    private let fd: Int32
    private let render: @Sendable () -> String
    private let live: @Sendable () -> Health
    private let ready: @Sendable () -> Health
    private let stopped = Atomic<Bool>(false)
    private let started = Atomic<Bool>(false)
    private let finished = DispatchSemaphore(value: 0)
    /// A pipe that wakes the poll loop on stop.
    private let wake: (read: Int32, write: Int32)
    public let port: UInt16
    /// Milliseconds a client has to send its request and take the response.
    public var deadlineMs: Int64 = 1000
    public var maximumConnections = 32

    /// Binds `host:port` (port 0 picks one). `live` answers `/healthz`,
    /// `ready` answers `/readyz`.
    public init(host: String, port: UInt16, render: @escaping @Sendable () -> String,
                live: @escaping @Sendable () -> Health, ready: @escaping @Sendable () -> Health) throws {
        self.render = render
        self.live = live
        self.ready = ready
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &result) == 0, let ai = result else {
            throw ConnectionError("--metrics-listen: cannot resolve \(host)")
        }
        defer { freeaddrinfo(result) }
        let s = socket(ai.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard s >= 0 else { throw ConnectionError("--metrics-listen: socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(s, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, listen(s, 64) == 0 else {
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
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else {
            close(s)
            throw ConnectionError("--metrics-listen: pipe: \(String(cString: strerror(errno)))")
        }
        for f in fds { Self.setFlags(f) }
        wake = (fds[0], fds[1])
        fd = s
        self.port = bound
    }

    /// `/healthz` and `/readyz` with one answer (tests, simple embeddings).
    public convenience init(host: String, port: UInt16, render: @escaping @Sendable () -> String, healthy: @escaping @Sendable () -> Bool) throws {
        try self.init(host: host, port: port, render: render,
                      live: { Health(ok: true, reason: "ok") },
                      ready: { healthy() ? Health(ok: true, reason: "ok") : Health(ok: false, reason: "not ready") })
    }

    public func start() {
        guard !started.exchange(true, ordering: .relaxed) else { return }
        let thread = Thread { [self] in
            serve()
            finished.signal()
        }
        thread.name = "tapio-metrics"
        thread.start()
    }

    public func stop() {
        guard !stopped.exchange(true, ordering: .relaxed) else { return }
        var byte: UInt8 = 1
        _ = write(wake.write, &byte, 1)
        if started.load(ordering: .relaxed) { finished.wait() }
        close(fd)
        close(wake.read)
        close(wake.write)
    }

    private final class Client {
        let fd: Int32
        let deadlineNs: Int64
        var request: [UInt8] = []
        /// The response once the request head is complete.
        var response: [UInt8]?
        var sent = 0
        init(fd: Int32, deadlineNs: Int64) {
            self.fd = fd
            self.deadlineNs = deadlineNs
        }
    }

    private func serve() {
        var clients: [Client] = []
        defer { for c in clients { close(c.fd) } }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !stopped.load(ordering: .relaxed) {
            let now = monotonicNs()
            // Deadlines: a client that has not sent its request (or taken its
            // response) in time is closed without an answer.
            clients.removeAll { c in
                guard now >= c.deadlineNs else { return false }
                close(c.fd)
                return true
            }
            var pfds = [pollfd(fd: wake.read, events: Int16(POLLIN), revents: 0), pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
            for c in clients { pfds.append(pollfd(fd: c.fd, events: Int16(c.response == nil ? POLLIN : POLLOUT), revents: 0)) }
            let nearest = clients.map(\.deadlineNs).min().map { max(0, ($0 - now) / 1_000_000 + 1) } ?? 1000
            let n = poll(&pfds, nfds_t(pfds.count), Int32(min(nearest, 1000)))
            if n < 0 {
                if errno == EINTR { continue }
                return
            }
            if pfds[0].revents != 0 { return }
            var done = Set<Int32>()
            for (i, c) in clients.enumerated() where pfds[i + 2].revents != 0 {
                if c.response == nil {
                    let r = read(c.fd, &buffer, buffer.count)
                    if r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR) { done.insert(c.fd); continue }
                    if r > 0 { c.request += buffer[0..<r] }
                    if let end = headEnd(c.request) {
                        c.response = respond(to: Array(c.request[..<end]))
                    } else if c.request.count > 16384 {
                        c.response = Array(Self.response("431 Request Header Fields Too Large", "request head too large\n").utf8)
                    }
                }
                if let response = c.response {
                    let w = response.withUnsafeBytes { send(c.fd, $0.baseAddress! + c.sent, $0.count - c.sent, Int32(MSG_NOSIGNAL)) }
                    if w > 0 { c.sent += w }
                    if (w < 0 && errno != EAGAIN && errno != EINTR) || c.sent >= response.count {
                        done.insert(c.fd)
                    }
                }
            }
            clients.removeAll { c in
                guard done.contains(c.fd) else { return false }
                close(c.fd)
                return true
            }
            if pfds[1].revents != 0 {
                // Take every waiting connection.
                while true {
                    let client = accept(fd, nil, nil)
                    if client < 0 { break }
                    Self.setFlags(client)
                    if clients.count >= maximumConnections {
                        let oldest = clients.removeFirst()
                        close(oldest.fd)
                    }
                    clients.append(Client(fd: client, deadlineNs: monotonicNs() + deadlineMs * 1_000_000))
                }
            }
        }
    }

    /// Non-blocking, closed on exec.
    private static func setFlags(_ fd: Int32) {
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    /// Index just past the blank line ending the request head.
    private func headEnd(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 2 else { return nil }
        for i in 1..<bytes.count where bytes[i] == 10 {
            if bytes[i - 1] == 10 || (i >= 2 && bytes[i - 1] == 13 && bytes[i - 2] == 10) { return i + 1 }
        }
        return nil
    }

    private func respond(to head: [UInt8]) -> [UInt8] {
        let line = String(decoding: head.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self)
        let target = line.split(separator: " ").dropFirst().first.map(String.init) ?? "/"
        let path = String(target.prefix { $0 != "?" })
        let text: String
        switch path {
        case "/metrics":
            text = Self.response("200 OK", render())
        case "/healthz", "/livez":
            let h = live()
            text = Self.response(h.ok ? "200 OK" : "503 Service Unavailable", h.reason + "\n")
        case "/readyz":
            let h = ready()
            text = Self.response(h.ok ? "200 OK" : "503 Service Unavailable", h.reason + "\n")
        default:
            text = Self.response("404 Not Found", "not found\n")
        }
        return Array(text.utf8)
    }

    private static func response(_ status: String, _ body: String) -> String {
        "HTTP/1.1 \(status)\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: \(body.utf8.count)\r\nConnection: close\r\n\r\n\(body)"
    }
}

extension Agent {
    /// Prometheus text: what was read, sent and acknowledged, what was lost
    /// and why, and which programs run.
    public func metricsText() -> String {
        let stats = outbox.stats
        let status = sender.status
        var m = MetricsText()
        m.add("tapio_agent_events_read_total", .counter, "Events read from the kernel (records and aggregates), the agent's own traffic left out.", kernel.eventsRead)
        m.add("tapio_agent_batches_sealed_total", .counter, "Batches built from events read.", stats.sealedBatches)
        m.add("tapio_agent_batches_sent_total", .counter, "Batches written to the server (a resend counts again).", status.batchesSent)
        m.add("tapio_agent_batch_bytes_sent_total", .counter, "Encoded bytes of the batches written to the server.", status.batchBytesSent)
        m.add("tapio_agent_batches_acked_total", .counter, "Batches the server acknowledged as durable.", stats.ackedBatches)
        m.add("tapio_agent_unacknowledged_batches", .gauge, "Batches kept for (re)sending until acknowledged.", stats.unacknowledged)
        m.add("tapio_agent_outbox_memory_bytes", .gauge, "Bytes of batches kept in memory for sending.", stats.memoryBytes)
        m.add("tapio_agent_spool_bytes", .gauge, "Bytes the spool takes on disk: unacknowledged batches and the acknowledged records still in their segments.", stats.spoolBytes)
        m.add("tapio_agent_connected", .gauge, "1 while a session with the server is open (hello acknowledged).", status.connected ? 1 : 0)
        m.add("tapio_agent_connects_total", .counter, "Sessions with the server opened.", status.connects)
        m.add("tapio_agent_connect_failures_total", .counter, "Connection attempts and sessions that failed.", status.connectFailures)
        m.add("tapio_agent_connect_refusals_total", .counter, "Attempts the server refused (error answer to the hello, failed TLS handshake).", status.refusals)
        m.add("tapio_agent_refused", .gauge, "1 while the last attempt was refused.", status.refused ? 1 : 0)
        m.add("tapio_agent_reconnect_delay_seconds", .gauge, "Wait before the next connection attempt (0 while connected).", Double(status.retryInMs) / 1000)
        m.add("tapio_agent_ready", .gauge, "1 while /readyz answers 200.", readiness().ok ? 1 : 0)
        m.add("tapio_agent_proc_cgroup_reads_total", .counter, "Reads of /proc/PID/cgroup: only for records whose cgroup ids name no container.", attributor.procReads)
        m.add("tapio_agent_self_events_filtered_total", .counter, "Network events of the agent's own traffic left out (not read, not dropped).", kernel.selfEventsFiltered)
        m.add("tapio_agent_dropped_events_total", .counter, "Events lost, by kind and reason, in the kernel and in the agent.",
              stats.drops.sorted { ($0.kind.rawValue, $0.reason) < ($1.kind.rawValue, $1.reason) }
                  .map { .init([("kind", $0.kind.name), ("reason", $0.reason)], $0.count) })
        let rings = kernel.ringBuffers
        m.add("tapio_agent_ring_buffer_bytes", .gauge, "Size of each ring buffer read.", rings.map { .init([("ring", $0.name)], $0.bytes) })
        m.add("tapio_agent_ring_records_total", .counter, "Records read from each ring buffer.", rings.map { .init([("ring", $0.name)], $0.records) })
        m.add("tapio_agent_ring_fill_bytes", .gauge, "Bytes of each ring buffer written by the programs and not yet read.",
              rings.map { .init([("ring", $0.name)], $0.fillBytes) })
        m.add("tapio_agent_ring_wakeups_total", .counter, "Times a ring buffer past its fill mark woke the reader.", kernel.ringWakeups)
        m.add("tapio_agent_program_attached", .gauge, "1 per running kernel program, 0 per degraded one.",
              kernel.programs.map { .init([("program", $0.name), ("signal", $0.capability)], $0.attached ? 1 : 0) })
        let programs = Self.bpfProgramStatistics(known: kernel.programs.map(\.name))
        m.add("tapio_agent_bpf_program_runs_total", .counter, "Runs of each loaded BPF program (counted only while kernel.bpf_stats_enabled is 1).",
              programs.map { .init([("program", $0.name)], $0.runs) })
        m.add("tapio_agent_bpf_program_run_seconds_total", .counter, "CPU time spent in each loaded BPF program (counted only while kernel.bpf_stats_enabled is 1).",
              programs.map { .init([("program", $0.name)], Double($0.runTimeNs) / 1e9) })
        m.add("tapio_agent_bpf_program_recursion_misses_total", .counter, "Runs of each loaded BPF program skipped because it was already running on that CPU.",
              programs.map { .init([("program", $0.name)], $0.recursionMisses) })
        let statsEnabled = tapio_prog_stats_enabled()
        m.add("tapio_agent_bpf_stats_enabled", .gauge, "1 while the kernel counts BPF program runs and time (kernel.bpf_stats_enabled).", max(0, statsEnabled))
        m.add("tapio_agent_build_info", .gauge, "Always 1; the version of the running agent in its label.", [.init([("version", TapioVersion.current)], 1)])
        m.addProcessMetrics()
        return m.text
    }

    struct BPFProgramStatistics: Equatable {
        var name: String
        var runs: UInt64
        var runTimeNs: UInt64
        var recursionMisses: UInt64
    }

    /// The agent's own BPF programs as the kernel counts them (tapio_progstats.h),
    /// summed by name. The kernel keeps 15 characters of a name; one that is
    /// the start of exactly one program the agent knows gets that full name.
    static func bpfProgramStatistics(known: [String]) -> [BPFProgramStatistics] {
        var entries = [tapio_prog_stats](repeating: tapio_prog_stats(), count: 128)
        let found = Int(tapio_prog_stats_self(&entries, Int32(entries.count)))
        guard found > 0 else { return [] }
        var byName: [String: BPFProgramStatistics] = [:]
        for entry in entries.prefix(min(found, entries.count)) {
            let short = withUnsafeBytes(of: entry.name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            let candidates = known.filter { $0.hasPrefix(short) }
            let name = candidates.count == 1 ? candidates[0] : short
            var s = byName[name] ?? BPFProgramStatistics(name: name, runs: 0, runTimeNs: 0, recursionMisses: 0)
            s.runs += entry.run_count
            s.runTimeNs += entry.run_time_ns
            s.recursionMisses += entry.recursion_misses
            byName[name] = s
        }
        return byName.values.sorted { $0.name < $1.name }
    }
}
