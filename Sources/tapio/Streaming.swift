import Foundation
import TapioClient
import TapioWire

/// Keeps `watch` and `events --follow` talking to the server and rides out
/// server restarts: a failure a restart explains (unreachable, connection
/// closed, no answer, shutting down) prints one status line on stderr and
/// is retried with a growing pause (up to `maximumBackoff`); the first
/// success after it prints another. Any other failure (wrong CA, expired or
/// non-operator certificate, a bad request) ends the command with its
/// explanation: waiting would not fix it.
///
/// Status lines go to stderr so stdout stays one record per line for pipes.
/// The connection is resolved again for every attempt, so renewed
/// certificate files are picked up.
final class Reconnecting {
    let connection: ConnectionOptions
    var interval: Double
    var maximumBackoff: Double = 5
    private var lostSince: Date?
    private var backoff: Double = 0
    private var server = ""

    init(connection: ConnectionOptions, interval: Double) {
        self.connection = connection
        self.interval = interval
    }

    /// `query`'s result, or nil after a transient failure (having waited
    /// before returning). `query` may call `connected()` once the server
    /// answered, when it goes on for long (a subscription): the
    /// "reconnected" line is printed then, not when it ends.
    func attempt<T>(_ query: (QueryClient) throws -> T) throws -> T? {
        let resolved = try connection.resolve()
        server = resolved.server.value
        do {
            let client = try QueryClient(host: resolved.host, port: resolved.port, ca: resolved.ca.value,
                                         certificate: resolved.certificate.value, key: resolved.key.value)
            let result = try query(client)
            connected()
            return result
        } catch let error as QueryError where error.isTransient {
            if lostSince == nil {
                lostSince = Date()
                status("\(error.description); retrying until it answers (the address is from \(resolved.server.origin); interrupt to stop)")
            }
            backoff = min(maximumBackoff, max(interval, backoff * 2))
            Thread.sleep(forTimeInterval: backoff)
            return nil
        } catch let error as QueryError {
            throw CLIError(resolved.explain(error))
        }
    }

    /// The server answered: says so if it had been lost, and resets the pause.
    func connected() {
        if let since = lostSince {
            status("reconnected to \(server) after \(Int(Date().timeIntervalSince(since).rounded())) s")
            lostSince = nil
        }
        backoff = 0
    }

    private func status(_ text: String) {
        FileHandle.standardError.write(Data("tapio: \(rfc3339(ns: wallClockNs()))  \(text)\n".utf8))
    }
}
