import Foundation
import TapioClient
import TapioWire

/// Repeats a query for `watch` and `events --follow` and rides out server
/// restarts: a failure a restart explains (unreachable, connection closed,
/// no answer) prints one status line on stderr and is retried with a growing
/// pause (up to `maximumBackoff`); the first answer after it prints another.
/// Any other failure (wrong CA, expired or non-operator certificate, a bad
/// request) ends the command with its explanation: waiting would not fix it.
///
/// Status lines go to stderr so stdout stays one record per line for pipes.
/// The connection is resolved again for every attempt, so renewed
/// certificate files are picked up.
struct Reconnecting {
    let connection: ConnectionOptions
    var interval: Double
    var maximumBackoff: Double = 5
    private var lostSince: Date?
    private var backoff: Double = 0

    init(connection: ConnectionOptions, interval: Double) {
        self.connection = connection
        self.interval = interval
    }

    /// The answer, or nil after a transient failure (having waited before returning).
    mutating func query(_ method: String, _ params: [String: String]) throws -> JSONValue? {
        let resolved = try connection.resolve()
        do {
            let client = try QueryClient(host: resolved.host, port: resolved.port, ca: resolved.ca.value,
                                         certificate: resolved.certificate.value, key: resolved.key.value)
            let doc = try client.json(method, params)
            if let since = lostSince {
                status("reconnected to \(resolved.server.value) after \(Int(Date().timeIntervalSince(since).rounded())) s")
                lostSince = nil
            }
            backoff = 0
            return doc
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

    private func status(_ text: String) {
        FileHandle.standardError.write(Data("tapio: \(rfc3339(ns: wallClockNs()))  \(text)\n".utf8))
    }
}
