import Foundation

/// What one run created, written to disk after every change so that a run
/// that dies (kill -9, power) can be finished by `tapio-lab cleanup`.
///
/// The file is `/run/tapio-lab/<id>.json` (`$TAPIO_LAB_STATE_DIR` overrides
/// the directory). Items are removed from it as they are torn down; the file
/// goes when nothing is left.
public final class LabState: @unchecked Sendable {
    public struct Item: Codable, Sendable, Equatable {
        /// `process`, `netns`, `cgroup`, `mount`, `iptables`, `qdisc`.
        public var kind: String
        /// process: its name; netns: the namespace; cgroup/mount: the path;
        /// iptables/qdisc: the namespace the rule or qdisc is in.
        public var name: String
        public var pid: Int32?
        public var startTime: UInt64?
        /// iptables: the rule (`-A` arguments); qdisc: the device.
        public var detail: [String]?
        /// process: stopped after the others (agents before the server).
        public var stopOrder: Int?
    }

    public struct Snapshot: Codable, Sendable {
        public var id: String
        public var ownerPid: Int32
        public var ownerStartTime: UInt64?
        public var runDirectory: String
        public var scenario: String
        public var items: [Item]
    }

    public static var directory: String {
        ProcessInfo.processInfo.environment["TAPIO_LAB_STATE_DIR"].flatMap { $0.isEmpty ? nil : $0 } ?? "/run/tapio-lab"
    }

    public let path: String
    private let lock = NSLock()
    private var snapshot: Snapshot

    public init(id: String, scenario: String, runDirectory: String) throws {
        try Shell.mkdir(LabState.directory)
        path = LabState.directory + "/" + id + ".json"
        snapshot = Snapshot(id: id, ownerPid: getpid(), ownerStartTime: Shell.startTime(pid: getpid()),
                            runDirectory: runDirectory, scenario: scenario, items: [])
        try save()
    }

    /// A state file left behind by another run.
    public init(loading path: String) throws {
        guard let data = FileManager.default.contents(atPath: path) else { throw LabError("cannot read \(path)") }
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        snapshot = try decoder.decode(Snapshot.self, from: data)
        self.path = path
    }

    public var id: String { lock.withLock { snapshot.id } }
    public var items: [Item] { lock.withLock { snapshot.items } }
    public var current: Snapshot { lock.withLock { snapshot } }

    /// True while the run that wrote this file is still running.
    public var ownerAlive: Bool {
        let s = current
        return s.ownerPid != getpid() && Shell.isAlive(pid: s.ownerPid, startTime: s.ownerStartTime)
    }

    public func add(_ item: Item) throws {
        lock.withLock { snapshot.items.append(item) }
        try save()
    }

    public func remove(_ item: Item) {
        lock.withLock { snapshot.items.removeAll { $0 == item } }
        try? save()
    }

    public func addProcess(name: String, pid: Int32, stopOrder: Int = 0) throws {
        try add(Item(kind: "process", name: name, pid: pid, startTime: Shell.startTime(pid: pid), stopOrder: stopOrder))
    }

    public func removeProcess(pid: Int32) {
        lock.withLock { snapshot.items.removeAll { $0.kind == "process" && $0.pid == pid } }
        try? save()
    }

    private func save() throws {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try lock.withLock { try encoder.encode(snapshot) }
        let tmp = path + ".tmp"
        guard FileManager.default.createFile(atPath: tmp, contents: data), rename(tmp, path) == 0 else {
            throw LabError("cannot write the state file \(path)")
        }
    }

    public func deleteFile() {
        unlink(path)
    }

    /// Every state file in the state directory.
    public static func leftovers() -> [String] {
        let files = (try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? []
        return files.filter { $0.hasSuffix(".json") }.sorted().map { directory + "/" + $0 }
    }
}

/// Tears down what a `LabState` lists, in the order that works: processes
/// (services, then agents, then the server), whatever is still in the run's
/// cgroups, rules and qdiscs, mounts, namespaces, cgroup directories.
/// Every step is retried on the next call if it fails, and each item leaves
/// the state file once it is gone.
public enum Cleaner {
    /// Returns what could not be removed (empty: clean).
    @discardableResult
    public static func cleanup(_ state: LabState, log: (String) -> Void = { _ in }) -> [String] {
        var problems: [String] = []
        let items = state.items

        // 1. Processes: TERM by stop order, waiting for each group, then KILL.
        let processes = items.filter { $0.kind == "process" }
        for order in Set(processes.map { $0.stopOrder ?? 0 }).sorted() {
            let group = processes.filter { ($0.stopOrder ?? 0) == order }
            for p in group where Shell.isAlive(pid: p.pid!, startTime: p.startTime) { kill(p.pid!, SIGTERM) }
            let grace: Double = order == 0 ? 3 : 8
            let deadline = Date(timeIntervalSinceNow: grace)
            while Date() < deadline, group.contains(where: { Shell.isAlive(pid: $0.pid!, startTime: $0.startTime) }) { usleep(20_000) }
            for p in group {
                if Shell.isAlive(pid: p.pid!, startTime: p.startTime) {
                    log("process \(p.name) (\(p.pid!)) ignored SIGTERM: SIGKILL")
                    kill(p.pid!, SIGKILL)
                }
                state.remove(p)
            }
        }

        // 2. Anything still running in the run's cgroups (forked workers, fault helpers).
        let cgroups = items.filter { $0.kind == "cgroup" }
        for _ in 0..<50 {
            let left = cgroups.flatMap { Shell.cgroupPids($0.name) }
            if left.isEmpty { break }
            for pid in Set(left) { kill(pid, SIGKILL) }
            usleep(50_000)
        }

        // 3. Rules and qdiscs (they would go with their namespace too).
        for item in items where item.kind == "iptables" || item.kind == "qdisc" {
            if FileManager.default.fileExists(atPath: "/run/netns/" + item.name) {
                if item.kind == "iptables" {
                    var rule = item.detail ?? []
                    if let i = rule.firstIndex(of: "-A") ?? rule.firstIndex(of: "-I") { rule[i] = "-D" }
                    Shell.run(["ip", "netns", "exec", item.name, "iptables"] + rule)
                } else {
                    Shell.run(["ip", "netns", "exec", item.name, "tc", "qdisc", "del", "dev", item.detail?.first ?? "eth0", "root"])
                }
            }
            state.remove(item)
        }

        // 4. Mounts, deepest first.
        for item in items.filter({ $0.kind == "mount" }).sorted(by: { $0.name.count > $1.name.count }) {
            if isMountPoint(item.name) {
                var r = Shell.run(["umount", item.name])
                if r.status != 0 { r = Shell.run(["umount", "-l", item.name]) }
                if r.status != 0 || isMountPoint(item.name) {
                    problems.append("mount \(item.name): \(r.output)")
                    continue
                }
            }
            state.remove(item)
        }

        // 5. Network namespaces (their veths, bridge, rules and qdiscs go with them).
        for item in items.filter({ $0.kind == "netns" }).reversed() {
            if FileManager.default.fileExists(atPath: "/run/netns/" + item.name) {
                let r = Shell.run(["ip", "netns", "delete", item.name])
                if r.status != 0 { problems.append("netns \(item.name): \(r.output)"); continue }
            }
            state.remove(item)
        }

        // 6. cgroup directories, deepest first; a dying task can hold one for a moment.
        for item in cgroups.sorted(by: { $0.name.count > $1.name.count }) {
            var gone = !FileManager.default.fileExists(atPath: item.name)
            for _ in 0..<40 where !gone {
                if rmdir(item.name) == 0 || errno == ENOENT { gone = true; break }
                for pid in Shell.cgroupPids(item.name) { kill(pid, SIGKILL) }
                usleep(50_000)
            }
            if gone { state.remove(item) } else { problems.append("cgroup \(item.name): \(String(cString: strerror(errno)))") }
        }

        if problems.isEmpty && state.items.isEmpty { state.deleteFile() }
        for p in problems { log("cleanup: could not remove \(p)") }
        return problems
    }

    public static func isMountPoint(_ path: String) -> Bool {
        guard let mounts = Shell.read("/proc/self/mounts") else { return false }
        let target = path.replacingOccurrences(of: " ", with: "\\040")
        return mounts.split(separator: "\n").contains { $0.split(separator: " ").dropFirst().first.map(String.init) == target }
    }
}
