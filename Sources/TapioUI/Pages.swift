import Foundation
import TapioQueryAPI
import TapioWire

/// The queries the pages ask tapio-server (docs/protocol.md, "Queries"),
/// answered with the query API's types. Errors are shown as their
/// description, so they should say in words what is wrong.
public protocol UIQueries: Sendable {
    /// `status`: `open`, `resolved` or `all`.
    func incidents(status: String) throws -> IncidentsAnswer
    /// One incident with its timeline, links and weights.
    func explain(id: String) throws -> QueryIncident
    func services() throws -> ServicesAnswer
    func nodes() throws -> NodesAnswer
    /// `params` as the `events` method takes them.
    func events(_ params: [String: String]) throws -> EventsAnswer
}

/// A rendered page: what `<main>` holds, and the title and tab around it.
struct Rendered {
    var title: String
    var tab: String
    var fragment: String
}

/// A page the UI does not have, or an incident the server does not know.
struct NotFound: Error, CustomStringConvertible {
    var description: String
}

/// The pages, rendered on the server from the query API's JSON.
enum Pages {
    /// The page at `path` with its query `params`; throws the query's error
    /// (or `NotFound`).
    static func render(path: String, params: [String: String], query: UIQueries) throws -> Rendered {
        if path == "/" || path == "/incidents" { return try incidents(params, query) }
        if path.hasPrefix("/incidents/") {
            let id = String(path.dropFirst("/incidents/".count))
            guard !id.isEmpty, !id.contains("/") else { throw NotFound(description: "no page \(path)") }
            return try incident(id: id, params: params, query)
        }
        if path == "/services" { return try services(query) }
        if path == "/events" { return try events(params, query) }
        if path == "/nodes" { return try nodes(query) }
        throw NotFound(description: "no page \(path): the UI has / (incidents), /incidents/ID, /services, /events and /nodes")
    }

    // MARK: Incidents

    static func incidents(_ params: [String: String], _ query: UIQueries) throws -> Rendered {
        let status = ["open", "resolved"].contains(params["status"] ?? "") ? params["status"]! : "all"
        let list = try query.incidents(status: status).incidents.sorted { $0.openedAt > $1.openedAt }
        let open = list.filter { $0.status == "open" }.count
        var out = "<h1>Incidents</h1><p class=\"tabs\">"
        for s in ["all", "open", "resolved"] {
            out += "<a href=\"/?status=\(s)\"\(s == status ? " class=\"active\"" : "")>\(s)</a>"
        }
        out += "<span class=\"muted\">\(list.count) shown, \(open) open</span></p>"
        guard !list.isEmpty else {
            return Rendered(title: "Incidents", tab: "incidents", fragment: out + "<div class=\"card muted\">No incidents\(status == "all" ? "" : " \(status)"): nothing is failing against its baseline.</div>")
        }
        out += "<table class=\"incidents\"><thead><tr><th>Incident</th><th>Status</th><th>Opened (UTC)</th><th>Top root cause</th><th>Confidence</th><th>Affected services</th><th>Title</th></tr></thead><tbody>"
        for i in list {
            let id = i.id
            let st = i.status
            let top = i.topCause
            // Incidents that do not page are kept and shown as observations (docs/correlation.md, "Paging").
            let pages = i.pages ? " <span class=\"badge page\" title=\"worth paging a person\">page</span>"
                : " <span class=\"badge observation\" title=\"below the paging floor or inferred only: not paged\">observation</span>"
            out += "<tr class=\"incident\" data-id=\"\(esc(id))\" data-status=\"\(esc(st))\"><td><a href=\"/incidents/\(urlEncode(id))\" class=\"mono\">\(esc(id))</a></td>"
            out += "<td><span class=\"badge \(esc(st))\">\(esc(st))</span>\(pages)</td><td>\(esc(shortTime(i.openedAt)))</td>"
            if let top {
                out += "<td class=\"root-cause\" data-kind=\"\(esc(top.kind))\" data-entity=\"\(esc(top.entity))\"><b>\(esc(top.kind))</b> \(esc(top.entity))"
                out += top.inferred ? " <span class=\"badge inferred\">inferred</span>" : ""
                out += "</td><td>\(confidenceBar(top.confidence))</td>"
            } else {
                out += "<td class=\"muted\">none yet</td><td></td>"
            }
            out += "<td>\(esc(i.affected.services.joined(separator: ", ")))</td><td>\(esc(i.title))</td></tr>"
        }
        return Rendered(title: "Incidents", tab: "incidents", fragment: out + "</tbody></table>")
    }

    // MARK: One incident

    /// `from_ns` and `to_ns` zoom the timeline in on that stretch.
    static func incident(id: String, params: [String: String] = [:], _ query: UIQueries) throws -> Rendered {
        let doc = try query.explain(id: id)
        var window: (from: Int64, to: Int64)?
        if let from = params["from_ns"].flatMap({ Int64($0) }), let to = params["to_ns"].flatMap({ Int64($0) }), to > from { window = (from, to) }
        let st = doc.status
        var out = "<p><a href=\"/\">← Incidents</a></p><h1 class=\"incident-id\" data-id=\"\(esc(doc.id))\">\(esc(doc.id)) "
        out += "<span class=\"badge \(esc(st))\">\(esc(st))</span>"
        out += doc.pages ? " <span class=\"badge page\">page</span>" : " <span class=\"badge observation\">observation, not paged</span>"
        out += "</h1><p>\(esc(doc.title))</p><div class=\"meta\">"
        for (label, time) in [("detected", doc.detectedAt), ("opened", doc.openedAt), ("updated", doc.updatedAt), ("resolved", doc.resolvedAt)] {
            if let t = time, !t.isEmpty { out += "<span>\(label) <b>\(esc(shortTime(t)))</b></span>" }
        }
        out += "<span>services <b>\(esc(doc.affected.services.joined(separator: ", ")))</b></span>"
        out += "<span>nodes <b>\(esc(doc.affected.nodes.joined(separator: ", ")))</b></span>"
        if !doc.mergedIds.isEmpty { out += "<span>merged <b>\(esc(doc.mergedIds.joined(separator: ", ")))</b></span>" }
        out += "</div>"

        out += "<h2>Root causes, ranked</h2>"
        if doc.rootCauses.isEmpty { out += "<div class=\"card muted\">No candidate yet.</div>" }
        for (rank, c) in doc.rootCauses.enumerated() {
            out += "<div class=\"card cause\(rank == 0 ? " top" : "")\" data-rank=\"\(rank + 1)\" data-kind=\"\(esc(c.kind))\" data-entity=\"\(esc(c.entity))\">"
            out += "<h3>#\(rank + 1) <b>\(esc(c.kind))</b> at \(esc(c.entity)) \(confidenceBar(c.confidence))"
            out += c.inferred ? " <span class=\"badge inferred\" title=\"no cause event seen; inferred from the symptoms\">inferred</span>" : ""
            out += "</h3><div class=\"meta\"><span>first seen <b>\(esc(shortTime(c.firstSeen)))</b></span><span>nodes <b>\(esc(c.nodes.joined(separator: ", ")))</b></span></div>"
            out += factorTable(c.factors)
            if !c.evidence.isEmpty {
                out += "<details\(rank == 0 ? " open" : "")><summary>evidence (\(c.evidence.count))</summary><ul class=\"mono\">"
                for e in c.evidence.prefix(20) { out += "<li>\(esc(e))</li>" }
                out += "</ul></details>"
            }
            out += "</div>"
        }
        if let model = doc.model { out += "<p class=\"muted\">\(esc(model)); a factor's contribution is value × weight.</p>" }

        out += "<h2>Timeline: one lane per node</h2>" + TimelineLanes.fragment(doc, heading: false, window: window, links: true)

        out += "<h2>Symptoms</h2>"
        if doc.symptoms.isEmpty { out += "<div class=\"card muted\">None.</div>" } else {
            out += "<table class=\"symptoms\"><thead><tr><th>Entity</th><th>Kind</th><th>Towards</th><th>Since (UTC)</th><th>Last</th><th class=\"num\">Count</th><th class=\"num\">Baseline</th><th>Active</th></tr></thead><tbody>"
            for s in doc.symptoms {
                out += "<tr><td>\(esc(s.entity))</td><td><code>\(esc(s.kind))</code></td><td>\(esc(s.peer ?? ""))</td>"
                out += "<td>\(esc(timeOfDay(s.since)))</td><td>\(esc(timeOfDay(s.last)))</td><td class=\"num\">\(s.count)</td>"
                out += "<td class=\"num\">\(fmt(s.baseline, 3)) \(esc(s.baselineUnit.replacingOccurrences(of: "_", with: " ")))</td>"
                out += "<td>\(s.active ? "<span class=\"badge open\">firing</span>" : "<span class=\"muted\">ended</span>")</td></tr>"
            }
            out += "</tbody></table>"
        }

        let links = doc.links ?? []
        if !links.isEmpty {
            out += "<h2>Causal links</h2><table class=\"links\"><thead><tr><th>Cause</th><th>Symptom</th><th>Relation</th><th>Confidence</th></tr></thead><tbody>"
            for l in links.sorted(by: { $0.confidence > $1.confidence }) {
                out += "<tr><td>\(esc(l.cause.kind)) \(esc(l.cause.entity))</td>"
                out += "<td>\(esc(l.symptom.kind)) at \(esc(l.symptom.entity))\(l.symptom.peer.map { " → " + esc($0) } ?? "")</td>"
                out += "<td><code>\(esc(l.relation))</code></td><td>\(confidenceBar(l.confidence))</td></tr>"
            }
            out += "</tbody></table>"
        }
        return Rendered(title: doc.id, tab: "incidents", fragment: out)
    }

    static func factorTable(_ factors: [QueryIncident.Factor]) -> String {
        guard !factors.isEmpty else { return "" }
        let contributions = factors.map { $0.value * $0.weight }
        let largest = max(0.01, contributions.map(abs).max() ?? 1)
        var out = "<table class=\"factors\"><thead><tr><th>Factor</th><th class=\"num\">Value</th><th class=\"num\">Weight</th><th>Contribution</th></tr></thead><tbody>"
        for (f, c) in zip(factors, contributions) {
            let w = Int((abs(c) / largest * 120).rounded())
            out += "<tr data-factor=\"\(esc(f.name))\"><td>\(esc(f.name.replacingOccurrences(of: "_", with: " ")))</td>"
            out += "<td class=\"num\">\(fmt(f.value, 3))</td><td class=\"num\">\(fmt(f.weight, 2))</td>"
            out += "<td><span class=\"factor-bar \(c < 0 ? "neg" : "pos")\" style=\"width:\(w)px\"></span> \(abs(c) < 0.005 ? "0.00" : (c > 0 ? "+" : "") + fmt(c, 2))</td></tr>"
        }
        return out + "</tbody></table>"
    }

    // MARK: Service map

    static func services(_ query: UIQueries) throws -> Rendered {
        let doc = try query.services()
        let open = try query.incidents(status: "open").incidents
        let causes = Set(open.compactMap { $0.topCause?.entity })
        let affected = Set(open.flatMap(\.affected.services))
        var out = "<h1>Service map</h1><p class=\"muted\">Who connects to whom, learned from the TCP connects the agents saw and from DNS answers. "
        out += "Red edges had failed connects (thicker: a larger share); red boxes are the root cause of an open incident, orange ones affected by one.</p>"
        out += "<div class=\"svgwrap\">\(ServiceMap.svg(doc, causes: causes, affected: affected))</div>"
        let edges = ServiceMap.edges(doc)
        if !edges.isEmpty {
            out += "<h2>Edges</h2><table class=\"edges\"><thead><tr><th>Client</th><th>Server</th><th class=\"num\">Connects</th><th class=\"num\">Failed</th><th class=\"num\">Fail %</th><th>Failures by outcome</th><th class=\"num\">Connect p50</th><th class=\"num\">p99</th><th class=\"num\">Response p50</th><th>Last seen</th></tr></thead><tbody>"
            for (e, raw) in zip(edges, doc.services) {
                let o = raw.failuresByOutcome
                let outcomes = o.keys.sorted().map { "\($0) \(o[$0]!)" }
                out += "<tr class=\"\(e.failures > 0 ? "failing" : "")\"><td>\(esc(e.client))</td><td>\(esc(e.server))</td><td class=\"num\">\(e.connects)</td><td class=\"num\">\(e.failures)</td>"
                out += "<td class=\"num\">\(fmt(e.ratio * 100, 1))</td><td>\(esc(outcomes.joined(separator: ", ")))</td><td class=\"num\">\(fmt(e.p50)) ms</td><td class=\"num\">\(fmt(e.p99)) ms</td>"
                out += "<td class=\"num\">\(e.responseCount > 0 ? fmt(e.responseP50) + " ms" : "–")</td><td>\(esc(shortTime(raw.lastSeen)))</td></tr>"
            }
            out += "</tbody></table>"
        }
        let names = doc.names
        if !names.isEmpty {
            out += "<h2>DNS names</h2><table class=\"names\"><thead><tr><th>Name</th><th>Service</th></tr></thead><tbody>"
            for name in names.keys.sorted() { out += "<tr><td class=\"mono\">\(esc(name))</td><td>\(esc(names[name]!))</td></tr>" }
            out += "</tbody></table>"
        }
        return Rendered(title: "Service map", tab: "services", fragment: out)
    }

    // MARK: Nodes

    /// The agents: connected or not, their clock offset with its
    /// uncertainty (what the timeline's bars come from), what they delivered
    /// and lost, programs that could not run.
    static func nodes(_ query: UIQueries) throws -> Rendered {
        let list = try query.nodes().nodes
        var out = "<h1>Nodes</h1><p class=\"muted\">Each agent's clock offset is estimated from time-sync exchanges on its connection; "
        out += "its uncertainty is the ± every event of that node carries on the timeline.</p>"
        guard !list.isEmpty else { return Rendered(title: "Nodes", tab: "nodes", fragment: out + "<div class=\"card muted\">No agent has connected yet.</div>") }
        out += "<table class=\"nodes\"><thead><tr><th>Node</th><th>Connected</th><th>Last seen (UTC)</th><th class=\"num\">Clock offset</th><th class=\"num\">Events</th><th class=\"num\">Dropped</th><th>Programs</th><th>Agent</th></tr></thead><tbody>"
        for n in list.sorted(by: { $0.node < $1.node }) {
            let connected = n.connected
            let offset = Double(n.clockOffsetNs), error = Double(n.clockErrorNs)
            let degraded = n.degraded
            let drops = n.drops.keys.sorted().map { "\($0) \(n.drops[$0]!)" }
            out += "<tr class=\"node\" data-node=\"\(esc(n.node))\"><td><b>\(esc(n.node))</b></td>"
            out += "<td>\(connected ? "<span class=\"badge resolved\">connected</span>" : "<span class=\"badge\">not connected</span>")</td>"
            out += "<td>\(esc(shortTime(n.lastSeen)))</td><td class=\"num mono\">\(offset < 0 ? "−" : "+")\(esc(duration(ns: abs(offset)))) ± \(esc(duration(ns: error)))</td>"
            out += "<td class=\"num\">\(n.eventsReceived)</td><td class=\"num\" title=\"\(esc(drops.joined(separator: ", ")))\">\(n.dropsTotal)</td>"
            out += "<td>\(n.capabilities.count) running\(degraded.isEmpty ? "" : ", <span class=\"badge inferred\">\(degraded.count) degraded</span> " + esc(degraded.joined(separator: ", ")))</td>"
            out += "<td class=\"mono\">\(esc(n.agentVersion))</td></tr>"
        }
        return Rendered(title: "Nodes", tab: "nodes", fragment: out + "</tbody></table>")
    }

    // MARK: Events

    /// Filters: kind, node, pod (a trailing * matches a prefix), since (a
    /// duration back from now or an RFC 3339 time), limit.
    static func events(_ params: [String: String], _ query: UIQueries, nowNs: Int64 = wallClockNs()) throws -> Rendered {
        let kind = params["kind"].flatMap { $0.isEmpty ? nil : $0 }
        let node = params["node"].flatMap { $0.isEmpty ? nil : $0 }
        let pod = params["pod"].flatMap { $0.isEmpty ? nil : $0 }
        let since = params["since"].flatMap { $0.isEmpty ? nil : $0 }
        let limit = params["limit"].flatMap { Int($0) }.map { min(max($0, 1), 5000) } ?? 200
        var q: [String: String] = ["limit": String(limit)]
        var problems: [String] = []
        if let kind {
            if EventKind(name: kind) != nil { q["kind"] = kind } else { problems.append("unknown kind \(kind)") }
        }
        if let node { q["node"] = node }
        if let pod {
            if pod.hasSuffix("*") { if pod.count > 1 { q["pod_prefix"] = String(pod.dropLast()) } } else { q["pod"] = pod }
        }
        if let since {
            if let ns = sinceNs(since, nowNs: nowNs) { q["since_ns"] = String(ns) } else {
                problems.append("cannot read since \(since): use a duration back from now (30s, 15m, 2h, 1d) or an RFC 3339 time")
            }
        }
        let nodes = ((try? query.nodes())?.nodes ?? []).map(\.node).sorted()
        var out = "<h1>Events</h1><form class=\"filters\" method=\"get\" action=\"/events\">"
        out += "<label>kind<select name=\"kind\"><option value=\"\">any</option>"
        for k in EventKind.allCases.dropFirst() {
            out += "<option\(k.name == kind ? " selected" : "")>\(esc(k.name))</option>"
        }
        out += "</select></label><label>node<select name=\"node\"><option value=\"\">any</option>"
        for n in Set(nodes + (node.map { [$0] } ?? [])).sorted() { out += "<option\(n == node ? " selected" : "")>\(esc(n))</option>" }
        out += "</select></label><label>pod (prefix*)<input name=\"pod\" value=\"\(esc(pod ?? ""))\" placeholder=\"api-*\"></label>"
        out += "<label>since<input name=\"since\" value=\"\(esc(since ?? ""))\" placeholder=\"15m or 2026-12-01T10:00:00Z\"></label>"
        out += "<label>limit<input name=\"limit\" value=\"\(limit)\" size=\"5\"></label><button type=\"submit\">Show</button></form>"
        if !problems.isEmpty {
            return Rendered(title: "Events", tab: "events", fragment: out + "<div class=\"error-box\">\(esc(problems.joined(separator: "\n")))</div>")
        }
        let doc = try query.events(q)
        let events = doc.events.reversed()
        out += "<p class=\"muted\">\(events.count) event\(events.count == 1 ? "" : "s"), newest first (at most \(limit))."
        if let note = doc.retention?.note { out += " \(esc(note))." }
        out += "</p>"
        guard !events.isEmpty else { return Rendered(title: "Events", tab: "events", fragment: out + "<div class=\"card muted\">No events match.</div>") }
        out += "<table class=\"events\"><thead><tr><th>Time (UTC)</th><th>Node</th><th>Kind</th><th>Pod</th><th>Process</th><th>Detail</th></tr></thead><tbody>"
        let common: Set<String> = ["time", "time_ns", "node", "kind", "pod", "namespace", "comm", "pid", "cgroup_id", "container_id", "time_error_ns"]
        for e in events {
            var detail: [String] = []
            do {
                let o = e.fields
                for key in o.keys.sorted() where !common.contains(key) {
                    let v = o[key]!
                    let text: String
                    switch v {
                    case .string(let s): text = s
                    case .null: continue
                    default: text = v.serialized()
                    }
                    detail.append("\(key)=\(text)")
                }
            }
            let podName = e.pod ?? ""
            let ns = e.namespace ?? ""
            out += "<tr class=\"event\" data-kind=\"\(esc(e.kind))\" data-node=\"\(esc(e.node))\"><td class=\"mono\">\(esc(shortTime(e.time)))\(esc(fraction(e.time)))</td>"
            out += "<td>\(esc(e.node))</td><td><code>\(esc(e.kind))</code></td>"
            out += "<td>\(esc(ns.isEmpty ? podName : "\(ns)/\(podName)"))</td><td>\(esc(e.comm ?? ""))\(e.pid.map { " <span class=\"muted\">\($0)</span>" } ?? "")</td>"
            out += "<td class=\"mono\">\(esc(detail.joined(separator: " ")))</td></tr>"
        }
        return Rendered(title: "Events", tab: "events", fragment: out + "</tbody></table>")
    }

    /// ".041017" of an RFC 3339 time (microseconds).
    static func fraction(_ rfc: String) -> String {
        guard let dot = rfc.firstIndex(of: ".") else { return "" }
        return "." + rfc[rfc.index(after: dot)...].prefix { $0.isNumber }.prefix(6)
    }

    /// "30s", "15m", "2h", "1d" back from `nowNs`, or an RFC 3339 time.
    static func sinceNs(_ text: String, nowNs: Int64) -> Int64? {
        let units: [(String, Double)] = [("ms", 1e6), ("s", 1e9), ("m", 60e9), ("h", 3600e9), ("d", 86400e9)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            if let v = Double(text.dropLast(suffix.count)), v >= 0, v * scale < 1e18 { return nowNs - Int64(v * scale) }
        }
        return TimelineLanes.parseTime(text)
    }
}
