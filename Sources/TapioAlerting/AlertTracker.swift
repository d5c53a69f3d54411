/// Which notifications the incidents' changes call for: a value type fed
/// the incidents that changed, answering notices; the notifier carries them
/// out. The rule (docs/alerts.md, "When an incident pages"):
///
/// - `opened` when an open incident first qualifies (it pages and its top
///   cause reaches the confidence floor);
/// - `updated` when an announced incident's labels or summary change or its
///   top cause's confidence moves by 0.05 or more;
/// - `resolved` when an announced incident resolves, or is merged into
///   another (its own alert ends; the survivor carries on).
///
/// Once announced, an incident stays announced until it resolves, even if it
/// later stops qualifying: a person was paged, and the resolve is what tells
/// them it is over. An incident that resolves unannounced sends nothing.
public struct AlertTracker: Sendable {
    public enum Event: String, Sendable { case opened, updated, resolved }

    public struct Notice: Sendable, Equatable {
        public var event: Event
        public var alert: IncidentAlert
        /// What was last sent for the incident (its labels may differ).
        public var previous: IncidentAlert?
        /// For an incident merged into another, the survivor's id.
        public var mergedInto: String?
    }

    public var minimumConfidence: Double
    /// Announced and not resolved, by id: what was last sent.
    public private(set) var firing: [String: IncidentAlert] = [:]

    public init(minimumConfidence: Double) {
        self.minimumConfidence = minimumConfidence
    }

    /// Incidents open when the server started: taken as announced by the
    /// previous run when they qualify (Alertmanager gets them again with the
    /// next re-send; the webhook gets no second `opened`).
    public mutating func restore(_ alerts: [IncidentAlert]) {
        for a in alerts where a.qualifies(minimumConfidence: minimumConfidence) { firing[a.id] = a }
    }

    /// The notices for incidents that changed, in order.
    public mutating func observe(_ alerts: [IncidentAlert]) -> [Notice] {
        var out: [Notice] = []
        for var a in alerts {
            // A severity derived from the confidence stays what it was when
            // announced: a label that flips around 0.8 would end the alert
            // and start another (Alertmanager identifies alerts by labels).
            if let previous = firing[a.id], !a.severityGiven { a.severity = previous.severity }
            for merged in a.mergedIds where merged != a.id {
                guard var gone = firing.removeValue(forKey: merged) else { continue }
                let previous = gone
                gone.status = .resolved
                gone.resolvedNs = a.resolvedNs ?? gone.resolvedNs
                out.append(Notice(event: .resolved, alert: gone, previous: previous, mergedInto: a.id))
            }
            if let previous = firing[a.id] {
                if a.status == .resolved {
                    firing.removeValue(forKey: a.id)
                    out.append(Notice(event: .resolved, alert: a, previous: previous))
                } else if a.differs(from: previous) {
                    firing[a.id] = a
                    out.append(Notice(event: .updated, alert: a, previous: previous))
                }
            } else if a.qualifies(minimumConfidence: minimumConfidence) {
                firing[a.id] = a
                out.append(Notice(event: .opened, alert: a))
            }
        }
        return out
    }
}
