import ArgumentParser
import Foundation
import TapioLab
import TapioWire

struct Locations: ParsableArguments {
    @Option(help: "Directory with tapio-server and tapio-agent (default: beside tapio-lab).")
    var binDir: String?
    @Option(help: "The lab directory: scenarios/, topologies/, services/ (default: ./lab or the source tree's).")
    var labDir: String?
    @Option(help: "Where runs are recorded (default: lab-runs/ beside the lab directory).")
    var runsDir: String?
    @Flag(name: .shortAndLong, help: "Print the lab's timeline on stderr as it happens.")
    var verbose = false

    func options() -> LabOptions {
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        let lab = labDir ?? LabFiles.labDirectory(executable: exe.path)
        let runs = runsDir ?? URL(fileURLWithPath: lab).deletingLastPathComponent().path + "/lab-runs"
        return LabOptions(binDirectory: binDir ?? exe.deletingLastPathComponent().path, labDirectory: lab, runsDirectory: runs, verbose: verbose)
    }
}

let distributedHelp = "Run the server in the distributed mode (docs/scaling.md): nats-server (JetStream) and clickhouse-server started in the run directory, and tapio-server as one ingest replica (the agents' server), one correlate replica (asked for incidents) and one query replica (asked for events), instead of one tapio-server --data-dir."

@main
struct TapioLabCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tapio-lab",
        abstract: "Builds nodes (network namespaces + cgroups) on this machine, runs real services and tapio, injects a fault and scores the answer.",
        version: TapioVersion.current,
        subcommands: [Run.self, Bench.self, Soak.self, Cleanup.self, List.self])
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one scenario: print the incident the server reported, its timeline and the score.")

    @Argument(help: "A built-in scenario name (tapio-lab list) or a path to a scenario file.")
    var scenario: String
    @Flag(help: "Print one JSON object instead of the report.")
    var json = false
    @Flag(help: ArgumentHelp(distributedHelp))
    var distributed = false
    @OptionGroup var locations: Locations

    func run() throws {
        LabSignals.install()
        var options = locations.options()
        options.distributed = distributed
        let s = try LabFiles.resolve(scenario, labDirectory: options.labDirectory)
        do {
            let report = try LabRun(scenario: s, options: options).run()
            print(json ? report.json.serialized(pretty: true) : report.text)
        } catch let e as LabError where e.description == LabError.interrupted.description {
            FileHandle.standardError.write(Data("tapio-lab: interrupted; everything it created is removed\n".utf8))
            throw ExitCode(130)
        }
    }
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run every scenario (or the named ones) N times: AC@1, AC@3, time to detect, time to a correct top-1, false incidents; and the baseline.")

    @Option(help: "Runs per scenario.")
    var runs = 1
    @Option(help: "Only these scenarios (comma-separated).")
    var only: String?
    @Flag(help: "Print one JSON object instead of the tables.")
    var json = false
    @Flag(help: ArgumentHelp(distributedHelp))
    var distributed = false
    @OptionGroup var locations: Locations

    func run() throws {
        LabSignals.install()
        var options = locations.options()
        options.distributed = distributed
        let names = only.map { $0.split(separator: ",").map(String.init) } ?? LabFiles.scenarioNames(labDirectory: options.labDirectory)
        let scenarios = try names.map { try LabFiles.resolve($0, labDirectory: options.labDirectory) }
        do {
            let report = try LabBench.run(scenarios: scenarios, runs: runs, options: options) {
                FileHandle.standardError.write(Data(($0 + "\n").utf8))
            }
            print(json ? report.json.serialized(pretty: true) : report.text)
        } catch let e as LabError where e.description == LabError.interrupted.description {
            FileHandle.standardError.write(Data("tapio-lab: interrupted; everything it created is removed\n".utf8))
            throw ExitCode(130)
        }
    }
}

struct Soak: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the healthy scenarios' activities together, repeated, for N minutes against one server and agents: incidents that paged (must be none), events/s, the server's and agents' CPU and RSS over time. Exits 1 if an incident paged.")

    @Option(help: "Minutes to run, the 15 s warmup included.")
    var minutes: Double = 30
    @Option(help: "Only these healthy scenarios (comma-separated; default: every healthy scenario).")
    var only: String?
    @Flag(help: "Print the soak's JSON (also written to soak.json in the run directory) instead of the table.")
    var json = false
    @OptionGroup var locations: Locations

    func run() throws {
        LabSignals.install()
        let options = locations.options()
        let names = only.map { $0.split(separator: ",").map(String.init) } ?? LabFiles.scenarioNames(labDirectory: options.labDirectory)
        let healthy = try names.map { try LabFiles.resolve($0, labDirectory: options.labDirectory) }.filter { only != nil || $0.isHealthy }
        let scenario = try LabSoak.scenario(mixing: healthy, minutes: minutes)
        FileHandle.standardError.write(Data("soak: \(scenario.description ?? ""); \(scenario.faults.count) activities\n".utf8))
        do {
            let report = try LabSoak.run(scenario: scenario, options: options) {
                FileHandle.standardError.write(Data(("soak: " + $0 + "\n").utf8))
            }
            print(json ? report.json.serialized(pretty: true) : report.text, terminator: "")
            if !report.passed { throw ExitCode(1) }
        } catch let e as LabError where e.description == LabError.interrupted.description {
            FileHandle.standardError.write(Data("tapio-lab: interrupted; everything it created is removed\n".utf8))
            throw ExitCode(130)
        }
    }
}

struct Cleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Finish the cleanup of runs that were killed: everything their state files (\(LabState.directory)) list.")

    @Flag(help: "Also clean up runs whose tapio-lab process is still alive.")
    var force = false
    @OptionGroup var locations: Locations

    func run() throws {
        var left = 0
        let files = LabState.leftovers()
        if files.isEmpty { print("nothing to clean up") }
        for path in files {
            guard let state = try? LabState(loading: path) else {
                print("\(path): unreadable, skipped")
                continue
            }
            if state.ownerAlive && !force {
                print("run \(state.id) (\(state.current.scenario)) is still running (pid \(state.current.ownerPid)); skipped (--force to clean it anyway)")
                continue
            }
            let problems = Cleaner.cleanup(state) { print("  " + $0) }
            for mount in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu"] { rmdir(mount + "/tapio-lab") }
            print("run \(state.id) (\(state.current.scenario)): \(problems.isEmpty ? "cleaned up" : "\(problems.count) items could not be removed")")
            left += problems.count
        }
        if left > 0 { throw ExitCode(1) }
    }
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The built-in scenarios.")
    @OptionGroup var locations: Locations

    func run() throws {
        let options = locations.options()
        for name in LabFiles.scenarioNames(labDirectory: options.labDirectory) {
            let s = try? LabFiles.resolve(name, labDirectory: options.labDirectory)
            print(name.padding(toLength: 24, withPad: " ", startingAt: 0) + (s?.description ?? "(does not load)"))
        }
    }
}
