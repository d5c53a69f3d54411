import Foundation

/// Reads a whole procfs file. procfs reports a size of 0 and hands its text
/// out a page per read(); `FileManager.contents(atPath:)` stops after the first
/// read, so /proc/self/mountinfo in a container (over 4 KiB once the runtime's
/// overlay options and the pod's volumes are in it) came back cut mid-line and
/// the host's cgroup hierarchies below the cut were not found.
enum ProcFile {
    static func read(_ path: String) -> Data? {
        guard let handle = FileHandle(forReadingAtPath: path) else { return nil }
        defer { try? handle.close() }
        return (try? handle.readToEnd()).map { $0 ?? Data() }
    }
}
