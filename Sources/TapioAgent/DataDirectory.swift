import Foundation

/// The agent's data directory (`--data-dir`, default `/var/lib/tapio-agent`):
/// its spool (`spool/`, unless `--spool-dir` puts it elsewhere), the crash
/// counters (`counters`, see `CrashCounters`) and `lock`.
///
/// Two agents on one data directory would delete each other's spool records
/// and count each other's events as lost, so the agent takes an exclusive
/// `flock` on `<dir>/lock` before it touches anything else there and holds it
/// until the process ends (the kernel releases it with the last descriptor:
/// a killed agent leaves no stale lock behind). A second agent is refused with
/// a message that names the holder.
public final class AgentDataDirectory: @unchecked Sendable {
    public let path: String
    private let fd: Int32

    public var spoolPath: String { path + "/spool" }
    public var countersPath: String { path + "/counters" }

    public struct InUse: Error, CustomStringConvertible {
        public var directory: String
        public var holder: String?

        public var description: String {
            "data directory \(directory) is in use by another tapio-agent\(holder.map { " (\($0))" } ?? ""): it holds \(directory)/lock. "
                + "Two agents must not share a data directory (each would send and delete the other's spool); "
                + "stop the other one or give this one its own --data-dir."
        }
    }

    /// Creates the directory if needed and takes the lock without waiting.
    public init(path: String) throws {
        self.path = path
        do {
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        } catch {
            throw KernelSourceError("--data-dir \(path): cannot create it: \(error.localizedDescription)")
        }
        let lockPath = path + "/lock"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw KernelSourceError("--data-dir \(path): cannot open \(lockPath): \(String(cString: strerror(errno)))") }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            var buffer = [UInt8](repeating: 0, count: 256)
            let n = pread(fd, &buffer, buffer.count, 0)
            let holder = n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self).split(separator: "\n").joined(separator: ", ") : nil
            close(fd)
            if e == EWOULDBLOCK { throw InUse(directory: path, holder: holder) }
            throw KernelSourceError("--data-dir \(path): cannot lock \(lockPath): \(String(cString: strerror(e)))")
        }
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let text = "pid \(getpid())\nhost \(String(cString: host))\n"
        _ = ftruncate(fd, 0)
        _ = text.withCString { pwrite(fd, $0, strlen($0), 0) }
        self.fd = fd
    }

    deinit { close(fd) }
}
