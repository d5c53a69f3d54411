import Foundation
import TapioWire

/// One query to tapio-server: a method of the query API (docs/protocol.md,
/// "Queries") and its params, answered with the JSON document. Errors are
/// shown as their description, so it should say in words what is wrong.
public typealias UIQuery = @Sendable (_ method: String, _ params: [String: String]) throws -> JSONValue

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
    static func render(path: String, params: [String: String], query: UIQuery) throws -> Rendered {
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

    static func incidents(_ params: [String: String], _ query: UIQuery) throws -> Rendered {
        let status = ["open", "resolved"].contains(params["status"] ?? "") ? params["status"]! : "all"
        let doc = try query("incidents", ["status": status])
        let list = (doc["incidents"]?.array ?? []).sorted { ($0["opened_at"]?.str ?? "") > ($1["opened_at"]?.str ?? "") }
        let open = list.filter { $0["status"]?.str == "open" }.count
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
            let id = i["id"]?.str ?? ""
            let st = i["status"]?.str ?? ""
            let top = i["root_causes"]?.array.first
            // Incidents that do not page are kept and shown as observations (docs/correlation.md, "Paging").
            let pages: String
            switch i["pages"] {
            case .bool(true)?: pages = " <span class=\"badge page\" title=\"worth paging a person\">page</span>"
            case .bool(false)?: pages = " <span class=\"badge observation\" title=\"below the paging floor or inferred only: not paged\">observation</span>"
            default: pages = ""
            }
            out += "<tr class=\"incident\" data-id=\"\(esc(id))\" data-status=\"\(esc(st))\"><td><a href=\"/incidents/\(urlEncode(id))\" class=\"mono\">\(esc(id))</a></td>"
            out += "<td><span class=\"badge \(esc(st))\">\(esc(st))</span>\(pages)</td><td>\(esc(shortTime(i["opened_at"]?.str ?? "")))</td>"
            if let top {
                out += "<td class=\"root-cause\" data-kind=\"\(esc(top["kind"]?.str ?? ""))\" data-entity=\"\(esc(top["entity"]?.str ?? ""))\"><b>\(esc(top["kind"]?.str ?? ""))</b> \(esc(top["entity"]?.str ?? ""))"
                out += top["inferred"] == .bool(true) ? " <span class=\"badge inferred\">inferred</span>" : ""
                out += "</td><td>\(confidenceBar(top["confidence"]?.double ?? 0))</td>"
            } else {
                out += "<td class=\"muted\">none yet</td><td></td>"
            }
            out += "<td>\(esc((i["affected"]?["services"]?.strings ?? []).joined(separator: ", ")))</td><td>\(esc(i["title"]?.str ?? ""))</td></tr>"
        }
        return Rendered(title: "Incidents", tab: "incidents", fragment: out + "</tbody></table>")
    }

    // MARK: One incident

    /// `from_ns` and `to_ns` zoom the timeline in on that stretch.
    static func incident(id: String, params: [String: String] = [:], _ query: UIQuery) throws -> Rendered {
        let doc = try query("explain", ["id": id])
        var window: (from: Int64, to: Int64)?
        if let from = params["from_ns"].flatMap({ Int64($0) }), let to = params["to_ns"].flatMap({ Int64($0) }), to > from { window = (from, to) }
        let st = doc["status"]?.str ?? ""
        var out = "<p><a href=\"/\">← Incidents</a></p><h1 class=\"incident-id\" data-id=\"\(esc(doc["id"]?.str ?? id))\">\(esc(doc["id"]?.str ?? id)) "
        out += "<span class=\"badge \(esc(st))\">\(esc(st))</span>"
        switch doc["pages"] {
        case .bool(true)?: out += " <span class=\"badge page\">page</span>"
        case .bool(false)?: out += " <span class=\"badge observation\">observation, not paged</span>"
        default: break
        }
        out += "</h1><p>\(esc(doc["title"]?.str ?? ""))</p><div class=\"meta\">"
        for (label, key) in [("detected", "detected_at"), ("opened", "opened_at"), ("updated", "updated_at"), ("resolved", "resolved_at")] {
            if let t = doc[key]?.stringValue { out += "<span>\(label) <b>\(esc(shortTime(t)))</b></span>" }
        }
        let affected = doc["affected"]
        out += "<span>services <b>\(esc((affected?["services"]?.strings ?? []).joined(separator: ", ")))</b></span>"
        out += "<span>nodes <b>\(esc((affected?["nodes"]?.strings ?? []).joined(separator: ", ")))</b></span>"
        if let merged = doc["merged_ids"]?.strings, !merged.isEmpty { out += "<span>merged <b>\(esc(merged.joined(separator: ", ")))</b></span>" }
        out += "</div>"

        out += "<h2>Root causes, ranked</h2>"
        let causes = doc["root_causes"]?.array ?? []
        if causes.isEmpty { out += "<div class=\"card muted\">No candidate yet.</div>" }
        for (rank, c) in causes.enumerated() {
            let kind = c["kind"]?.str ?? "", entity = c["entity"]?.str ?? ""
            out += "<div class=\"card cause\(rank == 0 ? " top" : "")\" data-rank=\"\(rank + 1)\" data-kind=\"\(esc(kind))\" data-entity=\"\(esc(entity))\">"
            out += "<h3>#\(rank + 1) <b>\(esc(kind))</b> at \(esc(entity)) \(confidenceBar(c["confidence"]?.double ?? 0))"
            out += c["inferred"] == .bool(true) ? " <span class=\"badge inferred\" title=\"no cause event seen; inferred from the symptoms\">inferred</span>" : ""
            out += "</h3><div class=\"meta\"><span>first seen <b>\(esc(shortTime(c["first_seen"]?.str ?? "")))</b></span><span>nodes <b>\(esc((c["nodes"]?.strings ?? []).joined(separator: ", ")))</b></span></div>"
            out += factorTable(c["factors"]?.array ?? [])
            let evidence = c["evidence"]?.strings ?? []
            if !evidence.isEmpty {
                out += "<details\(rank == 0 ? " open" : "")><summary>evidence (\(evidence.count))</summary><ul class=\"mono\">"
                for e in evidence.prefix(20) { out += "<li>\(esc(e))</li>" }
                out += "</ul></details>"
            }
            out += "</div>"
        }
        if let model = doc["model"]?.stringValue { out += "<p class=\"muted\">\(esc(model)); a factor's contribution is value × weight.</p>" }

        out += "<h2>Timeline: one lane per node</h2>" + TimelineLanes.fragment(doc, heading: false, window: window, links: true)

        out += "<h2>Symptoms</h2>"
        let symptoms = doc["symptoms"]?.array ?? []
        if symptoms.isEmpty { out += "<div class=\"card muted\">None.</div>" } else {
            out += "<table class=\"symptoms\"><thead><tr><th>Entity</th><th>Kind</th><th>Towards</th><th>Since (UTC)</th><th>Last</th><th class=\"num\">Count</th><th class=\"num\">Baseline</th><th>Active</th></tr></thead><tbody>"
            for s in symptoms {
                out += "<tr><td>\(esc(s["entity"]?.str ?? ""))</td><td><code>\(esc(s["kind"]?.str ?? ""))</code></td><td>\(esc(s["peer"]?.str ?? ""))</td>"
                out += "<td>\(esc(timeOfDay(s["since"]?.str ?? "")))</td><td>\(esc(timeOfDay(s["last"]?.str ?? "")))</td><td class=\"num\">\(s["count"]?.intValue ?? 0)</td>"
                out += "<td class=\"num\">\(fmt(s["baseline"]?.double ?? 0, 3)) \(esc((s["baseline_unit"]?.str ?? "").replacingOccurrences(of: "_", with: " ")))</td>"
                out += "<td>\(s["active"] == .bool(true) ? "<span class=\"badge open\">firing</span>" : "<span class=\"muted\">ended</span>")</td></tr>"
            }
            out += "</tbody></table>"
        }

        let links = doc["links"]?.array ?? []
        if !links.isEmpty {
            out += "<h2>Causal links</h2><table class=\"links\"><thead><tr><th>Cause</th><th>Symptom</th><th>Relation</th><th>Confidence</th></tr></thead><tbody>"
            for l in links.sorted(by: { ($0["confidence"]?.double ?? 0) > ($1["confidence"]?.double ?? 0) }) {
                let s = l["symptom"]
                out += "<tr><td>\(esc(l["cause"]?["kind"]?.str ?? "")) \(esc(l["cause"]?["entity"]?.str ?? ""))</td>"
                out += "<td>\(esc(s?["kind"]?.str ?? "")) at \(esc(s?["entity"]?.str ?? ""))\(s?["peer"]?.stringValue.map { " → " + esc($0) } ?? "")</td>"
                out += "<td><code>\(esc(l["relation"]?.str ?? ""))</code></td><td>\(confidenceBar(l["confidence"]?.double ?? 0))</td></tr>"
            }
            out += "</tbody></table>"
        }
        return Rendered(title: doc["id"]?.str ?? id, tab: "incidents", fragment: out)
    }

    static func factorTable(_ factors: [JSONValue]) -> String {
        guard !factors.isEmpty else { return "" }
        let contributions = factors.map { ($0["value"]?.double ?? 0) * ($0["weight"]?.double ?? 0) }
        let largest = max(0.01, contributions.map(abs).max() ?? 1)
        var out = "<table class=\"factors\"><thead><tr><th>Factor</th><th class=\"num\">Value</th><th class=\"num\">Weight</th><th>Contribution</th></tr></thead><tbody>"
        for (f, c) in zip(factors, contributions) {
            let w = Int((abs(c) / largest * 120).rounded())
            out += "<tr data-factor=\"\(esc(f["name"]?.str ?? ""))\"><td>\(esc((f["name"]?.str ?? "").replacingOccurrences(of: "_", with: " ")))</td>"
            out += "<td class=\"num\">\(fmt(f["value"]?.double ?? 0, 3))</td><td class=\"num\">\(fmt(f["weight"]?.double ?? 0, 2))</td>"
            out += "<td><span class=\"factor-bar \(c < 0 ? "neg" : "pos")\" style=\"width:\(w)px\"></span> \(abs(c) < 0.005 ? "0.00" : (c > 0 ? "+" : "") + fmt(c, 2))</td></tr>"
        }
        return out + "</tbody></table>"
    }

    // MARK: Service map

    static func services(_ query: UIQuery) throws -> Rendered {
        let doc = try query("services", [:])
        let open = (try query("incidents", ["status": "open"]))["incidents"]?.array ?? []
        let causes = Set(open.compactMap { $0["root_causes"]?.array.first?["entity"]?.stringValue })
        let affected = Set(open.flatMap { $0["affected"]?["services"]?.strings ?? [] })
        var out = "<h1>Service map</h1><p class=\"muted\">Who connects to whom, learned from the TCP connects the agents saw and from DNS answers. "
        out += "Red edges had failed connects (thicker: a larger share); red boxes are the root cause of an open incident, orange ones affected by one.</p>"
        out += "<div class=\"svgwrap\">\(ServiceMap.svg(doc, causes: causes, affected: affected))</div>"
        let edges = ServiceMap.edges(doc)
        if !edges.isEmpty {
            out += "<h2>Edges</h2><table class=\"edges\"><thead><tr><th>Client</th><th>Server</th><th class=\"num\">Connects</th><th class=\"num\">Failed</th><th class=\"num\">Fail %</th><th>Failures by outcome</th><th class=\"num\">Connect p50</th><th class=\"num\">p99</th><th class=\"num\">Response p50</th><th>Last seen</th></tr></thead><tbody>"
            for (e, raw) in zip(edges, doc["services"]?.array ?? []) {
                var outcomes: [String] = []
                if case .object(let o)? = raw["failures_by_outcome"] { outcomes = o.keys.sorted().map { "\($0) \(o[$0]?.intValue ?? 0)" } }
                out += "<tr class=\"\(e.failures > 0 ? "failing" : "")\"><td>\(esc(e.client))</td><td>\(esc(e.server))</td><td class=\"num\">\(e.connects)</td><td class=\"num\">\(e.failures)</td>"
                out += "<td class=\"num\">\(fmt(e.ratio * 100, 1))</td><td>\(esc(outcomes.joined(separator: ", ")))</td><td class=\"num\">\(fmt(e.p50)) ms</td><td class=\"num\">\(fmt(e.p99)) ms</td>"
                out += "<td class=\"num\">\(e.responseCount > 0 ? fmt(e.responseP50) + " ms" : "–")</td><td>\(esc(shortTime(raw["last_seen"]?.str ?? "")))</td></tr>"
            }
            out += "</tbody></table>"
        }
        if case .object(let names)? = doc["names"], !names.isEmpty {
            out += "<h2>DNS names</h2><table class=\"names\"><thead><tr><th>Name</th><th>Service</th></tr></thead><tbody>"
            for name in names.keys.sorted() { out += "<tr><td class=\"mono\">\(esc(name))</td><td>\(esc(names[name]?.str ?? ""))</td></tr>" }
            out += "</tbody></table>"
        }
        return Rendered(title: "Service map", tab: "services", fragment: out)
    }

    // MARK: Nodes

    /// The agents: connected or not, their clock offset with its
    /// uncertainty (what the timeline's bars come from), what they delivered
    /// and lost, programs that could not run.
    static func nodes(_ query: UIQuery) throws -> Rendered {
        let list = (try query("nodes", [:]))["nodes"]?.array ?? []
        var out = "<h1>Nodes</h1><p class=\"muted\">Each agent's clock offset is estimated from time-sync exchanges on its connection; "
        out += "its uncertainty is the ± every event of that node carries on the timeline.</p>"
        guard !list.isEmpty else { return Rendered(title: "Nodes", tab: "nodes", fragment: out + "<div class=\"card muted\">No agent has connected yet.</div>") }
        out += "<table class=\"nodes\"><thead><tr><th>Node</th><th>Connected</th><th>Last seen (UTC)</th><th class=\"num\">Clock offset</th><th class=\"num\">Events</th><th class=\"num\">Dropped</th><th>Programs</th><th>Agent</th></tr></thead><tbody>"
        for n in list.sorted(by: { ($0["node"]?.str ?? "") < ($1["node"]?.str ?? "") }) {
            let connected = n["connected"] == .bool(true)
            let offset = Double(n["clock_offset_ns"]?.intValue ?? 0), error = Double(n["clock_error_ns"]?.intValue ?? 0)
            let degraded = n["degraded"]?.strings ?? []
            var drops: [String] = []
            if case .object(let d)? = n["drops"] { drops = d.keys.sorted().map { "\($0) \(d[$0]?.intValue ?? 0)" } }
            out += "<tr class=\"node\" data-node=\"\(esc(n["node"]?.str ?? ""))\"><td><b>\(esc(n["node"]?.str ?? ""))</b></td>"
            out += "<td>\(connected ? "<span class=\"badge resolved\">connected</span>" : "<span class=\"badge\">not connected</span>")</td>"
            out += "<td>\(esc(shortTime(n["last_seen"]?.str ?? "")))</td><td class=\"num mono\">\(offset < 0 ? "−" : "+")\(esc(duration(ns: abs(offset)))) ± \(esc(duration(ns: error)))</td>"
            out += "<td class=\"num\">\(n["events_received"]?.intValue ?? 0)</td><td class=\"num\" title=\"\(esc(drops.joined(separator: ", ")))\">\(n["drops_total"]?.intValue ?? 0)</td>"
            out += "<td>\(n["capabilities"]?.array.count ?? 0) running\(degraded.isEmpty ? "" : ", <span class=\"badge inferred\">\(degraded.count) degraded</span> " + esc(degraded.joined(separator: ", ")))</td>"
            out += "<td class=\"mono\">\(esc(n["agent_version"]?.str ?? ""))</td></tr>"
        }
        return Rendered(title: "Nodes", tab: "nodes", fragment: out + "</tbody></table>")
    }

    // MARK: Events

    /// Filters: kind, node, pod (a trailing * matches a prefix), since (a
    /// duration back from now or an RFC 3339 time), limit.
    static func events(_ params: [String: String], _ query: UIQuery, nowNs: Int64 = wallClockNs()) throws -> Rendered {
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
        let nodes = ((try? query("nodes", [:]))?["nodes"]?.array ?? []).compactMap { $0["node"]?.stringValue }.sorted()
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
        let doc = try query("events", q)
        let events = (doc["events"]?.array ?? []).reversed()
        out += "<p class=\"muted\">\(events.count) event\(events.count == 1 ? "" : "s"), newest first (at most \(limit))."
        if let note = doc["retention"]?["note"]?.stringValue { out += " \(esc(note))." }
        out += "</p>"
        guard !events.isEmpty else { return Rendered(title: "Events", tab: "events", fragment: out + "<div class=\"card muted\">No events match.</div>") }
        out += "<table class=\"events\"><thead><tr><th>Time (UTC)</th><th>Node</th><th>Kind</th><th>Pod</th><th>Process</th><th>Detail</th></tr></thead><tbody>"
        let common: Set<String> = ["time", "time_ns", "node", "kind", "pod", "namespace", "comm", "pid", "cgroup_id", "container_id", "time_error_ns"]
        for e in events {
            var detail: [String] = []
            if case .object(let o) = e {
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
            let podName = e["pod"]?.str ?? ""
            let ns = e["namespace"]?.str ?? ""
            out += "<tr class=\"event\" data-kind=\"\(esc(e["kind"]?.str ?? ""))\" data-node=\"\(esc(e["node"]?.str ?? ""))\"><td class=\"mono\">\(esc(shortTime(e["time"]?.str ?? "")))\(esc(fraction(e["time"]?.str ?? "")))</td>"
            out += "<td>\(esc(e["node"]?.str ?? ""))</td><td><code>\(esc(e["kind"]?.str ?? ""))</code></td>"
            out += "<td>\(esc(ns.isEmpty ? podName : "\(ns)/\(podName)"))</td><td>\(esc(e["comm"]?.str ?? ""))\(e["pid"]?.intValue.map { " <span class=\"muted\">\($0)</span>" } ?? "")</td>"
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
