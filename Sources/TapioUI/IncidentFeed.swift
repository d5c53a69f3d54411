import Foundation
import NIOCore
import Synchronization

/// How the browser learns that incidents changed without asking every
/// 2 s: `tapio ui` keeps a subscription to the server's incident changes
/// (docs/protocol.md, "Subscriptions") and calls `changed()` for each
/// message; the page's script long-polls `/api/changes?after=N`, answered as
/// soon as the generation passes N (or after `wait_s`, 25 s at most, with
/// the same generation), and fetches its fragment again at once.
public final class IncidentFeed: Sendable {
    private struct State {
        var generation = 0
        var nextWaiter = 0
        var waiters: [Int: (after: Int, promise: EventLoopPromise<Int>)] = [:]
    }

    private let state = Mutex(State())
    /// The longest a long-poll is held.
    public static let maximumWaitSeconds: Int64 = 25

    public init() {}

    /// Incidents changed (or the subscription started again): every waiter is answered.
    public func changed() {
        let (generation, ready) = state.withLock { s -> (Int, [EventLoopPromise<Int>]) in
            s.generation += 1
            let ready = s.waiters.values.map(\.promise)
            s.waiters.removeAll()
            return (s.generation, ready)
        }
        for p in ready { p.succeed(generation) }
    }

    public var generation: Int { state.withLock { $0.generation } }

    /// The generation once it is past `after`, or the current one after `waitSeconds`.
    func next(after: Int, on loop: EventLoop, waitSeconds: Int64) -> EventLoopFuture<Int> {
        let promise = loop.makePromise(of: Int.self)
        let id = state.withLock { s -> Int? in
            guard s.generation <= after else { return nil }
            s.nextWaiter += 1
            s.waiters[s.nextWaiter] = (after, promise)
            return s.nextWaiter
        }
        guard let id else {
            promise.succeed(generation)
            return promise.futureResult
        }
        loop.scheduleTask(in: .seconds(max(1, min(waitSeconds, Self.maximumWaitSeconds)))) { [self] in
            if let waiter = state.withLock({ $0.waiters.removeValue(forKey: id) }) { waiter.promise.succeed(generation) }
        }
        return promise.futureResult
    }
}
