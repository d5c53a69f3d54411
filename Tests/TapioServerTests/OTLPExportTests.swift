import Foundation
import Logging
import NIOSSL
@testable import TapioAlerting
import TapioServer
import TapioTestSupport
import TapioWire
import XCTest

/// Incidents exported as OpenTelemetry logs over OTLP/HTTP (docs/alerts.md,
/// "OTLP"). The decoding side is independent of ours: protoc and Python's
/// protobuf, from a minimal .proto written here with opentelemetry-proto's
/// field numbers. The live test runs a real server whose engine opens and
/// resolves an incident from a recorded lab run (as AlertingTests does) and
/// a Python OTLP/HTTP receiver that parses every request as an
/// `ExportLogsServiceRequest`.
final class OTLPExportTests: XCTestCase {
    private var dir = ""
    private var receiver: ChildProcess?

    override func tearDown() {
        receiver?.stop()
        if !dir.isEmpty { try? FileManager.default.removeItem(atPath: dir) }
    }

    // MARK: - A live incident to a receiver that decodes OTLP

    func testAnIncidentReachesAnOTLPReceiverAsLogRecordsThatDecodeWithTheCauseAndTheResolve() throws {
        let (port, log) = try startReceiver(failFirst: true)
        let harness = try ServerHarness { c in
            AlertingTests.quickEngine(&c)
            // A path prefix is kept; the signal's path is added to it.
            c.alerting.otlp = try! AlertTarget(url: "http://127.0.0.1:\(port)/otel")
            c.alerting.linkBase = "http://tapio.example/incidents/"
            c.alerting.delivery.initialBackoff = .milliseconds(200)
        }
        try AlertingTests.feedCascade(harness.server)

        var requests: [JSONValue] = []
        XCTAssertTrue(eventually(timeout: 90) {
            requests = Self.lines(log)
            return requests.contains { $0["status"]?.intValue == 200 && Self.records($0).contains { Self.attributes($0)["tapio.incident.event"] == .string("resolved") } }
        }, "no resolved record; received: \(requests.map { $0.serialized() })\nreceiver log: \(receiver?.log.suffix(2000) ?? "")")
        XCTAssertGreaterThanOrEqual(requests.count, 3, "opened (refused with 503, then again) and resolved")
        for r in requests {
            XCTAssertEqual(r["path"]?.stringValue, "/otel/v1/logs")
            XCTAssertEqual(r["content_type"]?.stringValue, "application/x-protobuf")
            XCTAssertNil(r["error"], "the receiver could not parse a request: \(r.serialized())")
            let resourceLogs = try XCTUnwrap(r["request"]?["resource_logs"]?.arrayValue)
            XCTAssertEqual(resourceLogs.count, 1)
            let resource = Self.attributes(try XCTUnwrap(resourceLogs.first?["resource"]))
            XCTAssertEqual(resource["service.name"], .string("tapio-server"))
            XCTAssertEqual(resource["service.version"], .string(TapioVersion.current))
            XCTAssertNotNil(resource["host.name"]?.stringValue)
            XCTAssertEqual(resourceLogs.first?["scope_logs"]?.arrayValue?.first?["scope"]?["name"]?.stringValue, "tapio")
            XCTAssertEqual(Self.records(r).count, 1, "one record per notification")
        }
        // The refused request came again, the same bytes.
        XCTAssertEqual(requests[0]["status"]?.intValue, 503)
        XCTAssertEqual(requests[1]["status"]?.intValue, 200)
        XCTAssertEqual(requests[1]["sha256"], requests[0]["sha256"])

        let opened = try XCTUnwrap(Self.records(requests[0]).first)
        let a = Self.attributes(opened)
        XCTAssertEqual(a["tapio.incident.event"], .string("opened"))
        XCTAssertEqual(a["tapio.incident.status"], .string("open"))
        XCTAssertEqual(a["tapio.root_cause.kind"], .string("crash"))
        XCTAssertEqual(a["tapio.root_cause.entity"], .string("redis"))
        let confidence = try XCTUnwrap(a["tapio.root_cause.confidence"].flatMap(number))
        XCTAssertGreaterThan(confidence, 0.5)
        XCTAssertLessThanOrEqual(confidence, 1)
        let id = try XCTUnwrap(a["tapio.incident.id"]?.stringValue)
        XCTAssertTrue(id.hasPrefix("inc-"), id)
        XCTAssertEqual(a["tapio.incident.link"], .string("http://tapio.example/incidents/" + id))
        XCTAssertEqual(a["tapio.incident.pages"], .bool(true), "an incident is announced only when it pages")
        XCTAssertNotNil(a["tapio.incident.service"]?.stringValue, "the failing service")
        let affected = try XCTUnwrap(a["tapio.incident.affected_services"]?.arrayValue)
        XCTAssertFalse(affected.isEmpty)
        XCTAssertTrue(["SEVERITY_NUMBER_ERROR", "SEVERITY_NUMBER_WARN"].contains(opened["severity_number"]?.stringValue ?? ""), "\(opened.serialized())")
        XCTAssertTrue(opened["body"]?["string_value"]?.stringValue?.contains("Root cause: crash of redis") ?? false, "\(opened.serialized())")
        // Times in ns since the epoch: the incident opened before it was told,
        // and both within the last few minutes.
        let time = try XCTUnwrap(opened["time_unix_nano"].flatMap(Self.integer))
        let observed = try XCTUnwrap(opened["observed_time_unix_nano"].flatMap(Self.integer))
        XCTAssertLessThanOrEqual(time, observed)
        XCTAssertLessThan(abs(wallClockNs() - observed), 300_000_000_000)
        XCTAssertEqual(a["tapio.incident.opened_at"].flatMap(Self.integer), time)

        // The server's own answer names the same incident and cause.
        let stored = try XCTUnwrap(try harness.server.correlation.incidentJSON(id: id, explain: false))
        XCTAssertEqual(stored["root_causes"]?.arrayValue?.first?["entity"]?.stringValue, "redis")

        let resolvedRequest = try XCTUnwrap(requests.last { Self.records($0).contains { Self.attributes($0)["tapio.incident.event"] == .string("resolved") } })
        let resolved = try XCTUnwrap(Self.records(resolvedRequest).first)
        let r = Self.attributes(resolved)
        XCTAssertEqual(r["tapio.incident.id"], .string(id))
        XCTAssertEqual(r["tapio.incident.status"], .string("resolved"))
        XCTAssertEqual(resolved["severity_number"]?.stringValue, "SEVERITY_NUMBER_INFO")
        XCTAssertEqual(resolved["severity_text"]?.stringValue, "INFO")
        let resolvedAt = try XCTUnwrap(r["tapio.incident.resolved_at"].flatMap(Self.integer))
        XCTAssertEqual(resolved["time_unix_nano"].flatMap(Self.integer), resolvedAt)
        XCTAssertGreaterThan(resolvedAt, time)

        let metrics = harness.server.metricsText()
        let endpoint = "receiver=\"otlp\",endpoint=\"127.0.0.1:\(port)\""
        XCTAssertEqual(AlertingTests.value(metrics, "tapio_alerts_failed_total{\(endpoint)}"), 1, metrics)
        XCTAssertGreaterThanOrEqual(AlertingTests.value(metrics, "tapio_alerts_sent_total{\(endpoint)}") ?? 0, 2, metrics)
        for reason in AlertNotifier.dropReasons {
            XCTAssertEqual(AlertingTests.value(metrics, "tapio_alerts_dropped_total{\(endpoint),reason=\"\(reason)\"}"), 0, "\(reason)\n\(metrics)")
        }
    }

    func testAnHTTPSEndpointIsVerifiedAgainstTheAlertCA() throws {
        dir = try TestSupport.temporaryDirectory("tapio-otlp-tls")
        let pki = try TestSupport.makePKI(in: dir, nodes: ["n"])
        let tls = try NIOSSLContext(configuration: .makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(pki + "/server/tls.crt").map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(bytes: Array(try Data(contentsOf: URL(fileURLWithPath: pki + "/server/tls.key"))), format: .pem))))
        let collector = try WebhookReceiver(tls: tls) { _, _ in .ok }
        defer { collector.close() }
        var config = AlertingConfiguration()
        // Given with the signal's path: used as it is.
        config.otlp = try AlertTarget(url: "https://localhost:\(collector.port)/v1/logs")
        config.trustRootsFile = pki + "/server/ca.crt"
        config.delivery.maxAttempts = 1
        let counters = Counters()
        let notifier = try AlertNotifier(configuration: config, logger: Logger(label: "test")) { counters.add($0, $1) }
        notifier.start(restoring: [])
        notifier.incidentsChanged([AlertingTests.incident(id: "inc-tls", status: "open", confidence: 0.9)])
        let sent = "tapio_alerts_sent_total{receiver=\"otlp\",endpoint=\"localhost:\(collector.port)\"}"
        XCTAssertTrue(eventually(timeout: 30) { counters.value(sent) == 1 }, "\(counters.all())")
        notifier.shutdown()
        XCTAssertEqual(collector.requests.map(\.path), ["/v1/logs"])
        XCTAssertGreaterThan(collector.requests.first?.body.count ?? 0, 100)
    }

    // MARK: - The encoder

    func testOneRecordDecodedByProtocSaysWhatTheIncidentSays() throws {
        let protoc = try Self.tool("/usr/bin/protoc", package: "protobuf-compiler")
        dir = try TestSupport.temporaryDirectory("tapio-otlp")
        try Self.proto.write(toFile: dir + "/otlp.proto", atomically: true, encoding: .utf8)
        let incident = try IncidentAlert(json: AlertingTests.incident(id: "inc-otlp", status: "open", confidence: 0.93))
        let previous = try IncidentAlert(json: AlertingTests.incident(id: "inc-otlp", status: "open", confidence: 0.6, cause: "api"))
        let notice = AlertTracker.Notice(event: .updated, alert: incident, previous: previous)
        let now: Int64 = 1_796_119_500_123_456_789
        let bytes = OTLPLogs.exportRequest(notice, nowNs: now, linkBase: "https://tapio.example/incidents/",
                                           resource: .init(hostName: "server-0"))
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/request.bin"))
        let r = try TestSupport.run("/bin/sh", ["-c", "\(protoc) --proto_path=\(dir) --decode=otlp.ExportLogsServiceRequest \(dir)/otlp.proto < \(dir)/request.bin"])
        XCTAssertEqual(r.status, 0, r.stderr)
        let text = r.stdout
        // Fields protoc does not know by name would print as numbers.
        let unknown = text.split(separator: "\n").filter { $0.trimmingCharacters(in: .whitespaces).first?.isNumber ?? false }
        XCTAssertEqual(unknown, [], text)
        // Compared with every run of blanks and newlines made one space.
        let flat = Self.flatten(text)
        for expected in [
            #"key: "service.name" value { string_value: "tapio-server" }"#,
            #"key: "host.name" value { string_value: "server-0" }"#,
            #"scope { name: "tapio" version: "\#(TapioVersion.current)" }"#,
            // An update's record is timed when it is told.
            "time_unix_nano: \(now) severity_number: SEVERITY_NUMBER_ERROR severity_text: \"ERROR\"",
            "observed_time_unix_nano: \(now)",
            #"body { string_value: "Incident inc-otlp updated: redis crashed: api failing. Root cause: crash of redis (confidence 0.93)." }"#,
            #"key: "tapio.incident.id" value { string_value: "inc-otlp" }"#,
            #"key: "tapio.incident.event" value { string_value: "updated" }"#,
            #"key: "tapio.incident.status" value { string_value: "open" }"#,
            #"key: "tapio.incident.severity" value { string_value: "critical" }"#,
            #"key: "tapio.incident.pages" value { bool_value: true }"#,
            #"key: "tapio.root_cause.kind" value { string_value: "crash" }"#,
            #"key: "tapio.root_cause.entity" value { string_value: "redis" }"#,
            #"key: "tapio.root_cause.confidence" value { double_value: 0.93 }"#,
            #"key: "tapio.incident.service" value { string_value: "api" }"#,
            #"key: "tapio.incident.namespace" value { string_value: "shop" }"#,
            #"key: "tapio.incident.affected_services" value { array_value { values { string_value: "api" } values { string_value: "redis" } } }"#,
            #"key: "tapio.incident.opened_at" value { int_value: 1796119200000000000 }"#,
            #"key: "tapio.incident.link" value { string_value: "https://tapio.example/incidents/inc-otlp" }"#,
            #"key: "tapio.previous_root_cause.entity" value { string_value: "api" }"#,
            #"key: "tapio.previous_root_cause.confidence" value { double_value: 0.6 }"#,
        ] {
            XCTAssertTrue(flat.contains(expected), "missing:\n\(expected)\nin:\n\(text)")
        }
        XCTAssertFalse(text.contains("tapio.incident.resolved_at"), "an open incident has no resolve time")
    }

    func testTheWriterEncodesVarintsFixed64AndLengthsAsProtobufDoes() {
        var w = ProtobufWriter()
        w.varint(1, 150)
        XCTAssertEqual(w.bytes, [0x08, 0x96, 0x01], "the protobuf documentation's example")
        w = ProtobufWriter()
        w.varint(3, UInt64(bitPattern: -1))
        XCTAssertEqual(w.bytes, [0x18] + [UInt8](repeating: 0xff, count: 9) + [0x01], "a negative int64 takes ten bytes")
        w = ProtobufWriter()
        w.fixed64(1, 0x0102_0304_0506_0708)
        XCTAssertEqual(w.bytes, [0x09, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01], "little-endian")
        w = ProtobufWriter()
        w.string(2, "testing")
        XCTAssertEqual(w.bytes, [0x12, 0x07] + Array("testing".utf8))
        w = ProtobufWriter()
        w.message(16) { $0.string(1, String(repeating: "x", count: 200)) }
        XCTAssertEqual(Array(w.bytes.prefix(5)), [0x82, 0x01, 0xcb, 0x01, 0x0a], "field 16's tag and a two-byte length")
    }

    func testOTLPRetriesOnlyWhatItsSpecificationCallsRetryable() throws {
        let otlp = Receiver(kind: .otlp, target: try AlertTarget(url: "http://collector:4318/v1/logs"))
        XCTAssertEqual([400, 401, 404, 413, 429, 500, 502, 503, 504].filter(otlp.retries(status:)), [429, 502, 503, 504])
        let webhook = Receiver(kind: .webhook, target: try AlertTarget(url: "http://hooks/"))
        XCTAssertEqual([400, 401, 404, 408, 429, 500, 502, 503, 504].filter(webhook.retries(status:)), [408, 429, 500, 502, 503, 504])
    }

    func testEveryOTLPSeriesIsThereAtZeroBeforeAnyIncident() throws {
        let counters = Counters()
        var config = AlertingConfiguration()
        config.otlp = try AlertTarget(url: "http://127.0.0.1:1")
        XCTAssertTrue(config.isEnabled)
        let notifier = try AlertNotifier(configuration: config, logger: Logger(label: "test")) { counters.add($0, $1) }
        notifier.shutdown()
        let series = "{receiver=\"otlp\",endpoint=\"127.0.0.1:1\""
        XCTAssertEqual(counters.value("tapio_alerts_sent_total\(series)}"), 0)
        XCTAssertEqual(counters.value("tapio_alerts_failed_total\(series)}"), 0)
        for reason in AlertNotifier.dropReasons {
            XCTAssertEqual(counters.value("tapio_alerts_dropped_total\(series),reason=\"\(reason)\"}"), 0, reason)
        }
    }

    // MARK: - Helpers

    /// The minimal OTLP logs schema the receivers decode with: Tapio's own,
    /// with opentelemetry-proto's message shapes and field numbers
    /// (collector/logs/v1/logs_service.proto, logs/v1/logs.proto,
    /// common/v1/common.proto, resource/v1/resource.proto) in one package.
    static let proto = """
        syntax = "proto3";
        package otlp;

        message ExportLogsServiceRequest { repeated ResourceLogs resource_logs = 1; }
        message ExportLogsServiceResponse { ExportLogsPartialSuccess partial_success = 1; }
        message ExportLogsPartialSuccess { int64 rejected_log_records = 1; string error_message = 2; }

        message ResourceLogs { Resource resource = 1; repeated ScopeLogs scope_logs = 2; string schema_url = 3; }
        message Resource { repeated KeyValue attributes = 1; uint32 dropped_attributes_count = 2; }
        message ScopeLogs { InstrumentationScope scope = 1; repeated LogRecord log_records = 2; string schema_url = 3; }
        message InstrumentationScope { string name = 1; string version = 2; repeated KeyValue attributes = 3; uint32 dropped_attributes_count = 4; }

        enum SeverityNumber {
          SEVERITY_NUMBER_UNSPECIFIED = 0;
          SEVERITY_NUMBER_DEBUG = 5;
          SEVERITY_NUMBER_INFO = 9;
          SEVERITY_NUMBER_WARN = 13;
          SEVERITY_NUMBER_ERROR = 17;
          SEVERITY_NUMBER_FATAL = 21;
        }

        message LogRecord {
          fixed64 time_unix_nano = 1;
          fixed64 observed_time_unix_nano = 11;
          SeverityNumber severity_number = 2;
          string severity_text = 3;
          AnyValue body = 5;
          repeated KeyValue attributes = 6;
          uint32 dropped_attributes_count = 7;
          fixed32 flags = 8;
          bytes trace_id = 9;
          bytes span_id = 10;
          string event_name = 12;
        }

        message AnyValue {
          oneof value {
            string string_value = 1;
            bool bool_value = 2;
            int64 int_value = 3;
            double double_value = 4;
            ArrayValue array_value = 5;
            KeyValueList kvlist_value = 6;
            bytes bytes_value = 7;
          }
        }
        message ArrayValue { repeated AnyValue values = 1; }
        message KeyValueList { repeated KeyValue values = 1; }
        message KeyValue { string key = 1; AnyValue value = 2; }

        """

    /// An OTLP/HTTP logs receiver: every POST parsed as an
    /// ExportLogsServiceRequest and written as a JSON line (path, content
    /// type, status answered, SHA-256 of the body, the request as protobuf's
    /// JSON mapping with the .proto's field names), answered with an empty
    /// ExportLogsServiceResponse; with `fail-first`, the first POST is
    /// answered 503 (retryable).
    static let receiverScript = """
        import hashlib, http.server, json, os, sys
        sys.path.insert(0, sys.argv[1])
        import otlp_pb2
        from google.protobuf import json_format

        out_path, port_path, fail_first = sys.argv[2], sys.argv[3], sys.argv[4] == "fail-first"
        seen = [0]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                seen[0] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                status = 503 if fail_first and seen[0] == 1 else 200
                entry = {"path": self.path, "content_type": self.headers.get("Content-Type"), "status": status,
                         "sha256": hashlib.sha256(body).hexdigest()}
                try:
                    request = otlp_pb2.ExportLogsServiceRequest()
                    request.ParseFromString(body)
                    entry["request"] = json_format.MessageToDict(request, preserving_proto_field_name=True)
                except Exception as e:
                    entry["error"] = repr(e)
                    status = entry["status"] = 400
                with open(out_path, "a") as f:
                    f.write(json.dumps(entry) + "\\n")
                reply = otlp_pb2.ExportLogsServiceResponse().SerializeToString()
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        with open(port_path + ".tmp", "w") as f:
            f.write(str(server.server_address[1]))
        os.rename(port_path + ".tmp", port_path)
        server.serve_forever()

        """

    /// Compiles the schema for Python and starts the receiver: its port and
    /// the file of its JSON lines.
    func startReceiver(failFirst: Bool) throws -> (port: Int, log: String) {
        let protoc = try Self.tool("/usr/bin/protoc", package: "protobuf-compiler")
        let python = try Self.tool(TestSupport.systemPython, package: "python3")
        dir = try TestSupport.temporaryDirectory("tapio-otlp")
        try Self.proto.write(toFile: dir + "/otlp.proto", atomically: true, encoding: .utf8)
        try Self.receiverScript.write(toFile: dir + "/receiver.py", atomically: true, encoding: .utf8)
        let compiled = try TestSupport.run(protoc, ["--proto_path=\(dir)", "--python_out=\(dir)", "\(dir)/otlp.proto"])
        guard compiled.status == 0 else { throw TestSupportError("protoc --python_out failed: \(compiled.stderr)") }
        let probe = try TestSupport.run(python, ["-c", "import google.protobuf"])
        if probe.status != 0 {
            let why = "\(python) has no protobuf module (Debian package python3-protobuf; make deps installs it)"
            if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
            throw XCTSkip(why)
        }
        let log = dir + "/received.jsonl"
        receiver = try ChildProcess(python, [dir + "/receiver.py", dir, log, dir + "/port", failFirst ? "fail-first" : "-"], logPath: dir + "/receiver.log")
        var port: Int?
        _ = eventually(timeout: 20) {
            port = (try? String(contentsOfFile: dir + "/port", encoding: .utf8)).flatMap { Int($0) }
            return port != nil
        }
        guard let port else { throw TestSupportError("the OTLP receiver did not start: \(receiver?.log.suffix(2000) ?? "")") }
        return (port, log)
    }

    /// A program the test needs: skips without it, fails under
    /// TAPIO_REQUIRE_BPF=1 (as CI runs).
    static func tool(_ path: String, package: String) throws -> String {
        guard FileManager.default.isExecutableFile(atPath: path) else {
            let why = "\(path) is missing (Debian package \(package); make deps installs it)"
            if TestSupport.bpfRequired { throw TestSupportError("TAPIO_REQUIRE_BPF=1 but \(why)") }
            throw XCTSkip(why)
        }
        return path
    }

    /// Text with every run of blanks and newlines made one space.
    static func flatten(_ text: String) -> String {
        text.split(whereSeparator: { $0 == " " || $0 == "\n" }).joined(separator: " ")
    }

    /// The receiver's JSON lines so far.
    static func lines(_ path: String) -> [JSONValue] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").compactMap { try? JSONValue.parse(Array($0.utf8)) }
    }

    /// The log records of one received request.
    static func records(_ entry: JSONValue) -> [JSONValue] {
        (entry["request"]?["resource_logs"]?.arrayValue ?? []).flatMap { ($0["scope_logs"]?.arrayValue ?? []).flatMap { $0["log_records"]?.arrayValue ?? [] } }
    }

    /// A message's `attributes` (KeyValue list) by key, each value as
    /// protobuf's JSON mapping gives it: strings, bools, doubles as they
    /// are, int64 as a decimal string, arrays as arrays of those.
    static func attributes(_ message: JSONValue) -> [String: JSONValue] {
        var out: [String: JSONValue] = [:]
        for kv in message["attributes"]?.arrayValue ?? [] {
            guard let key = kv["key"]?.stringValue, let value = kv["value"] else { continue }
            out[key] = plain(value)
        }
        return out
    }

    private static func plain(_ anyValue: JSONValue) -> JSONValue {
        if let s = anyValue["string_value"] { return s }
        if let b = anyValue["bool_value"] { return b }
        if let i = anyValue["int_value"] { return i }
        if let d = anyValue["double_value"] { return d }
        if let a = anyValue["array_value"] { return .array((a["values"]?.arrayValue ?? []).map(plain)) }
        return .null
    }

    /// An int64 or fixed64 as protobuf's JSON mapping writes it (a decimal string).
    static func integer(_ v: JSONValue) -> Int64? {
        switch v {
        case .string(let s): return Int64(s)
        case .int(let i): return i
        default: return nil
        }
    }
}
