import Logging
import TapioNATS
import TapioQueryAPI
import TapioStore

/// Follows the incident bucket (`TAPIO_INCIDENTS`) into an `IncidentBoard`:
/// what every correlate replica does, and every query replica (docs/scaling.md).
/// An ephemeral consumer on the bucket's stream delivers every value, then
/// new ones as they come; each is acknowledged, so a value delivered to a
/// pull request that was lost comes again after 5 s; an older value arriving
/// after a newer one is ignored by the board. The consumer is made again
/// from the next sequence when a fetch fails. A value that cannot be read is
/// counted (`malformedMetric`), logged and skipped.
struct IncidentMirror {
    let bucket: String
    let board: IncidentBoard
    let metrics: ServerMetrics
    let logger: Logger
    let malformedMetric: String
    let restartMetric: String

    /// Runs until `stopping()`; `caughtUp` once the bucket has been read to
    /// its end, `changed` for each incident that is new or newer (`isNew`: new; a throw counts it as unreadable).
    func run(_ js: JetStream, stopping: @Sendable () -> Bool, caughtUp: @Sendable () -> Void,
             changed: @Sendable (StoredIncident, _ isNew: Bool) throws -> Void) async {
        let stream = "KV_\(bucket)"
        let prefix = "$KV.\(bucket)."
        var from = ConsumerConfiguration.DeliverPolicy.all
        var consumer: String?
        while !stopping() {
            do {
                if consumer == nil {
                    var c = ConsumerConfiguration.ephemeral(deliver: from, ack: .explicit)
                    c.ackWait = .seconds(5)
                    consumer = try await js.createEphemeralConsumer(stream: stream, c).name
                }
                let messages = try await js.fetch(stream: stream, consumer: consumer!, batch: 256, expires: .milliseconds(500))
                for m in messages {
                    try? await js.ack(m, confirm: false)
                    // A value delivered again (after a lost delivery) may be older than
                    // the position: applied all the same, the board keeps the newest.
                    if case .startSequence(let next) = from, m.streamSequence < next {} else { from = .startSequence(m.streamSequence + 1) }
                    guard m.subject.hasPrefix(prefix), m.headers?["KV-Operation"] == nil else { continue }
                    do {
                        let incident = try IncidentBoard.decode(Array(m.payload.readableBytesView))
                        let (isChanged, isNew) = board.mirror(incident)
                        if isChanged { try changed(incident, isNew) }
                    } catch {
                        metrics.add(malformedMetric)
                        logger.warning("an incident in the bucket cannot be read; skipped", metadata: ["key": "\(m.subject.dropFirst(prefix.count))", "error": "\(error)"])
                    }
                }
                if messages.last.map({ $0.pending == 0 }) ?? true { caughtUp() }
            } catch {
                if stopping() { return }
                metrics.add(restartMetric)
                logger.warning("reading the incident bucket failed; reading again from the next value", metadata: ["error": "\(error)"])
                consumer = nil
                try? await Task.sleep(for: .milliseconds(500))
            }
        }
    }
}
