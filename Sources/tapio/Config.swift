import ArgumentParser
import Foundation
import TapioWire

/// The CLI's config file: named contexts, each a server address and an
/// operator identity, and the one in use (like kubectl's contexts). JSON, so
/// it is read without a YAML parser:
///
///     {
///       "current_context": "lab",
///       "contexts": {
///         "lab":  {"server": "127.0.0.1:7401", "tls_dir": "/root/pki/operators/alice"},
///         "prod": {"server": "127.0.0.1:17401", "tls_dir": "~/.tapio/admin"}
///       }
///     }
///
/// Found at `$TAPIO_CONFIG`, else `$XDG_CONFIG_HOME/tapio/config.json`, else
/// `~/.config/tapio/config.json`; a missing file is an empty config.
struct CLIConfig {
    struct Context: Codable, Equatable {
        var server: String?
        var tlsDir: String?
        var tlsCa: String?
        var tlsCert: String?
        var tlsKey: String?

        enum CodingKeys: String, CodingKey {
            case server, tlsDir = "tls_dir", tlsCa = "tls_ca", tlsCert = "tls_cert", tlsKey = "tls_key"
        }
    }

    struct File: Codable, Equatable {
        var currentContext: String?
        var contexts: [String: Context] = [:]

        enum CodingKeys: String, CodingKey {
            case currentContext = "current_context", contexts
        }

        init() {}

        init(from decoder: Decoder) throws {
            let c = try decoder.container(keyedBy: CodingKeys.self)
            currentContext = try c.decodeIfPresent(String.self, forKey: .currentContext)
            contexts = try c.decodeIfPresent([String: Context].self, forKey: .contexts) ?? [:]
        }
    }

    var path: String
    var file: File

    static func path(environment: [String: String]) -> String {
        if let p = environment["TAPIO_CONFIG"], !p.isEmpty { return p }
        if let x = environment["XDG_CONFIG_HOME"], !x.isEmpty { return x + "/tapio/config.json" }
        return (environment["HOME"].flatMap { $0.isEmpty ? nil : $0 } ?? NSHomeDirectory()) + "/.config/tapio/config.json"
    }

    static func load(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> CLIConfig {
        let path = path(environment: environment)
        guard let data = FileManager.default.contents(atPath: path) else {
            if FileManager.default.fileExists(atPath: path) { throw CLIError("cannot read the config file \(path) (set TAPIO_CONFIG to use another)") }
            return CLIConfig(path: path, file: File())
        }
        do {
            return CLIConfig(path: path, file: try JSONDecoder().decode(File.self, from: data))
        } catch {
            throw CLIError("the config file \(path) is not valid: \(describe(error)) (docs/cli.md shows its format; TAPIO_CONFIG selects another file)")
        }
    }

    func save() throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let data = try encoder.encode(file)
        let dir = (path as NSString).deletingLastPathComponent
        do {
            try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
            try (data + Data("\n".utf8)).write(to: URL(fileURLWithPath: path), options: .atomic)
        } catch {
            throw CLIError("cannot write the config file \(path): \((error as NSError).localizedDescription)")
        }
    }

    private static func describe(_ error: Error) -> String {
        switch error {
        case DecodingError.dataCorrupted: return "not JSON"
        case DecodingError.typeMismatch(_, let c), DecodingError.valueNotFound(_, let c):
            return "wrong type at \(c.codingPath.map(\.stringValue).joined(separator: "."))"
        default: return "unexpected content"
        }
    }
}

struct Config: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Named contexts (server address and operator identity) in the config file, like kubectl's.",
        discussion: "The file is $TAPIO_CONFIG, else $XDG_CONFIG_HOME/tapio/config.json, else ~/.config/tapio/config.json.",
        subcommands: [SetContext.self, UseContext.self, GetContexts.self, CurrentContext.self, DeleteContext.self])

    struct SetContext: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "set-context", abstract: "Create or change a context (relative paths are stored absolute).")

        @Argument(help: "Context name.")
        var name: String
        @Option(help: "Server query address, HOST:PORT.")
        var server: String?
        @Option(help: "Directory with ca.crt, tls.crt, tls.key.")
        var tlsDir: String?
        @Option(help: "CA certificate (PEM).")
        var tlsCa: String?
        @Option(help: "Operator certificate (PEM).")
        var tlsCert: String?
        @Option(help: "Operator private key (PEM).")
        var tlsKey: String?
        @Flag(help: "Also make it the current context.")
        var use = false

        func run() throws {
            var config = try CLIConfig.load()
            var c = config.file.contexts[name] ?? CLIConfig.Context()
            func absolute(_ p: String?) -> String? {
                guard let p else { return nil }
                if p.hasPrefix("/") || p.hasPrefix("~/") { return p }
                return FileManager.default.currentDirectoryPath + "/" + p
            }
            if let server {
                guard (try? parseHostPort(server)) != nil else { throw ValidationError("cannot read the server address \(server): use HOST:PORT") }
                c.server = server
            }
            if let tlsDir { c.tlsDir = absolute(tlsDir) }
            if let tlsCa { c.tlsCa = absolute(tlsCa) }
            if let tlsCert { c.tlsCert = absolute(tlsCert) }
            if let tlsKey { c.tlsKey = absolute(tlsKey) }
            config.file.contexts[name] = c
            if use || config.file.currentContext == nil { config.file.currentContext = name }
            try config.save()
            print("context \(name) saved in \(config.path)\(config.file.currentContext == name ? " (current)" : "")")
        }
    }

    struct UseContext: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "use-context", abstract: "Make a context the current one.")

        @Argument(help: "Context name.")
        var name: String

        func run() throws {
            var config = try CLIConfig.load()
            guard config.file.contexts[name] != nil else {
                throw CLIError("no context \(name) in \(config.path); known: \(config.file.contexts.keys.sorted().joined(separator: ", "))")
            }
            config.file.currentContext = name
            try config.save()
            print("current context: \(name)")
        }
    }

    struct GetContexts: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "get-contexts", abstract: "List the contexts; * marks the current one.")

        func run() throws {
            let config = try CLIConfig.load()
            let rows = config.file.contexts.keys.sorted().map { name -> [String] in
                let c = config.file.contexts[name]!
                let identity = c.tlsDir ?? [c.tlsCa, c.tlsCert, c.tlsKey].compactMap { $0 }.joined(separator: ",")
                return [config.file.currentContext == name ? "*" : "", name, c.server ?? "", identity]
            }
            print(table(["CURRENT", "NAME", "SERVER", "TLS"], rows))
        }
    }

    struct CurrentContext: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "current-context", abstract: "Print the current context's name.")

        func run() throws {
            let config = try CLIConfig.load()
            guard let name = config.file.currentContext else { throw CLIError("no current context in \(config.path)") }
            print(name)
        }
    }

    struct DeleteContext: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "delete-context", abstract: "Remove a context.")

        @Argument(help: "Context name.")
        var name: String

        func run() throws {
            var config = try CLIConfig.load()
            guard config.file.contexts.removeValue(forKey: name) != nil else { throw CLIError("no context \(name) in \(config.path)") }
            if config.file.currentContext == name { config.file.currentContext = nil }
            try config.save()
            print("context \(name) deleted")
        }
    }
}
