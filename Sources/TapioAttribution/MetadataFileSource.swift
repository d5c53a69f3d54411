import Foundation
import Synchronization

/// Pod metadata from a file in the Kubernetes API's PodList JSON format
/// (`--metadata-file`; `kubectl get pods -o json` writes one). A single Pod
/// document is accepted too.
///
/// The file is read again when its modification time, size or inode changes
/// (an atomic rename gives a new inode even within one mtime tick). A read that
/// does not parse — a writer caught mid-write — leaves the index as it was and
/// is retried on the next check.
public final class MetadataFileSource: Sendable {
    public let path: String
    public let index: PodIndex

    private struct Stamp: Equatable {
        var seconds: Int
        var nanoseconds: Int
        var size: Int64
        var inode: UInt64
    }

    private struct State {
        var loaded: Stamp?
        var lastError: String?
        var reloads: UInt64 = 0
        var stopping = false
    }

    private let state = Mutex(State())

    public init(path: String, index: PodIndex) {
        self.path = path
        self.index = index
    }

    /// Why the last read failed, nil after a good one.
    public var lastError: String? { state.withLock { $0.lastError } }
    /// Successful loads so far.
    public var reloads: UInt64 { state.withLock { $0.reloads } }

    /// Reads the file if it changed since the last successful load; true if
    /// the index was replaced. Throws if the file is missing or does not parse
    /// (the index keeps the last good contents).
    @discardableResult
    public func reloadIfChanged() throws -> Bool {
        guard let stamp = Self.stamp(path) else {
            let message = "cannot stat \(path): \(String(cString: strerror(errno)))"
            state.withLock { $0.lastError = message }
            throw AttributionError(message)
        }
        if state.withLock({ $0.loaded == stamp }) { return false }
        do {
            let data = try Data(contentsOf: URL(fileURLWithPath: path))
            let (pods, _) = try KubeDocument.pods(from: data)
            index.replaceAll(pods.compactMap(PodInfo.init))
            state.withLock { s in
                s.loaded = stamp
                s.lastError = nil
                s.reloads += 1
            }
            return true
        } catch {
            let message = "\(path): \(error)"
            state.withLock { $0.lastError = message }
            throw AttributionError(message)
        }
    }

    /// Checks the file every `interval` seconds on a background thread until `stop()`.
    public func start(interval: Double = 1) {
        let thread = Thread { [self] in
            while !state.withLock({ $0.stopping }) {
                _ = try? reloadIfChanged()
                index.sweep()
                var slept = 0.0
                while slept < interval && !state.withLock({ $0.stopping }) {
                    Thread.sleep(forTimeInterval: min(0.05, interval))
                    slept += 0.05
                }
            }
        }
        thread.name = "tapio-metadata-file"
        state.withLock { $0.stopping = false }
        thread.start()
    }

    /// Stops the background thread (returns at once; it exits within 50 ms).
    public func stop() {
        state.withLock { $0.stopping = true }
    }

    private static func stamp(_ path: String) -> Stamp? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        #if canImport(Darwin)
        return Stamp(seconds: st.st_mtimespec.tv_sec, nanoseconds: st.st_mtimespec.tv_nsec, size: Int64(st.st_size), inode: UInt64(st.st_ino))
        #else
        return Stamp(seconds: st.st_mtim.tv_sec, nanoseconds: st.st_mtim.tv_nsec, size: Int64(st.st_size), inode: UInt64(st.st_ino))
        #endif
    }
}
