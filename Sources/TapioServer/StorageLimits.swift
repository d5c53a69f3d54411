import Foundation

/// `--retention` and `--max-disk` as an operator writes them.
public enum StorageLimits {
    /// A duration: a number with s, m, h, d or w ("90m", "7d", "1.5h").
    public static func parseDuration(_ text: String) throws -> Int64 {
        let units: [Character: Double] = ["s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800]
        guard let unit = text.last, let scale = units[unit], let value = Double(text.dropLast()), value > 0, value.isFinite else {
            throw StorageLimitError("not a duration: '\(text)' (a number and s, m, h, d or w: 90m, 7d)")
        }
        let ns = value * scale * 1e9
        guard ns >= 60e9, ns < Double(Int64.max) else { throw StorageLimitError("duration '\(text)' out of range (at least 1m)") }
        return Int64(ns)
    }

    /// A size: bytes with an optional unit (K, M, G, T with or without iB/B,
    /// all powers of 1024), or a percentage of the filesystem that holds
    /// `directory` ("80%").
    public static func parseSize(_ text: String, directory: String) throws -> Int64 {
        if text.hasSuffix("%") {
            guard let percent = Double(text.dropLast()), percent > 0, percent <= 100 else {
                throw StorageLimitError("not a percentage: '\(text)' (1% to 100%)")
            }
            return Int64(Double(try filesystemBytes(directory)) * percent / 100)
        }
        var digits = text
        var scale: Double = 1
        for (suffixes, s) in [(["TiB", "TB", "T"], 1024.0 * 1024 * 1024 * 1024), (["GiB", "GB", "G"], 1024.0 * 1024 * 1024),
                              (["MiB", "MB", "M"], 1024.0 * 1024), (["KiB", "KB", "K"], 1024.0), (["B"], 1.0)] {
            if let suffix = suffixes.first(where: { text.hasSuffix($0) }) {
                digits = String(text.dropLast(suffix.count))
                scale = s
                break
            }
        }
        guard let value = Double(digits), value > 0, value.isFinite, value * scale < 9e18 else {
            throw StorageLimitError("not a size: '\(text)' (bytes with K, M, G or T, or a percentage of the volume: 20GiB, 80%)")
        }
        let bytes = Int64(value * scale)
        guard bytes >= 64 << 20 else { throw StorageLimitError("size '\(text)' is below the smallest store, 64MiB") }
        return bytes
    }

    /// The size of the filesystem that holds `directory` (or its nearest
    /// existing parent).
    public static func filesystemBytes(_ directory: String) throws -> Int64 {
        var path = directory
        while !FileManager.default.fileExists(atPath: path), path != "/" {
            path = (path as NSString).deletingLastPathComponent
            if path.isEmpty { path = "." }
        }
        var s = statvfs()
        guard statvfs(path, &s) == 0 else {
            throw StorageLimitError("statvfs \(path): \(String(cString: strerror(errno)))")
        }
        return Int64(s.f_blocks) * Int64(s.f_frsize)
    }
}

public struct StorageLimitError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
