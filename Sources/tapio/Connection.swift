import ArgumentParser
import Foundation
import TapioClient
import TapioWire

/// Options every query command shares: where the server is and who we are.
///
/// Each setting is taken from the first of: its flag, its environment
/// variable, the selected context of the config file, the default
/// (docs/cli.md, "Where the server and certificates come from"). The CA,
/// certificate and key are each resolved alone: `--tls-ca` (say) overrides
/// the CA of whatever directory applies, and the rest still comes from it.
struct ConnectionOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Server query address, HOST:PORT (env TAPIO_SERVER; default \(ConnectionOptions.defaultServer)).", valueName: "host:port"))
    var server: String?
    @Option(help: ArgumentHelp("Directory with ca.crt, tls.crt, tls.key of an operator identity (env TAPIO_TLS_DIR).", valueName: "dir"))
    var tlsDir: String?
    @Option(help: "CA certificate (PEM); overrides the directory's ca.crt.")
    var tlsCa: String?
    @Option(help: "Operator certificate (PEM); overrides the directory's tls.crt.")
    var tlsCert: String?
    @Option(help: "Operator private key (PEM); overrides the directory's tls.key.")
    var tlsKey: String?
    @Option(help: ArgumentHelp("Context of the config file to use (env TAPIO_CONTEXT; default: its current context).", valueName: "name"))
    var context: String?
    @Option(name: [.short, .customLong("output")], help: "Output format: table, json or ndjson (one JSON object per line); svg or html for timeline.")
    var output: OutputFormat = .table

    static let defaultServer = "127.0.0.1:7401"

    func resolve(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> ResolvedConnection {
        let config = try CLIConfig.load(environment: environment)
        var contextName: Setting?
        if let context { contextName = Setting(context, "--context") } else if let name = environment["TAPIO_CONTEXT"], !name.isEmpty {
            contextName = Setting(name, "TAPIO_CONTEXT")
        } else if let name = config.file.currentContext {
            contextName = Setting(name, "the current context of \(config.path)")
        }
        var selected: CLIConfig.Context?
        if let name = contextName {
            guard let c = config.file.contexts[name.value] else {
                let known = config.file.contexts.keys.sorted()
                throw CLIError("no context \(name.value) (from \(name.origin)) in \(config.path)"
                    + (known.isEmpty ? "; create one with `tapio config set-context`" : "; known: \(known.joined(separator: ", "))"))
            }
            selected = c
        }
        let from = contextName.map { "context \($0.value)" } ?? ""
        func pick(_ flag: String?, _ flagName: String, _ env: String?, _ fromContext: String?) -> Setting? {
            if let flag { return Setting(flag, flagName) }
            if let env, let value = environment[env], !value.isEmpty { return Setting(value, env) }
            if let fromContext { return Setting(fromContext, from) }
            return nil
        }
        let server = pick(self.server, "--server", "TAPIO_SERVER", selected?.server) ?? Setting(Self.defaultServer, "the default")
        let dir = pick(tlsDir, "--tls-dir", "TAPIO_TLS_DIR", selected?.tlsDir)
        func file(_ flag: String?, _ flagName: String, _ fromContext: String?, _ name: String) throws -> Setting {
            if let s = pick(flag, flagName, nil, fromContext) { return s }
            if let dir { return Setting(dir.value + "/" + name, dir.origin) }
            throw CLIError("""
                no operator identity given: use --tls-dir DIR (a directory with ca.crt, tls.crt, tls.key), \
                or set TAPIO_TLS_DIR, or select a context of \(config.path) (`tapio config set-context`)
                """)
        }
        let ca = try file(tlsCa, "--tls-ca", selected?.tlsCa, "ca.crt")
        let cert = try file(tlsCert, "--tls-cert", selected?.tlsCert, "tls.crt")
        let key = try file(tlsKey, "--tls-key", selected?.tlsKey, "tls.key")
        let hostPort: (host: String, port: Int)
        do { hostPort = try parseHostPort(server.value) } catch {
            throw CLIError("cannot read the server address \(server.value) (from \(server.origin)): use HOST:PORT, e.g. 127.0.0.1:7401")
        }
        return ResolvedConnection(host: hostPort.host, port: hostPort.port, server: server, ca: ca.expanded, certificate: cert.expanded, key: key.expanded)
    }

    func client() throws -> QueryClient {
        try resolve().client()
    }
}

/// A setting's value and where it came from ("--server", "TAPIO_TLS_DIR",
/// "context lab", "the default"), so an error can name what to change.
struct Setting: Equatable {
    var value: String
    var origin: String

    init(_ value: String, _ origin: String) {
        self.value = value
        self.origin = origin
    }

    /// `~/x` → `$HOME/x`.
    var expanded: Setting {
        Setting(value.hasPrefix("~/") ? NSHomeDirectory() + value.dropFirst() : value, origin)
    }
}

struct ResolvedConnection {
    var host: String
    var port: Int
    var server: Setting
    var ca: Setting
    var certificate: Setting
    var key: Setting

    func client() throws -> QueryClient {
        do {
            return try QueryClient(host: host, port: port, ca: ca.value, certificate: certificate.value, key: key.value)
        } catch let error as QueryError {
            throw CLIError(explain(error))
        }
    }

    /// Runs one query; a failure comes back in words with what fixes it.
    func ask<T>(_ query: (QueryClient) throws -> T) throws -> T {
        let c = try client()
        do {
            return try query(c)
        } catch let error as QueryError {
            throw CLIError(explain(error))
        }
    }

    /// The error, then what to change and where that setting came from.
    func explain(_ error: QueryError) -> String {
        func via(_ s: Setting) -> String { "from \(s.origin)" }
        let identity = "--tls-dir or TAPIO_TLS_DIR (or --tls-ca/--tls-cert/--tls-key, or a context's tls_dir)"
        switch error.kind {
        case .files:
            return "\(error.description)\n  The files come \(ca.origin == certificate.origin ? via(ca) : "\(via(ca)), \(via(certificate)), \(via(key))"); "
                + "point \(identity) at an operator identity (`tapio certs init --dir D --operators NAME` writes D/operators/NAME)."
        case .unreachable:
            return "\(error.description)\n  Is tapio-server running and listening for queries there? The address \(server.value) is \(via(server)); "
                + "set another with --server HOST:PORT or TAPIO_SERVER (default \(ConnectionOptions.defaultServer), the server's --query-listen)."
        case .timeout, .connectionClosed:
            return "\(error.description)\n  The address \(server.value) is \(via(server)) (--server or TAPIO_SERVER); is it the server's query port (--query-listen)?"
        case .serverCertificateUntrusted:
            return "\(error.description) (\(via(ca))).\n  Use the CA that signed the server's certificate: --tls-ca FILE, or \(identity) "
                + "pointing at an identity issued by the server's CA."
        case .serverCertificateExpired:
            return "\(error.description).\n  The server's certificate must be renewed (its --tls-dir); tapio-server picks renewed files up without a restart."
        case .serverNameMismatch:
            return "\(error.description) (\(via(server))).\n  Connect with --server (or TAPIO_SERVER) using a name or address the certificate carries "
                + "(the development PKI's carry localhost, 127.0.0.1 and ::1; add more with `tapio certs init --server-names`)."
        case .clientCertificateExpired:
            return "\(error.description) (\(via(certificate))).\n  Renew it (`tapio certs init --dir D --operators NAME` issues a new one from the same CA), "
                + "or point \(identity) at a valid identity."
        case .clientCertificateRejected:
            return "\(error.description) (\(via(certificate))).\n  Use an operator identity issued by the server's CA: \(identity)."
        case .forbidden:
            return "\(error.description)\n  Queries need an operator certificate (O=tapio-operator); \(certificate.value) is \(via(certificate)). "
                + "Point \(identity) at an operator identity, e.g. D/operators/NAME of `tapio certs init --operators NAME`."
        case .refused, .other:
            return error.description
        }
    }
}

/// An error the CLI prints as it is (no "Error: " decoration beyond
/// ArgumentParser's own prefix, no type names).
struct CLIError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
