import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import TapioQueryAPI
import TapioServer
import TapioTestSupport
@testable import TapioUI
import TapioWire
import XCTest

/// The web UI (docs/ui.md) as an operator uses it: a real tapio-server in
/// this process holding a recorded lab run (the cascade: redis crashes, api
/// and frontend fail), the real `tapio ui` program talking mTLS to it, and
/// Debian's Chromium, headless, loading every page. The DOM must name the
/// right incident, its root cause, one lane per node of its timeline and the
/// service map's services; screenshots are saved under the test's output
/// directory (and copied to $TAPIO_UI_SCREENSHOTS when set). Also: `tapio
/// timeline ID -o svg` is XML with the same lanes, and the token keeps
/// other local clients out.
final class UITests: XCTestCase {
    private var output = ""

    func testEveryPageShowsTheRecordedIncidentInHeadlessChromium() throws {
        let chromium = try Self.chromium()
        let fixture = try RecordedServer(scenario: "cascade")
        output = fixture.dir + "/ui-output"
        try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true)
        print("UITests: output (screenshots, DOMs) in \(output)")

        // What the server itself answers, to hold the pages against.
        let client = try fixture.harness.operatorClient()
        let incidents = try client.incidents(status: "all").incidents
        let incident = try XCTUnwrap(incidents.first { $0.topCause?.entity == "redis" },
                                     "the replayed cascade has an incident with redis at the top: \(incidents.map(\.title))")
        let id = incident.id
        let top = try XCTUnwrap(incident.topCause)
        XCTAssertEqual(top.kind, "crash")
        let timeline = try client.timeline(id: id).timeline ?? []
        let timelineNodes = Set(timeline.map(\.node))
        XCTAssertGreaterThanOrEqual(timelineNodes.count, 2, "the cascade's timeline spans nodes: \(timelineNodes)")
        let edges = try client.services().services
        let services = Set(edges.flatMap { [$0.client, $0.server] })
        XCTAssertTrue(services.contains("redis") && services.contains("api"), "\(services)")

        let ui = try fixture.startUI()
        let browser = Browser(binary: chromium, profile: fixture.dir + "/chromium-profile")

        // Incidents.
        let list = try browser.dom(ui.url("/"), saveTo: output + "/incidents.html")
        XCTAssertTrue(list.contains("data-id=\"\(id)\""), "the incident list names \(id)")
        XCTAssertTrue(list.contains("data-kind=\"crash\" data-entity=\"redis\""), "its root cause is shown")
        XCTAssertTrue(list.contains("live · updated"), "the page's script polled the UI's JSON endpoint and said so")
        XCTAssertFalse(list.contains("Token needed"))

        // One incident: causes with factors, lanes, symptoms.
        let page = try browser.dom(ui.url("/incidents/\(id)"), saveTo: output + "/incident.html")
        XCTAssertTrue(page.contains("class=\"incident-id\" data-id=\"\(id)\""), "the incident page is \(id)")
        XCTAssertTrue(page.contains("class=\"card cause top\" data-rank=\"1\" data-kind=\"crash\" data-entity=\"redis\""), "the top cause is redis crashing")
        for factor in ["time_proximity", "topology_match", "observed_cause"] {
            XCTAssertTrue(page.contains("data-factor=\"\(factor)\""), "factor \(factor) is listed")
        }
        let lanes = Self.matches(page, "<g class=\"lane\" data-node=\"([^\"]+)\"")
        XCTAssertEqual(lanes.sorted(), timelineNodes.sorted(), "one lane per node of the timeline, each once")
        XCTAssertEqual(Self.matches(page, "<g class=\"event (?:cause|symptom)").count, timeline.count, "every timeline event is drawn")
        XCTAssertTrue(page.contains("<g class=\"event cause"), "causes are drawn")
        XCTAssertTrue(page.contains("class=\"err\""), "uncertainty bars are drawn")
        if timeline.contains(where: { !$0.concurrentWith.isEmpty }) {
            XCTAssertTrue(page.contains("class=\"concurrent-band\""), "concurrent events are shown as such")
        }
        XCTAssertTrue(page.contains("<table class=\"symptoms\">") && page.contains("connect_refused"), "the symptoms are listed")
        // A band links to a zoom on it: the same lanes, the stretch of time said.
        if let zoom = Self.matches(page, "href=\"\\?from_ns=(-?[0-9]+&amp;to_ns=-?[0-9]+)").first {
            let query = zoom.replacingOccurrences(of: "&amp;", with: "&")
            let zoomed = try browser.dom(ui.url("/incidents/\(id)?from_ns=\(query)"), saveTo: output + "/incident-zoomed.html")
            XCTAssertTrue(zoomed.contains("Zoomed in on"), "the zoom is said")
            XCTAssertEqual(Self.matches(zoomed, "<g class=\"lane\" data-node=\"([^\"]+)\"").sorted(), timelineNodes.sorted(), "every lane stays")
            XCTAssertTrue(zoomed.contains("class=\"concurrent-band\""), "the band zoomed in on is there")
        }

        // The service map: every service a box, the failing edge marked.
        let map = try browser.dom(ui.url("/services"), saveTo: output + "/services.html")
        for s in services { XCTAssertTrue(map.contains("class=\"svc-node") && map.contains("data-name=\"\(s)\""), "service \(s) on the map") }
        let failing = edges.filter { $0.failures > 0 }
        for e in failing {
            XCTAssertTrue(map.contains("<g class=\"edge failing\" data-client=\"\(e.client)\" data-server=\"\(e.server)\""),
                          "failing edge \(e.client) → \(e.server) is marked")
        }
        XCTAssertFalse(failing.isEmpty, "the cascade has failed connects to redis")

        // Events, filtered by kind and node.
        let node = try XCTUnwrap(timeline.first { $0.kind == "process_exit" }?.node ?? timelineNodes.sorted().first)
        let events = try browser.dom(ui.url("/events?kind=process_exit&node=\(node)&limit=50"), saveTo: output + "/events.html")
        let kinds = Self.matches(events, "<tr class=\"event\" data-kind=\"([^\"]+)\"")
        XCTAssertFalse(kinds.isEmpty, "process exits of \(node) are listed")
        XCTAssertEqual(Set(kinds), ["process_exit"], "only the kind asked for")
        XCTAssertEqual(Set(Self.matches(events, "<tr class=\"event\" data-kind=\"[^\"]+\" data-node=\"([^\"]+)\"")), [node], "only the node asked for")

        // Nodes: every agent of the run, with its clock offset.
        let nodesPage = try browser.dom(ui.url("/nodes"), saveTo: output + "/nodes.html")
        let known = try client.nodes().nodes.map(\.node)
        XCTAssertFalse(known.isEmpty)
        XCTAssertEqual(Set(Self.matches(nodesPage, "<tr class=\"node\" data-node=\"([^\"]+)\"")), Set(known), "every node is listed")
        XCTAssertTrue(timelineNodes.isSubset(of: Set(known)), "the timeline's nodes are the run's agents")

        // Screenshots of the incident and the map.
        for (name, path, size) in [("incident", "/incidents/\(id)", "1400,1400"), ("services", "/services", "1400,900"), ("incidents", "/", "1400,600")] {
            let png = output + "/\(name).png"
            try browser.screenshot(ui.url(path), to: png, size: size)
            let bytes = try XCTUnwrap(FileManager.default.contents(atPath: png), "\(png) written")
            XCTAssertEqual(Array(bytes.prefix(8)), [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A], "\(png) is a PNG")
            XCTAssertGreaterThan(bytes.count, 10_000, "\(png) has a picture in it")
            print("UITests: screenshot \(png)")
            // The two docs/ui.md and the README show.
            if let copy = ProcessInfo.processInfo.environment["TAPIO_UI_SCREENSHOTS"], !copy.isEmpty, name != "incidents" {
                try? FileManager.default.removeItem(atPath: copy + "/ui-\(name).png")
                try FileManager.default.copyItem(atPath: png, toPath: copy + "/ui-\(name).png")
            }
        }
        ui.process.stop()
    }

    /// Without the token the UI answers 401; the token once sets a cookie and
    /// redirects to the page without it; the live endpoint answers JSON with
    /// the page's fragment.
    func testTheUIWantsItsTokenAndServesTheLiveFragment() throws {
        let fixture = try RecordedServer(scenario: "cascade")
        let ui = try fixture.startUI()
        XCTAssertEqual(try HTTP.get(port: ui.port, path: "/").status, 401)
        XCTAssertEqual(try HTTP.get(port: ui.port, path: "/?token=not-the-token").status, 401)
        XCTAssertEqual(try HTTP.get(port: ui.port, path: "/api/fragment?path=/").status, 401)
        XCTAssertEqual(try HTTP.get(port: ui.port, path: "/api/changes?after=0").status, 401, "the change feed wants the token too")
        let redirect = try HTTP.get(port: ui.port, path: "/events?kind=dns&token=\(ui.token)")
        XCTAssertEqual(redirect.status, 303)
        XCTAssertEqual(redirect.headers["location"], "/events?kind=dns", "the token is taken out of the address")
        let cookie = try XCTUnwrap(redirect.headers["set-cookie"]?.split(separator: ";").first.map(String.init))
        XCTAssertTrue(redirect.headers["set-cookie"]?.contains("HttpOnly") ?? false)
        XCTAssertEqual(try HTTP.get(port: ui.port, path: "//elsewhere.example/?token=\(ui.token)").headers["location"], "/", "the redirect stays in the UI")
        let fragment = try HTTP.get(port: ui.port, path: "/api/fragment?path=%2F%3Fstatus%3Dall", headers: ["Cookie": cookie])
        XCTAssertEqual(fragment.status, 200)
        let doc = try JSONValue.parse(Array(fragment.body.utf8))
        XCTAssertNil(doc["error"], fragment.body)
        XCTAssertTrue(doc["html"]?.stringValue?.contains("class=\"incident\"") ?? false, fragment.body)
        let unknown = try HTTP.get(port: ui.port, path: "/incidents/inc-0000000000000000", headers: ["Cookie": cookie])
        XCTAssertEqual(unknown.status, 404)
        XCTAssertTrue(unknown.body.contains("no incident inc-0000000000000000"), unknown.body)
        XCTAssertEqual(try HTTP.get(port: ui.port, path: "/nowhere", headers: ["Cookie": cookie]).status, 404)
        let page = try HTTP.get(port: ui.port, path: "/", headers: ["Cookie": cookie])
        XCTAssertTrue(page.headers["content-security-policy"]?.contains("script-src 'self'") ?? false, "\(page.headers)")
        // A port already taken is said in words, with the flag that changes it.
        let taken = try TapioCLI().run(["ui", "--server", "127.0.0.1:\(fixture.harness.queryPort)", "--tls-dir", fixture.harness.pki + "/operators/alice",
                                        "--listen", "127.0.0.1:\(ui.port)"])
        XCTAssertNotEqual(taken.status, 0)
        XCTAssertTrue(taken.stderr.contains("cannot listen on 127.0.0.1:\(ui.port): address already in use; choose another with --listen"), taken.stderr)
        ui.process.stop()

        // A certificate that may not query is said at start, in words, and nothing is served.
        let refused = try TapioCLI().run(["ui", "--server", "127.0.0.1:\(fixture.harness.queryPort)", "--tls-dir", fixture.harness.pki + "/nodes/node1",
                                          "--listen", "127.0.0.1:\(TestSupport.freePort())"])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.stderr.contains("may not query") && refused.stderr.contains("operator"), refused.stderr)
        XCTAssertFalse(refused.stdout.contains("http://"), refused.stdout)
    }

    /// The page's JSON endpoint follows the server: an incident that opens
    /// after the page was loaded is in the next answer, and the map marks
    /// its cause.
    func testTheLiveEndpointFollowsTheServer() throws {
        // An empty server, then the cascade run fed to its engine as if it
        // happened now (as the alerting tests do).
        let fixture = try RecordedServer(scenario: nil)
        let ui = try fixture.startUI()
        let cookie = try ui.cookie()
        func fragment(_ path: String) throws -> String {
            let r = try HTTP.get(port: ui.port, path: "/api/fragment?path=" + (path.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? ""), headers: ["Cookie": cookie])
            let doc = try JSONValue.parse(Array(r.body.utf8))
            guard let html = doc["html"]?.stringValue else { throw TestSupportError("no fragment for \(path): \(r.status) \(r.body)") }
            return html
        }
        XCTAssertFalse(try fragment("/?status=open").contains("data-status=\"open\""), "nothing is open yet")
        XCTAssertFalse(try fragment("/services").contains("svc-node cause"))

        try AlertingTests.feedCascade(fixture.harness.server)
        var list = ""
        XCTAssertTrue(eventually(timeout: 60) {
            list = (try? fragment("/?status=open")) ?? ""
            return list.contains("data-status=\"open\"")
        }, "the open incident reaches the live endpoint: \(list)")
        XCTAssertTrue(list.contains("data-entity=\"redis\""), list)
        XCTAssertTrue(try fragment("/services").contains("<g class=\"svc-node cause\" data-name=\"redis\""), "the map outlines the open incident's cause")

        // The server goes away: the live endpoint says why (the page keeps
        // what it shows), and a page loaded now says it in words.
        fixture.harness.server.shutdown()
        let r = try HTTP.get(port: ui.port, path: "/api/fragment?path=%2F", headers: ["Cookie": cookie])
        let error = try JSONValue.parse(Array(r.body.utf8))["error"]?.stringValue ?? ""
        XCTAssertTrue(error.contains("cannot connect to 127.0.0.1:\(fixture.harness.queryPort)"), r.body)
        let page = try HTTP.get(port: ui.port, path: "/", headers: ["Cookie": cookie])
        XCTAssertEqual(page.status, 502)
        XCTAssertTrue(page.body.contains("Cannot ask tapio-server") && page.body.contains("connection refused"), page.body)
        ui.process.stop()
    }

    /// `tapio timeline ID -o svg` is one XML document with a lane per node
    /// and every event; `-o html` is a page with the same drawing; other
    /// commands refuse the drawing formats in words.
    func testTimelineAsSVGIsXMLWithOneLanePerNode() throws {
        let fixture = try RecordedServer(scenario: "cascade")
        let client = try fixture.harness.operatorClient()
        let incidents = try client.incidents(status: "all").incidents
        let id = try XCTUnwrap(incidents.first { $0.topCause?.entity == "redis" }?.id)
        let timeline = try client.timeline(id: id).timeline ?? []
        let cli = try TapioCLI()
        let connection = ["--server", "127.0.0.1:\(fixture.harness.queryPort)", "--tls-dir", fixture.harness.pki + "/operators/alice"]
        let svg = try cli.run(connection + ["timeline", id, "-o", "svg"])
        XCTAssertEqual(svg.status, 0, svg.stderr)
        let lanes = try SVGLanes(svg.stdout)
        XCTAssertEqual(lanes.root, "svg")
        XCTAssertEqual(lanes.nodes.sorted(), Set(timeline.map(\.node)).sorted(), "one lane per node")
        XCTAssertEqual(lanes.events, timeline.count, "every event drawn")
        XCTAssertTrue(svg.stdout.contains(id) && svg.stdout.contains("crash redis"), "the file says which incident and cause")
        let dir = try TestSupport.temporaryDirectory("tapio-ui-svg")
        try svg.stdout.write(toFile: dir + "/\(id).svg", atomically: true, encoding: .utf8)
        print("UITests: timeline SVG \(dir)/\(id).svg")

        // A timeline saved with -o json draws the same, without the server.
        let saved = try cli.run(connection + ["timeline", id, "-o", "json"])
        try saved.stdout.write(toFile: dir + "/saved.json", atomically: true, encoding: .utf8)
        let offline = try cli.run(["timeline", "--file", dir + "/saved.json", "-o", "svg"])
        XCTAssertEqual(offline.status, 0, offline.stderr)
        XCTAssertEqual(offline.stdout, svg.stdout, "--file draws what the server's answer draws")

        let html = try cli.run(connection + ["timeline", id, "-o", "html"])
        XCTAssertEqual(html.status, 0, html.stderr)
        XCTAssertTrue(html.stdout.hasPrefix("<!doctype html>") && html.stdout.contains("<svg") && html.stdout.contains("timeline-list"), html.stdout.prefix(400).description)
        XCTAssertFalse(html.stdout.contains("<script"), "the file for a ticket runs nothing")

        let refused = try cli.run(connection + ["nodes", "-o", "svg"])
        XCTAssertNotEqual(refused.status, 0)
        XCTAssertTrue(refused.stderr.contains("use them with `tapio timeline ID`"), refused.stderr)
    }

    /// A quiet gap is cut out of the axis: one event long after the rest gets
    /// its own stretch instead of squeezing the others into a corner, and
    /// time still runs left to right.
    func testAQuietGapIsCutOutOfTheTimelineAxis() {
        let ms: Int64 = 1_000_000
        let intervals: [(Int64, Int64)] = [(0, ms), (2 * ms, 3 * ms), (500 * ms, 501 * ms), (40_000 * ms, 40_000 * ms + 300_000)]
        let axis = Axis(intervals, window: nil, x0: 100, width: 1000)
        XCTAssertEqual(axis.segments.count, 2, "\(axis.segments)")
        XCTAssertGreaterThan(axis.x(501 * ms) - axis.x(0), 500, "the first stretch keeps most of the width")
        var last = -Double.infinity
        for t in stride(from: -ms, through: 40_001 * ms, by: Int64.Stride(50 * ms)) {
            XCTAssertGreaterThanOrEqual(axis.x(t), last, "x grows with time at \(t)")
            last = axis.x(t)
        }
        XCTAssertLessThanOrEqual(axis.x(40_001 * ms), 1100.0001)
        let zoomed = Axis(intervals, window: (0, 10 * ms), x0: 100, width: 1000)
        XCTAssertEqual(zoomed.segments.count, 1)
        XCTAssertEqual(zoomed.x(5 * ms), 600, accuracy: 0.001, "a zoom is one linear stretch")
    }

    /// `tapio ui` subscribes to the server's incident changes: a page's
    /// long-poll on /api/changes is answered as soon as an incident opens,
    /// not at its 2 s poll or the long-poll's end, and the fragment fetched
    /// then shows the incident.
    func testAnIncidentThatOpensIsPushedToTheLongPollingPage() throws {
        let harness = try ServerHarness(nodes: ["node-a", "node-b"])
        let port = TestSupport.freePort()
        let process = try TapioCLI().start(["ui", "--server", "127.0.0.1:\(harness.queryPort)", "--tls-dir", harness.pki + "/operators/alice",
                                            "--listen", "127.0.0.1:\(port)", "--no-token"])
        defer { process.stop() }
        XCTAssertTrue(eventually(timeout: 30) { process.stdout.contains("http://") }, process.stderr)
        @Sendable func generation(_ query: String) throws -> Int {
            let r = try HTTP.get(port: port, path: "/api/changes?" + query)
            guard r.status == 200, let g = try JSONValue.parse(Array(r.body.utf8))["generation"]?.intValue else {
                throw TestSupportError("no generation: \(r.status) \(r.body)")
            }
            return Int(g)
        }
        // The subscription's snapshot is the first generation.
        var start = 0
        XCTAssertTrue(eventually { start = (try? generation("after=-1")) ?? 0; return start >= 1 }, "the UI subscribed: \(process.stderr)")
        XCTAssertEqual(try generation("after=\(start)&wait_s=1"), start, "nothing changed: the long-poll ends with the same generation")

        let answered = Collected()
        let from = start
        let waiting = Thread {
            let began = Date()
            let g = (try? generation("after=\(from)&wait_s=25")) ?? -1
            answered.ended("\(g) \(Date().timeIntervalSince(began))")
        }
        waiting.start()
        try QueryAPITests.feedOOMKillBehindRefusedConnects(harness)
        XCTAssertTrue(eventually(timeout: 30) { answered.end != nil }, "the long-poll is answered")
        let parts = try XCTUnwrap(answered.end).split(separator: " ")
        XCTAssertGreaterThan(Int(parts[0]) ?? -1, start, "a newer generation")
        XCTAssertLessThan(Double(parts[1]) ?? 99, 20, "answered when the incident opened, not at the long-poll's end")
        // The page fetches its fragment again after every change. The first
        // change may come from the node whose batch the engine took first
        // (each agent sends on its own), so the cause is checked as the page
        // would show it after the changes that follow.
        var fragment = ""
        XCTAssertTrue(eventually(timeout: 30) {
            fragment = (try? HTTP.get(port: port, path: "/api/fragment?path=%2F").body) ?? ""
            return fragment.contains("data-kind=\\\"oom_kill\\\" data-entity=\\\"redis\\\"")
        }, fragment)
    }

    /// Names from the cluster (a pod, a DNS name) are text, never markup.
    func testWhatTheClusterNamesIsEscaped() throws {
        let evil = "<script>alert(1)</script>\"'&"
        let incident = QueryIncident(
            id: "inc-1", status: "open", title: evil, openedAt: "2026-12-01T10:00:00Z", affected: .init(services: [evil]),
            rootCauses: [.init(entity: evil, kind: "crash", confidence: 0.9)], pages: false,
            timeline: [.init(id: "e1", time: "2026-12-01T10:00:00.000000001Z", timeNs: 1_764_583_200_000_000_001, timeErrorNs: 1000, node: evil,
                             kind: "dns", entity: evil, summary: evil, role: "symptom", concurrentWith: [])])
        let latency = ServiceEdge.Latency(count: 0, meanMs: 0, p50Ms: 0, p99Ms: 0, maxMs: 0)
        let services = ServicesAnswer(services: [ServiceEdge(client: evil, server: "redis", connects: 3, failures: 1, failuresByOutcome: ["refused": 1],
                                                             failureRatio: 0.333, ports: [6379], connectLatency: latency, responseLatency: latency,
                                                             firstSeen: "", lastSeen: "")], names: [:])
        let query = FixedQueries(incident: incident, graph: services)
        for path in ["/", "/incidents/inc-1", "/services"] {
            let html = try Pages.render(path: path, params: [:], query: query).fragment
            XCTAssertFalse(html.contains("<script>"), "\(path): \(html)")
            XCTAssertTrue(html.contains("&lt;script&gt;"), path)
        }
        XCTAssertTrue(try Pages.render(path: "/", params: [:], query: query).fragment.contains("observation"), "an incident that does not page is an observation")
        // An open incident's top cause is outlined on the map, its affected services marked.
        let map = try Pages.render(path: "/services", params: [:], query: query).fragment
        XCTAssertTrue(map.contains("<g class=\"svc-node cause\" data-name=\"\(esc(evil))\""), map)
        XCTAssertTrue(map.contains("<g class=\"svc-node\" data-name=\"redis\""), "redis is neither cause nor affected here")
        XCTAssertTrue(map.contains("<g class=\"edge failing\""), "the edge with a failed connect is marked")
        let svg = try SVGLanes(TimelineLanes.svg(incident, standalone: true))
        XCTAssertEqual(svg.nodes, [evil], "the lane's name survives as text")
    }

    /// Answers the pages' queries with fixed documents.
    struct FixedQueries: UIQueries {
        var incident: QueryIncident
        var graph: ServicesAnswer
        func incidents(status: String) throws -> IncidentsAnswer { IncidentsAnswer(incidents: [incident.summary]) }
        func explain(id: String) throws -> QueryIncident { incident }
        func services() throws -> ServicesAnswer { graph }
        func nodes() throws -> NodesAnswer { NodesAnswer(nodes: []) }
        func events(_ params: [String: String]) throws -> EventsAnswer { EventsAnswer(events: []) }
    }

    // MARK: - Helpers

    static func chromium() throws -> String {
        for path in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] where FileManager.default.isExecutableFile(atPath: path) { return path }
        let why = "no headless browser: /usr/bin/chromium is missing (Debian package chromium; make deps installs it)"
        if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
        throw XCTSkip(why)
    }

    static func matches(_ text: String, _ pattern: String) -> [String] {
        let re = try! NSRegularExpression(pattern: pattern)
        return re.matches(in: text, range: NSRange(text.startIndex..., in: text)).map { m in
            m.numberOfRanges > 1 ? String(text[Range(m.range(at: 1), in: text)!]) : String(text[Range(m.range, in: text)!])
        }
    }
}

/// A tapio-server in this process restored from a recording: the
/// recording's store files become its data directory, retention is off and
/// the whole log is replayed at start (the runs are older than the defaults
/// keep), so its queries answer as the server did after the run.
final class RecordedServer {
    let dir: String
    let harness: ServerHarness
    private var uis: [UIProcess] = []

    /// nil: an empty server.
    init(scenario: String?) throws {
        dir = try TestSupport.temporaryDirectory("tapio-ui-test")
        guard let scenario else {
            harness = try ServerHarness(nodes: ["node1"])
            return
        }
        let names = try FileManager.default.contentsOfDirectory(atPath: RecordedRunTests.directory)
            .filter { $0.hasPrefix(scenario + "-") && $0.hasSuffix(".json") }.sorted()
        guard let name = names.last else { throw TestSupportError("no \(scenario) recording in \(RecordedRunTests.directory)") }
        let base = RecordedRunTests.directory + "/" + String(name.dropLast(".json".count))
        let data = dir + "/data"
        try FileManager.default.createDirectory(atPath: data, withIntermediateDirectories: true)
        let unpack: (status: Int32, stdout: String, stderr: String)
        if FileManager.default.fileExists(atPath: base + ".tar.gz") {
            unpack = try TestSupport.run("/bin/tar", ["-xzf", base + ".tar.gz", "-C", data])
        } else {
            unpack = try TestSupport.run("/bin/sh", ["-c", "gzip -dc \"$0\" > \"$1\"", base + ".sqlite.gz", data + "/events.sqlite"])
        }
        guard unpack.status == 0 else { throw TestSupportError("cannot unpack \(base): \(unpack.stderr)") }
        harness = try ServerHarness(nodes: ["node1"]) { c in
            c.dataDirectory = data
            c.storage.retentionNs = nil
            c.correlation.replayWindowNs = 3650 * 86_400_000_000_000
        }
    }

    /// `tapio ui` as a program, on a free port, with the operator identity.
    func startUI() throws -> UIProcess {
        let cli = try TapioCLI()
        let port = TestSupport.freePort()
        let process = try cli.start(["ui", "--server", "127.0.0.1:\(harness.queryPort)", "--tls-dir", harness.pki + "/operators/alice",
                                     "--listen", "127.0.0.1:\(port)"])
        var line = ""
        let started = eventually(timeout: 30) {
            line = process.stdout.split(separator: "\n").first { $0.contains("http://") }.map(String.init) ?? ""
            return !line.isEmpty || !process.isRunning
        }
        guard started, let range = line.range(of: "?token=") else {
            throw TestSupportError("tapio ui printed no URL: \(process.stdout) \(process.stderr)")
        }
        XCTAssertTrue(line.contains("http://127.0.0.1:\(port)/?token="), line)
        let ui = UIProcess(process: process, port: port, token: String(line[range.upperBound...].prefix { !$0.isWhitespace }))
        uis.append(ui)
        return ui
    }

    deinit {
        for ui in uis { ui.process.stop() }
        harness.server.shutdown()
        // The store and the browser's profile go; the pages and screenshots stay (their path was printed).
        for sub in ["data", "chromium-profile"] { try? FileManager.default.removeItem(atPath: dir + "/" + sub) }
        if !FileManager.default.fileExists(atPath: dir + "/ui-output") { try? FileManager.default.removeItem(atPath: dir) }
    }
}

struct UIProcess {
    let process: CLIProcess
    let port: Int
    let token: String

    /// The cookie the UI sets for its token.
    func cookie() throws -> String {
        let r = try HTTP.get(port: port, path: "/?token=\(token)")
        guard r.status == 303, let c = r.headers["set-cookie"]?.split(separator: ";").first else {
            throw TestSupportError("the token was not taken: \(r.status) \(r.headers)")
        }
        return String(c)
    }

    /// The page's URL with the token (the UI redirects and keeps it in a cookie).
    func url(_ path: String) -> String {
        let parts = path.split(separator: "#", maxSplits: 1)
        let page = String(parts.first ?? "/")
        return "http://127.0.0.1:\(port)\(page)\(page.contains("?") ? "&" : "?")token=\(token)" + (parts.count == 2 ? "#" + parts[1] : "")
    }
}

/// Debian's Chromium, headless, one run per page.
struct Browser {
    let binary: String
    let profile: String

    private func run(_ arguments: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
        try TestSupport.run(binary, ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                                     "--user-data-dir=\(profile)", "--virtual-time-budget=4000"] + arguments, timeout: 120)
    }

    /// The DOM after the page's script ran.
    func dom(_ url: String, saveTo path: String) throws -> String {
        let r = try run(["--dump-dom", url])
        guard r.status == 0, r.stdout.contains("<html") else {
            throw TestSupportError("chromium --dump-dom \(url) exited \(r.status): \(r.stderr.suffix(2000))")
        }
        try r.stdout.write(toFile: path, atomically: true, encoding: .utf8)
        return r.stdout
    }

    func screenshot(_ url: String, to path: String, size: String) throws {
        let r = try run(["--hide-scrollbars", "--force-device-scale-factor=0.8", "--window-size=\(size)", "--screenshot=\(path)", url])
        guard r.status == 0, FileManager.default.fileExists(atPath: path) else {
            throw TestSupportError("chromium --screenshot \(url) exited \(r.status): \(r.stderr.suffix(2000))")
        }
    }
}

/// An HTTP/1.1 GET with headers (TestSupport's); the status, headers (lower-cased names) and body.
enum HTTP {
    static func get(port: Int, path: String, headers: [String: String] = [:]) throws -> (status: Int, headers: [String: String], body: String) {
        try TestSupport.httpRequest(port: port, path: path, headers: headers)
    }
}

/// The lanes and events of a timeline SVG, read with an XML parser (so the
/// file is well-formed XML, as a ticket system's SVG viewer needs).
struct SVGLanes {
    var root = ""
    var nodes: [String] = []
    var events = 0

    init(_ text: String) throws {
        final class Delegate: NSObject, XMLParserDelegate {
            var root = ""
            var nodes: [String] = []
            var events = 0
            func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?, qualifiedName: String?, attributes: [String: String] = [:]) {
                if root.isEmpty { root = name }
                guard name == "g", let cls = attributes["class"]?.split(separator: " ") else { return }
                if cls.first == "lane", let node = attributes["data-node"] { nodes.append(node) }
                if cls.first == "event" { events += 1 }
            }
        }
        let parser = XMLParser(data: Data(text.utf8))
        let delegate = Delegate()
        parser.delegate = delegate
        guard parser.parse() else {
            throw TestSupportError("not well-formed XML: \(parser.parserError.map { "\($0)" } ?? "?") at line \(parser.lineNumber)")
        }
        root = delegate.root
        nodes = delegate.nodes
        events = delegate.events
    }
}
