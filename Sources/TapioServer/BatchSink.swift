import Logging
import NIOCore
import NIOPosix
import TapioCorrelation
import TapioStore
import TapioWire

/// Where the ingest path puts what an agent sends. `IngestHandler` speaks the
/// agent protocol (hello, identity, limits, time sync, acks) and hands each
/// batch to a sink; the sink says when the batch is durable. Two sinks exist:
/// `LocalBatchSink` (role `all`: the segment log with group commit, then the
/// correlation engine) and `JetStreamBatchSink` (role `ingest`: a JetStream
/// stream). The ack rule is the handler's and the same for both: an `Ack`
/// leaves only after the sink's future succeeds.
protocol BatchSink: Sendable {
    /// Durable (stored now, or a duplicate of a batch stored before) when the
    /// future succeeds; not durable, and not to be acknowledged, when it fails.
    func append(_ append: BatchAppend, observed: [ObservedEvent], eventLoop: any EventLoop) -> EventLoopFuture<GroupCommit.Outcome>
    /// The contiguous durable prefix of (node, epoch) the hello-ack claims: it
    /// may be lower than the truth (the agent then resends batches that are
    /// acknowledged as duplicates), never higher.
    func durablePrefix(node: String, epoch: UInt64, eventLoop: any EventLoop) -> EventLoopFuture<UInt64>
    /// The node's record (connected, counters), where this role keeps it.
    func saveNode(_ record: NodeRecord, logger: Logger)
    /// The pods a node reported, where this role keeps them.
    func savePods(node: String, pods: [PodInfo], logger: Logger)
    /// Calls `body` once the consumer of stored batches has room again
    /// (after an `Outcome` with `room == false`).
    func whenRoom(_ body: @escaping @Sendable () -> Void)
}

/// Role `all`: the local segment log (group commit on the storage thread),
/// the engine fed from it, nodes and pods in the store's SQLite tables.
struct LocalBatchSink: BatchSink {
    let store: any EventStore
    let storage: NIOThreadPool
    let commits: GroupCommit
    let correlation: CorrelationService

    func append(_ append: BatchAppend, observed: [ObservedEvent], eventLoop: any EventLoop) -> EventLoopFuture<GroupCommit.Outcome> {
        commits.append(append, observed: observed, eventLoop: eventLoop)
    }

    func durablePrefix(node: String, epoch: UInt64, eventLoop: any EventLoop) -> EventLoopFuture<UInt64> {
        let store = self.store
        return storage.runIfActive(eventLoop: eventLoop) { try store.durablePrefix(node: node, epoch: epoch) }
    }

    func saveNode(_ record: NodeRecord, logger: Logger) {
        let store = self.store
        storage.submit { state in
            guard case .active = state else { return }
            do { try store.saveNode(record) } catch { logger.error("saving node state failed", metadata: ["error": "\(error)"]) }
        }
    }

    func savePods(node: String, pods: [PodInfo], logger: Logger) {
        correlation.updateInventory(node: node, pods: pods)
        let store = self.store
        storage.submit { state in
            guard case .active = state else { return }
            do { try store.savePods(node: node, pods: pods) } catch { logger.error("saving pods failed", metadata: ["error": "\(error)"]) }
        }
    }

    func whenRoom(_ body: @escaping @Sendable () -> Void) {
        correlation.whenRoom(body)
    }
}
