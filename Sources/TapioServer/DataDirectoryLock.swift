import Foundation

/// An exclusive lock on a data directory: `flock` on `<dir>/lock`, held from
/// before the store is opened until the server stops (or the process ends: the
/// kernel releases it with the last descriptor, so a killed server leaves no
/// stale lock behind). A server in another process on the same directory is
/// refused instead of writing into the same SQLite files.
///
/// The lock belongs to the process: servers of one process on one directory
/// (a restart inside a test) share it, and it is released when the last of
/// them stops.
///
/// The holder writes its pid and host name into the file, so the refusal can
/// say who holds it. The pid is as the holder sees it (its PID namespace).
public final class DataDirectoryLock: @unchecked Sendable {
    public let directory: String
    public let path: String
    private var fd: Int32
    private var key: FileKey?

    private struct FileKey: Hashable {
        var device: UInt64
        var inode: UInt64
    }

    /// Lock files this process holds: descriptor and number of holders.
    private nonisolated(unsafe) static var held: [FileKey: (fd: Int32, holders: Int)] = [:]
    private static let heldLock = NSLock()

    public struct Held: Error, CustomStringConvertible {
        public var directory: String
        /// The holder's pid and host as it wrote them, when readable.
        public var pid: Int32?
        public var host: String?

        public var description: String {
            var holder = "another tapio-server"
            if let pid { holder += " (pid \(pid)\(host.map { " on \($0)" } ?? ""))" }
            return "data directory \(directory) is in use by \(holder): it holds \(directory)/lock. "
                + "Only one server may use a data directory; stop the other one or give this one another --data-dir."
        }
    }

    public struct Failed: Error, CustomStringConvertible {
        public var description: String
    }

    /// Creates the directory if needed and takes the lock without waiting.
    public init(directory: String) throws {
        self.directory = directory
        path = (directory as NSString).appendingPathComponent("lock")
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw Failed(description: "cannot open \(path): \(String(cString: strerror(errno)))")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            close(fd)
            throw Failed(description: "cannot stat \(path): \(String(cString: strerror(e)))")
        }
        let key = FileKey(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
        Self.heldLock.lock()
        defer { Self.heldLock.unlock() }
        if let mine = Self.held[key] {
            close(fd)
            fd = mine.fd
            self.key = key
            Self.held[key] = (mine.fd, mine.holders + 1)
            return
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            let contents = Self.read(fd)
            close(fd)
            fd = -1
            if e == EWOULDBLOCK {
                throw Held(directory: directory, pid: contents.pid, host: contents.host)
            }
            throw Failed(description: "cannot lock \(path): \(String(cString: strerror(e)))")
        }
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let text = "pid \(getpid())\nhost \(String(cString: host))\n"
        _ = ftruncate(fd, 0)
        _ = text.withCString { pwrite(fd, $0, strlen($0), 0) }
        self.key = key
        Self.held[key] = (fd, 1)
    }

    deinit { release() }

    /// Releases the lock (idempotent).
    public func release() {
        Self.heldLock.lock()
        defer { Self.heldLock.unlock() }
        guard fd >= 0, let key else { return }
        fd = -1
        self.key = nil
        guard let mine = Self.held[key] else { return }
        if mine.holders > 1 {
            Self.held[key] = (mine.fd, mine.holders - 1)
        } else {
            Self.held[key] = nil
            close(mine.fd)
        }
    }

    private static func read(_ fd: Int32) -> (pid: Int32?, host: String?) {
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = pread(fd, &buffer, buffer.count, 0)
        guard n > 0 else { return (nil, nil) }
        var pid: Int32?
        var host: String?
        for line in String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2 else { continue }
            if parts[0] == "pid" { pid = Int32(parts[1]) }
            if parts[0] == "host" { host = String(parts[1]) }
        }
        return (pid, host)
    }
}
