import Foundation
import TapioWire

/// Incident notifications as OpenTelemetry logs: the body of an OTLP/HTTP
/// `POST /v1/logs` (an `ExportLogsServiceRequest`, binary protobuf) with one
/// log record per notice (docs/alerts.md, "OTLP"). Written by hand with
/// `ProtobufWriter`: only the fields Tapio sets, numbered as in
/// opentelemetry-proto's `collector/logs/v1/logs_service.proto`,
/// `logs/v1/logs.proto`, `common/v1/common.proto` and
/// `resource/v1/resource.proto`.
enum OTLPLogs {
    /// The resource every record comes from.
    struct Resource: Sendable {
        var serviceName = "tapio-server"
        var serviceVersion = TapioVersion.current
        /// `host.name`: the machine (in Kubernetes, the pod) the server runs on.
        var hostName: String

        static var current: Resource { Resource(hostName: OTLPLogs.hostName()) }
    }

    /// The instrumentation scope of every record.
    static let scopeName = "tapio"

    /// `SeverityNumber` values (logs.proto).
    enum Severity: UInt64 {
        case info = 9, warn = 13, error = 17

        var text: String {
            switch self {
            case .info: return "INFO"
            case .warn: return "WARN"
            case .error: return "ERROR"
            }
        }
    }

    /// A record's severity: a resolve is news, not trouble (INFO); an open
    /// incident is ERROR when `critical`, WARN when `warning`, and INFO for
    /// a severity Tapio does not know.
    static func severity(_ notice: AlertTracker.Notice) -> Severity {
        if notice.event == .resolved { return .info }
        switch notice.alert.severity {
        case "critical": return .error
        case "warning": return .warn
        default: return .info
        }
    }

    /// What the record's body says, one line.
    static func body(_ notice: AlertTracker.Notice) -> String {
        let a = notice.alert
        var s = "Incident \(a.id) \(notice.event.rawValue): \(a.title)."
        if let c = a.cause { s += " Root cause: \(c.kind) of \(c.entity) (confidence \(String(format: "%.2f", c.confidence)))." }
        if let m = notice.mergedInto { s += " Merged into \(m)." }
        return s
    }

    /// The record's attributes, in the order they are written.
    static func attributes(_ notice: AlertTracker.Notice, linkBase: String?) -> [(String, Value)] {
        let a = notice.alert
        var out: [(String, Value)] = [
            ("tapio.incident.id", .string(a.id)),
            ("tapio.incident.event", .string(notice.event.rawValue)),
            ("tapio.incident.status", .string(a.status.rawValue)),
            ("tapio.incident.title", .string(a.title)),
            ("tapio.incident.severity", .string(a.severity)),
            ("tapio.incident.pages", .bool(a.pages)),
        ]
        if let c = a.cause {
            out.append(("tapio.root_cause.kind", .string(c.kind)))
            out.append(("tapio.root_cause.entity", .string(c.entity)))
            out.append(("tapio.root_cause.confidence", .double(c.confidence)))
        }
        if let s = a.service { out.append(("tapio.incident.service", .string(s))) }
        if let ns = a.namespace { out.append(("tapio.incident.namespace", .string(ns))) }
        out.append(("tapio.incident.affected_services", .strings(a.affectedServices)))
        out.append(("tapio.incident.opened_at", .int(a.openedNs)))
        if let r = a.resolvedNs, a.status == .resolved { out.append(("tapio.incident.resolved_at", .int(r))) }
        if let link = a.link(base: linkBase) { out.append(("tapio.incident.link", .string(link))) }
        if let m = notice.mergedInto { out.append(("tapio.incident.merged_into", .string(m))) }
        if notice.event == .updated, let p = notice.previous?.cause, p != a.cause {
            out.append(("tapio.previous_root_cause.kind", .string(p.kind)))
            out.append(("tapio.previous_root_cause.entity", .string(p.entity)))
            out.append(("tapio.previous_root_cause.confidence", .double(p.confidence)))
        }
        return out
    }

    /// When what the record tells happened: the incident's open for
    /// `opened`, its resolve for `resolved` (the notification time when the
    /// incident carries none, as for a merge), the notification time for
    /// `updated`.
    static func eventTimeNs(_ notice: AlertTracker.Notice, nowNs: Int64) -> Int64 {
        switch notice.event {
        case .opened: return notice.alert.openedNs > 0 ? notice.alert.openedNs : nowNs
        case .updated: return nowNs
        case .resolved: return notice.alert.resolvedNs ?? nowNs
        }
    }

    /// The `ExportLogsServiceRequest` for one notice.
    static func exportRequest(_ notice: AlertTracker.Notice, nowNs: Int64, linkBase: String?, resource: Resource) -> [UInt8] {
        var request = ProtobufWriter()
        // ExportLogsServiceRequest.resource_logs = 1
        request.message(1) { resourceLogs in
            // ResourceLogs.resource = 1
            resourceLogs.message(1) { r in
                // Resource.attributes = 1
                keyValue(&r, 1, "service.name", .string(resource.serviceName))
                keyValue(&r, 1, "service.version", .string(resource.serviceVersion))
                if !resource.hostName.isEmpty { keyValue(&r, 1, "host.name", .string(resource.hostName)) }
            }
            // ResourceLogs.scope_logs = 2
            resourceLogs.message(2) { scopeLogs in
                // ScopeLogs.scope = 1: InstrumentationScope.name = 1, version = 2
                scopeLogs.message(1) { scope in
                    scope.string(1, scopeName)
                    scope.string(2, resource.serviceVersion)
                }
                // ScopeLogs.log_records = 2
                scopeLogs.message(2) { record in
                    let severity = severity(notice)
                    record.fixed64(1, UInt64(clamping: eventTimeNs(notice, nowNs: nowNs)))  // time_unix_nano
                    record.varint(2, severity.rawValue)  // severity_number
                    record.string(3, severity.text)  // severity_text
                    record.message(5) { anyValue(&$0, .string(body(notice))) }  // body
                    for (key, value) in attributes(notice, linkBase: linkBase) { keyValue(&record, 6, key, value) }  // attributes
                    record.fixed64(11, UInt64(clamping: nowNs))  // observed_time_unix_nano
                }
            }
        }
        return request.bytes
    }

    /// An attribute value (common.proto's `AnyValue`, the kinds Tapio uses).
    enum Value: Equatable {
        case string(String)
        case bool(Bool)
        case int(Int64)
        case double(Double)
        case strings([String])
    }

    /// A `KeyValue` (key = 1, value = 2) as field `field` of the message being written.
    private static func keyValue(_ w: inout ProtobufWriter, _ field: Int, _ key: String, _ value: Value) {
        w.message(field) { kv in
            kv.string(1, key)
            kv.message(2) { anyValue(&$0, value) }
        }
    }

    /// The inside of an `AnyValue`: string_value = 1, bool_value = 2,
    /// int_value = 3, double_value = 4, array_value = 5 (ArrayValue.values = 1).
    /// Each is written even when it is its type's default (an empty
    /// string, false, 0): the oneof says which kind the value is.
    private static func anyValue(_ w: inout ProtobufWriter, _ value: Value) {
        switch value {
        case .string(let s): w.string(1, s)
        case .bool(let b): w.varint(2, b ? 1 : 0)
        case .int(let i): w.varint(3, UInt64(bitPattern: i))
        case .double(let d): w.fixed64(4, d.bitPattern)
        case .strings(let list):
            w.message(5) { array in
                for s in list { array.message(1) { $0.string(1, s) } }
            }
        }
    }

    /// The host's name (`gethostname`), empty when it cannot be read.
    static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A protocol buffers writer for the few wire types OTLP needs: varint (0),
/// fixed64 (1) and length-delimited (2). Fields are written in the order
/// asked; nothing is omitted for being a default value.
struct ProtobufWriter {
    private(set) var bytes: [UInt8] = []

    mutating func varint(_ field: Int, _ value: UInt64) {
        tag(field, 0)
        rawVarint(value)
    }

    mutating func fixed64(_ field: Int, _ value: UInt64) {
        tag(field, 1)
        for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: value >> (8 * UInt64(i)))) }
    }

    mutating func lengthDelimited(_ field: Int, _ payload: [UInt8]) {
        tag(field, 2)
        rawVarint(UInt64(payload.count))
        bytes += payload
    }

    mutating func string(_ field: Int, _ s: String) { lengthDelimited(field, Array(s.utf8)) }

    /// An embedded message, built by `build` into its own writer, then
    /// written length-delimited.
    mutating func message(_ field: Int, _ build: (inout ProtobufWriter) -> Void) {
        var inner = ProtobufWriter()
        build(&inner)
        lengthDelimited(field, inner.bytes)
    }

    private mutating func tag(_ field: Int, _ wireType: UInt8) {
        rawVarint(UInt64(field) << 3 | UInt64(wireType))
    }

    /// Base 128, least significant group first, the high bit set on every byte but the last.
    mutating func rawVarint(_ value: UInt64) {
        var v = value
        while v >= 0x80 {
            bytes.append(UInt8(v & 0x7f) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }
}
