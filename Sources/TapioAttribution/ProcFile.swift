import Foundation

/// Reads a whole procfs, sysfs or cgroupfs file with open/read/close.
///
/// Those files report a size of 0 and hand their text out a page per
/// read(): `FileManager.contents(atPath:)` stops after the first read, so
/// /proc/self/mountinfo in a container (over 4 KiB once the runtime's overlay
/// options and the pod's volumes are in it) came back cut mid-line. And
/// Foundation's `String(contentsOfFile:)` loses about 4 KiB of heap on every
/// such file it reads (measured with heaptrack on this toolchain): an agent
/// that reads its cgroups' files every second grew by tens of KiB a second.
/// Reading here allocates one buffer, released with the result.
public enum ProcFile {
    /// The file's bytes, at most `limit` of them; nil when it cannot be opened or read.
    public static func bytes(_ path: String, limit: Int = 16 << 20) -> [UInt8]? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out: [UInt8] = []
        let complete = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 16 << 10) { chunk -> Bool in
            while out.count < limit {
                let n = Foundation.read(fd, chunk.baseAddress!, min(chunk.count, limit - out.count))
                if n < 0 {
                    if errno == EINTR { continue }
                    return false
                }
                if n == 0 { break }
                out.append(contentsOf: UnsafeBufferPointer(rebasing: chunk[0..<n]))
            }
            return true
        }
        return complete ? out : nil
    }

    /// The file's text (UTF-8, invalid bytes replaced).
    public static func text(_ path: String, limit: Int = 16 << 20) -> String? {
        bytes(path, limit: limit).map { String(decoding: $0, as: UTF8.self) }
    }
}
