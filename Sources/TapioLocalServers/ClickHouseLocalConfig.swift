import Foundation

/// The files of a private clickhouse-server (Debian's 18.16 or a current
/// one) on loopback: its config, users file and directories, all under one
/// directory, so nothing of the system's installation (/etc/clickhouse-server,
/// /var/lib/clickhouse, its service) is read or touched. The tests and the
/// lab's distributed mode start their servers from these.
public struct ClickHouseLocalConfig: Sendable {
    public struct User: Sendable {
        public var name: String
        public var password: String
        /// `default`, or `readonly` (may not write or change settings).
        public var profile: String
        public init(name: String, password: String = "", profile: String = "default") {
            (self.name, self.password, self.profile) = (name, password, profile)
        }
    }

    /// Holds data/, tmp/, user_files/, format_schemas/, config.xml, users.xml.
    public var directory: String
    public var httpPort: Int
    public var tcpPort: Int
    /// HTTPS on this port with `tlsDirectory`'s tls.crt and tls.key.
    public var httpsPort: Int?
    /// tls.crt, tls.key, ca.crt (the cert-manager layout).
    public var tlsDirectory: String?
    /// With HTTPS: refuse clients without a certificate ca.crt signed.
    public var verifyClients = false
    /// Where its log and error log go (default: `directory`).
    public var logDirectory: String?
    public var logFileName = "server.log"
    public var errorLogFileName = "error.log"
    public var users: [User] = [User(name: "default")]

    public init(directory: String, httpPort: Int, tcpPort: Int) {
        (self.directory, self.httpPort, self.tcpPort) = (directory, httpPort, tcpPort)
    }

    public var configPath: String { directory + "/config.xml" }
    public var errorLogPath: String { (logDirectory ?? directory) + "/" + errorLogFileName }

    /// Creates the directories and writes both files.
    public func write() throws {
        for sub in ["data", "tmp", "user_files", "format_schemas"] {
            try FileManager.default.createDirectory(atPath: "\(directory)/\(sub)", withIntermediateDirectories: true)
        }
        try configXML.write(toFile: configPath, atomically: true, encoding: .utf8)
        try usersXML.write(toFile: directory + "/users.xml", atomically: true, encoding: .utf8)
    }

    public var configXML: String {
        let logs = logDirectory ?? directory
        var https = ""
        if let httpsPort, let tls = tlsDirectory {
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
        return """
            <?xml version="1.0"?>
            <yandex>
              <logger><level>warning</level><log>\(logs)/\(logFileName)</log><errorlog>\(logs)/\(errorLogFileName)</errorlog><console>0</console></logger>
              <listen_host>127.0.0.1</listen_host>
              <http_port>\(httpPort)</http_port>
              <tcp_port>\(tcpPort)</tcp_port>
            \(https)  <path>\(directory)/data/</path>
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
    }

    public var usersXML: String {
        func escaped(_ s: String) -> String { s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;") }
        let users = self.users.map { u in
            "    <\(u.name)><password>\(escaped(u.password))</password><networks><ip>127.0.0.1</ip></networks><profile>\(u.profile)</profile><quota>default</quota></\(u.name)>"
        }.joined(separator: "\n")
        return """
            <?xml version="1.0"?>
            <yandex>
              <profiles><default><max_memory_usage>2000000000</max_memory_usage></default><readonly><readonly>1</readonly></readonly></profiles>
              <users>
            \(users)
              </users>
              <quotas><default></default></quotas>
            </yandex>

            """
    }
}
