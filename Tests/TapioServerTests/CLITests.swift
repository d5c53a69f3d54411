import Foundation
import Logging
import TapioAgent
import TapioClient
import TapioServer
import TapioStore
import TapioTestSupport
import TapioWire
import XCTest

/// The `tapio` program as an operator runs it, against a real tapio-server
/// (real TLS, real SQLite) in this process: help, where the settings come
/// from, the events filters, --follow and watch across a server restart,
/// errors in words, and a timeline that fits a terminal (docs/cli.md).
final class CLITests: XCTestCase {
    // MARK: - Help, version, completion

    func testHelpNamesACommandAndItsOptions() throws {
        let cli = try TapioCLI()
        let events = try cli.run(["help", "events"])
        XCTAssertEqual(events.status, 0, events.stderr)
        for option in ["--until", "--service", "--follow", "--pod", "ndjson"] {
            XCTAssertTrue(events.stdout.contains(option), "help events names \(option):\n\(events.stdout)")
        }
        let all = try cli.run(["help"])
        XCTAssertEqual(all.status, 0, all.stderr)
        for command in ["events", "timeline", "watch", "config", "certs"] { XCTAssertTrue(all.stdout.contains(command), all.stdout) }
        // Connection options before `help` (the documented order) are fine too, and so are nested commands.
        let nested = try cli.run(["--tls-dir", "/nowhere", "help", "config", "use-context"])
        XCTAssertEqual(nested.status, 0, nested.stderr)
        XCTAssertTrue(nested.stdout.contains("current"), nested.stdout)
        let version = try cli.run(["--version"])
        XCTAssertEqual(version.stdout.trimmingCharacters(in: .whitespacesAndNewlines), TapioVersion.current)
    }

    /// `--version` on every program, not only the CLI: what an operator
    /// checks first when a node and the server disagree.
    func testEveryProgramPrintsItsVersion() throws {
        for program in ["tapio", "tapio-agent", "tapio-server", "tapio-lab"] {
            let r = try TestSupport.run(try TestSupport.product(program), ["--version"])
            XCTAssertEqual(r.status, 0, "\(program) --version: \(r.stderr)")
            XCTAssertEqual(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines), TapioVersion.current, program)
        }
    }

    /// `tapio-agent --disable KIND` takes the kinds' names from docs/events.md
    /// and refuses any other name in words, listing the names it knows.
    func testTheAgentRefusesAnUnknownKindToDisableInWords() throws {
        let r = try TestSupport.run(try TestSupport.product("tapio-agent"), [
            "--server", "127.0.0.1:1", "--node-name", "n", "--tls-dir", "/nowhere", "--disable", "cpu_throttle", "--disable", "cpu_throtle",
        ])
        XCTAssertEqual(r.status, 64, r.stderr)
        XCTAssertTrue(r.stderr.contains("--disable cpu_throtle: not an event kind ("), r.stderr)
        XCTAssertTrue(r.stderr.contains("memory_pressure"), r.stderr)
        XCTAssertFalse(r.stderr.contains("--disable cpu_throttle:"), "a known name is accepted: \(r.stderr)")
    }

    func testCompletionScriptsAreGenerated() throws {
        let cli = try TapioCLI()
        for shell in ["bash", "zsh", "fish"] {
            let r = try cli.run(["--generate-completion-script", shell])
            XCTAssertEqual(r.status, 0, r.stderr)
            XCTAssertTrue(r.stdout.contains("use-context") && r.stdout.contains("--follow"), "\(shell) completion covers subcommands and options")
        }
    }

    // MARK: - Settings: flag > environment > context > default

    func testServerAndIdentityComeFromTheFlagThenTheEnvironmentThenTheContext() throws {
        let h = try ServerHarness(nodes: ["node-a"])
        let cli = try TapioCLI()
        let alice = h.pki + "/operators/alice"
        let good = "127.0.0.1:\(h.queryPort)"
        let nowhere = "127.0.0.1:\(TestSupport.freePort())"
        XCTAssertEqual(try cli.run(["config", "set-context", "good", "--server", good, "--tls-dir", alice]).status, 0)
        XCTAssertEqual(try cli.run(["config", "set-context", "bad", "--server", nowhere, "--tls-dir", h.pki + "/nodes/node-a"]).status, 0)

        // The first context set becomes the current one.
        let viaContext = try cli.run(["nodes", "-o", "json"])
        XCTAssertEqual(viaContext.status, 0, viaContext.stderr)
        XCTAssertNotNil(try JSONValue.parse(Array(viaContext.stdout.utf8))["nodes"])

        // TAPIO_CONTEXT picks another; --context wins over it.
        let viaEnvContext = try cli.run(["nodes"], env: ["TAPIO_CONTEXT": "bad"])
        XCTAssertNotEqual(viaEnvContext.status, 0)
        XCTAssertTrue(viaEnvContext.stderr.contains("context bad"), viaEnvContext.stderr)
        XCTAssertEqual(try cli.run(["--context", "good", "nodes"], env: ["TAPIO_CONTEXT": "bad"]).status, 0)

        // TAPIO_SERVER beats the context; --server beats TAPIO_SERVER.
        let viaEnv = try cli.run(["nodes"], env: ["TAPIO_SERVER": nowhere])
        XCTAssertNotEqual(viaEnv.status, 0)
        XCTAssertTrue(viaEnv.stderr.contains("from TAPIO_SERVER"), viaEnv.stderr)
        XCTAssertEqual(try cli.run(["--server", good, "nodes"], env: ["TAPIO_SERVER": nowhere]).status, 0)

        // TAPIO_TLS_DIR beats the context's directory (here: a node identity, refused); --tls-dir beats it.
        let node = h.pki + "/nodes/node-a"
        let viaTLSEnv = try cli.run(["nodes"], env: ["TAPIO_TLS_DIR": node])
        XCTAssertNotEqual(viaTLSEnv.status, 0)
        XCTAssertTrue(viaTLSEnv.stderr.contains("from TAPIO_TLS_DIR"), viaTLSEnv.stderr)
        XCTAssertEqual(try cli.run(["--tls-dir", alice, "nodes"], env: ["TAPIO_TLS_DIR": node]).status, 0)

        // With no config file, the environment alone is enough.
        let bare = try TapioCLI()
        let envOnly = try bare.run(["nodes"], env: ["TAPIO_SERVER": good, "TAPIO_TLS_DIR": alice])
        XCTAssertEqual(envOnly.status, 0, envOnly.stderr)
        // And nothing at all says what to give.
        let nothing = try bare.run(["nodes"])
        XCTAssertNotEqual(nothing.status, 0)
        XCTAssertTrue(nothing.stderr.contains("--tls-dir") && nothing.stderr.contains("TAPIO_TLS_DIR"), nothing.stderr)
    }

    func testConfigCommandsListSwitchAndDeleteContexts() throws {
        let cli = try TapioCLI()
        XCTAssertEqual(try cli.run(["config", "set-context", "lab", "--server", "127.0.0.1:7401", "--tls-dir", "pki/operators/alice"]).status, 0)
        XCTAssertEqual(try cli.run(["config", "set-context", "prod", "--server", "tapio.example:7401", "--tls-dir", "~/.tapio/admin"]).status, 0)
        XCTAssertEqual(try cli.run(["config", "current-context"]).stdout, "lab\n")
        XCTAssertEqual(try cli.run(["config", "use-context", "prod"]).status, 0)
        XCTAssertEqual(try cli.run(["config", "current-context"]).stdout, "prod\n")
        let list = try cli.run(["config", "get-contexts"]).stdout.split(separator: "\n").map(String.init)
        XCTAssertEqual(list.count, 3, "\(list)")
        let tls = list[1].split(separator: " ").last.map(String.init) ?? ""
        XCTAssertTrue(list[1].contains("lab") && tls.hasPrefix("/") && tls.contains("tapio-cli-home") && tls.hasSuffix("/pki/operators/alice"),
                      "relative paths are stored absolute: \(list)")
        XCTAssertTrue(list[2].hasPrefix("*") && list[2].contains("prod"), "\(list)")
        let missing = try cli.run(["config", "use-context", "staging"])
        XCTAssertNotEqual(missing.status, 0)
        XCTAssertTrue(missing.stderr.contains("lab, prod"), missing.stderr)
        XCTAssertEqual(try cli.run(["config", "delete-context", "prod"]).status, 0)
        XCTAssertNotEqual(try cli.run(["config", "current-context"]).status, 0)
        // The file is JSON another tool can read.
        let file = try JSONValue.parse(Array(try Data(contentsOf: URL(fileURLWithPath: cli.home + "/.config/tapio/config.json"))))
        XCTAssertEqual(file["contexts"]?["lab"]?["server"], .string("127.0.0.1:7401"))
        // A broken file is named, not a crash.
        try Data("{ not json".utf8).write(to: URL(fileURLWithPath: cli.home + "/.config/tapio/config.json"))
        let broken = try cli.run(["config", "get-contexts"])
        XCTAssertNotEqual(broken.status, 0)
        XCTAssertTrue(broken.stderr.contains("config.json is not valid"), broken.stderr)
    }

    // MARK: - events

    func testEventsFilterByUntilServiceAndPodPrefixAndPrintNDJSON() throws {
        let h = try ServerHarness(nodes: ["node-a"])
        let (outbox, sender) = try h.agent(node: "node-a")
        defer { sender.drainAndStop(graceSeconds: 0) }
        sender.setInventory(Inventory(pods: [
            PodInfo(uid: "u1", name: "api-7d9f-abcde", namespace: "shop", node: "node-a", ips: ["10.0.1.1"], service: "api"),
            PodInfo(uid: "u2", name: "api-7d9f-fghij", namespace: "shop", node: "node-a", ips: ["10.0.1.2"], service: "api"),
            PodInfo(uid: "u3", name: "apiary-0", namespace: "shop", node: "node-a", ips: ["10.0.1.3"], service: "apiary"),
            PodInfo(uid: "u4", name: "web-0", namespace: "shop", node: "node-a", ips: ["10.0.1.4"], service: "web"),
        ]))
        let t0 = wallClockNs() - 60_000_000_000
        let pods = ["api-7d9f-abcde", "web-0", "api-7d9f-fghij", "apiary-0"]
        for i in 0..<8 {
            outbox.add(TapioEvent(kind: .processExit, timeNs: t0 + Int64(i) * 1_000_000_000, pid: UInt32(100 + i), comm: "proc\(i)",
                                  pod: pods[i % 4], namespace: "shop", detail: .exit(exitCode: 0, signal: 0, coreDumped: false)))
        }
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })
        XCTAssertTrue(eventually { h.server.pods.all().count == 4 }, "the inventory arrived")

        let cli = try TapioCLI()
        let env = ["TAPIO_SERVER": "127.0.0.1:\(h.queryPort)", "TAPIO_TLS_DIR": h.pki + "/operators/alice"]
        func ndjson(_ args: [String]) throws -> [JSONValue] {
            let r = try cli.run(["events", "-o", "ndjson"] + args, env: env)
            XCTAssertEqual(r.status, 0, r.stderr)
            return try r.stdout.split(separator: "\n").map { try JSONValue.parse(Array($0.utf8)) }
        }
        func pids(_ events: [JSONValue]) -> [Int64] { events.compactMap { $0["pid"]?.intValue } }

        XCTAssertEqual(pids(try ndjson([])), Array(100...107), "one event per line, oldest first")
        // A trailing * is a prefix; without it the name is exact.
        XCTAssertEqual(pids(try ndjson(["--pod", "api-*"])), [100, 102, 104, 106])
        XCTAssertEqual(pids(try ndjson(["--pod", "api*"])), [100, 102, 103, 104, 106, 107])
        XCTAssertEqual(pids(try ndjson(["--pod", "web-0"])), [101, 105])
        // The most recent matches, even when newer events of other pods fill the store's first answer.
        XCTAssertEqual(pids(try ndjson(["--pod", "api-*", "--limit", "2"])), [104, 106])
        // A service is its pods in the inventory.
        XCTAssertEqual(pids(try ndjson(["--service", "api"])), [100, 102, 104, 106])
        XCTAssertEqual(pids(try ndjson(["--service", "web", "--namespace", "shop"])), [101, 105])
        let unknown = try cli.run(["events", "--service", "nope"], env: env)
        XCTAssertNotEqual(unknown.status, 0)
        XCTAssertTrue(unknown.stderr.contains("no pod of service nope"), unknown.stderr)
        // --until: an RFC 3339 time (exclusive) or a duration ago; --since likewise.
        // (Between event times: the server places events on its own clock, a hair from the agent's.)
        let t2_5 = rfc3339(ns: t0 + 2_500_000_000)
        XCTAssertEqual(pids(try ndjson(["--until", t2_5])), [100, 101, 102])
        XCTAssertEqual(pids(try ndjson(["--since", t2_5, "--until", rfc3339(ns: t0 + 4_500_000_000)])), [103, 104])
        // The same instant with an offset and a shorter fraction.
        let plusTwo = String(rfc3339(ns: t0 + 2_500_000_000 + 7_200_000_000_000).prefix(23)) + "+02:00"
        XCTAssertEqual(pids(try ndjson(["--until", plusTwo])), [100, 101, 102], plusTwo)
        XCTAssertEqual(pids(try ndjson(["--until", "1h"])), [], "nothing is older than an hour")
        XCTAssertEqual(pids(try ndjson(["--since", "1h", "--service", "api", "--pod", "api-7d9f-f*"])), [102, 106], "filters combine")
        let bad = try cli.run(["events", "--until", "yesterday"], env: env)
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.stderr.contains("RFC 3339"), bad.stderr)
        // -o json stays one document.
        let json = try cli.run(["events", "-o", "json", "--pod", "web-0"], env: env)
        XCTAssertEqual(try JSONValue.parse(Array(json.stdout.utf8))["count"], .int(2))
    }

    func testFollowPrintsNewEventsOnceAndRidesOutAServerRestart() throws {
        let server = try RestartableServer()
        let (outbox, sender) = try server.agent()
        defer { sender.drainAndStop(graceSeconds: 0) }
        outbox.add(event(1, comm: "before"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { outbox.unacknowledged == 0 })

        let cli = try TapioCLI()
        let follow = try cli.start(["events", "--follow", "-o", "ndjson", "--interval", "0.2"], env: server.cliEnvironment)
        defer { follow.stop() }
        XCTAssertTrue(eventually { follow.stdout.contains("\"before\"") }, "the events so far: \(follow.stdout) \(follow.stderr)")
        outbox.add(event(2, comm: "while-up"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually { follow.stdout.contains("\"while-up\"") }, "a new event appears: \(follow.stdout)")

        server.stop()
        XCTAssertTrue(eventually { follow.stderr.contains("retrying") }, "a status line says the server is gone: \(follow.stderr)")
        XCTAssertTrue(follow.isRunning, "follow keeps running while the server is away")
        try server.start()
        outbox.add(event(3, comm: "after-restart"))
        outbox.sealIfDue(nowNs: wallClockNs(), force: true)
        XCTAssertTrue(eventually(timeout: 30) { follow.stdout.contains("\"after-restart\"") }, "\(follow.stdout)\n\(follow.stderr)")
        XCTAssertTrue(follow.stderr.contains("reconnected"), follow.stderr)
        let comms = follow.stdout.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8))["comm"]?.stringValue }
        XCTAssertEqual(comms, ["before", "while-up", "after-restart"], "each event once, in order")
        XCTAssertFalse(follow.stdout.contains("tapio:"), "status lines stay off stdout")
    }

    /// watch subscribes: with keepalives a minute apart, an incident the
    /// engine opens after watch started can only reach it as a push, and
    /// the server is never asked for its incidents. A restart closes the
    /// subscription; watch says so, subscribes again when the server is
    /// back, and does not announce again what it already printed.
    func testWatchIsPushedAnIncidentOpenedAfterItStartedAndRidesOutAServerRestart() throws {
        let server = try RestartableServer(nodes: ["node-a", "node-b"])
        let cli = try TapioCLI()
        let watch = try cli.start(["watch", "-o", "ndjson", "--interval", "60"], env: server.cliEnvironment)
        defer { watch.stop() }
        XCTAssertTrue(eventually { watch.isRunning && !watch.stderr.contains("Error") })
        XCTAssertTrue(eventually { server.metrics?.value("tapio_server_queries_total{method=\"subscribe\"}") == 1 }, "watch subscribed: \(watch.stderr)")
        XCTAssertEqual(watch.stdout, "", "nothing to report yet")

        // Refused connections to redis after its OOM kill (as CorrelationTests).
        try QueryAPITests.feedOOMKillBehindRefusedConnects(agent: { try server.agent(node: $0) })

        XCTAssertTrue(eventually(timeout: 20) { watch.stdout.contains("\"opened\"") }, "watch reports the incident: \(watch.stdout) \(watch.stderr)")
        let opened = try XCTUnwrap(watch.stdout.split(separator: "\n").first.map { try JSONValue.parse(Array($0.utf8)) })
        XCTAssertEqual(opened["incident"]?["root_causes"]?.arrayValue?.first?["kind"], .string("oom_kill"))
        XCTAssertEqual(server.metrics?.value("tapio_server_queries_total{method=\"incidents\"}"), 0, "pushed, not polled")
        XCTAssertEqual(server.metrics?.value("tapio_server_queries_total{method=\"subscribe\"}"), 1, "one subscription all along")
        let linesBefore = watch.stdout.split(separator: "\n").count

        server.stop()
        XCTAssertTrue(eventually { watch.stderr.contains("retrying") }, "a status line says the server is gone: \(watch.stderr)")
        XCTAssertTrue(watch.isRunning, "watch does not exit when the server goes away")
        try server.start()
        XCTAssertTrue(eventually(timeout: 30) { watch.stderr.contains("reconnected") }, watch.stderr)
        XCTAssertEqual(server.metrics?.value("tapio_server_queries_total{method=\"subscribe\"}"), 1, "subscribed again to the restarted server")
        XCTAssertEqual(server.metrics?.value("tapio_server_queries_total{method=\"incidents\"}"), 0)
        // The restarted server's snapshot holds the incident: it is not reported again.
        let settled = Date(timeIntervalSinceNow: 1)
        XCTAssertTrue(eventually { Date() > settled })
        let after = watch.stdout.split(separator: "\n").filter { (try? JSONValue.parse(Array($0.utf8))["change"]) == .string("opened") }
        XCTAssertEqual(after.count, 1, watch.stdout)
        XCTAssertGreaterThanOrEqual(watch.stdout.split(separator: "\n").count, linesBefore)
    }

    // MARK: - Incidents

    func testIncidentsSayWhichOnesPageAndWhichAreObservations() throws {
        let server = try RestartableServer()
        // Two incidents in the server's store, as a previous run saved them:
        // one that pages and an observation (an inferred crash at 0.09).
        server.stop()
        do {
            let store = try SegmentEventStore(directory: server.dir + "/data")
            let opened = wallClockNs() - 3_600_000_000_000
            func incident(_ id: String, pages: Bool, kind: String, entity: String, confidence: Double) throws -> StoredIncident {
                let json = JSONValue.object([
                    "id": .string(id), "status": .string("resolved"), "title": .string("\(entity) \(kind)"),
                    "opened_at": .string(rfc3339(ns: opened)), "pages": .bool(pages),
                    "root_causes": .array([.object(["kind": .string(kind), "entity": .string(entity), "confidence": .double(confidence)])]),
                    "affected": .object(["services": .array([.string("api")])]),
                ])
                return StoredIncident(id: id, status: "resolved", openedNs: opened, updatedNs: opened, json: json.serialized())
            }
            try store.saveIncident(incident("inc-pages", pages: true, kind: "oom_kill", entity: "redis", confidence: 0.87))
            try store.saveIncident(incident("inc-observed", pages: false, kind: "crash", entity: "redis", confidence: 0.09))
        }
        try server.start()
        let cli = try TapioCLI()

        let r = try cli.run(["incidents"], env: server.cliEnvironment)
        XCTAssertEqual(r.status, 0, r.stderr)
        let lines = r.stdout.split(separator: "\n").map(String.init)
        let header = try XCTUnwrap(lines.first)
        let pagesAt = try XCTUnwrap(header.range(of: "PAGES"), header)
        let column = header.distance(from: header.startIndex, to: pagesAt.lowerBound)
        func pagesCell(_ id: String) throws -> String {
            let line = try XCTUnwrap(lines.first { $0.hasPrefix(id + " ") }, r.stdout)
            return String(line.dropFirst(column).prefix { $0 != " " })
        }
        XCTAssertEqual(try pagesCell("inc-pages"), "yes", r.stdout)
        XCTAssertEqual(try pagesCell("inc-observed"), "no", r.stdout)

        // -o json carries the same field.
        let json = try cli.run(["incidents", "-o", "json"], env: server.cliEnvironment)
        XCTAssertEqual(json.status, 0, json.stderr)
        let list = try XCTUnwrap(JSONValue.parse(Array(json.stdout.utf8))["incidents"]?.arrayValue, json.stdout)
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: list.map { ($0["id"]?.stringValue ?? "", $0["pages"]) }),
                       ["inc-pages": .bool(true), "inc-observed": .bool(false)])

        // watch marks an observation on its line too.
        let watch = try cli.run(["watch", "--interval", "0.2", "--duration", "1"], env: server.cliEnvironment)
        XCTAssertEqual(watch.status, 0, watch.stderr)
        let watched = watch.stdout.split(separator: "\n")
        XCTAssertTrue(try XCTUnwrap(watched.first { $0.contains("inc-observed") }, watch.stdout).hasSuffix("(observation: does not page)"), watch.stdout)
        XCTAssertFalse(try XCTUnwrap(watched.first { $0.contains("inc-pages") }, watch.stdout).contains("observation"), watch.stdout)
    }

    // MARK: - Errors in words

    func testErrorsSayWhatIsWrongAndWhichSettingFixesIt() throws {
        let h = try ServerHarness(nodes: ["node-a"])
        let cli = try TapioCLI()
        let server = "127.0.0.1:\(h.queryPort)"
        let alice = h.pki + "/operators/alice"
        let other = try TestSupport.makePKI(in: try TestSupport.temporaryDirectory(), nodes: [], operators: ["eve"])

        func fails(_ args: [String], env: [String: String] = [:], saying phrases: [String], file: StaticString = #filePath, line: UInt = #line) throws {
            let r = try cli.run(args + ["nodes"], env: env)
            XCTAssertNotEqual(r.status, 0, "\(args) should fail", file: file, line: line)
            for phrase in phrases {
                XCTAssertTrue(r.stderr.contains(phrase), "\(args): «\(phrase)» missing from:\n\(r.stderr)", file: file, line: line)
            }
            for leak in ["OPENSSL_internal", "/checkouts/", ".build/", "NIOSSL", "BoringSSL", "handshakeFailed"] {
                XCTAssertFalse(r.stderr.contains(leak), "\(args): a library string leaked:\n\(r.stderr)", file: file, line: line)
            }
        }

        // Unreachable: nothing listens there.
        let closed = "127.0.0.1:\(TestSupport.freePort())"
        try fails(["--server", closed, "--tls-dir", alice], saying: ["cannot connect to \(closed): connection refused", "--server", "TAPIO_SERVER"])
        try fails(["--tls-dir", alice], env: ["TAPIO_SERVER": closed], saying: ["from TAPIO_SERVER"])
        // Wrong CA: the server's certificate is not signed by the CA given.
        try fails(["--server", server, "--tls-dir", alice, "--tls-ca", other + "/ca/ca.crt"],
                  saying: ["server's certificate is not signed by the CA in \(other)/ca/ca.crt", "from --tls-ca", "--tls-dir"])
        // The client's certificate is from another CA: the server refuses it in the handshake.
        try fails(["--server", server, "--tls-dir", other + "/operators/eve", "--tls-ca", alice + "/ca.crt"],
                  saying: ["server does not accept the certificate \(other)/operators/eve/tls.crt", "--tls-dir"])
        // Expired: an operator certificate of the right CA whose validity ended.
        let expired = try issueExpiredOperator(pki: h.pki)
        try fails(["--server", server], env: ["TAPIO_TLS_DIR": expired],
                  saying: ["the certificate \(expired)/tls.crt expired at 2024-01-02T00:00:00Z", "from TAPIO_TLS_DIR", "--tls-dir"])
        // Not an operator: a node's certificate is valid but may not query.
        try fails(["--server", server, "--tls-dir", h.pki + "/nodes/node-a"],
                  saying: ["O=tapio-node", "needs tapio-operator", "operator certificate", "from --tls-dir", "--operators"])
        // Missing files.
        try fails(["--server", server, "--tls-dir", "/nonexistent/alice"],
                  saying: ["cannot read the CA certificate /nonexistent/alice/ca.crt: no such file", "--tls-dir"])
        // The server's certificate does not carry the name connected to.
        let named = try TestSupport.temporaryDirectory()
        _ = try DevelopmentPKI.initialize(directory: named, nodes: [], operators: ["alice"], serverNames: ["DNS:tapio.example"])
        let narrow = try ServerHarness.serving(pki: named)
        defer { narrow.shutdown() }
        try fails(["--server", "127.0.0.1:\(narrow.queryPort)", "--tls-dir", named + "/operators/alice"],
                  saying: ["server's certificate does not name 127.0.0.1", "--server"])
        // The server's certificate has expired (served by Debian's openssl s_server, as
        // tapio-server itself refuses to start with an expired certificate).
        let expiredServer = try issueExpired(pki: h.pki, subject: "/O=tapio-server/CN=tapio-server",
                                             extensions: "extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1")
        let port = TestSupport.freePort()
        let sServer = try ChildProcess("/usr/bin/openssl", ["s_server", "-accept", "127.0.0.1:\(port)", "-tls1_3", "-quiet", "-naccept", "1",
                                                           "-cert", expiredServer + "/tls.crt", "-key", expiredServer + "/tls.key"],
                                       logPath: expiredServer + "/s_server.log")
        defer { sServer.stop(signal: SIGKILL) }
        XCTAssertTrue(eventually { (try? TestSupport.run("/usr/bin/ss", ["-Htln", "sport = :\(port)"]).stdout.contains("LISTEN")) ?? false },
                      "openssl s_server listens: \(sServer.log)")
        try fails(["--server", "127.0.0.1:\(port)", "--tls-dir", alice], saying: ["server's certificate expired at 2024-01-02T00:00:00Z", "renewed"])
        // And a working identity still works.
        XCTAssertEqual(try cli.run(["--server", server, "--tls-dir", alice, "nodes"]).status, 0)
    }

    /// An operator certificate valid for one day in 2024, signed by the
    /// development CA with Debian's openssl (`openssl ca` can date a
    /// certificate in the past; the PKI code only issues from now on).
    private func issueExpiredOperator(pki: String) throws -> String {
        try issueExpired(pki: pki, subject: "/O=tapio-operator/CN=old", extensions: "extendedKeyUsage = clientAuth")
    }

    private func issueExpired(pki: String, subject: String, extensions: String) throws -> String {
        let dir = try TestSupport.temporaryDirectory("tapio-expired")
        try """
            [ca]
            default_ca = d
            [d]
            database = \(dir)/index.txt
            new_certs_dir = \(dir)
            serial = \(dir)/serial
            policy = p
            default_md = sha256
            x509_extensions = ext
            unique_subject = no
            [p]
            organizationName = supplied
            commonName = supplied
            [ext]
            basicConstraints = critical,CA:FALSE
            keyUsage = critical,digitalSignature
            \(extensions)
            """.write(toFile: dir + "/ca.cnf", atomically: true, encoding: .utf8)
        try "".write(toFile: dir + "/index.txt", atomically: true, encoding: .utf8)
        try "01\n".write(toFile: dir + "/serial", atomically: true, encoding: .utf8)
        let openssl = "/usr/bin/openssl"
        let req = try TestSupport.run(openssl, ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                                                "-keyout", dir + "/tls.key", "-subj", subject, "-out", dir + "/req.csr"])
        XCTAssertEqual(req.status, 0, req.stderr)
        let sign = try TestSupport.run(openssl, ["ca", "-batch", "-config", dir + "/ca.cnf", "-cert", pki + "/ca/ca.crt", "-keyfile", pki + "/ca/ca.key",
                                                 "-in", dir + "/req.csr", "-out", dir + "/tls.crt",
                                                 "-startdate", "20240101000000Z", "-enddate", "20240102000000Z"])
        XCTAssertEqual(sign.status, 0, sign.stderr)
        try FileManager.default.copyItem(atPath: pki + "/ca/ca.crt", toPath: dir + "/ca.crt")
        return dir
    }

    // MARK: - Timeline

    func testTimelineOfTenNodesFitsTheTerminal() throws {
        let dir = try TestSupport.temporaryDirectory()
        let t0: Int64 = 1_764_269_176_088_766_816
        var entries: [JSONValue] = []
        for i in 0..<40 {
            let node = "node-\(i % 10)"
            entries.append(.object([
                "id": .string("e\(i)"), "time": .string(rfc3339(ns: t0 + Int64(i) * 3_000_000)), "time_ns": .int(t0 + Int64(i) * 3_000_000),
                "time_error_ns": .int(Int64(100_000 * (i % 10 + 1))), "node": .string(node), "kind": .string(i == 5 ? "oom_kill" : "tcp_connect"),
                "entity": .string("checkout-\(i % 10)"), "role": .string(i == 5 ? "cause" : "symptom"),
                "summary": .string(i == 5 ? "redis-server (pid 301) killed by the OOM killer, anon-rss 512000 kB"
                                          : "checkout-\(i % 10) connect to 10.77.1.13:6379 (redis-master.shop.svc.cluster.local) refused ×\(i + 1)"),
                "concurrent_with": .array(i % 7 == 0 ? [.string("e\(i + 1)")] : []),
            ]))
        }
        let doc = JSONValue.object([
            "id": .string("inc-ten"), "status": .string("open"), "title": .string("checkout fails to reach redis"),
            "root_causes": .array([.object(["kind": .string("oom_kill"), "entity": .string("redis"), "confidence": .double(0.9)])]),
            "timeline": .array(entries),
        ])
        try doc.serialized().write(toFile: dir + "/t.json", atomically: true, encoding: .utf8)
        let cli = try TapioCLI()
        for columns in [120, 80] {
            let r = try cli.run(["timeline", "--file", dir + "/t.json"], env: ["COLUMNS": String(columns)])
            XCTAssertEqual(r.status, 0, r.stderr)
            let lines = r.stdout.split(separator: "\n", omittingEmptySubsequences: false)
            let widest = lines.map(\.count).max() ?? 0
            XCTAssertLessThanOrEqual(widest, columns, "at \(columns) columns:\n\(r.stdout)")
            for i in 0..<10 { XCTAssertTrue(r.stdout.contains("node-\(i)"), "every node has its rows") }
            XCTAssertTrue(r.stdout.contains("[cause]"), "the cause is marked")
            XCTAssertTrue(r.stdout.contains("≈ 18:46:16.088766816"), "concurrency and the time of day:\n\(r.stdout)")
            XCTAssertTrue(r.stdout.contains("times UTC on 2025-11-27"), r.stdout)
            // Every word of every summary is printed (wrapped, not cut).
            let words = Set(r.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init))
            XCTAssertTrue(words.isSuperset(of: ["(redis-master.shop.svc.cluster.local)", "×40", "anon-rss"]), r.stdout)
        }
        let notSaved = try cli.run(["timeline", "--file", "/nonexistent.json"])
        XCTAssertNotEqual(notSaved.status, 0)
        XCTAssertTrue(notSaved.stderr.contains("cannot read /nonexistent.json"), notSaved.stderr)
    }
}

// MARK: - Helpers

extension ServerHarness {
    /// A server on `pki`'s server identity with port-0 listeners (for a PKI the harness does not make).
    static func serving(pki: String) throws -> ServedPKI {
        let dir = try TestSupport.temporaryDirectory("tapio-server-test")
        var config = ServerConfiguration(dataDirectory: dir + "/data", tls: TLSFiles(directory: pki + "/server"))
        config.ingestPort = 0
        config.queryPort = 0
        config.metricsHost = nil
        config.shutdownGrace = .seconds(1)
        var logger = Logger(label: "tapio-server-test")
        logger.logLevel = .critical
        let server = try TapioServer(configuration: config, logger: logger)
        let addresses = try server.start()
        return ServedPKI(server: server, queryPort: addresses.query.port!)
    }
}

struct ServedPKI {
    let server: TapioServer
    let queryPort: Int
    func shutdown() { server.shutdown() }
}

/// A tapio-server on fixed ports and one data directory, stopped and started
/// again like a restart (a rollout) would.
final class RestartableServer {
    let dir: String
    let pki: String
    let ingestPort = TestSupport.freePort()
    let queryPort = TestSupport.freePort()
    private var server: TapioServer?

    init(nodes: [String] = ["node-a"]) throws {
        dir = try TestSupport.temporaryDirectory("tapio-restart")
        pki = try TestSupport.makePKI(in: dir, nodes: nodes, operators: ["alice"])
        try start()
    }

    deinit { stop() }

    func start() throws {
        var config = ServerConfiguration(dataDirectory: dir + "/data", tls: TLSFiles(directory: pki + "/server"))
        config.ingestPort = ingestPort
        config.queryPort = queryPort
        config.metricsHost = nil
        config.shutdownGrace = .seconds(1)
        var logger = Logger(label: "tapio-server-test")
        logger.logLevel = .critical
        let s = try TapioServer(configuration: config, logger: logger)
        _ = try s.start()
        server = s
    }

    func stop() {
        server?.shutdown()
        server = nil
    }

    /// The running server's metrics (nil while stopped).
    var metrics: ServerMetrics? { server?.metrics }

    var cliEnvironment: [String: String] {
        ["TAPIO_SERVER": "127.0.0.1:\(queryPort)", "TAPIO_TLS_DIR": pki + "/operators/alice"]
    }

    /// An agent without the kernel part that reconnects quickly.
    func agent(node: String = "node-a") throws -> (Outbox, Sender) {
        let outbox = try Outbox(node: node, epoch: UInt64(wallClockNs()), limits: Outbox.Limits(), spoolDirectory: nil)
        var config = Sender.Configuration(host: "127.0.0.1", port: UInt16(ingestPort), serverName: "localhost",
                                          tls: AgentTLSFiles(directory: pki + "/nodes/" + node),
                                          node: node, bootId: "test", capabilities: ["process_exec"], degraded: [])
        config.maximumBackoffMs = 200
        var logger = Logger(label: "tapio-agent-test")
        logger.logLevel = .critical
        let sender = Sender(configuration: config, outbox: outbox, logger: logger)
        sender.start()
        return (outbox, sender)
    }
}

/// The `tapio` program with an environment of its own: HOME is a fresh
/// directory (so the config file is this test's), and only the variables a
/// test gives are set besides PATH.
final class TapioCLI {
    let home: String
    let program: String

    init() throws {
        home = try TestSupport.temporaryDirectory("tapio-cli-home")
        program = try TestSupport.product("tapio")
    }

    func environment(_ extra: [String: String]) -> [String] {
        var env = ["PATH": "/usr/bin:/bin", "HOME": home]
        env.merge(extra) { $1 }
        return env.map { "\($0.key)=\($0.value)" }
    }

    /// Runs to completion in `home`.
    func run(_ arguments: [String], env: [String: String] = [:], timeout: TimeInterval = 60) throws -> (status: Int32, stdout: String, stderr: String) {
        let p = try start(arguments, env: env)
        let deadline = Date(timeIntervalSinceNow: timeout)
        while p.isRunning, Date() < deadline { usleep(5_000) }
        if p.isRunning {
            p.stop()
            throw TestSupportError("tapio \(arguments.joined(separator: " ")) did not finish within \(timeout) s")
        }
        return (p.stop(), p.stdout, p.stderr)
    }

    func start(_ arguments: [String], env: [String: String] = [:]) throws -> CLIProcess {
        try CLIProcess(program, arguments, environment: environment(env), directory: home)
    }
}

/// A child process with stdout and stderr in files of their own.
final class CLIProcess {
    let pid: pid_t
    private let out: String
    private let err: String
    private var status: Int32?

    init(_ path: String, _ arguments: [String], environment: [String], directory: String) throws {
        let dir = try TestSupport.temporaryDirectory("tapio-cli-run")
        out = dir + "/out"
        err = dir + "/err"
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, out, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        posix_spawn_file_actions_addopen(&actions, 2, err, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        // In `directory`: a shell changes there and becomes the program.
        let argv = (["/bin/sh", "-c", "cd \"$0\" && exec \"$@\"", directory, path] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup($0) } + [nil]
        defer { for a in argv + envp { free(a) } }
        // The server in this process must not live on in the child: its
        // listening sockets would outlast a stop and block the restart.
        TestSupport.inheritNothing(&actions)
        var child: pid_t = 0
        let rc = posix_spawn(&child, "/bin/sh", &actions, nil, argv, envp)
        guard rc == 0 else { throw TestSupportError("cannot start \(path): \(String(cString: strerror(rc)))") }
        pid = child
    }

    deinit { stop() }

    var stdout: String { (try? String(contentsOfFile: out, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOfFile: err, encoding: .utf8)) ?? "" }

    var isRunning: Bool { reap(block: false) == nil }

    private func reap(block: Bool) -> Int32? {
        if let status { return status }
        var s: Int32 = 0
        guard waitpid(pid, &s, block ? 0 : WNOHANG) == pid else { return nil }
        status = (s & 0x7f) == 0 ? (s >> 8) & 0xff : 128 + (s & 0x7f)
        return status
    }

    /// The exit code; a running process gets SIGTERM first (then SIGKILL after 10 s).
    @discardableResult
    func stop() -> Int32 {
        if let done = reap(block: false) { return done }
        kill(pid, SIGTERM)
        let deadline = Date(timeIntervalSinceNow: 10)
        while Date() < deadline {
            if let done = reap(block: false) { return done }
            usleep(10_000)
        }
        kill(pid, SIGKILL)
        return reap(block: true) ?? -1
    }
}
