import NIOCore
import NIOPosix
import Synchronization
import TapioStore

/// Group commit on the storage thread: batches that arrive while it is busy
/// are committed together, in one transaction and one fsync, and each is
/// acknowledged after that commit. The thread stays the only writer and
/// keeps its order: every append submits a job, and the first job to run
/// commits everything pending, so a batch is durable no later than its own
/// job would have made it, before any job submitted after it.
final class GroupCommit: Sendable {
    private struct Item: Sendable {
        var append: BatchAppend
        var promise: EventLoopPromise<Bool>
    }

    private let pending = Mutex<[Item]>([])
    private let store: any EventStore
    private let storage: NIOThreadPool
    private let histograms: ServerHistograms

    init(store: any EventStore, storage: NIOThreadPool, histograms: ServerHistograms = ServerHistograms()) {
        self.store = store
        self.storage = storage
        self.histograms = histograms
    }

    /// Stored (true) or a duplicate (false), once durable; fails when the
    /// commit failed (nothing of the group is stored) or storage has stopped.
    func append(_ append: BatchAppend, eventLoop: EventLoop) -> EventLoopFuture<Bool> {
        let promise = eventLoop.makePromise(of: Bool.self)
        pending.withLock { $0.append(Item(append: append, promise: promise)) }
        let store = self.store
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
                let appends = items.map(\.append)
                let stored = try histograms.commit(appends) { try store.appendAll(appends) }
                for (i, s) in zip(items, stored) { i.promise.succeed(s) }
            } catch {
                for i in items { i.promise.fail(error) }
            }
        }
        return promise.futureResult
    }
}
