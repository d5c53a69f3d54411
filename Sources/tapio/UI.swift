import ArgumentParser
import Foundation
import TapioClient
import TapioQueryAPI
import TapioUI
import TapioWire

/// `tapio ui`: the web UI served from the operator's machine (docs/ui.md).
/// It holds the operator's certificate and asks tapio-server over the query
/// port like every other command, so the server serves nothing new and the
/// certificate never leaves the machine; the browser talks plain HTTP to a
/// loopback port and shows it has the token this command prints.
struct UI: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ui",
        abstract: "Serve the web UI (incidents, an incident's causes and timeline lanes, the service map, events) on a local port.",
        discussion: """
            Prints the URL to open, with an access token; runs until interrupted. The UI asks the server with this \
            command's connection settings (--server, --tls-dir, contexts) on every page and every 2 s update.
            """)

    @OptionGroup var connection: ConnectionOptions
    @Option(help: ArgumentHelp("Where the UI listens, HOST:PORT. Anything but a loopback address lets other machines reach it.", valueName: "host:port"))
    var listen = "127.0.0.1:7480"
    @Option(help: ArgumentHelp("Access token the browser must show once (default: a new random one each start).", valueName: "token"))
    var token: String?
    @Flag(help: "Serve without a token: anyone who reaches the port reads what the operator certificate may read.")
    var noToken = false

    func validate() throws {
        guard (try? parseHostPort(listen)) != nil else { throw ValidationError("cannot read --listen \(listen): use HOST:PORT, e.g. 127.0.0.1:7480") }
        if noToken, token != nil { throw ValidationError("--token and --no-token do not go together") }
        if let token, token.count < 16 || !token.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" }) {
            throw ValidationError("--token must be at least 16 letters, digits, - or _")
        }
    }

    func run() throws {
        let resolved = try connection.resolve()
        // A wrong certificate or CA is said now, not on the first page; an
        // unreachable server may come up later, and the pages say so meanwhile.
        do {
            _ = try resolved.client().nodes()
        } catch let error as QueryError where error.isTransient {
            FileHandle.standardError.write(Data("tapio: \(resolved.explain(error))\n  Serving the UI anyway; its pages show the error until the server answers.\n".utf8))
        } catch let error as QueryError {
            throw CLIError(resolved.explain(error))
        }
        let address = try parseHostPort(listen)
        var config = UIServer.Configuration()
        config.host = address.host
        config.port = address.port
        config.token = noToken ? nil : (token ?? Self.randomToken())
        let feed = IncidentFeed()
        Self.follow(resolved, into: feed)
        let server = UIServer(configuration: config, query: ServerQueries(connection: resolved), feed: feed)
        let bound: Int
        do {
            bound = try server.start().port ?? address.port
        } catch {
            throw CLIError("\(error); choose another with --listen HOST:PORT")
        }
        let loopback = address.host == "localhost" || address.host == "::1" || address.host.hasPrefix("127.")
        if !loopback {
            FileHandle.standardError.write(Data("tapio: warning: --listen \(listen) is not a loopback address; the UI is plain HTTP and other machines may reach it\n".utf8))
        }
        let host = address.host.contains(":") ? "[\(address.host)]" : address.host
        let url = "http://\(host):\(bound)/" + (config.token.map { "?token=\($0)" } ?? "")
        print("Tapio UI for \(resolved.server.value) at \(url)")
        print("(interrupt to stop)")
        fflush(nil)
        try server.wait()
    }

    /// The pages' queries through this command's connection, failures in words.
    struct ServerQueries: UIQueries {
        let connection: ResolvedConnection
        func incidents(status: String) throws -> IncidentsAnswer { try connection.ask { try $0.incidents(status: status) } }
        func explain(id: String) throws -> QueryIncident { try connection.ask { try $0.explain(id: id) } }
        func services() throws -> ServicesAnswer { try connection.ask { try $0.services() } }
        func nodes() throws -> NodesAnswer { try connection.ask { try $0.nodes() } }
        func events(_ params: [String: String]) throws -> EventsAnswer { try connection.ask { try $0.events(params) } }
    }

    /// Keeps a subscription to the server's incident changes for the pages'
    /// live updates, on a thread of its own for as long as the UI runs; a
    /// lost connection is tried again every 2 s (the pages say meanwhile
    /// what their own queries meet).
    static func follow(_ connection: ResolvedConnection, into feed: IncidentFeed) {
        let thread = Thread {
            while true {
                do {
                    try connection.client().subscribe(keepaliveMs: 5_000) { message in
                        if message.type != .keepalive { feed.changed() }
                        return true
                    }
                } catch {
                    Thread.sleep(forTimeInterval: 2)
                }
            }
        }
        thread.name = "incident-feed"
        thread.start()
    }

    static func randomToken() -> String {
        var g = SystemRandomNumberGenerator()
        return (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255, using: &g)) }.joined()
    }
}
