import Foundation

/// What the lab itself did and saw, in its own clock: the ground truth a
/// run's report prints beside the server's timeline.
public final class LabTimeline: @unchecked Sendable {
    public struct Entry: Sendable {
        public var timeNs: Int64
        public var text: String
    }

    private let lock = NSLock()
    private var entries: [Entry] = []
    private let echo: Bool

    public init(echo: Bool) { self.echo = echo }

    public func note(_ text: String) {
        let e = Entry(timeNs: Shell.nowNs(), text: text)
        lock.withLock { entries.append(e) }
        if echo { FileHandle.standardError.write(Data("[lab \(LabTimeline.clock(e.timeNs))] \(text)\n".utf8)) }
    }

    public var all: [Entry] { lock.withLock { entries } }

    static func clock(_ ns: Int64) -> String {
        let date = Date(timeIntervalSince1970: Double(ns) / 1e9)
        let f = DateFormatter()
        f.locale = Locale(identifier: "en_US_POSIX")
        f.timeZone = TimeZone(identifier: "UTC")
        f.dateFormat = "HH:mm:ss.SSS"
        return f.string(from: date)
    }
}

/// A child process started with posix_spawn and reaped with
/// `waitpid(WNOHANG)`. Not Foundation's `Process`: it decides a child has
/// exited when an inherited pipe closes and then blocks in `waitpid` — and
/// daemons such as dnsmasq close every inherited descriptor while running.
/// The child gets its own process group (a terminal's Ctrl-C reaches only
/// tapio-lab, which then stops everything in order) and default signal
/// dispositions.
public final class Child: @unchecked Sendable {
    public let pid: Int32
    private let lock = NSLock()
    private var status: Int32?

    public init(_ argv: [String], environment: [String: String], log: String) throws {
        Child.closeOnExecEverything()
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        var all = sigset_t()
        sigfillset(&all)
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigdefault(&attr, &all)
        posix_spawnattr_setsigmask(&attr, &none)
        posix_spawnattr_setpgroup(&attr, 0)
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETPGROUP))
        let env = environment.map { "\($0.key)=\($0.value)" }
        var cArgs = argv.map { strdup($0) } + [nil]
        var cEnv = env.map { strdup($0) } + [nil]
        defer {
            for p in cArgs { free(p) }
            for p in cEnv { free(p) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, &cArgs, &cEnv)
        guard rc == 0 else { throw LabError("cannot start \(argv[0]): \(String(cString: strerror(rc)))") }
        self.pid = pid
    }

    /// Marks every descriptor above stderr close-on-exec, so no child
    /// inherits another's pipes (a pipe our own parent watches to see us exit
    /// must not be held open by the services we leave behind).
    static func closeOnExecEverything() {
        guard let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") else { return }
        for name in fds {
            guard let fd = Int32(name), fd > 2 else { continue }
            let flags = fcntl(fd, F_GETFD)
            if flags >= 0, flags & FD_CLOEXEC == 0 { _ = fcntl(fd, F_SETFD, flags | FD_CLOEXEC) }
        }
    }

    /// Reaps the child if it has exited; true while it runs.
    public var isRunning: Bool {
        lock.withLock {
            if status != nil { return false }
            var st: Int32 = 0
            let r = waitpid(pid, &st, WNOHANG)
            if r == pid || (r < 0 && errno == ECHILD) { status = r == pid ? st : 0; return false }
            return true
        }
    }

    /// The exit code, or 128 + the signal that ended it (as a shell reports it).
    public var exitStatus: Int32 {
        guard !isRunning, let st = lock.withLock({ status }) else { return -1 }
        return st & 0x7f != 0 ? 128 + (st & 0x7f) : (st >> 8) & 0xff
    }

    /// "exited with N" or "killed by signal N" once it has ended.
    public var exitDescription: String {
        guard !isRunning, let st = lock.withLock({ status }) else { return "running" }
        let sig = st & 0x7f
        return sig != 0 ? "killed by signal \(sig)" : "exited with \((st >> 8) & 0xff)"
    }

    /// Waits up to `timeout` seconds; true if it has exited.
    @discardableResult
    public func wait(timeout: Double) -> Bool {
        let deadline = Date(timeIntervalSinceNow: timeout)
        while isRunning {
            if Date() >= deadline { return false }
            usleep(10_000)
        }
        return true
    }

    /// SIGTERM, then SIGKILL after `grace` seconds; reaped on return.
    public func terminate(grace: Double) {
        guard isRunning else { return }
        kill(pid, SIGTERM)
        if !wait(timeout: grace) {
            kill(pid, SIGKILL)
            wait(timeout: 5)
        }
    }
}

/// Starts programs inside a lab node: into cgroups first (cgroup v2 for
/// identity, v1 memory/cpu for limits), then into the node's network
/// namespace with nsenter (not `ip netns exec`, which remounts /sys and
/// would hide the cgroup filesystems and the lab's volumes).
public enum Spawner {
    public static func spawn(_ argv: [String], netns: String?, cgroups: [String], log: String,
                             environment: [String: String] = [:]) throws -> Child {
        let enter = netns.map { "exec /usr/bin/nsenter --net=/run/netns/\($0) -- \"$@\"" } ?? "exec \"$@\""
        let join = "for d in $TAPIO_LAB_CGROUPS; do echo $$ > \"$d/cgroup.procs\" || exit 126; done; "
        var env = ProcessInfo.processInfo.environment
        env["TAPIO_LAB_CGROUPS"] = cgroups.joined(separator: " ")
        env["PYTHONUNBUFFERED"] = "1"
        for (k, v) in environment { env[k] = v }
        return try Child(["/bin/sh", "-c", join + enter, "sh"] + argv, environment: env, log: log)
    }
}

/// A service's process with kubelet-like restarts: when it exits it is
/// started again after a backoff (1, 2, 4, 8 s; reset after 10 s up), unless
/// its restart policy is `never` or a fault holds it down.
public final class ManagedService: @unchecked Sendable {
    public let name: String
    let argv: [String]
    let netns: String?
    let cgroups: [String]
    let log: String
    let restarts: Bool
    let state: LabState
    let timeline: LabTimeline

    private let lock = NSLock()
    private var process: Child?
    private var startedAt = Date.distantPast
    private var nextStart: Date?
    private var backoff: Double = 1
    private var held = false
    private var stopping = false
    public private(set) var exits = 0

    init(name: String, argv: [String], netns: String?, cgroups: [String], log: String, restarts: Bool, state: LabState, timeline: LabTimeline) {
        self.name = name
        self.argv = argv
        self.netns = netns
        self.cgroups = cgroups
        self.log = log
        self.restarts = restarts
        self.state = state
        self.timeline = timeline
    }

    public var pid: Int32? { lock.withLock { process.flatMap { $0.isRunning ? $0.pid : nil } } }

    public func start() throws {
        try lock.withLock {
            guard !stopping, process?.isRunning != true else { return }
            let p = try Spawner.spawn(argv, netns: netns, cgroups: cgroups, log: log)
            try state.addProcess(name: name, pid: p.pid)
            process = p
            startedAt = Date()
            nextStart = nil
        }
    }

    /// Called by the supervisor: notices an exit and restarts when due.
    func tick() {
        var exited: (pid: Int32, how: String)?
        var shouldStart = false
        lock.withLock {
            if let p = process, !p.isRunning {
                exited = (p.pid, p.exitDescription)
                state.removeProcess(pid: p.pid)
                process = nil
                exits += 1
                if Date().timeIntervalSince(startedAt) > 10 { backoff = 1 }
                if restarts && !stopping { nextStart = Date(timeIntervalSinceNow: backoff) }
                backoff = min(backoff * 2, 8)
            }
            if process == nil, !held, !stopping, let at = nextStart, Date() >= at { shouldStart = true }
        }
        if let e = exited {
            let heldDown = lock.withLock { held }
            let next = heldDown ? "; held down by the fault" : restarts && !isStopping ? "; restart in \(Int(backoffNow)) s" : ""
            timeline.note("\(name) (pid \(e.pid)) \(e.how)" + next)
        }
        if shouldStart {
            do {
                try start()
                timeline.note("\(name) restarted (pid \(pid ?? 0))")
            } catch {
                timeline.note("\(name) restart failed: \(error)")
            }
        }
    }

    private var isStopping: Bool { lock.withLock { stopping } }
    private var backoffNow: Double { lock.withLock { nextStart.map { max(0, $0.timeIntervalSinceNow.rounded()) } ?? 0 } }

    /// Holds the service down (no restarts) until `release()`.
    public func hold() { lock.withLock { held = true } }

    public func release() {
        lock.withLock {
            held = false
            if process == nil, restarts || nextStart == nil { nextStart = Date() }
        }
    }

    /// Sends a signal to the service's main process.
    @discardableResult
    public func signal(_ sig: Int32) -> Bool {
        guard let pid else { return false }
        return kill(pid, sig) == 0
    }

    /// Stops for good: SIGTERM, then SIGKILL after `grace` seconds.
    public func stop(grace: Double = 3) {
        let p: Child? = lock.withLock {
            stopping = true
            return process
        }
        guard let p else { return }
        p.terminate(grace: grace)
        state.removeProcess(pid: p.pid)
    }
}

/// Polls the managed services every 100 ms on its own thread.
public final class Supervisor: @unchecked Sendable {
    private let lock = NSLock()
    private var services: [ManagedService] = []
    private var running = true
    private var thread: Thread?

    public init() {}

    public func add(_ s: ManagedService) { lock.withLock { services.append(s) } }

    public func start() {
        let t = Thread { [self] in
            while lock.withLock({ running }) {
                for s in lock.withLock({ services }) { s.tick() }
                usleep(100_000)
            }
        }
        t.name = "tapio-lab-supervisor"
        thread = t
        t.start()
    }

    public func stop() { lock.withLock { running = false } }
}
