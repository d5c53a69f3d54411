import Foundation
import TapioWire

/// The bodies the receivers get (docs/alerts.md, "Payloads").
enum Payloads {
    /// Alertmanager's `POST /api/v2/alerts` body for one notice: the alert as
    /// it is now, and the end of any alert sent before under other labels
    /// (Alertmanager identifies an alert by its labels, so a changed root
    /// cause would otherwise leave the old alert firing).
    static func alertmanager(_ notice: AlertTracker.Notice, nowNs: Int64, linkBase: String?, validForNs: Int64) -> JSONValue {
        var alerts: [JSONValue] = []
        let a = notice.alert
        switch notice.event {
        case .opened, .updated:
            alerts.append(alertmanagerAlert(a, endsNs: nowNs + validForNs, linkBase: linkBase))
            if let p = notice.previous, p.labels != a.labels {
                alerts.append(alertmanagerAlert(p, endsNs: nowNs, linkBase: linkBase))
            }
        case .resolved:
            let ends = min(a.resolvedNs ?? nowNs, nowNs)
            let previous = notice.previous ?? a
            alerts.append(alertmanagerAlert(previous, endsNs: ends, linkBase: linkBase))
            if previous.labels != a.labels { alerts.append(alertmanagerAlert(a, endsNs: ends, linkBase: linkBase)) }
        }
        return .array(alerts)
    }

    /// The periodic re-send: every announced alert, firing for `validForNs` more.
    static func alertmanagerResend(_ firing: [IncidentAlert], nowNs: Int64, linkBase: String?, validForNs: Int64) -> JSONValue {
        .array(firing.sorted { $0.id < $1.id }.map { alertmanagerAlert($0, endsNs: nowNs + validForNs, linkBase: linkBase) })
    }

    static func alertmanagerAlert(_ a: IncidentAlert, endsNs: Int64, linkBase: String?) -> JSONValue {
        var o: [String: JSONValue] = [
            "labels": .object(a.labels.mapValues { .string($0) }),
            "annotations": .object(a.annotations(linkBase: linkBase).mapValues { .string($0) }),
            "startsAt": .string(rfc3339(ns: min(a.openedNs, endsNs))),
            "endsAt": .string(rfc3339(ns: endsNs)),
        ]
        if let link = a.link(base: linkBase) { o["generatorURL"] = .string(link) }
        return .object(o)
    }

    /// The webhook's body for one notice (schema version 1).
    static func webhook(_ notice: AlertTracker.Notice, deliveryId: String, nowNs: Int64, linkBase: String?) -> JSONValue {
        let a = notice.alert
        var o: [String: JSONValue] = [
            "version": .int(1),
            "event": .string(notice.event.rawValue),
            "delivery_id": .string(deliveryId),
            "notified_at": .string(rfc3339(ns: nowNs)),
            "incident_id": .string(a.id),
            "status": .string(a.status.rawValue),
            "title": .string(a.title),
            "severity": .string(a.severity),
            "pages": .bool(a.pages),
            "root_cause": a.cause.map { .object(["entity": .string($0.entity), "kind": .string($0.kind), "confidence": .double($0.confidence)]) } ?? .null,
            "namespace": a.namespace.map { .string($0) } ?? .null,
            "service": a.service.map { .string($0) } ?? .null,
            "labels": .object(a.labels.mapValues { .string($0) }),
            "annotations": .object(a.annotations(linkBase: linkBase).mapValues { .string($0) }),
            "link": a.link(base: linkBase).map { .string($0) } ?? .null,
            "merged_into": notice.mergedInto.map { .string($0) } ?? .null,
            "incident": a.summaryJSON,
        ]
        if let p = notice.previous, p.cause != a.cause, let c = p.cause {
            o["previous_root_cause"] = .object(["entity": .string(c.entity), "kind": .string(c.kind), "confidence": .double(c.confidence)])
        }
        return .object(o)
    }
}
