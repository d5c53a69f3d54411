import CZstd
import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// A file written whole and replaced atomically: `path` holds either the
/// previous content or the new one, never a mix, across a crash. The
/// content is one zstd frame (with its checksum) after an 8-byte magic, so a
/// damaged file is refused rather than read. The engine's checkpoint
/// (docs/storage.md, "Engine checkpoints").
public enum CheckpointFile {
    static let magic: [UInt8] = Array("TAPCKPT1".utf8)

    public struct Damaged: Error, CustomStringConvertible {
        public let description: String
        public init(description: String) { self.description = description }
    }

    /// Writes `bytes` to `path` through a temporary file, fsync and rename.
    /// Returns the bytes written to disk (compressed).
    @discardableResult
    public static func write(_ bytes: [UInt8], to path: String) throws -> Int {
        guard let ctx = tapio_zstd_ctx_new(3) else { throw Damaged(description: "zstd: cannot create a compression context") }
        defer { tapio_zstd_ctx_free(ctx) }
        var frame = [UInt8](repeating: 0, count: Int(tapio_zstd_bound(bytes.count)))
        var message: UnsafePointer<CChar>?
        let n = frame.withUnsafeMutableBytes { dst in
            bytes.withUnsafeBytes { src in tapio_zstd_compress(ctx, dst.baseAddress, dst.count, src.baseAddress, src.count, &message) }
        }
        guard n >= 0 else { throw Damaged(description: "zstd: \(message.map { String(cString: $0) } ?? "compression failed")") }
        let out = magic + frame[0..<Int(n)]
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw Damaged(description: "open \(tmp): \(String(cString: strerror(errno)))") }
        var done = 0
        while done < out.count {
            let w = out.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if w < 0 {
                if errno == EINTR { continue }
                let e = String(cString: strerror(errno))
                close(fd)
                throw Damaged(description: "write \(tmp): \(e)")
            }
            done += w
        }
        guard fsync(fd) == 0 else {
            let e = String(cString: strerror(errno))
            close(fd)
            throw Damaged(description: "fsync \(tmp): \(e)")
        }
        close(fd)
        guard rename(tmp, path) == 0 else { throw Damaged(description: "rename \(tmp): \(String(cString: strerror(errno)))") }
        let dir = open((path as NSString).deletingLastPathComponent, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dir >= 0 {
            _ = fsync(dir)
            close(dir)
        }
        return out.count
    }

    /// The content of `path`, nil when there is none.
    public static func read(_ path: String) throws -> [UInt8]? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        let bytes = [UInt8](data)
        guard bytes.count > magic.count, Array(bytes[0..<magic.count]) == magic else {
            throw Damaged(description: "\(path) is not a checkpoint")
        }
        let size = bytes.withUnsafeBytes { tapio_zstd_frame_size($0.baseAddress! + magic.count, $0.count - magic.count) }
        guard size >= 0, size < 1 << 34 else { throw Damaged(description: "\(path): damaged (no frame size)") }
        var out = [UInt8](repeating: 0, count: Int(size))
        var message: UnsafePointer<CChar>?
        let got = out.withUnsafeMutableBytes { dst in
            bytes.withUnsafeBytes { src in
                tapio_zstd_decompress(dst.baseAddress, dst.count, src.baseAddress! + magic.count, src.count - magic.count, &message)
            }
        }
        guard got == size else { throw Damaged(description: "\(path): damaged (\(message.map { String(cString: $0) } ?? "size mismatch"))") }
        return out
    }
}
