import Foundation
import XCTest

/// Debian's clickhouse-server (package clickhouse-server, 18.16), started by
/// a test on free loopback ports with a config, users file and data
/// directory the test writes in a temporary directory: nothing of the
/// system's installation (/etc/clickhouse-server, /var/lib/clickhouse, its
/// service) is read or touched. Killed at the end of the test, also when
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
        var https = ""
        if let tls = tlsDirectory, let httpsPort {
            // Poco's settings as 18.16 reads them: strict verification asks
            // for a client certificate and refuses a handshake without one.
            https = """
                  <https_port>\(httpsPort)</https_port>
                  <openSSL><server>
                    <certificateFile>\(tls)/tls.crt</certificateFile>
                    <privateKeyFile>\(tls)/tls.key</privateKeyFile>
                    <caConfig>\(tls)/ca.crt</caConfig>
                    <verificationMode>\(verifyClients ? "strict" : "none")</verificationMode>
                    <loadDefaultCAFile>false</loadDefaultCAFile>
                    <cacheSessions>true</cacheSessions>
                    <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
                    <preferServerCiphers>true</preferServerCiphers>
                  </server></openSSL>
                """
        }
        for sub in ["data", "tmp", "user_files", "format_schemas"] {
            try FileManager.default.createDirectory(atPath: "\(directory)/\(sub)", withIntermediateDirectories: true)
        }
        let config = """
            <?xml version="1.0"?>
            <yandex>
              <logger><level>warning</level><log>\(directory)/server.log</log><errorlog>\(directory)/error.log</errorlog><console>0</console></logger>
              <listen_host>127.0.0.1</listen_host>
              <http_port>\(httpPort)</http_port>
              <tcp_port>\(tcpPort)</tcp_port>
            \(https)
              <path>\(directory)/data/</path>
              <tmp_path>\(directory)/tmp/</tmp_path>
              <user_files_path>\(directory)/user_files/</user_files_path>
              <format_schema_path>\(directory)/format_schemas/</format_schema_path>
              <users_config>\(directory)/users.xml</users_config>
              <default_profile>default</default_profile>
              <default_database>default</default_database>
              <timezone>UTC</timezone>
              <mark_cache_size>268435456</mark_cache_size>
              <max_concurrent_queries>16</max_concurrent_queries>
              <keep_alive_timeout>3</keep_alive_timeout>
            </yandex>
            """
        let password = Self.password.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
        let users = """
            <?xml version="1.0"?>
            <yandex>
              <profiles><default><max_memory_usage>2000000000</max_memory_usage></default><readonly><readonly>1</readonly></readonly></profiles>
              <users>
                <default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default>
                <\(Self.user)><password>\(password)</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></\(Self.user)>
                <\(Self.reader)><password></password><networks><ip>127.0.0.1</ip></networks><profile>readonly</profile><quota>default</quota></\(Self.reader)>
              </users>
              <quotas><default></default></quotas>
            </yandex>
            """
        try config.write(toFile: "\(directory)/config.xml", atomically: true, encoding: .utf8)
        try users.write(toFile: "\(directory)/users.xml", atomically: true, encoding: .utf8)
        try launch(binary)
    }

    private func launch(_ binary: String) throws {
        let process = try ChildProcess(binary, ["--config-file=\(directory)/config.xml"], logPath: "\(directory)/stdout.log")
        self.process = process
        // The HTTP port is bound once the server has loaded its tables and is ready.
        let httpPort = self.httpPort
        let up = eventually(timeout: 60) { !process.isRunning || Self.accepts(port: httpPort) }
        guard up, process.isRunning else {
            let log = (try? String(contentsOfFile: "\(directory)/error.log", encoding: .utf8)) ?? process.log
            process.stop(signal: SIGKILL)
            self.process = nil
            throw TestSupportError("clickhouse-server did not start on 127.0.0.1:\(httpPort): \(log.suffix(2000))")
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
