import Foundation
import TapioTestSupport
import XCTest

/// Delivery under faults, counted by name: a real agent (real BPF) confined to
/// a cgroup2 subtree of its own, a real server, real kill -9 and SIGTERM, full
/// disks and damaged spool records.
///
/// A generator inside the subtree execs N programs that are links to
/// /bin/true, each under its own name (`d<run><n>`, so the kernel's comm is
/// unique), at a bounded rate. Both kinds the agent reports for them are
/// counted, exec and exit: the agent's own losses (spool_full, spool_corrupt,
/// batch_too_large) are counted per batch, not per kind, so only the whole
/// subtree's events can be compared with them. Nothing else runs in the
/// subtree but the generator itself, whose exec and exit are counted too, in
/// a network namespace of its own where nothing happens, so
///
///     generated = 2 × (N + 1)   per generator run
///     stored    = distinct (kind, comm) among the node's stored events
///     drops     = the node's counted drops (`tapio nodes`, drops_total)
///
/// and every test asserts stored + drops == generated, and no (kind, comm)
/// stored twice.
final class DeliveryTests: XCTestCase {
    private let node = "delivery-node"
    private var dir = ""
    private var pki = ""
    private var ingestPort = 0
    private var queryPort = 0
    private var agentMetricsPort = 0
    private var server: ChildProcess?
    private var agent: ChildProcess?
    private var generator: ChildProcess?
    private var serverLogs: [String] = []
    private var agentLogs: [String] = []
    /// Unique per test: every program name the test generates carries it.
    private var run = ""
    private var cgroup = ""
    private var bin = ""
    /// Every (kind/comm) the generators of this test produced.
    private var expected = Set<String>()
    private var cleanups: [() -> Void] = []

    private var dataDir: String { dir + "/data" }
    private var spoolDir: String { dir + "/spool" }
    /// The agent's data directory (lock, crash counters); the spool is kept
    /// apart so that tests can mount a small filesystem on it.
    private var agentDataDir: String { dir + "/agent" }

    override func setUpWithError() throws {
        try TestSupport.requireBPF()
        guard let mount = Self.cgroup2Mount() else {
            if TestSupport.bpfRequired { throw TestSupportError("no cgroup2 hierarchy mounted (needed for --cgroup-root)") }
            throw XCTSkip("no cgroup2 hierarchy mounted (needed for --cgroup-root)")
        }
        dir = try TestSupport.temporaryDirectory("tapio-delivery")
        pki = try TestSupport.makePKI(in: dir, nodes: [node])
        ingestPort = TestSupport.freePort()
        queryPort = TestSupport.freePort()
        agentMetricsPort = TestSupport.freePort()
        run = String((0..<4).map { _ in "abcdefghijklmnopqrstuvwxyz".randomElement()! })
        bin = dir + "/b"
        try FileManager.default.createDirectory(atPath: bin, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: dataDir, withIntermediateDirectories: true)
        try FileManager.default.createDirectory(atPath: spoolDir, withIntermediateDirectories: true)
        guard mkfifo(bin + "/pace", 0o600) == 0 else { throw TestSupportError("mkfifo failed: errno \(errno)") }
        cgroup = mount + "/tapio-delivery-\(getpid())-\(run)"
        try FileManager.default.createDirectory(atPath: cgroup, withIntermediateDirectories: false)
        let group = cgroup
        cleanups.append { Self.removeCgroup(group) }
    }

    override func tearDown() {
        generator?.stop(signal: SIGKILL)
        agent?.stop(signal: SIGKILL)
        server?.stop(signal: SIGKILL)
        for c in cleanups.reversed() { c() }
        cleanups = []
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    // MARK: - Scenarios

    func testKillingTheServerMidStreamLosesAndDuplicatesNothing() throws {
        try startServer()
        try startAgent()
        let n = 3000
        let g = try startGenerator(1...n, tag: "a")
        // Twice: kill it while the agent streams, bring it back on the same
        // data directory a moment later, while the generator goes on.
        var stored = 0
        for (kill, restart) in [(n / 6, n / 3), (n / 2, 2 * n / 3)] {
            XCTAssertTrue(eventually(timeout: 60) { progress(g) >= kill }, "generator progress; log:\n\(g.log)")
            let before = stored
            XCTAssertTrue(eventually(timeout: 60) {
                stored = (try? tally().distinct) ?? stored
                return stored > before
            }, "the agent streams to this server before it is killed; agent log:\n\(agentLog())")
            XCTAssertEqual(server!.stop(signal: SIGKILL), 128 + SIGKILL)
            XCTAssertTrue(eventually(timeout: 60) { progress(g) >= restart }, "generator progress; log:\n\(g.log)")
            try startServer()
        }
        try finish(g)
        let t = try awaitDelivery()
        XCTAssertEqual(t.agentDrops, 0, "the agent lost nothing it had read: \(t)")
    }

    func testKillingTheAgentDuringAnOutageLosesNothingItHadSpooled() throws {
        try startServer()
        try startAgent()
        server!.stop()
        let g = try startGenerator(1...2000, tag: "a")
        try finish(g)
        // Everything the kernel handed over is sealed and spooled when the
        // batch delay has passed; kill -9 only then.
        try awaitSpooled()
        XCTAssertEqual(agent!.stop(signal: SIGKILL), 128 + SIGKILL)
        try startAgent(waitConnected: false)
        try startServer()
        let t = try awaitDelivery()
        XCTAssertEqual(t.agentDrops, 0, "the agent lost nothing it had spooled: \(t)")
    }

    func testKillingTheAgentWithBatchesInFlightStoresEveryEventOnce() throws {
        try startServer()
        try startAgent()
        let g = try startGenerator(1...2000, tag: "a")
        XCTAssertTrue(eventually(timeout: 60) { progress(g) >= 800 }, "generator progress; log:\n\(g.log)")
        // The server stops reading (SIGSTOP): the agent's batches wait
        // unacknowledged in the socket and in its spool.
        XCTAssertEqual(kill(server!.pid, SIGSTOP), 0)
        XCTAssertTrue(eventually(timeout: 60) { progress(g) >= 1400 }, "generator progress; log:\n\(g.log)")
        // Nothing may happen in the subtree while no agent watches it: freeze
        // it, and kill -9 the agent once it has read (and so sealed and
        // spooled) everything.
        try freezeSubtree(true)
        awaitAgentReadEverything()
        XCTAssertEqual(agent!.stop(signal: SIGKILL), 128 + SIGKILL)
        try startAgent(waitConnected: false)
        // The server now stores what the dead connection had in flight; the
        // new agent resends the same batches from the spool.
        XCTAssertEqual(kill(server!.pid, SIGCONT), 0)
        try freezeSubtree(false)
        try finish(g)
        let t = try awaitDelivery()
        XCTAssertEqual(t.agentDrops, 0, "the agent lost nothing it had read: \(t)")
        XCTAssertGreaterThan(t.duplicateBatches, 0, "the server stored batches of the dead connection that the new agent sent again: \(t)")
    }

    func testStoppingTheAgentDuringAnOutageKeepsItsBatchesForTheNextStart() throws {
        try startServer()
        try startAgent()
        // The server goes away mid-stream: the first process's batches are
        // acknowledged up to some sequence, the rest wait.
        let g = try startGenerator(1...2000, tag: "a")
        var stored = 0
        XCTAssertTrue(eventually(timeout: 60) {
            stored = (try? tally().distinct) ?? 0
            return stored >= 200
        }, "streaming before the outage; agent log:\n\(agentLog())")
        server!.stop()
        try finish(g)
        // SIGTERM: it waits --shutdown-grace (1 s) for acknowledgements that
        // cannot come, then leaves its batches in the spool.
        XCTAssertEqual(agent!.stop(), 0, agentLog())
        XCTAssertFalse(spoolRecords().isEmpty, "the stopped agent left its batches in the spool")
        // A second process during the same outage, stopped the same way:
        // the third holds the batches of two earlier epochs, the first of
        // them starting past sequence 1.
        try startAgent(waitConnected: false)
        try finish(try startGenerator(2001...3000, tag: "b"))
        XCTAssertEqual(agent!.stop(), 0, agentLog())
        try startAgent(waitConnected: false)
        try startServer()
        let t = try awaitDelivery()
        XCTAssertEqual(t.agentDrops, 0, "the agent lost nothing: \(t)")
    }

    // MARK: - Stopped or killed while the server is unreachable (issue 15)

    /// The agent as deployed (its spool in its data directory, by default)
    /// reads 2002 events while no server is reachable; with a batch delay of
    /// a minute, most of them wait in memory, unsealed, when it is stopped.
    private func readWhileTheServerIsUnreachable(_ extra: [String] = []) throws -> Int {
        try startAgent(waitConnected: false, defaultSpool: true, extra: ["--batch-max-delay-ms", "60000"] + extra)
        try finish(try startGenerator(1...1000, tag: "a"))
        awaitAgentReadEverything()
        let read = agentEventsRead()
        XCTAssertGreaterThan(read, 0, agentLog())
        return read
    }

    func testStoppingTheAgentWhileTheServerIsUnreachableKeepsEveryEventItRead() throws {
        let read = try readWhileTheServerIsUnreachable()
        XCTAssertEqual(agent!.stop(), 0, agentLog())
        XCTAssertTrue(agentLog(full: true).contains("events_read=\(read)"), "the agent logs what it read:\n\(agentLog())")
        XCTAssertEqual(spoolRecords(in: agentDataDir + "/spool").reduce(0) { $0 + $1.events }, read,
                       "everything it read is in the data directory's spool")
        try startAgent(waitConnected: false, defaultSpool: true)
        try startServer()
        let t = try awaitDelivery()
        XCTAssertEqual(t.agentDrops, 0, "the agent lost nothing: \(t)")
        XCTAssertEqual(t.distinct, read, "every event it read arrived: \(t)")
    }

    func testKillingTheAgentWhileTheServerIsUnreachableCountsWhatItHadNotSpooled() throws {
        let read = try readWhileTheServerIsUnreachable()
        let spooled = spoolRecords(in: agentDataDir + "/spool").reduce(0) { $0 + $1.events }
        XCTAssertLessThan(spooled, read, "events wait in memory, unsealed, when the agent is killed")
        XCTAssertEqual(agent!.stop(signal: SIGKILL), 128 + SIGKILL)
        try startAgent(waitConnected: false, defaultSpool: true)
        try startServer()
        let t = try awaitDelivery()
        let killed = t.dropsByReason.filter { $0.key.hasSuffix("/agent_killed") }
        XCTAssertEqual(killed.values.reduce(0, +), Int64(read - spooled), "what was only in memory is counted as dropped: \(t)")
        XCTAssertEqual(Set(killed.keys), ["process_exec/agent_killed", "process_exit/agent_killed"], "per kind: \(t)")
        XCTAssertEqual(t.distinct + Int(t.agentDrops), read, "every event it read arrived or is counted: \(t)")
        // A new event after that carries the count once more, never twice.
        try runTrailer()
        let after = try awaitDelivery()
        XCTAssertEqual(after.dropsByReason.filter { $0.key.hasSuffix("/agent_killed") }, killed, "counted once: \(after)")
    }

    func testKillingTheAgentAgainBeforeItReportsTheCountReportsItOnce() throws {
        let read = try readWhileTheServerIsUnreachable()
        let spooled = spoolRecords(in: agentDataDir + "/spool").reduce(0) { $0 + $1.events }
        XCTAssertEqual(agent!.stop(signal: SIGKILL), 128 + SIGKILL)
        // The second process takes the count over and is killed before any
        // server saw it.
        try startAgent(waitConnected: false, defaultSpool: true)
        Thread.sleep(forTimeInterval: 0.5)
        XCTAssertEqual(agent!.stop(signal: SIGKILL), 128 + SIGKILL)
        try startAgent(waitConnected: false, defaultSpool: true)
        try startServer()
        let t = try awaitDelivery()
        XCTAssertEqual(t.dropsByReason.filter { $0.key.hasSuffix("/agent_killed") }.values.reduce(0, +), Int64(read - spooled), "\(t)")
        XCTAssertEqual(t.distinct + Int(t.agentDrops), read, "every event it read arrived or is counted: \(t)")
    }

    func testWithoutASpoolWhatAStopLosesIsCountedAndReportedByTheNextStart() throws {
        let read = try readWhileTheServerIsUnreachable(["--no-spool"])
        XCTAssertEqual(agent!.stop(), 0, agentLog())
        XCTAssertFalse(FileManager.default.fileExists(atPath: agentDataDir + "/spool"), "memory only")
        try startAgent(waitConnected: false, defaultSpool: true, extra: ["--no-spool"])
        try startServer()
        let t = try awaitDelivery()
        XCTAssertEqual(t.dropsByReason["unspecified/queue_full"], Int64(read), "everything it held is counted: \(t)")
    }

    func testASecondAgentOnTheSameDataDirectoryIsRefused() throws {
        try startAgent(waitConnected: false, defaultSpool: true)
        let second = try TestSupport.run(try TestSupport.product("tapio-agent"), [
            "--server", "127.0.0.1:\(ingestPort)", "--node-name", node, "--tls-dir", pki + "/nodes/" + node,
            "--data-dir", agentDataDir, "--cgroup-root", cgroup,
        ], timeout: 30)
        XCTAssertNotEqual(second.status, 0)
        XCTAssertTrue(second.stderr.contains("data directory \(agentDataDir) is in use by another tapio-agent"), second.stderr)
        XCTAssertTrue(agent!.isRunning, "the first agent runs on")
    }

    func testAFullDiskOnTheServerDelaysBatchesUntilThereIsRoom() throws {
        try mountTmpfs(dataDir, size: "32m")
        try startServer()
        try startAgent()
        // Fill the server's disk to the last page.
        let filler = dataDir + "/filler"
        _ = try TestSupport.run("/usr/bin/dd", ["if=/dev/zero", "of=" + filler, "bs=1M"], timeout: 60)
        _ = try TestSupport.run("/usr/bin/dd", ["if=/dev/zero", "of=" + filler, "bs=4k", "oflag=append", "conv=notrunc"], timeout: 60)
        let g = try startGenerator(1...2000, tag: "a")
        try finish(g)
        // The store refuses (error 6) and the agent keeps what it has.
        XCTAssertTrue(eventually(timeout: 30) { agentLog(full: true).contains("(code 6)") },
                      "the full disk made storing fail; server log:\n\(serverLog())\nagent log:\n\(agentLog())")
        let during = try tally()
        XCTAssertLessThan(during.distinct + Int(during.drops), expected.count, "not everything can be stored on a full disk: \(during)")
        XCTAssertFalse(agentIdle(), "the agent still holds batches")
        Thread.sleep(forTimeInterval: 2)
        try FileManager.default.removeItem(atPath: filler)
        let t = try awaitDelivery()
        XCTAssertEqual(t.agentDrops, 0, "the agent lost nothing: \(t)")
        XCTAssertTrue(server!.isRunning, "the server lived through the full disk")
    }

    func testASpoolOnATinyFilesystemCountsWhatDoesNotFitAndDeliversTheRest() throws {
        try mountTmpfs(spoolDir, size: "256k")
        try startServer()
        try startAgent()
        server!.stop()
        // Far more than 256 KiB of batches while the server is away: the
        // spool fills, the rest is held in memory only.
        let g = try startGenerator(1...3000, tag: "a")
        try finish(g)
        Thread.sleep(forTimeInterval: 1)
        // SIGTERM: what is not in the spool cannot outlive the process and is
        // counted as dropped.
        XCTAssertEqual(agent!.stop(), 0, agentLog())
        let lost = Int(agentLog(full: true).firstMatch(of: /lost_events=(\d+)/)?.1 ?? "") ?? 0
        XCTAssertGreaterThan(lost, 0, "the stopped agent could not keep everything:\n\(agentLog())")
        XCTAssertTrue(FileManager.default.fileExists(atPath: spoolDir + "/carried-drops"),
                      "the stopped agent saved the count of what it lost for its next start: \((try? FileManager.default.contentsOfDirectory(atPath: spoolDir)) ?? [])")
        try startAgent(waitConnected: false)
        try startServer()
        // Nothing runs in the subtree now: the restarted agent must report
        // the count it took over without waiting for events to carry it.
        let t = try awaitDelivery()
        XCTAssertEqual(t.distinct, expected.count - lost, "every spooled event arrived: \(t)")
        XCTAssertEqual(t.dropsByReason["unspecified/spool_full"], Int64(lost), "the excess is counted: \(t)")
        // New events after that carry the count once more, never twice.
        try runTrailer()
        let after = try awaitDelivery()
        XCTAssertEqual(after.dropsByReason["unspecified/spool_full"], Int64(lost), "the excess is counted: \(after)")
    }

    func testACorruptSpoolRecordIsQuarantinedAndCountedAndTheRestArrives() throws {
        try startServer()
        try startAgent()
        server!.stop()
        let g = try startGenerator(1...2000, tag: "a")
        try finish(g)
        try awaitSpooled()
        XCTAssertEqual(agent!.stop(signal: SIGKILL), 128 + SIGKILL)
        let records = spoolRecords()
        XCTAssertGreaterThanOrEqual(records.count, 3, "several records to choose from: \(records)")
        guard records.count >= 3 else { return }
        // One record with a damaged payload (its header, with the event
        // count, still checks out), one truncated inside its header (nothing
        // is known about it any more, not even how many events it held).
        let damaged = records[records.count / 2]
        let truncated = records[records.count - 1]
        let truncatedEvents = truncated.events
        let handle = try XCTUnwrap(FileHandle(forUpdatingAtPath: damaged.path))
        handle.seek(toFileOffset: UInt64(damaged.offset + 40 + 5))
        let byte = handle.readData(ofLength: 1)
        handle.seek(toFileOffset: UInt64(damaged.offset + 40 + 5))
        handle.write(Data([byte.first! ^ 0xFF]))
        handle.closeFile()
        // The last record is the end of the newest segment: cut inside its header, as a torn write.
        XCTAssertEqual(truncate(truncated.path, off_t(truncated.offset + 20)), 0)

        try startAgent(waitConnected: false)
        try startServer()
        // A record truncated inside its header is counted as one event (every
        // batch held at least one): the agent cannot know more. So the sum
        // falls short by exactly the truncated record's other events, which
        // this test read before truncating it.
        // Nothing runs in the subtree now: the restarted agent must report
        // what it quarantined without waiting for events to carry the count.
        let t = try awaitDelivery(shortBy: truncatedEvents - 1)
        XCTAssertEqual(t.distinct, expected.count - damaged.events - truncatedEvents, "every other record arrived: \(t)")
        let quarantined = (try? FileManager.default.contentsOfDirectory(atPath: spoolDir + "/quarantine")) ?? []
        XCTAssertEqual(quarantined.count, 2, "both records quarantined: \(quarantined)")
        XCTAssertEqual(t.dropsByReason["unspecified/spool_corrupt"], Int64(damaged.events + 1),
                       "the damaged record's events and the truncated one as one: \(t)")
        // New events after that carry the count once more, never twice.
        try runTrailer()
        let after = try awaitDelivery(shortBy: truncatedEvents - 1)
        XCTAssertEqual(after.dropsByReason["unspecified/spool_corrupt"], Int64(damaged.events + 1), "counted once: \(after)")
    }

    func testABatchLargerThanTheServerAcceptsIsCountedAndDoesNotBlockTheRest() throws {
        // While there is no server the agent seals by its own limits (512
        // events, 1 MiB; up to 1 s of events here); the server then announces
        // 8 KiB frames, which those batches do not fit. Batches a previous
        // process spooled can only be counted (this process cannot know
        // whether they were ever stored); its own batches that were never
        // sent may be sealed again within the limits, or counted.
        let slow = ["--batch-max-delay-ms", "1000"]
        try startAgent(waitConnected: false, extra: slow)
        try finish(try startGenerator(1...1000, tag: "a"))
        try awaitSpooled()
        XCTAssertEqual(agent!.stop(), 0, agentLog())
        try startAgent(waitConnected: false, extra: slow)
        try finish(try startGenerator(1001...2000, tag: "b"))
        Thread.sleep(forTimeInterval: 1.5)
        try startServer(["--max-frame-bytes", "8192"])
        XCTAssertTrue(eventually(timeout: 30) { nodeConnected() }, "agent connected; agent log:\n\(agentLog())")
        // Batches sealed after the hello-ack fit the server's limit.
        try finish(try startGenerator(2001...2500, tag: "c"))
        let t = try awaitDelivery()
        XCTAssertGreaterThan(t.dropsByReason["unspecified/batch_too_large"] ?? 0, 0, "the earlier process's oversized batches are counted: \(t)")
        let sealedWithinTheLimit = Set((2001...2500).flatMap { ["process_exec/d\(run)\($0)", "process_exit/d\(run)\($0)"] })
        if t.kernelDrops == 0 {
            XCTAssertTrue(sealedWithinTheLimit.isSubset(of: t.stored),
                          "every event sealed within the server's limit arrived: \(sealedWithinTheLimit.subtracting(t.stored).count) missing")
        }
    }

    // MARK: - Processes

    private func startServer(_ extra: [String] = []) throws {
        let log = dir + "/server-\(serverLogs.count + 1).log"
        serverLogs.append(log)
        server = try ChildProcess(try TestSupport.product("tapio-server"), [
            "--data-dir", dataDir, "--tls-dir", pki + "/server",
            "--listen", "127.0.0.1:\(ingestPort)", "--query-listen", "127.0.0.1:\(queryPort)", "--metrics-listen", "off",
        ] + extra, logPath: log)
        XCTAssertTrue(eventually(timeout: 30) { (try? query(["nodes"])) != nil }, "server answers; log:\n\(serverLog())")
    }

    /// Starts the agent; waits until the server lists it as connected, or
    /// (without a server) until its kernel programs are attached.
    /// `defaultSpool`: no --spool-dir, the spool is the data directory's.
    private func startAgent(waitConnected: Bool = true, defaultSpool: Bool = false, extra: [String] = []) throws {
        let log = dir + "/agent-\(agentLogs.count + 1).log"
        agentLogs.append(log)
        agent = try ChildProcess(try TestSupport.product("tapio-agent"), [
            "--server", "127.0.0.1:\(ingestPort)", "--node-name", node, "--tls-dir", pki + "/nodes/" + node,
            "--server-name", "localhost", "--data-dir", agentDataDir] + (defaultSpool ? [] : ["--spool-dir", spoolDir]) + ["--cgroup-root", cgroup,
            "--batch-max-delay-ms", "100", "--shutdown-grace", "1",
            "--metrics-listen", "127.0.0.1:\(agentMetricsPort)",
            // The subtree's CPU and memory counters (the watched root is
            // reported every interval) would be events the generator did not
            // make, and some would be counted among the drops of oversized
            // batches: this test accounts for the generator's events only.
            "--disable", "cpu_throttle", "--disable", "memory_pressure",
        ] + extra, logPath: log)
        let attached = eventually(timeout: 30) {
            let m = try? TestSupport.httpGet(port: agentMetricsPort, path: "/metrics")
            return m?.body.contains("tapio_agent_program_attached{program=\"handle_exec\",signal=\"process_exec\"} 1") == true
                && m?.body.contains("tapio_agent_program_attached{program=\"handle_exit\",signal=\"process_exit\"} 1") == true
        }
        XCTAssertTrue(attached, "agent's exec and exit programs attached; log:\n\(agentLog())")
        if waitConnected {
            XCTAssertTrue(eventually(timeout: 30) { nodeConnected() }, "agent connected; agent log:\n\(agentLog())\nserver log:\n\(serverLog())")
        }
    }

    private func nodeConnected() -> Bool {
        guard let nodes = try? query(["nodes"])["nodes"] as? [[String: Any]] else { return false }
        return nodes.first { $0["node"] as? String == node }?["connected"] as? Bool == true
    }

    /// A bash (named `g<run><tag>`) that moves into the subtree, then execs
    /// `d<run><n>` for every n in `range`, pausing 20 ms after every 20.
    private func startGenerator(_ range: ClosedRange<Int>, tag: String) throws -> ChildProcess {
        let fm = FileManager.default
        for n in range {
            try fm.createSymbolicLink(atPath: "\(bin)/d\(run)\(n)", withDestinationPath: "/bin/true")
        }
        let name = "g\(run)\(tag)"
        try fm.createSymbolicLink(atPath: bin + "/" + name, withDestinationPath: "/bin/bash")
        let script = """
            exec 3<>\(bin)/pace
            n=\(range.lowerBound); f=0
            while [ $n -le \(range.upperBound) ]; do
              \(bin)/d\(run)$n || f=$((f+1))
              if [ $((n % 20)) -eq 0 ]; then read -t 0.02 -u 3; fi
              if [ $((n % 100)) -eq 0 ]; then echo "progress $n"; fi
              n=$((n+1))
            done
            echo "done failures=$f"
            exit 0
            """
        let path = "\(dir)/\(name).sh"
        try script.write(toFile: path, atomically: true, encoding: .utf8)
        expected.formUnion(range.flatMap { ["process_exec/d\(run)\($0)", "process_exit/d\(run)\($0)"] })
        expected.formUnion(["process_exec/\(name)", "process_exit/\(name)"])
        // In a network namespace of its own: the agent then watches only
        // that one for network events, where nothing happens. (Resets of
        // sockets no cgroup owns, like those of the agent's own reconnects
        // to a stopped server, pass the subtree filter in any watched
        // namespace, by design.)
        generator = try ChildProcess("/usr/bin/unshare", ["-n", "/bin/sh", "-c", "echo $$ > \(cgroup)/cgroup.procs && exec \(bin)/\(name) \(path)"],
                                     logPath: "\(dir)/\(name).log")
        return generator!
    }

    /// How many the generator has run so far (to the last hundred).
    private func progress(_ g: ChildProcess) -> Int {
        g.log.split(separator: "\n").last { $0.hasPrefix("progress ") }.flatMap { Int($0.dropFirst(9)) } ?? 0
    }

    private func finish(_ g: ChildProcess) throws {
        guard eventually(timeout: 120, { !g.isRunning }) else {
            throw TestSupportError("generator did not finish; log:\n\(g.log)")
        }
        XCTAssertEqual(g.stop(), 0, g.log)
        XCTAssertTrue(g.log.contains("done failures=0"), "every program ran: \(g.log)")
    }

    // MARK: - Counting

    struct Tally: CustomStringConvertible {
        var rows = 0
        var distinct = 0
        var stored = Set<String>()
        /// Stored events no generator of this test produced.
        var strangers: [String] = []
        var drops: Int64 = 0
        var dropsByReason: [String: Int64] = [:]
        /// Batches the server received again and did not store again.
        var duplicateBatches: Int64 = 0

        /// Counted by the kernel (ring buffer full): not the agent's losses.
        var kernelDrops: Int64 { dropsByReason.filter { $0.key.hasSuffix("/ringbuf_full") }.values.reduce(0, +) }
        var agentDrops: Int64 { drops - kernelDrops }

        var description: String {
            "stored rows \(rows), distinct \(distinct), drops \(drops) \(dropsByReason.sorted { $0.key < $1.key }), duplicate batches \(duplicateBatches), strangers \(strangers.prefix(5))"
        }
    }

    private func tally() throws -> Tally {
        var t = Tally()
        let events = try query(["events", "--node", node, "--limit", "100000"])["events"] as? [[String: Any]] ?? []
        var seen = Set<String>()
        for e in events {
            let key = "\(e["kind"] as? String ?? "?")/\(e["comm"] as? String ?? "?")"
            t.rows += 1
            if expected.contains(key) { seen.insert(key) } else { t.strangers.append(key) }
        }
        t.stored = seen
        t.distinct = seen.count
        let nodes = try query(["nodes"])["nodes"] as? [[String: Any]] ?? []
        if let me = nodes.first(where: { $0["node"] as? String == node }) {
            t.drops = (me["drops_total"] as? NSNumber)?.int64Value ?? 0
            t.duplicateBatches = (me["duplicate_batches"] as? NSNumber)?.int64Value ?? 0
            for (k, v) in me["drops"] as? [String: Any] ?? [:] { t.dropsByReason[k] = (v as? NSNumber)?.int64Value ?? 0 }
        }
        return t
    }

    /// Waits until every generated event is stored or counted as dropped and
    /// the agent holds nothing more, or until nothing moves any more (the
    /// agent connected, holding nothing, the counts unchanged for 3 s), then
    /// asserts stored + drops == generated, and no duplicates. `shortBy`:
    /// events the agent provably cannot know it lost.
    @discardableResult
    private func awaitDelivery(shortBy: Int = 0, file: StaticString = #filePath, line: UInt = #line) throws -> Tally {
        let target = expected.count - shortBy
        var t = Tally()
        var last: (rows: Int, distinct: Int, drops: Int64)?
        var unchangedSince = Date()
        let settled = try eventually(timeout: 90) {
            t = try tally()
            let idle = agentIdle() && nodeConnected()
            if idle, t.distinct + Int(t.drops) >= target { return true }
            let now = (t.rows, t.distinct, t.drops)
            if last == nil || last! != now || !idle { unchangedSince = Date() }
            last = now
            if Date().timeIntervalSince(unchangedSince) >= 3 { return true }
            Thread.sleep(forTimeInterval: 0.3)
            return false
        }
        // Late resends would show up as duplicates: look once more.
        t = try tally()
        let context = "\n\(t)\nagent log:\n\(agentLog())\nserver log:\n\(serverLog())"
        XCTAssertTrue(settled, "delivery settled" + context, file: file, line: line)
        XCTAssertEqual(t.distinct + Int(t.drops), target, "stored + counted drops == generated (\(expected.count)\(shortBy > 0 ? " − \(shortBy)" : ""))" + context,
                       file: file, line: line)
        XCTAssertEqual(t.rows - t.strangers.count, t.distinct, "no event stored twice" + context, file: file, line: line)
        XCTAssertEqual(t.strangers, [], "only the generator's events in the subtree", file: file, line: line)
        return t
    }

    /// A few more programs after a restart: the batches they are sealed in
    /// carry the counters the new agent took over from the previous one.
    private func runTrailer() throws {
        try finish(try startGenerator(9001...9010, tag: "z"))
    }

    /// Freezes (or thaws) every task of the subtree (cgroup v2 freezer).
    private func freezeSubtree(_ frozen: Bool) throws {
        try (frozen ? "1" : "0").write(toFile: cgroup + "/cgroup.freeze", atomically: false, encoding: .utf8)
        let state = "frozen \(frozen ? 1 : 0)"
        XCTAssertTrue(eventually(timeout: 10) {
            ((try? String(contentsOfFile: cgroup + "/cgroup.events", encoding: .utf8)) ?? "").contains(state)
        }, "subtree \(state)")
    }

    /// Waits until the running agent has read nothing new for a second (the
    /// subtree is frozen): everything it read is sealed within its batch
    /// delay, and spooled as it is sealed.
    private func awaitAgentReadEverything() {
        var last = -1
        var since = Date()
        let quiet = eventually(timeout: 30) {
            let m = (try? TestSupport.httpGet(port: agentMetricsPort, path: "/metrics"))?.body ?? ""
            let read = m.split(separator: "\n").first { $0.hasPrefix("tapio_agent_events_read_total ") }
                .flatMap { Int($0.split(separator: " ").last ?? "") } ?? -1
            if read != last { last = read; since = Date() }
            return read >= 0 && Date().timeIntervalSince(since) >= 1
        }
        XCTAssertTrue(quiet, "the agent stopped reading; agent log:\n\(agentLog())")
    }

    /// The running agent holds no unacknowledged batch.
    private func agentIdle() -> Bool {
        guard let m = try? TestSupport.httpGet(port: agentMetricsPort, path: "/metrics") else { return false }
        return m.body.contains("\ntapio_agent_unacknowledged_batches 0\n")
    }

    /// Waits until the spool's records hold every generated event the agent
    /// did not count as lost (it seals within its batch delay and spools each
    /// batch as it seals it).
    private func awaitSpooled() throws {
        var held = 0
        var counted = 0
        let ok = eventually(timeout: 30) {
            held = spoolRecords().reduce(0) { $0 + $1.events }
            counted = agentCountedDrops()
            return held + counted >= expected.count
        }
        XCTAssertTrue(ok, "spooled \(held) and counted \(counted) of \(expected.count) events; agent log:\n\(agentLog())")
    }

    /// The running agent's own count of lost events (its /metrics).
    private func agentCountedDrops() -> Int {
        guard let m = try? TestSupport.httpGet(port: agentMetricsPort, path: "/metrics") else { return 0 }
        return m.body.split(separator: "\n").filter { $0.hasPrefix("tapio_agent_dropped_events_total{") }
            .compactMap { $0.split(separator: " ").last.flatMap { Int($0) } }.reduce(0, +)
    }

    /// The events the running agent has read (its /metrics), -1 when unknown.
    private func agentEventsRead() -> Int {
        let m = (try? TestSupport.httpGet(port: agentMetricsPort, path: "/metrics"))?.body ?? ""
        return m.split(separator: "\n").first { $0.hasPrefix("tapio_agent_events_read_total ") }
            .flatMap { Int($0.split(separator: " ").last ?? "") } ?? -1
    }

    /// The unsettled records in the spool's segment files (records back to
    /// back: a 40-byte header with the event count, big-endian, at 24 and the
    /// payload length at 28), oldest first; records named in a segment's
    /// `.acks` marks (32 bytes each, the offset first) are settled.
    private func spoolRecords(in directory: String? = nil) -> [(path: String, offset: Int, events: Int)] {
        let spoolDir = directory ?? spoolDir
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: spoolDir)) ?? [])
            .filter { $0.hasPrefix("segment-") && $0.hasSuffix(".spool") }.sorted()
        return names.flatMap { name -> [(path: String, offset: Int, events: Int)] in
            let path = spoolDir + "/" + name
            guard let data = FileManager.default.contents(atPath: path) else { return [] }
            let bytes = [UInt8](data)
            let marks = [UInt8](FileManager.default.contents(atPath: String(path.dropLast(".spool".count)) + ".acks") ?? Data())
            let settled = Set(stride(from: 0, to: marks.count - marks.count % 32, by: 32).map { i in marks[i..<(i + 8)].reduce(0) { $0 << 8 | Int($1) } })
            var records: [(path: String, offset: Int, events: Int)] = []
            var offset = 0
            while offset + 40 <= bytes.count {
                let events = bytes[(offset + 24)..<(offset + 28)].reduce(0) { $0 << 8 | Int($1) }
                let length = bytes[(offset + 28)..<(offset + 32)].reduce(0) { $0 << 8 | Int($1) }
                if !settled.contains(offset) { records.append((path, offset, events)) }
                offset += 40 + length
            }
            return records
        }
    }

    private func query(_ arguments: [String]) throws -> [String: Any] {
        let r = try TestSupport.run(try TestSupport.product("tapio"),
                                    ["--server", "127.0.0.1:\(queryPort)", "--tls-dir", pki + "/operators/alice"] + arguments + ["-o", "json"])
        guard r.status == 0 else { throw TestSupportError("tapio \(arguments) failed: \(r.stderr)") }
        guard let doc = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any] else {
            throw TestSupportError("tapio \(arguments) printed no JSON object")
        }
        return doc
    }

    // MARK: - Environment

    private func mountTmpfs(_ path: String, size: String) throws {
        let r = try TestSupport.run("/usr/bin/mount", ["-t", "tmpfs", "-o", "size=\(size),mode=0700", "tmpfs", path])
        guard r.status == 0 else { throw TestSupportError("mount tmpfs on \(path): \(r.stderr)") }
        cleanups.append { _ = try? TestSupport.run("/usr/bin/umount", ["-l", path]) }
    }

    private static func cgroup2Mount() -> String? {
        guard let mounts = try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8) else { return nil }
        for line in mounts.split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count > 2, f[2] == "cgroup2" { return String(f[1]) }
        }
        return nil
    }

    /// Kills whatever is left in the subtree and removes it.
    private static func removeCgroup(_ path: String) {
        try? "0".write(toFile: path + "/cgroup.freeze", atomically: false, encoding: .utf8)
        for _ in 0..<200 {
            if rmdir(path) == 0 || errno == ENOENT { return }
            let procs = (try? String(contentsOfFile: path + "/cgroup.procs", encoding: .utf8)) ?? ""
            for pid in procs.split(separator: "\n").compactMap({ Int32($0) }) { kill(pid, SIGKILL) }
            usleep(20_000)
        }
    }

    private func tail(_ path: String?, lines: Int = 40) -> String {
        guard let path, let text = try? String(contentsOfFile: path, encoding: .utf8) else { return "" }
        return text.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    private func agentLog(full: Bool = false) -> String {
        agentLogs.map { "--- \(($0 as NSString).lastPathComponent)\n" + tail($0, lines: full ? .max : 40) }.joined(separator: "\n")
    }

    private func serverLog() -> String {
        serverLogs.map { "--- \(($0 as NSString).lastPathComponent)\n" + tail($0) }.joined(separator: "\n")
    }
}
