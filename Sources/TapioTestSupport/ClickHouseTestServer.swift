import Foundation
import TapioLocalServers
import XCTest

/// Debian's clickhouse-server (package clickhouse-server, 18.16), started by
/// a test on free loopback ports from a `ClickHouseLocalConfig` in a
/// temporary directory: nothing of the system's installation is read or
/// touched. Killed at the end of the test, also when
/// it fails (and killed by `ChildProcess` if nobody stops it).
public final class ClickHouseTestServer {
    public let directory: String
    public let httpPort: Int
    public let tcpPort: Int
    /// The HTTPS interface's port, when started with a TLS directory.
    public let httpsPort: Int?
    /// A user with a password, for the authentication tests.
    public static let user = "tapio"
    public static let password = "s3cret 'with' \\ quotes"
    /// A user whose profile is readonly (may not write or change settings).
    public static let reader = "reader"
    private var process: ChildProcess?

    public static func binary() throws -> String {
        for path in ["/usr/sbin/clickhouse-server", "/usr/bin/clickhouse-server"] where FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        let why = "clickhouse-server is missing (Debian package clickhouse-server; make deps installs it)"
        if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
        throw XCTSkip(why)
    }

    /// `tlsDirectory` (tls.crt, tls.key, ca.crt): also serve HTTPS on
    /// `httpsPort` with that certificate; `verifyClients`: HTTPS only for
    /// clients with a certificate `ca.crt` signed.
    public init(tlsDirectory: String? = nil, verifyClients: Bool = false) throws {
        let binary = try Self.binary()
        directory = try TestSupport.temporaryDirectory("tapio-clickhouse")
        var taken: Set<Int> = []
        func port() -> Int {
            var p = TestSupport.freePort()
            while taken.contains(p) { p = TestSupport.freePort() }
            taken.insert(p)
            return p
        }
        httpPort = port()
        tcpPort = port()
        httpsPort = tlsDirectory == nil ? nil : port()
        var config = ClickHouseLocalConfig(directory: directory, httpPort: httpPort, tcpPort: tcpPort)
        (config.httpsPort, config.tlsDirectory, config.verifyClients) = (httpsPort, tlsDirectory, verifyClients)
        config.users = [.init(name: "default"), .init(name: Self.user, password: Self.password), .init(name: Self.reader, profile: "readonly")]
        try config.write()
        try launch(binary)
    }

    private func launch(_ binary: String) throws {
        let process = try ChildProcess(binary, ["--config-file=\(directory)/config.xml"], logPath: "\(directory)/stdout.log")
        self.process = process
        // The HTTP port is bound once the server has loaded its tables and
        // is ready; the HTTPS listener comes after it, not at once (a test
        // that connected right away was refused under load).
        let httpPort = self.httpPort
        let ports = [httpPort] + (httpsPort.map { [$0] } ?? [])
        let up = eventually(timeout: 60) { !process.isRunning || ports.allSatisfy { Self.accepts(port: $0) } }
        guard up, process.isRunning else {
            let log = (try? String(contentsOfFile: "\(directory)/error.log", encoding: .utf8)) ?? process.log
            process.stop(signal: SIGKILL)
            self.process = nil
            throw TestSupportError("clickhouse-server did not start on 127.0.0.1:\(ports.map(String.init).joined(separator: ", ")): \(log.suffix(2000))")
        }
    }

    /// Kills the server (SIGKILL) and keeps its directory, so `restart()`
    /// brings it back on the same ports with the same data.
    public func kill() {
        process?.stop(signal: SIGKILL, timeout: 10)
        process = nil
    }

    /// Starts the killed server again on its ports, over its data.
    public func restart() throws {
        kill()
        // The ports are free again once the killed process is gone.
        _ = eventually(timeout: 10) { !Self.accepts(port: httpPort) }
        try launch(try Self.binary())
    }

    public var isRunning: Bool { process?.isRunning ?? false }

    public static func accepts(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        addr.sin_port = UInt16(port).bigEndian
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }

    /// Kills the server (SIGKILL) and removes its directory. Not SIGTERM:
    /// a child started from the test runner inherits the runner's blocked
    /// signals, and 18.16 takes SIGTERM only in a handler no thread of it
    /// then accepts, so it would sit out any timeout. Nothing of its data is
    /// kept, so nothing is lost by not stopping it gracefully.
    public func stop() {
        process?.stop(signal: SIGKILL, timeout: 10)
        process = nil
        try? FileManager.default.removeItem(atPath: directory)
    }

    deinit { stop() }
}
