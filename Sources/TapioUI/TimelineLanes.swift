import Foundation
import TapioQueryAPI
import TapioWire

/// An incident's timeline drawn as one lane per node on the corrected clock
/// (docs/ui.md): each event is a mark at its time with a bar for its
/// uncertainty (`time_error_ns` either side), causes as red diamonds,
/// symptoms as orange dots, numbered in time order. Events the server marks
/// `concurrent_with` each other (different nodes, overlapping uncertainty
/// intervals) are drawn violet and under a shaded band across the lanes: their
/// order is not known, and the picture does not pretend it is.
///
/// The same drawing serves the incident page and `tapio timeline ID -o svg`
/// (`-o html`), which add a header and the numbered list of events so the
/// file stands alone in a ticket.
public enum TimelineLanes {
    struct Entry {
        var number: Int
        var id: String
        var timeNs: Int64
        var errorNs: Int64
        var node: String
        var kind: String
        var entity: String
        var summary: String
        var time: String
        var isCause: Bool
        var concurrentWith: [String]
    }

    static func entries(_ doc: QueryIncident) -> [Entry] {
        var out: [Entry] = []
        for e in doc.timeline ?? [] {
            out.append(Entry(number: 0, id: e.id, timeNs: e.timeNs, errorNs: max(0, e.timeErrorNs), node: e.node, kind: e.kind, entity: e.entity,
                             summary: e.summary, time: e.time.isEmpty ? rfc3339(ns: e.timeNs) : e.time, isCause: e.role == "cause",
                             concurrentWith: e.concurrentWith))
        }
        out.sort { ($0.timeNs, $0.node, $0.id) < ($1.timeNs, $1.node, $1.id) }
        for i in out.indices { out[i].number = i + 1 }
        return out
    }

    /// Nodes in the order of their first event.
    static func nodes(_ entries: [Entry]) -> [String] {
        var seen = Set<String>()
        return entries.compactMap { seen.insert($0.node).inserted ? $0.node : nil }
    }

    static let labelWidth = 140.0
    static let plotWidth = 1000.0
    static let rightMargin = 24.0
    static let rowHeight = 18.0
    static let axisHeight = 46.0

    /// The lanes as an `<svg>` element. `standalone` adds the incident's
    /// header above and the list of events below, and the XML namespace
    /// declarations a file needs.
    /// `window`: only this stretch of time (`from`/`to` in ns), for the
    /// page's zoom; `links`: bands link to a zoom on themselves.
    public static func svg(_ doc: QueryIncident, standalone: Bool = false) -> String {
        svg(doc, standalone: standalone, window: nil, links: false)
    }

    static func svg(_ doc: QueryIncident, standalone: Bool, window: (from: Int64, to: Int64)?, links: Bool) -> String {
        let entries = entries(doc)
        let width = labelWidth + plotWidth + rightMargin
        var body = ""
        var y = 8.0
        if standalone {
            body += "<text x=\"8\" y=\"\(y + 14)\" class=\"title\">\(esc("\(doc.id)  \(doc.status)  \(doc.title)"))</text>"
            y += 22
            for (rank, c) in doc.rootCauses.prefix(3).enumerated() {
                let line = "#\(rank + 1) \(c.kind) \(c.entity)  confidence \(fmt(c.confidence))"
                body += "<text x=\"8\" y=\"\(y + 13)\" class=\"cause-line\">\(esc(line))</text>"
                y += 18
            }
            y += 6
        }
        guard let first = entries.first else {
            body += "<text x=\"8\" y=\"\(y + 16)\" class=\"note\">no timeline entries</text>"
            y += 28
            return wrap(body, width: width, height: y, standalone: standalone)
        }
        let axis = Axis(entries.filter { e in window.map { e.timeNs + e.errorNs >= $0.from && e.timeNs - e.errorNs <= $0.to } ?? true }
                            .map { ($0.timeNs - $0.errorNs, $0.timeNs + $0.errorNs) },
                        window: window.map { ($0.from, $0.to) }, x0: labelWidth, width: plotWidth)
        func x(_ t: Int64) -> Double { axis.x(t) }
        func shown(_ e: Entry) -> Bool { e.timeNs + e.errorNs >= axis.lo && e.timeNs - e.errorNs <= axis.hi }

        // The axis: the date once, ticks at a round step with the time of
        // day in each stretch of events; long quiet gaps between stretches
        // are cut out and marked, so the events are not squeezed into a
        // corner by one late one.
        let day = String(first.time.prefix(10))
        let axisY = y + axisHeight - 10
        let scaleNote = axis.segments.count > 1 ? "; ⋯ marks a quiet gap cut out (scales differ either side)" : ""
        let zoomNote = window != nil ? "; zoomed in" : links ? "; click a ≈ band to zoom in" : ""
        body += "<text x=\"8\" y=\"\(y + 14)\" class=\"note\">\(esc("times UTC on \(day), corrected clock; bars: ± uncertainty; shaded ≈: order unknown\(scaleNote)\(zoomNote)"))</text>"
        var ticks = ""
        var lastLabel = -Double.infinity
        for segment in axis.segments {
            let step = tickStep(spanNs: Double(segment.hi - segment.lo), maxTicks: max(1, Int((segment.x1 - segment.x0) / 110)))
            let digits = step < 1_000 ? 9 : step < 1_000_000 ? 6 : step < 1_000_000_000 ? 3 : 0
            var tick = (segment.lo / step + 1) * step
            while tick < segment.hi {
                let tx = x(tick)
                ticks += "<line x1=\"\(r(tx))\" y1=\"\(r(axisY))\" x2=\"\(r(tx))\" y2=\"@BOTTOM@\" class=\"grid\"/>"
                // Labels keep clear of each other and of a gap's mark.
                if tx - lastLabel > 95, segment.x0 == axis.segments[0].x0 || tx - segment.x0 > 45 {
                    ticks += "<text x=\"\(r(tx))\" y=\"\(r(axisY - 6))\" class=\"tick\" text-anchor=\"middle\">\(esc(timeOfDay(rfc3339(ns: tick), digits: digits)))</text>"
                    lastLabel = tx
                }
                tick += step
            }
        }
        for (a, b) in zip(axis.segments, axis.segments.dropFirst()) {
            let gx = (a.x1 + b.x0) / 2
            ticks += "<g class=\"gap\"><title>\(esc("\(duration(ns: Double(b.lo - a.hi))) without events cut out"))</title>"
            ticks += "<line x1=\"\(r(gx))\" y1=\"\(r(axisY))\" x2=\"\(r(gx))\" y2=\"@BOTTOM@\" class=\"gap-line\"/>"
            ticks += "<text x=\"\(r(gx))\" y=\"\(r(axisY - 6))\" class=\"gap-label\" text-anchor=\"middle\">⋯</text></g>"
        }
        body += "@TICKS@"

        // Lanes: each event in the first row of its lane where it fits.
        var lanesSVG = ""
        var laneBackgrounds = ""  // under the grid and the bands, the events above them
        var laneY = axisY + 4
        var positions: [String: (x: Double, y: Double)] = [:]
        let laneOrder = nodes(entries)
        for (index, node) in laneOrder.enumerated() {
            var rowEnds: [Double] = []
            var placed: [(Entry, Int)] = []
            for e in entries where e.node == node && shown(e) {
                let start = min(x(e.timeNs - e.errorNs), x(e.timeNs) - 7)
                let end = max(x(e.timeNs + e.errorNs), x(e.timeNs) + 9 + Double(String(e.number).count) * 7)
                if let row = rowEnds.firstIndex(where: { $0 + 2 <= start }) {
                    rowEnds[row] = end
                    placed.append((e, row))
                } else {
                    rowEnds.append(end)
                    placed.append((e, rowEnds.count - 1))
                }
            }
            let height = Double(max(1, rowEnds.count)) * rowHeight + 10
            lanesSVG += "<g class=\"lane\" data-node=\"\(esc(node))\">"
            laneBackgrounds += "<rect x=\"0\" y=\"\(r(laneY))\" width=\"\(r(width))\" height=\"\(r(height))\" class=\"lane-bg\(index % 2 == 1 ? " alt" : "")\"/>"
            lanesSVG += "<text x=\"8\" y=\"\(r(laneY + 17))\" class=\"lane-label\">\(esc(shorten(node, 18)))</text>"
            for (e, row) in placed {
                let cy = laneY + 5 + Double(row) * rowHeight + rowHeight / 2
                let cx = x(e.timeNs)
                positions[e.id] = (cx, cy)
                let concurrent = !e.concurrentWith.isEmpty
                let classes = "event \(e.isCause ? "cause" : "symptom")\(concurrent ? " concurrent" : "")"
                let tooltip = "#\(e.number) \(e.time) ±\(duration(ns: Double(e.errorNs))) \(e.node) \(e.kind) \(e.entity): \(e.summary)"
                    + (concurrent ? " (concurrent with \(e.concurrentWith.count) event\(e.concurrentWith.count == 1 ? "" : "s") on other nodes)" : "")
                lanesSVG += "<g class=\"\(classes)\" data-id=\"\(esc(e.id))\" data-kind=\"\(esc(e.kind))\"><title>\(esc(tooltip))</title>"
                let bx = x(e.timeNs - e.errorNs)
                let bw = max(2, x(e.timeNs + e.errorNs) - bx)
                lanesSVG += "<rect x=\"\(r(min(bx, cx - 1)))\" y=\"\(r(cy - 3))\" width=\"\(r(bw))\" height=\"6\" rx=\"2\" class=\"err\"/>"
                if e.isCause {
                    lanesSVG += "<path d=\"M\(r(cx)) \(r(cy - 6)) L\(r(cx + 6)) \(r(cy)) L\(r(cx)) \(r(cy + 6)) L\(r(cx - 6)) \(r(cy)) Z\" class=\"mark\"/>"
                } else {
                    lanesSVG += "<circle cx=\"\(r(cx))\" cy=\"\(r(cy))\" r=\"4.5\" class=\"mark\"/>"
                }
                lanesSVG += "<text x=\"\(r(cx + 8))\" y=\"\(r(cy + 4))\" class=\"num\">\(e.number)</text></g>"
            }
            lanesSVG += "</g>"
            laneY += height
        }
        let bottom = laneY

        // Bands over the lanes for each group of events concurrent with each other.
        var bands = ""
        for group in concurrentGroups(entries) where group.allSatisfy(shown) {
            let from = group.map { $0.timeNs - $0.errorNs }.min()!, to = group.map { $0.timeNs + $0.errorNs }.max()!
            let a = x(from)
            let b = x(to)
            let w = max(8, b - a)
            let left = (a + b) / 2 - w / 2
            let ids = group.map(\.id).joined(separator: " ")
            bands += "<g class=\"concurrent-band\" data-ids=\"\(esc(ids))\"><title>\(esc("events \(group.map { "#\($0.number)" }.joined(separator: ", ")) on \(Set(group.map(\.node)).count) nodes: their uncertainty intervals overlap, so their order is not known"))</title>"
            bands += "<rect x=\"\(r(left))\" y=\"\(r(axisY))\" width=\"\(r(w))\" height=\"\(r(bottom - axisY))\" class=\"band\"/>"
            bands += "<text x=\"\(r(left + w / 2))\" y=\"\(r(axisY + 1))\" class=\"band-label\" text-anchor=\"middle\">≈</text></g>"
            if links, window == nil {
                // Zoom: the group and as much again either side.
                let margin = max(to - from, 2_000)
                bands = bands.replacingOccurrences(of: "<g class=\"concurrent-band\" data-ids=\"\(esc(ids))\">",
                                                   with: "<a href=\"?from_ns=\(from - margin)&amp;to_ns=\(to + margin)#timeline\"><g class=\"concurrent-band\" data-ids=\"\(esc(ids))\">") + "</a>"
            }
        }
        body = body.replacingOccurrences(of: "@TICKS@", with: laneBackgrounds + ticks.replacingOccurrences(of: "@BOTTOM@", with: r(bottom)) + bands + lanesSVG)
        y = bottom + 10

        if standalone {
            y += 8
            for e in entries {
                let line = "\(String(format: "%3d", e.number))  \(timeOfDay(e.time, digits: 9))  ±\(duration(ns: Double(e.errorNs)))  \(shorten(e.node, 16))  \(e.isCause ? "[cause] " : "")\(e.kind) \(shorten(e.entity, 24))  \(e.summary)"
                body += "<text x=\"8\" y=\"\(r(y + 12))\" class=\"list\" xml:space=\"preserve\">\(esc(shorten(line, 165)))</text>"
                y += 16
            }
            y += 6
        }
        return wrap(body, width: width, height: y, standalone: standalone)
    }

    /// A whole HTML document: the lanes and the list of events as a table,
    /// every summary whole. No script, no external file.
    public static func htmlDocument(_ doc: QueryIncident) -> String {
        let title = "\(doc.id) \(doc.title)"
        return """
            <!doctype html>
            <html lang="en"><head><meta charset="utf-8"><title>\(esc(title))</title><style>\(styleSheet)</style></head>
            <body><main>\(fragment(doc, heading: true))</main></body></html>
            """
    }

    /// The timeline section of a page: optionally the incident's heading,
    /// then the lanes and the numbered list of events.
    static func fragment(_ doc: QueryIncident, heading: Bool, window: (from: Int64, to: Int64)? = nil, links: Bool = false) -> String {
        var out = ""
        if heading {
            out += "<h1>\(esc(doc.id)) <span class=\"badge \(esc(doc.status))\">\(esc(doc.status))</span></h1>"
            out += "<p>\(esc(doc.title))</p><ol>"
            for c in doc.rootCauses {
                out += "<li><b>\(esc(c.kind))</b> \(esc(c.entity)) \(confidenceBar(c.confidence))</li>"
            }
            out += "</ol>"
        }
        let entries = entries(doc)
        if let window {
            out += "<p>Zoomed in on \(esc(timeOfDay(rfc3339(ns: window.from), digits: 9))) – \(esc(timeOfDay(rfc3339(ns: window.to), digits: 9))) UTC · <a href=\"?#timeline\">the whole timeline</a></p>"
        }
        out += "<div class=\"svgwrap\" id=\"timeline\">\(svg(doc, standalone: false, window: window, links: links))</div>"
        guard !entries.isEmpty else { return out }
        out += "<table class=\"timeline-list\"><thead><tr><th>#</th><th>Time (UTC)</th><th>±</th><th>Node</th><th>Role</th><th>Kind</th><th>Entity</th><th>Summary</th></tr></thead><tbody>"
        for e in entries {
            let concurrent = e.concurrentWith.isEmpty ? "" : " <span class=\"badge\" title=\"order against events on other nodes unknown\">≈</span>"
            out += "<tr data-id=\"\(esc(e.id))\"><td class=\"num\">\(e.number)</td><td class=\"mono\">\(esc(timeOfDay(e.time, digits: 9)))\(concurrent)</td>"
            out += "<td class=\"num mono\">\(esc(duration(ns: Double(e.errorNs))))</td><td>\(esc(e.node))</td>"
            out += "<td>\(e.isCause ? "<span class=\"badge open\">cause</span>" : "symptom")</td><td><code>\(esc(e.kind))</code></td><td>\(esc(e.entity))</td><td>\(esc(e.summary))</td></tr>"
        }
        return out + "</tbody></table>"
    }

    static func wrap(_ body: String, width: Double, height: Double, standalone: Bool) -> String {
        let ns = standalone ? " xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\"" : ""
        return "<svg\(ns) class=\"timeline-lanes\" width=\"\(r(width))\" height=\"\(r(height))\" viewBox=\"0 0 \(r(width)) \(r(height))\" role=\"img\" aria-label=\"incident timeline, one lane per node\"><style>\(svgStyle)</style>\(standalone ? "<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>" : "")\(body)</svg>"
    }

    /// Scoped to the drawing: an inline SVG's style sheet applies to the whole page.
    static let svgStyle = """
        .timeline-lanes text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:12px;fill:#1d232b}
        .timeline-lanes .title{font-size:14px;font-weight:700}.timeline-lanes .cause-line{font-size:12.5px}.timeline-lanes .note{fill:#667085}.timeline-lanes .tick{fill:#667085;font-size:11px}
        .timeline-lanes .grid{stroke:#e3e7ec;stroke-width:1}.timeline-lanes .lane-bg{fill:#fbfcfd;stroke:#e3e7ec}.timeline-lanes .lane-bg.alt{fill:#f3f5f8}.timeline-lanes .lane-label{font-weight:600}
        .timeline-lanes .event .err{fill:#f0b27a}.timeline-lanes .event .mark{fill:#d9822b;stroke:#fff;stroke-width:1}.timeline-lanes .event.cause .err{fill:#ea9a96}.timeline-lanes .event.cause .mark{fill:#c8312c}
        .timeline-lanes .event.concurrent .err{fill:#b9a2e6}.timeline-lanes .num{font-size:10.5px;fill:#344054}
        .timeline-lanes .band{fill:#7b4fc9;fill-opacity:.10;stroke:#7b4fc9;stroke-opacity:.35;stroke-dasharray:3 3}.timeline-lanes .band-label{fill:#7b4fc9;font-weight:700}
        .timeline-lanes .gap-line{stroke:#98a2b3;stroke-width:1;stroke-dasharray:2 4}.timeline-lanes .gap-label{fill:#667085;font-weight:700}
        .timeline-lanes .list{font-family:ui-monospace,Menlo,monospace;font-size:11.5px}
        """

    /// Connected groups of events linked by `concurrent_with`.
    static func concurrentGroups(_ entries: [Entry]) -> [[Entry]] {
        let byId = Dictionary(entries.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        var seen = Set<String>()
        var groups: [[Entry]] = []
        for e in entries where !e.concurrentWith.isEmpty && !seen.contains(e.id) {
            var group: [Entry] = []
            var stack = [e.id]
            seen.insert(e.id)
            while let id = stack.popLast() {
                guard let entry = byId[id] else { continue }
                group.append(entry)
                for other in entry.concurrentWith where !seen.contains(other) && byId[other] != nil {
                    seen.insert(other)
                    stack.append(other)
                }
            }
            if group.count > 1 { groups.append(group.sorted { $0.number < $1.number }) }
        }
        return groups
    }

    /// A round step (1, 2 or 5 × a power of ten ns) giving at most 8 ticks.
    static func tickStep(spanNs: Double, maxTicks: Int = 8) -> Int64 {
        var step: Int64 = 1
        while true {
            for m: Int64 in [1, 2, 5] where spanNs / Double(step * m) <= Double(maxTicks) { return step * m }
            step *= 10
        }
    }

    /// RFC 3339 with up to nine fraction digits, in UTC ("Z") or with an offset.
    static func parseTime(_ text: String) -> Int64? {
        let parts = text.split(separator: ".", maxSplits: 1)
        guard let head = parts.first, head.count == 19 else { return nil }
        var fractionNs: Int64 = 0
        var zone = ""
        if parts.count == 2 {
            let digits = parts[1].prefix { $0.isNumber }
            zone = String(parts[1].dropFirst(digits.count))
            fractionNs = Int64((digits + String(repeating: "0", count: max(0, 9 - digits.count))).prefix(9)) ?? 0
        } else {
            zone = String(text.dropFirst(19))
        }
        let f = ISO8601DateFormatter()
        guard let date = f.date(from: head + (zone.isEmpty ? "Z" : zone)) else { return nil }
        return Int64(date.timeIntervalSince1970) * 1_000_000_000 + fractionNs
    }
}

/// Time to x: one linear stretch per run of events, quiet gaps longer than
/// a tenth of the whole span (and over 1 ms) cut out to `gapWidth` pixels.
/// Each stretch gets a share of the width by its length, at least 70 pixels.
struct Axis {
    struct Segment {
        var lo: Int64, hi: Int64
        var x0: Double, x1: Double
    }

    var segments: [Segment] = []
    var lo: Int64 { segments.first?.lo ?? 0 }
    var hi: Int64 { segments.last?.hi ?? 0 }
    static let gapWidth = 34.0

    init(_ intervals: [(Int64, Int64)], window: (Int64, Int64)?, x0: Double, width: Double) {
        var runs: [(lo: Int64, hi: Int64)] = []
        if let window {
            runs = [(window.0, max(window.1, window.0 + 1))]
        } else {
            let sorted = intervals.sorted { $0.0 < $1.0 }
            guard let first = sorted.first else {
                segments = [Segment(lo: 0, hi: 1, x0: x0, x1: x0 + width)]
                return
            }
            let span = (sorted.map(\.1).max() ?? first.1) - first.0
            let cut = max(span / 10, 1_000_000)
            runs = [(first.0, first.1)]
            for (a, b) in sorted.dropFirst() {
                if a - runs[runs.count - 1].hi > cut { runs.append((a, b)) } else { runs[runs.count - 1].hi = max(runs[runs.count - 1].hi, b) }
            }
            // Room either side of each run's first and last event.
            runs = runs.map { run in
                let pad = max((run.hi - run.lo) / 25, 20_000)
                return (run.lo - pad, run.hi + pad)
            }
        }
        let available = width - Self.gapWidth * Double(runs.count - 1)
        let minimum = min(70, available / Double(runs.count))
        let total = Double(runs.reduce(Int64(0)) { $0 + ($1.hi - $1.lo) })
        var x = x0
        for run in runs {
            let w = minimum + (available - minimum * Double(runs.count)) * Double(run.hi - run.lo) / max(total, 1)
            segments.append(Segment(lo: run.lo, hi: run.hi, x0: x, x1: x + w))
            x += w + Self.gapWidth
        }
    }

    func x(_ t: Int64) -> Double {
        guard let first = segments.first else { return 0 }
        if t <= first.lo { return first.x0 }
        for (i, s) in segments.enumerated() {
            if t <= s.hi { return s.x0 + Double(t - s.lo) / Double(max(1, s.hi - s.lo)) * (s.x1 - s.x0) }
            if i + 1 < segments.count, t < segments[i + 1].lo {
                let next = segments[i + 1]
                return s.x1 + Double(t - s.hi) / Double(max(1, next.lo - s.hi)) * (next.x0 - s.x1)
            }
        }
        return segments.last!.x1
    }
}

/// A coordinate with one decimal.
func r(_ v: Double) -> String { String(format: "%.1f", v) }

func shorten(_ text: String, _ limit: Int) -> String {
    text.count <= limit ? text : String(text.prefix(limit - 1)) + "…"
}
