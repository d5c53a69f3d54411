import Foundation
import TapioQueryAPI
import TapioWire

/// The dependency graph of `services` as an SVG: callers on the left, the
/// services they depend on to their right (columns by the longest chain of
/// callers before them), one arrow per client → server edge labelled with its
/// connect p50 and failure ratio. Edges with failed connects are red, thicker
/// the larger their share of failures; services that are a root cause of an
/// open incident are outlined red, services an open incident affects orange.
enum ServiceMap {
    struct Edge {
        var client: String
        var server: String
        var connects: Int64
        var failures: Int64
        var ratio: Double
        var p50: Double
        var p99: Double
        var responseP50: Double
        var responseCount: Int64
    }

    static func edges(_ doc: ServicesAnswer) -> [Edge] {
        doc.services.map { e in
            Edge(client: e.client, server: e.server, connects: e.connects, failures: e.failures, ratio: e.failureRatio,
                 p50: e.connectLatency.p50Ms, p99: e.connectLatency.p99Ms, responseP50: e.responseLatency.p50Ms, responseCount: e.responseLatency.count)
        }
    }

    /// Column of each service: 0 for those nobody calls, else one more than
    /// the furthest of its callers (cycles are cut after as many rounds as
    /// there are services).
    static func columns(_ edges: [Edge]) -> [String: Int] {
        var names = Set<String>()
        for e in edges { names.insert(e.client); names.insert(e.server) }
        var column = Dictionary(uniqueKeysWithValues: names.map { ($0, 0) })
        for _ in 0..<names.count {
            var changed = false
            for e in edges where e.client != e.server {
                let want = column[e.client]! + 1
                if column[e.server]! < want, want < names.count {
                    column[e.server] = want
                    changed = true
                }
            }
            if !changed { break }
        }
        return column
    }

    static let boxWidth = 170.0
    static let boxHeight = 40.0
    static let columnGap = 140.0
    static let rowGap = 28.0

    /// `causes`: entities that are a root cause of an open incident;
    /// `affected`: services an open incident affects.
    static func svg(_ doc: ServicesAnswer, causes: Set<String>, affected: Set<String>) -> String {
        let edges = edges(doc)
        guard !edges.isEmpty else {
            return "<p class=\"muted\">No connections learned yet: the map fills in as agents report TCP connects between pods.</p>"
        }
        let column = columns(edges)
        var byColumn: [Int: [String]] = [:]
        for (name, c) in column { byColumn[c, default: []].append(name) }
        for c in byColumn.keys { byColumn[c]!.sort() }
        let tallest = byColumn.values.map(\.count).max() ?? 1
        let height = 30 + Double(tallest) * (boxHeight + rowGap) + 10
        let width = 30 + Double(byColumn.count) * (boxWidth + columnGap) - columnGap + 30
        var position: [String: (x: Double, y: Double)] = [:]
        for (c, names) in byColumn {
            let top = 30 + (Double(tallest - names.count) * (boxHeight + rowGap)) / 2
            for (i, name) in names.enumerated() {
                position[name] = (30 + Double(c) * (boxWidth + columnGap), top + Double(i) * (boxHeight + rowGap))
            }
        }
        var out = "<svg class=\"service-map\" width=\"\(r(width))\" height=\"\(r(height))\" viewBox=\"0 0 \(r(width)) \(r(height))\" role=\"img\" aria-label=\"service map\">"
        out += "<style>\(style)</style><defs>"
        out += "<marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerUnits=\"userSpaceOnUse\" markerWidth=\"10\" markerHeight=\"10\" orient=\"auto-start-reverse\"><path d=\"M0 0 L10 5 L0 10 z\" fill=\"#8792a2\"/></marker>"
        out += "<marker id=\"arrow-failing\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerUnits=\"userSpaceOnUse\" markerWidth=\"10\" markerHeight=\"10\" orient=\"auto-start-reverse\"><path d=\"M0 0 L10 5 L0 10 z\" fill=\"#c8312c\"/></marker></defs>"
        var labels = ""
        for e in edges {
            guard let a = position[e.client], let b = position[e.server] else { continue }
            let failing = e.failures > 0
            let cls = "edge\(failing ? " failing" : "")"
            let stroke = failing ? 1.5 + 4 * min(1, e.ratio * 4) : 1.5
            var path: String
            var mid: (x: Double, y: Double)
            if e.client == e.server {
                let x0 = a.x + boxWidth - 30, y0 = a.y
                path = "M\(r(x0)) \(r(y0)) C\(r(x0 + 10)) \(r(y0 - 40)) \(r(x0 + 50)) \(r(y0 - 20)) \(r(a.x + boxWidth)) \(r(a.y + 10))"
                mid = (x0 + 30, y0 - 26)
            } else if b.x > a.x {
                let x0 = a.x + boxWidth, y0 = a.y + boxHeight / 2, x1 = b.x, y1 = b.y + boxHeight / 2
                let dx = (x1 - x0) / 2
                path = "M\(r(x0)) \(r(y0)) C\(r(x0 + dx)) \(r(y0)) \(r(x1 - dx)) \(r(y1)) \(r(x1)) \(r(y1))"
                mid = ((x0 + x1) / 2, (y0 + y1) / 2)
            } else {
                // A call back to an earlier column: around, below the boxes.
                let x0 = a.x + boxWidth / 2, y0 = a.y + boxHeight, x1 = b.x + boxWidth / 2, y1 = b.y + boxHeight
                let low = max(y0, y1) + rowGap * 0.8
                path = "M\(r(x0)) \(r(y0)) C\(r(x0)) \(r(low)) \(r(x1)) \(r(low)) \(r(x1)) \(r(y1))"
                mid = ((x0 + x1) / 2, low - 4)
            }
            let summary = "\(e.client) → \(e.server): \(e.connects) connects, \(e.failures) failed (\(fmt(e.ratio * 100, 1)) %), connect p50 \(fmt(e.p50)) ms, p99 \(fmt(e.p99)) ms"
                + (e.responseCount > 0 ? ", response p50 \(fmt(e.responseP50)) ms" : "")
            out += "<g class=\"\(cls)\" data-client=\"\(esc(e.client))\" data-server=\"\(esc(e.server))\"><title>\(esc(summary))</title>"
            out += "<path d=\"\(path)\" stroke-width=\"\(r(stroke))\" marker-end=\"url(#\(failing ? "arrow-failing" : "arrow"))\"/></g>"
            let label = failing ? "\(fmt(e.p50)) ms · \(fmt(e.ratio * 100, 1))% fail" : "\(fmt(e.p50)) ms"
            labels += "<text x=\"\(r(mid.x))\" y=\"\(r(mid.y - 4))\" text-anchor=\"middle\" class=\"edge-label\(failing ? " failing" : "")\">\(esc(label))</text>"
        }
        out += labels
        for name in position.keys.sorted() {
            let p = position[name]!
            let state = causes.contains(name) ? " cause" : affected.contains(name) ? " affected" : ""
            let calls = edges.filter { $0.server == name }
            let inbound = calls.reduce(Int64(0)) { $0 + $1.connects }
            let failed = calls.reduce(Int64(0)) { $0 + $1.failures }
            let detail = inbound > 0 ? "\(inbound) in" + (failed > 0 ? ", \(failed) failed" : "") : "client"
            out += "<g class=\"svc-node\(state)\" data-name=\"\(esc(name))\"><title>\(esc("\(name): \(detail)"))</title>"
            out += "<rect x=\"\(r(p.x))\" y=\"\(r(p.y))\" width=\"\(r(boxWidth))\" height=\"\(r(boxHeight))\" rx=\"6\"/>"
            out += "<text x=\"\(r(p.x + 10))\" y=\"\(r(p.y + 17))\" class=\"svc-name\">\(esc(shorten(name, 22)))</text>"
            out += "<text x=\"\(r(p.x + 10))\" y=\"\(r(p.y + 32))\" class=\"svc-detail\">\(esc(detail))</text></g>"
        }
        return out + "</svg>"
    }

    /// Scoped to the drawing: an inline SVG's style sheet applies to the whole page.
    static let style = """
        .service-map text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;font-size:12px;fill:#1d232b}
        .service-map .edge path{fill:none;stroke:#8792a2}.service-map .edge.failing path{stroke:#c8312c}
        .service-map .edge-label{font-size:11px;fill:#475467;paint-order:stroke;stroke:#fff;stroke-width:3px}.service-map .edge-label.failing{fill:#a3231e;font-weight:600}
        .service-map .svc-node rect{fill:#fff;stroke:#98a2b3;stroke-width:1.5}.service-map .svc-node.affected rect{fill:#fff6ec;stroke:#d9822b;stroke-width:2}
        .service-map .svc-node.cause rect{fill:#fdecea;stroke:#c8312c;stroke-width:2.5}.service-map .svc-name{font-weight:700}.service-map .svc-detail{font-size:11px;fill:#667085}
        """
}
