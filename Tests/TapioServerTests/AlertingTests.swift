import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import Synchronization
import TapioAlerting
import TapioCorrelation
import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

/// Incident alerts (docs/alerts.md) from a real server whose engine opens and
/// resolves a real incident: a recorded lab run (the cascade: redis crashes)
/// fed to the running engine with its times moved to now. Alertmanager is
/// Debian's (`prometheus-alertmanager`), started here; the webhook receiver is
/// a small HTTP server in the test that checks the signature and fails the
/// first delivery.
final class AlertingTests: XCTestCase {
    private var dir = ""
    private var alertmanager: ChildProcess?

    override func tearDown() {
        alertmanager?.stop()
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    // MARK: - With a live incident

    func testAnIncidentIsAlertedInAlertmanagerWithItsCauseAndEndsWhenItResolves() throws {
        let port = try startAlertmanager()
        let harness = try ServerHarness { c in
            Self.quickEngine(&c)
            c.alerting.alertmanagers = [try! AlertTarget(url: "http://127.0.0.1:\(port)")]
            c.alerting.linkBase = "http://tapio.example/incidents/"
        }
        try Self.feedCascade(harness.server)

        var alert: JSONValue?
        XCTAssertTrue(eventually(timeout: 60) {
            alert = try? Self.alertmanagerAlerts(port: port).first { $0["labels"]?["alertname"]?.stringValue == "TapioIncident" }
            return alert != nil
        }, "no TapioIncident alert in Alertmanager; its log:\n\(alertmanager?.log.suffix(2000) ?? "")")
        let a = try XCTUnwrap(alert)
        let labels = try XCTUnwrap(a["labels"])
        let id = try XCTUnwrap(labels["incident_id"]?.stringValue)
        XCTAssertEqual(labels["root_cause_kind"]?.stringValue, "crash")
        XCTAssertEqual(labels["root_cause_entity"]?.stringValue, "redis")
        XCTAssertTrue(["critical", "warning"].contains(labels["severity"]?.stringValue ?? ""), "\(labels)")
        XCTAssertNotNil(labels["service"]?.stringValue, "the failing service is a label: \(labels)")
        let annotations = try XCTUnwrap(a["annotations"])
        XCTAssertEqual(annotations["link"]?.stringValue, "http://tapio.example/incidents/" + id)
        let confidence = try XCTUnwrap(annotations["confidence"]?.stringValue.flatMap(Double.init))
        XCTAssertGreaterThan(confidence, 0.5)
        XCTAssertFalse(annotations["summary"]?.stringValue?.isEmpty ?? true)
        XCTAssertEqual(a["status"]?["state"]?.stringValue, "active")
        // The server's own answer names the same incident.
        let stored = try XCTUnwrap(try harness.server.correlation.incidentJSON(id: id, explain: false))
        XCTAssertEqual(stored["root_causes"]?.arrayValue?.first?["entity"]?.stringValue, "redis")

        // No more events: the engine resolves the incident after its quiet
        // period, and the resolve (endsAt now) takes the alert out of
        // Alertmanager's active alerts long before the four-minute validity
        // of the last send would.
        XCTAssertTrue(eventually(timeout: 90) {
            (try? Self.alertmanagerAlerts(port: port).contains { $0["labels"]?["incident_id"]?.stringValue == id }) == false
        }, "the alert is still active in Alertmanager after the incident resolved")
        XCTAssertEqual(try harness.server.correlation.incidentJSON(id: id, explain: false)?["status"]?.stringValue, "resolved")
        // Alertmanager may apply the resolve before the notifier has read its
        // answer and counted the send.
        let endpoint = "receiver=\"alertmanager\",endpoint=\"127.0.0.1:\(port)\""
        var metrics = harness.server.metricsText()
        XCTAssertTrue(eventually(timeout: 10) {
            metrics = harness.server.metricsText()
            return (Self.value(metrics, "tapio_alerts_sent_total{\(endpoint)}") ?? 0) >= 2
        }, "the open and the resolve were both sent:\n\(metrics)")
        XCTAssertEqual(Self.value(metrics, "tapio_alerts_dropped_total{\(endpoint),reason=\"queue_full\"}"), 0, metrics)
    }

    func testTheWebhookGetsSignedNotificationsRetriedAfterAFailure() throws {
        let secret = Array("s3cret-for-the-test".utf8)
        let receiver = try WebhookReceiver { request, number in
            // The first delivery fails: the notifier must come back.
            number == 1 ? .internalServerError : .ok
        }
        defer { receiver.close() }
        let harness = try ServerHarness { c in
            Self.quickEngine(&c)
            c.alerting.webhook = try! AlertTarget(url: "http://127.0.0.1:\(receiver.port)/hooks/tapio")
            c.alerting.webhookSecret = secret
            c.alerting.linkBase = "http://tapio.example/incidents/"
            c.alerting.delivery.initialBackoff = .milliseconds(200)
        }
        try Self.feedCascade(harness.server)

        XCTAssertTrue(eventually(timeout: 90) { receiver.requests.contains { $0.event == "resolved" } },
                      "no resolved notification; got \(receiver.requests.map(\.event))")
        let requests = receiver.requests
        XCTAssertGreaterThanOrEqual(requests.count, 3, "opened (failed, then retried) and resolved")
        for r in requests {
            XCTAssertEqual(r.path, "/hooks/tapio")
            XCTAssertTrue(WebhookSignature.verify(secret: secret, signature: r.signature ?? "", timestamp: r.timestamp ?? "", body: r.body),
                          "signature \(r.signature ?? "none") does not verify")
            XCTAssertFalse(WebhookSignature.verify(secret: Array("another".utf8), signature: r.signature ?? "", timestamp: r.timestamp ?? "", body: r.body))
        }
        // The failed delivery came again: same delivery id, same body.
        XCTAssertEqual(requests[0].status, 500)
        XCTAssertEqual(requests[1].deliveryId, requests[0].deliveryId)
        XCTAssertEqual(requests[1].body, requests[0].body)
        XCTAssertEqual(requests[1].status, 200)

        let opened = try JSONValue.parse(requests[0].body)
        XCTAssertEqual(opened["version"]?.intValue, 1)
        XCTAssertEqual(opened["event"]?.stringValue, "opened")
        XCTAssertEqual(opened["status"]?.stringValue, "open")
        XCTAssertEqual(opened["root_cause"]?["entity"]?.stringValue, "redis")
        XCTAssertEqual(opened["root_cause"]?["kind"]?.stringValue, "crash")
        let id = try XCTUnwrap(opened["incident_id"]?.stringValue)
        XCTAssertEqual(opened["link"]?.stringValue, "http://tapio.example/incidents/" + id)
        XCTAssertEqual(opened["labels"]?["incident_id"]?.stringValue, id)
        XCTAssertEqual(opened["incident"]?["id"]?.stringValue, id)
        XCTAssertNil(opened["incident"]?["timeline"], "the incident is the incidents entry, without its timeline")
        XCTAssertEqual(opened["delivery_id"]?.stringValue, requests[0].deliveryId)

        let resolved = try JSONValue.parse(try XCTUnwrap(requests.last { $0.event == "resolved" }).body)
        XCTAssertEqual(resolved["incident_id"]?.stringValue, id)
        XCTAssertEqual(resolved["status"]?.stringValue, "resolved")
        XCTAssertNotNil(resolved["incident"]?["resolved_at"]?.stringValue)

        let metrics = harness.server.metricsText()
        let endpoint = "receiver=\"webhook\",endpoint=\"127.0.0.1:\(receiver.port)\""
        XCTAssertEqual(Self.value(metrics, "tapio_alerts_failed_total{\(endpoint)}"), 1, metrics)
        XCTAssertGreaterThanOrEqual(Self.value(metrics, "tapio_alerts_sent_total{\(endpoint)}") ?? 0, 2, metrics)
        for reason in AlertNotifier.dropReasons {
            XCTAssertEqual(Self.value(metrics, "tapio_alerts_dropped_total{\(endpoint),reason=\"\(reason)\"}"), 0, "\(reason)\n\(metrics)")
        }
    }

    // MARK: - The notifier alone

    func testEveryAlertCounterIsThereAtZeroBeforeAnyIncident() throws {
        let harness = try ServerHarness { c in
            c.alerting.alertmanagers = [try! AlertTarget(url: "http://127.0.0.1:1")]
            c.alerting.webhook = try! AlertTarget(url: "http://127.0.0.1:2/x")
        }
        let metrics = harness.server.metricsText()
        for receiver in ["receiver=\"alertmanager\",endpoint=\"127.0.0.1:1\"", "receiver=\"webhook\",endpoint=\"127.0.0.1:2\""] {
            XCTAssertEqual(Self.value(metrics, "tapio_alerts_sent_total{\(receiver)}"), 0, metrics)
            XCTAssertEqual(Self.value(metrics, "tapio_alerts_failed_total{\(receiver)}"), 0, metrics)
            for reason in AlertNotifier.dropReasons {
                XCTAssertEqual(Self.value(metrics, "tapio_alerts_dropped_total{\(receiver),reason=\"\(reason)\"}"), 0, metrics)
            }
        }
        XCTAssertTrue(metrics.contains("# HELP tapio_alerts_dropped_total "), metrics)
        XCTAssertTrue(metrics.contains("# TYPE tapio_alerts_sent_total counter"), metrics)
    }

    func testTheAlertSeriesPassPromtool() throws {
        guard let promtool = ["/usr/bin/promtool", "/usr/local/bin/promtool"].first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            let why = "promtool is not installed (Debian package prometheus; make deps installs it)"
            if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
            throw XCTSkip(why)
        }
        let harness = try ServerHarness { c in
            c.alerting.alertmanagers = [try! AlertTarget(url: "http://127.0.0.1:1"), try! AlertTarget(url: "http://[::1]:2/prefix")]
            c.alerting.webhook = try! AlertTarget(url: "https://hooks.example/tapio")
        }
        let file = harness.dir + "/metrics.txt"
        try harness.server.metricsText().write(toFile: file, atomically: true, encoding: .utf8)
        XCTAssertTrue(try String(contentsOfFile: file, encoding: .utf8).contains("endpoint=\"[::1]:2\""))
        let check = try TestSupport.run("/bin/sh", ["-c", "\(promtool) check metrics < \(file)"])
        XCTAssertEqual(check.status, 0, check.stdout + check.stderr)
    }

    func testAResolvedAlertPostedByTheNotifierEndsInAlertmanager() throws {
        let port = try startAlertmanager()
        var config = AlertingConfiguration()
        // Given with the API's path: used as it is.
        config.alertmanagers = [try AlertTarget(url: "http://127.0.0.1:\(port)/api/v2/alerts")]
        // No periodic re-send during the test: exactly the two notifications are sent.
        config.resendInterval = .seconds(600)
        let counters = Counters()
        let notifier = try AlertNotifier(configuration: config, logger: Logger(label: "test")) { counters.add($0, $1) }
        defer { notifier.shutdown() }
        notifier.start(restoring: [])
        let opened = Self.incident(id: "inc-direct", status: "open", confidence: 0.93)
        notifier.incidentsChanged([opened])
        XCTAssertTrue(eventually(timeout: 30) {
            (try? Self.alertmanagerAlerts(port: port).contains { $0["labels"]?["incident_id"]?.stringValue == "inc-direct" }) == true
        })
        let alert = try XCTUnwrap(try Self.alertmanagerAlerts(port: port).first { $0["labels"]?["incident_id"]?.stringValue == "inc-direct" })
        XCTAssertEqual(alert["labels"]?["namespace"]?.stringValue, "shop")
        XCTAssertEqual(alert["labels"]?["service"]?.stringValue, "api")
        XCTAssertEqual(alert["labels"]?["severity"]?.stringValue, "critical")
        XCTAssertEqual(alert["annotations"]?["confidence"]?.stringValue, "0.93")
        XCTAssertNil(alert["annotations"]?["link"], "no --alert-link-base, no link")

        notifier.incidentsChanged([Self.incident(id: "inc-direct", status: "resolved", confidence: 0.93)])
        XCTAssertTrue(eventually(timeout: 30) {
            (try? Self.alertmanagerAlerts(port: port).contains { $0["labels"]?["incident_id"]?.stringValue == "inc-direct" }) == false
        }, "the resolved alert is still active")
        // Alertmanager may apply the resolve before the notifier has read its
        // answer and counted the send.
        let sent = "tapio_alerts_sent_total{receiver=\"alertmanager\",endpoint=\"127.0.0.1:\(port)\"}"
        XCTAssertTrue(eventually(timeout: 10) { counters.value(sent) == 2 }, "sent: \(String(describing: counters.value(sent)))")
    }

    func testNotificationsThatCannotBeDeliveredAreCountedAsDropped() throws {
        var config = AlertingConfiguration()
        // Nothing listens on a port that was free a moment ago.
        let port = TestSupport.freePort()
        config.webhook = try AlertTarget(url: "http://127.0.0.1:\(port)/")
        config.delivery.maxAttempts = 2
        config.delivery.initialBackoff = .milliseconds(10)
        config.delivery.queueCapacity = 2
        let counters = Counters()
        let notifier = try AlertNotifier(configuration: config, logger: Logger(label: "test")) { counters.add($0, $1) }
        notifier.start(restoring: [])
        // Five incidents open at once: two fit the queue, three are dropped.
        notifier.incidentsChanged((1...5).map { Self.incident(id: "inc-\($0)", status: "open", confidence: 0.9) })
        let series = "{receiver=\"webhook\",endpoint=\"127.0.0.1:\(port)\""
        XCTAssertTrue(eventually(timeout: 30) { counters.value("tapio_alerts_dropped_total\(series),reason=\"retries_exhausted\"}") == 2 },
                      "\(counters.all())")
        notifier.shutdown()
        XCTAssertEqual(counters.value("tapio_alerts_dropped_total\(series),reason=\"queue_full\"}"), 3)
        XCTAssertEqual(counters.value("tapio_alerts_failed_total\(series)}"), 4, "two attempts each")
        XCTAssertEqual(counters.value("tapio_alerts_sent_total\(series)}"), 0)
    }

    func testAnHTTPSWebhookIsVerifiedAgainstTheGivenCAAndRefusedWithoutIt() throws {
        dir = try TestSupport.temporaryDirectory("tapio-alert-tls")
        let pki = try TestSupport.makePKI(in: dir, nodes: ["n"])
        let tls = try NIOSSLContext(configuration: .makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(pki + "/server/tls.crt").map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(try Data(contentsOf: URL(fileURLWithPath: pki + "/server/tls.key"))), format: .pem))))
        let receiver = try WebhookReceiver(tls: tls) { _, _ in .ok }
        defer { receiver.close() }
        func send(trusting ca: String?) throws -> Counters {
            var config = AlertingConfiguration()
            config.webhook = try AlertTarget(url: "https://localhost:\(receiver.port)/tls")
            config.trustRootsFile = ca
            config.delivery.maxAttempts = 1
            let counters = Counters()
            let notifier = try AlertNotifier(configuration: config, logger: Logger(label: "test")) { counters.add($0, $1) }
            notifier.start(restoring: [])
            notifier.incidentsChanged([Self.incident(id: "inc-tls", status: "open", confidence: 0.9)])
            let series = "{receiver=\"webhook\",endpoint=\"localhost:\(receiver.port)\"}"
            XCTAssertTrue(eventually(timeout: 30) { (counters.value("tapio_alerts_sent_total\(series)") ?? 0) + (counters.value("tapio_alerts_failed_total\(series)") ?? 0) > 0 })
            notifier.shutdown()
            return counters
        }
        let trusted = try send(trusting: pki + "/server/ca.crt")
        XCTAssertEqual(trusted.value("tapio_alerts_sent_total{receiver=\"webhook\",endpoint=\"localhost:\(receiver.port)\"}"), 1)
        XCTAssertEqual(receiver.requests.map(\.path), ["/tls"])
        // The development CA is in no system trust store: the handshake fails.
        let untrusted = try send(trusting: nil)
        XCTAssertEqual(untrusted.value("tapio_alerts_failed_total{receiver=\"webhook\",endpoint=\"localhost:\(receiver.port)\"}"), 1)
        XCTAssertEqual(untrusted.value("tapio_alerts_dropped_total{receiver=\"webhook\",endpoint=\"localhost:\(receiver.port)\",reason=\"retries_exhausted\"}"), 1)
        XCTAssertEqual(receiver.requests.count, 1, "nothing reached the receiver over an unverified connection")
    }

    // MARK: - The rule and the signature

    func testOnlyIncidentsThatPageAndReachTheFloorAreAnnouncedAndAnnouncedOnesAlwaysResolve() throws {
        var tracker = AlertTracker(minimumConfidence: 0.6)
        func alert(_ id: String, _ status: String, _ confidence: Double, pages: Bool? = nil, cause: String = "redis", merged: [String] = []) throws -> IncidentAlert {
            try IncidentAlert(json: Self.incident(id: id, status: status, confidence: confidence, pages: pages, cause: cause, merged: merged))
        }
        XCTAssertEqual(tracker.observe([try alert("a", "open", 0.5)]).map(\.event), [], "below the floor")
        XCTAssertEqual(tracker.observe([try alert("b", "open", 0.9, pages: false)]).map(\.event), [], "pages: false")
        XCTAssertEqual(tracker.observe([try alert("c", "open", 0.9)]).map(\.event), [.opened], "no pages field: pages")
        XCTAssertEqual(tracker.observe([try alert("a", "open", 0.7)]).map(\.event), [.opened], "reached the floor")
        XCTAssertEqual(tracker.observe([try alert("c", "open", 0.92)]).map(\.event), [], "a small move is not news")
        let lower = tracker.observe([try alert("c", "open", 0.5)])
        XCTAssertEqual(lower.map(\.event), [.updated], "announced: stays, updated")
        XCTAssertEqual(lower.first?.alert.labels["severity"], "critical", "the derived severity stays what was announced")
        let changed = tracker.observe([try alert("c", "open", 0.5, cause: "api")])
        XCTAssertEqual(changed.map(\.event), [.updated])
        XCTAssertEqual(changed.first?.previous?.labels["root_cause_entity"], "redis")
        XCTAssertEqual(tracker.observe([try alert("b", "resolved", 0.9, pages: false)]).map(\.event), [], "never announced")
        let merged = tracker.observe([try alert("a", "open", 0.7, merged: ["c"])])
        XCTAssertEqual(merged.map(\.event), [.resolved])
        XCTAssertEqual(merged.first?.alert.id, "c")
        XCTAssertEqual(merged.first?.mergedInto, "a")
        XCTAssertEqual(tracker.observe([try alert("a", "resolved", 0.7)]).map(\.event), [.resolved])
        XCTAssertTrue(tracker.firing.isEmpty)

        var restored = AlertTracker(minimumConfidence: 0)
        restored.restore([try alert("r", "open", 0.9)])
        XCTAssertEqual(restored.observe([try alert("r", "open", 0.9)]).map(\.event), [], "announced by the previous run")
        XCTAssertEqual(restored.observe([try alert("r", "resolved", 0.9)]).map(\.event), [.resolved])
    }

    func testTheSignatureIsHMACSHA256OfTheTimestampAndTheBody() throws {
        // RFC 4231, test case 2.
        XCTAssertEqual(WebhookSignature.hmacSHA256(key: Array("Jefe".utf8), data: Array("what do ya want for nothing?".utf8)).map { String(format: "%02x", $0) }.joined(),
                       "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
        let body = Array(#"{"event":"opened"}"#.utf8)
        let signature = WebhookSignature.sign(secret: Array("k".utf8), timestamp: 1_800_000_000, body: body)
        let expected = WebhookSignature.hmacSHA256(key: Array("k".utf8), data: Array("1800000000.".utf8) + body).map { String(format: "%02x", $0) }.joined()
        XCTAssertEqual(signature, "sha256=" + expected)
        XCTAssertTrue(WebhookSignature.verify(secret: Array("k".utf8), signature: signature, timestamp: "1800000000", body: body, now: 1_800_000_100))
        XCTAssertFalse(WebhookSignature.verify(secret: Array("k".utf8), signature: signature, timestamp: "1800000000", body: body, now: 1_800_001_000), "too old: a replay")
        XCTAssertFalse(WebhookSignature.verify(secret: Array("k".utf8), signature: signature, timestamp: "1800000000", body: body + [32], now: 1_800_000_000))

        let file = try TestSupport.temporaryDirectory("tapio-secret") + "/secret"
        try "  key with spaces\n\n".write(toFile: file, atomically: true, encoding: .utf8)
        XCTAssertEqual(try WebhookSignature.readSecret(path: file), Array("  key with spaces".utf8))
        try "\n".write(toFile: file, atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try WebhookSignature.readSecret(path: file))
    }

    func testReceiverURLsAreCheckedWhenTheServerStarts() throws {
        XCTAssertEqual(try AlertTarget(url: "http://alertmanager:9093").description, "http://alertmanager:9093/")
        XCTAssertEqual(try AlertTarget(url: "https://hooks.example/tapio?team=db").path, "/tapio?team=db")
        XCTAssertEqual(try AlertTarget(url: "https://hooks.example/").port, 443)
        XCTAssertEqual(try AlertTarget(url: "http://[::1]:8080/x").authority, "[::1]:8080")
        for bad in ["alertmanager:9093", "ftp://x/", "http://", "http://user:pw@host/", "http://host:70000/"] {
            XCTAssertThrowsError(try AlertTarget(url: bad), bad)
        }
    }

    // MARK: - Helpers

    /// Short quiet period, so the fed incident resolves soon after the feed ends.
    static func quickEngine(_ c: inout ServerConfiguration) {
        c.correlation.engine.quietPeriodNs = 5_000_000_000
    }

    /// The cascade recording (redis crashes; api and frontend fail) up to
    /// 20 s after its fault, moved so that its last event is now, handed to
    /// the running engine as ingest would.
    static func feedCascade(_ server: TapioServer) throws {
        let runs = try FileManager.default.contentsOfDirectory(atPath: RecordedRunTests.directory)
            .filter { $0.hasPrefix("cascade-") && $0.hasSuffix(".json") }.sorted()
        guard let name = runs.first else { throw TestSupportError("no cascade recording in \(RecordedRunTests.directory)") }
        let run = try RecordedRun.load(RecordedRunTests.directory + "/" + name)
        let fault = try XCTUnwrap(run.faultNs)
        let end = fault + 20_000_000_000
        let delta = wallClockNs() - end
        let events = run.log.events.filter { $0.timeNs <= end }.map { e -> ObservedEvent in
            var event = e.event
            event.timeNs += delta
            return ObservedEvent(node: e.node, timeNs: e.timeNs + delta, errorNs: e.errorNs, event: event)
        }
        XCTAssertGreaterThan(events.count, 500)
        for (node, pods) in run.log.inventory { server.correlation.updateInventory(node: node, pods: pods) }
        _ = server.correlation.submit(events) {}
    }

    /// Starts Debian's Alertmanager on a free port with a receiver that sends
    /// nowhere; skips without it (fails under TAPIO_REQUIRE_BPF=1, as CI runs).
    func startAlertmanager() throws -> Int {
        let binary = "/usr/bin/prometheus-alertmanager"
        guard FileManager.default.isExecutableFile(atPath: binary) else {
            let why = "\(binary) is missing (Debian package prometheus-alertmanager; make deps installs it)"
            if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
            throw XCTSkip(why)
        }
        dir = try TestSupport.temporaryDirectory("tapio-alertmanager")
        let config = dir + "/alertmanager.yml"
        try "route:\n  receiver: nowhere\nreceivers:\n  - name: nowhere\n".write(toFile: config, atomically: true, encoding: .utf8)
        let port = TestSupport.freePort()
        alertmanager = try ChildProcess(binary, [
            "--config.file=\(config)", "--storage.path=\(dir)/data", "--web.listen-address=127.0.0.1:\(port)", "--cluster.listen-address=",
        ], logPath: dir + "/alertmanager.log")
        let ready = eventually(timeout: 30) { (try? TestSupport.httpGet(port: port, path: "/-/ready"))?.status == 200 }
        guard ready else { throw TestSupportError("Alertmanager did not become ready: \(alertmanager?.log.suffix(2000) ?? "")") }
        return port
    }

    /// `GET /api/v2/alerts`: the active alerts.
    static func alertmanagerAlerts(port: Int) throws -> [JSONValue] {
        let r = try TestSupport.httpGet(port: port, path: "/api/v2/alerts")
        guard r.status == 200 else { throw TestSupportError("GET /api/v2/alerts: \(r.status) \(r.body)") }
        return try JSONValue.parse(Array(r.body.utf8)).arrayValue ?? []
    }

    /// An incident's JSON in the stored shape, with what alerts read.
    static func incident(id: String, status: String, confidence: Double, pages: Bool? = nil, cause: String = "redis", merged: [String] = []) -> JSONValue {
        var o: [String: JSONValue] = [
            "id": .string(id), "status": .string(status), "title": .string("\(cause) crashed: api failing"),
            "opened_at": .string("2026-12-01T10:00:00.000000000Z"),
            "resolved_at": status == "resolved" ? .string("2026-12-01T10:05:00.000000000Z") : .null,
            "namespace": .string("shop"),
            "affected": .object(["services": .array([.string("api"), .string(cause)]), "nodes": .array([]), "pods": .array([])]),
            "symptoms": .array([.object(["entity": .string("api"), "kind": .string("connect_refused")])]),
            "root_causes": .array([.object(["entity": .string(cause), "kind": .string("crash"), "confidence": .double(confidence)])]),
            "merged_ids": .array(merged.map { .string($0) }),
            "timeline": .array([]),
        ]
        if let pages { o["pages"] = .bool(pages) }
        return .object(o)
    }

    /// The value of one series in Prometheus text, nil when absent.
    static func value(_ text: String, _ series: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1))
        }
        return nil
    }
}

/// Counters as the server keeps them, for the notifier alone.
final class Counters: Sendable {
    private let values = Mutex<[String: Int64]>([:])
    func add(_ name: String, _ v: Int64) { values.withLock { $0[name, default: 0] += v } }
    func value(_ name: String) -> Int64? { values.withLock { $0[name] } }
    func all() -> [String: Int64] { values.withLock { $0 } }
}

/// A webhook receiver: an HTTP/1.1 server on 127.0.0.1 that records every
/// request and answers the status `respond` picks (given the request and its
/// number, from 1).
final class WebhookReceiver: Sendable {
    struct Request: Sendable {
        var path: String
        var body: [UInt8]
        var signature: String?
        var timestamp: String?
        var deliveryId: String?
        var event: String?
        var status: Int
    }

    let port: Int
    private let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    private let channel: Channel
    private final class Log: Sendable {
        let requests = Mutex<[Request]>([])
    }
    private let received = Log()

    var requests: [Request] { received.requests.withLock { $0 } }

    /// - Parameter tls: serve https with this context.
    init(tls: NIOSSLContext? = nil, respond: @escaping @Sendable (Request, Int) -> HTTPResponseStatus) throws {
        let received = self.received
        channel = try ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(Handler { request in
                        received.requests.withLock { all in
                            var r = request
                            r.status = Int(respond(request, all.count + 1).code)
                            all.append(r)
                            return HTTPResponseStatus(statusCode: r.status)
                        }
                    })
                }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        port = channel.localAddress!.port!
    }

    func close() {
        try? channel.close().wait()
        try? group.syncShutdownGracefully()
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let handle: (Request) -> HTTPResponseStatus
        var head: HTTPRequestHead?
        var body: [UInt8] = []

        init(handle: @escaping (Request) -> HTTPResponseStatus) { self.handle = handle }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let h):
                head = h
                body = []
            case .body(var b):
                body += b.readBytes(length: b.readableBytes) ?? []
            case .end:
                guard let h = head else { return }
                let status = handle(Request(path: h.uri, body: body, signature: h.headers.first(name: WebhookSignature.signatureHeader),
                                            timestamp: h.headers.first(name: WebhookSignature.timestampHeader),
                                            deliveryId: h.headers.first(name: WebhookSignature.deliveryHeader),
                                            event: h.headers.first(name: WebhookSignature.eventHeader), status: 0))
                var headers = HTTPHeaders()
                headers.add(name: "Content-Length", value: "0")
                headers.add(name: "Connection", value: "close")
                context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers))), promise: nil)
                let bound = NIOLoopBound(context, eventLoop: context.eventLoop)
                context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in bound.value.close(promise: nil) }
            }
        }
    }
}
