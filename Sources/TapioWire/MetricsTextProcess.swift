import Glibc

/// The standard process families every Prometheus client library exports
/// (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), read
/// from /proc/self at each scrape, so dashboards and alerts written for any
/// Prometheus target work on the agent and the server alike. A file that
/// cannot be read leaves its families out rather than reporting 0.
extension MetricsText {
    public mutating func addProcessMetrics() {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let page = Double(sysconf(Int32(_SC_PAGESIZE)))
        // /proc/self/stat: the fields after the command's closing parenthesis
        // (the command may hold spaces and parentheses), man 5 proc.
        if let stat = Self.read("/proc/self/stat"), let close = stat.lastIndex(of: ")") {
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            // fields[0] is field 3 (state): field n is fields[n - 3].
            func field(_ n: Int) -> Double? { fields.count > n - 3 ? Double(fields[n - 3]) : nil }
            if let utime = field(14), let stime = field(15), ticks > 0 {
                add("process_cpu_seconds_total", .counter, "User and system CPU time spent by the process.", (utime + stime) / ticks)
            }
            if let vsize = field(23) {
                add("process_virtual_memory_bytes", .gauge, "Virtual memory size of the process.", vsize)
            }
            if let rss = field(24) {
                add("process_resident_memory_bytes", .gauge, "Resident memory size of the process.", rss * page)
            }
            if let start = field(22), let boot = Self.bootTime(), ticks > 0 {
                add("process_start_time_seconds", .gauge, "Start time of the process since the Unix epoch.", boot + start / ticks)
            }
        }
        if let open = Self.openDescriptors() {
            add("process_open_fds", .gauge, "Open file descriptors of the process.", open)
        }
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 {
            add("process_max_fds", .gauge, "Limit on open file descriptors of the process.", Double(limit.rlim_cur))
        }
    }

    /// `btime` of /proc/stat: boot time, seconds since the Unix epoch.
    private static func bootTime() -> Double? {
        guard let text = read("/proc/stat") else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            return Double(line.dropFirst(6))
        }
        return nil
    }

    private static func openDescriptors() -> Int? {
        guard let dir = opendir("/proc/self/fd") else { return nil }
        defer { closedir(dir) }
        var count = 0
        while let entry = readdir(dir) {
            let first = withUnsafeBytes(of: entry.pointee.d_name) { $0.first ?? 0 }
            if first != UInt8(ascii: ".") { count += 1 }
        }
        // The directory stream itself is one of them.
        return max(0, count - 1)
    }

    /// A small /proc file, whole (their size is 0 to stat, so read to the end).
    private static func read(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            bytes += buffer[0..<n]
        }
        return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self)
    }
}
