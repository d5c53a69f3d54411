import Foundation

/// A TCP forwarder on a free loopback port that stands in for a Kubernetes
/// Service in front of replicas: clients know one address, each new
/// connection goes to the first backend (in the order given) that accepts
/// it, and bytes are copied both ways untouched (TLS passes through, as
/// through kube-proxy). When a backend dies, its connections are closed on
/// the client side too, so the client reconnects to the same address and
/// lands on a backend that is left — what an agent behind the Service sees
/// when the replica it used is killed.
public final class ServiceProxy: @unchecked Sendable {
    public let port: Int
    public let backends: [Int]
    private let listener: Int32
    private let lock = NSLock()
    private var stopped = false
    private var open: Set<Int32> = []
    private var accepted: [Int: Int] = [:]
    private let acceptorDone = DispatchSemaphore(value: 0)

    /// Listens at once; `backends` are loopback ports.
    public init(backends: [Int]) throws {
        self.backends = backends
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket failed") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = Self.loopback(port: 0)
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        guard bound == 0, listen(fd, 64) == 0 else {
            close(fd)
            throw TestSupportError("cannot listen on 127.0.0.1: \(String(cString: strerror(errno)))")
        }
        _ = withUnsafeMutablePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }
        listener = fd
        port = Int(UInt16(bigEndian: addr.sin_port))
        let thread = Thread { [self] in
            acceptLoop()
            acceptorDone.signal()
        }
        thread.name = "service-proxy-\(port)"
        thread.start()
    }

    deinit { stop() }

    /// Connections this proxy has sent to `backend` so far.
    public func connections(to backend: Int) -> Int { lock.withLock { accepted[backend, default: 0] } }

    /// Stops accepting and closes every forwarded connection.
    public func stop() {
        // Under the lock: a forwarder closes its descriptors under it too, so
        // none is shut down here after being closed and reused.
        let first = lock.withLock {
            guard !stopped else { return false }
            stopped = true
            for fd in open { shutdown(fd, Int32(SHUT_RDWR)) }
            return true
        }
        guard first else { return }
        shutdown(listener, Int32(SHUT_RDWR))
        _ = acceptorDone.wait(timeout: .now() + 5)
        close(listener)
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if lock.withLock({ stopped }) {
                if client >= 0 { close(client) }
                return
            }
            guard client >= 0 else {
                if errno == EINTR || errno == ECONNABORTED { continue }
                return
            }
            guard let (backend, server) = connectToABackend() else {
                close(client)
                continue
            }
            let registered = lock.withLock {
                guard !stopped else { return false }
                open.insert(client)
                open.insert(server)
                accepted[backend, default: 0] += 1
                return true
            }
            guard registered else {
                close(client)
                close(server)
                return
            }
            let pump = Thread { [self] in forward(client, server) }
            pump.name = "service-proxy-\(port)-\(backend)"
            pump.start()
        }
    }

    private func connectToABackend() -> (Int, Int32)? {
        for backend in backends {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { return nil }
            var addr = Self.loopback(port: backend)
            let rc = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if rc == 0 { return (backend, fd) }
            close(fd)
        }
        return nil
    }

    /// Copies both ways until either side ends, then closes both.
    private func forward(_ a: Int32, _ b: Int32) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        var fds = [pollfd(fd: a, events: Int16(POLLIN), revents: 0), pollfd(fd: b, events: Int16(POLLIN), revents: 0)]
        loop: while true {
            let n = poll(&fds, 2, 1000)
            if n < 0 {
                if errno == EINTR { continue }
                break
            }
            if lock.withLock({ stopped }) { break }
            for i in 0..<2 where fds[i].revents != 0 {
                let from = fds[i].fd, to = fds[1 - i].fd
                let count = read(from, &buffer, buffer.count)
                guard count > 0 else { break loop }
                var written = 0
                while written < count {
                    let w = buffer.withUnsafeBytes { send(to, $0.baseAddress! + written, count - written, Int32(MSG_NOSIGNAL)) }
                    guard w > 0 else { break loop }
                    written += w
                }
            }
        }
        lock.withLock {
            open.remove(a)
            open.remove(b)
            shutdown(a, Int32(SHUT_RDWR))
            shutdown(b, Int32(SHUT_RDWR))
            close(a)
            close(b)
        }
    }

    private static func loopback(port: Int) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        return addr
    }
}
