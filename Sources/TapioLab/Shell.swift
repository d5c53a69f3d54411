import Foundation
import Synchronization

public struct LabError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }

    /// Raised where the run checks for Ctrl-C / SIGTERM.
    public static let interrupted = LabError("interrupted")
}

/// SIGINT and SIGTERM set a flag that every wait in the lab checks; the run
/// then unwinds and cleans up. A plain C handler (not SIG_IGN plus a dispatch
/// source) so children start with default signal dispositions.
public enum LabSignals {
    private static let received = Atomic<Int32>(0)

    public static func install() {
        let handler: @convention(c) (Int32) -> Void = { sig in LabSignals.received.store(sig, ordering: .relaxed) }
        signal(SIGINT, handler)
        signal(SIGTERM, handler)
        signal(SIGPIPE, SIG_IGN)
    }

    /// The signal received, 0 if none.
    public static var pending: Int32 { received.load(ordering: .relaxed) }

    public static func check() throws {
        if pending != 0 { throw LabError.interrupted }
    }

    /// Sleeps in small steps; throws `interrupted` as soon as a signal arrives.
    public static func sleep(_ seconds: Double) throws {
        let deadline = Date(timeIntervalSinceNow: seconds)
        while Date() < deadline {
            try check()
            usleep(UInt32(min(50_000, max(1000, deadline.timeIntervalSinceNow * 1e6))))
        }
        try check()
    }
}

/// Runs short commands (ip, iptables, tc, mount) to completion.
public enum Shell {
    public struct Result: Sendable {
        public var status: Int32
        public var output: String
    }

    /// Runs `argv` (a path, or a name looked up in PATH) and returns its status and combined output.
    @discardableResult
    public static func run(_ argv: [String], timeout: Double = 30) -> Result {
        var template = Array("/tmp/tapio-lab-out.XXXXXX".utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { return Result(status: 127, output: "mkstemp: \(String(cString: strerror(errno)))") }
        close(fd)
        let out = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { unlink(out) }
        var path = argv[0]
        if !path.hasPrefix("/") {
            let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "") + ":/usr/sbin:/usr/bin:/sbin:/bin"
            path = dirs.split(separator: ":").map { "\($0)/\(argv[0])" }.first { FileManager.default.isExecutableFile(atPath: $0) } ?? path
        }
        let child: Child
        do { child = try Child([path] + argv.dropFirst(), environment: ProcessInfo.processInfo.environment, log: out) } catch {
            return Result(status: 127, output: "\(error)")
        }
        if !child.wait(timeout: timeout) {
            kill(child.pid, SIGKILL)
            child.wait(timeout: 5)
        }
        return Result(status: child.exitStatus, output: read(out) ?? "")
    }

    /// Runs `argv` and throws with its output unless it succeeds.
    @discardableResult
    public static func check(_ argv: [String]) throws -> String {
        let r = run(argv)
        guard r.status == 0 else {
            throw LabError("\(argv.joined(separator: " ")) failed (\(r.status)): \(r.output.trimmingCharacters(in: .whitespacesAndNewlines))")
        }
        return r.output
    }

    public static func write(_ text: String, to path: String) throws {
        do { try text.write(toFile: path, atomically: false, encoding: .utf8) } catch {
            throw LabError("cannot write \(path): \(error)")
        }
    }

    public static func read(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }

    public static func mkdir(_ path: String) throws {
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) } catch {
            throw LabError("cannot create \(path): \(error)")
        }
    }

    /// The start time of a process (field 22 of /proc/PID/stat, clock ticks since boot),
    /// so a recorded pid is never confused with a later process that reuses it.
    public static func startTime(pid: Int32) -> UInt64? {
        guard let stat = read("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 19 ? UInt64(fields[19]) : nil
    }

    public static func isAlive(pid: Int32, startTime: UInt64?) -> Bool {
        guard pid > 0, let now = Shell.startTime(pid: pid) else { return false }
        // A zombie still has a stat line; treat it as gone.
        if let stat = read("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")"),
           stat[stat.index(after: close)...].split(separator: " ").first == "Z" { return false }
        return startTime == nil || startTime == now
    }

    /// The nanoseconds since the Unix epoch.
    public static func nowNs() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }

    /// Pids of every process in a cgroup directory and its descendants.
    public static func cgroupPids(_ dir: String) -> [Int32] {
        var pids: [Int32] = []
        if let text = read(dir + "/cgroup.procs") {
            pids += text.split(separator: "\n").compactMap { Int32($0) }
        }
        for child in (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? [] {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: dir + "/" + child, isDirectory: &isDir), isDir.boolValue {
                pids += cgroupPids(dir + "/" + child)
            }
        }
        return pids
    }
}
