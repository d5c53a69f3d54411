import NIOCore
import NIOPosix
import Synchronization
import TapioCorrelation
import TapioStore

/// Group commit on the storage thread: batches that arrive while it is busy
/// are committed together, in one transaction and one fsync, and each is
/// acknowledged after that commit. When a group's commit fails, each of its
/// batches is tried alone, so only the batch that cannot be stored fails. The thread stays the only writer and
/// keeps its order: every append submits a job, and the first job to run
/// commits everything pending, so a batch is durable no later than its own
/// job would have made it, before any job submitted after it.
final class GroupCommit: Sendable {
    /// What became of one batch.
    struct Outcome: Sendable {
        /// Stored now (false: a duplicate, stored before).
        var stored: Bool
        /// False when the engine's queue was full as the batch joined it:
        /// the connection stops reading until `CorrelationService.whenRoom`.
        var room: Bool
    }

    private struct Item: Sendable {
        var append: BatchAppend
        /// Its events as the engine sees them, handed to the engine once stored.
        var observed: [ObservedEvent]
        var promise: EventLoopPromise<Outcome>
    }

    private let pending = Mutex<[Item]>([])
    private let store: any EventStore
    private let storage: NIOThreadPool
    private let histograms: ServerHistograms
    private let correlation: CorrelationService?

    init(store: any EventStore, storage: NIOThreadPool, histograms: ServerHistograms = ServerHistograms(), correlation: CorrelationService? = nil) {
        self.store = store
        self.storage = storage
        self.histograms = histograms
        self.correlation = correlation
    }

    /// Stored or a duplicate, once durable; fails when the commit failed
    /// (nothing of the group is stored) or storage has stopped. A stored
    /// batch's `observed` events go to the engine here, on the storage
    /// thread, in log order, so the engine's position in the log is exact
    /// (its checkpoint says which batch it has seen last).
    func append(_ append: BatchAppend, observed: [ObservedEvent] = [], eventLoop: EventLoop) -> EventLoopFuture<Outcome> {
        let promise = eventLoop.makePromise(of: Outcome.self)
        pending.withLock { $0.append(Item(append: append, observed: observed, promise: promise)) }
        storage.submit { [self] state in
            let items = pending.withLock { p -> [Item] in
                let taken = p
                p.removeAll(keepingCapacity: true)
                return taken
            }
            guard !items.isEmpty else { return }
            guard case .active = state else {
                for i in items { i.promise.fail(NIOThreadPoolError.ThreadPoolInactive()) }
                return
            }
            do {
                try commit(items)
            } catch where items.count > 1 {
                // One batch's failure (a write error, a full disk) fails
                // that batch, not the others that shared its group: each is
                // tried on its own, in order.
                for i in items {
                    do { try commit([i]) } catch { i.promise.fail(error) }
                }
            } catch {
                for i in items { i.promise.fail(error) }
            }
        }
        return promise.futureResult
    }

    /// Commits `items` in one transaction and settles their promises; throws
    /// (settling none) when the transaction failed.
    private func commit(_ items: [Item]) throws {
        let appends = items.map(\.append)
        let ids = try histograms.commit(appends) { try store.appendLogged(appends) }
        for (i, id) in zip(items, ids) {
            var room = true
            if let id, let correlation { room = correlation.submit(i.observed, batchId: id) }
            i.promise.succeed(Outcome(stored: id != nil, room: room))
        }
    }
}
