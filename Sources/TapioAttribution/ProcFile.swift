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
        var chunk = 4096
        while out.count < limit {
            let want = min(chunk, limit - out.count)
            let start = out.count
            out.append(contentsOf: repeatElement(0, count: want))
            let n = out.withUnsafeMutableBufferPointer { buffer in
                Foundation.read(fd, buffer.baseAddress! + start, want)
            }
            if n < 0 {
                if errno == EINTR {
                    out.removeLast(want)
                    continue
                }
                return nil
            }
            out.removeLast(want - n)
            if n == 0 { break }
            chunk = min(chunk * 2, 1 << 20)
        }
        return out
    }

    /// The file's text (UTF-8, invalid bytes replaced).
    public static func text(_ path: String, limit: Int = 16 << 20) -> String? {
        bytes(path, limit: limit).map { String(decoding: $0, as: UTF8.self) }
    }
}
