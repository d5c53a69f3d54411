import Foundation
import TapioWire

// The pieces every page is made of: escaping (everything shown comes from
// the cluster — pod names, DNS names, process names — and is escaped before
// it reaches HTML or SVG), the page shell with its style sheet, and the small
// script that keeps a page live. No framework: the server renders, the
// script only swaps the rendered fragment in.

/// Text for HTML and SVG content and attribute values.
func esc(_ s: String) -> String {
    var out = ""
    out.reserveCapacity(s.utf8.count)
    for c in s.unicodeScalars {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&#39;"
        default:
            // XML 1.0 has no place for most control characters, even escaped.
            if c.value < 0x20, c != "\n", c != "\t" { out += "\u{FFFD}" } else { out.unicodeScalars.append(c) }
        }
    }
    return out
}

/// A query parameter value for a URL.
func urlEncode(_ s: String) -> String {
    var allowed = CharacterSet.alphanumerics
    allowed.insert(charactersIn: "-._~")
    return s.addingPercentEncoding(withAllowedCharacters: allowed) ?? ""
}

func fmt(_ v: Double, _ digits: Int = 2) -> String { String(format: "%.\(digits)f", v) }

/// "12.3 ms", "850 µs", "2.10 s".
func duration(ns: Double) -> String {
    if ns >= 1e9 { return fmt(ns / 1e9) + " s" }
    if ns >= 1e6 { return fmt(ns / 1e6, ns >= 1e8 ? 0 : 1) + " ms" }
    if ns >= 1e3 { return fmt(ns / 1e3, 0) + " µs" }
    return fmt(ns, 0) + " ns"
}

/// "17:45:42.041" from an RFC 3339 time (the date is said elsewhere).
func timeOfDay(_ rfc: String, digits: Int = 3) -> String {
    guard rfc.count >= 19, let t = rfc.firstIndex(of: "T") else { return rfc }
    let rest = rfc[rfc.index(after: t)...]
    let clock = rest.prefix(8)
    guard let dot = rest.firstIndex(of: ".") else { return String(clock) }
    let fraction = rest[rest.index(after: dot)...].prefix { $0.isNumber }
    return digits > 0 ? "\(clock).\(fraction.prefix(digits))" : String(clock)
}

/// "2026-11-27 17:45:42" from an RFC 3339 time.
func shortTime(_ rfc: String) -> String {
    guard rfc.count >= 19 else { return rfc }
    return rfc.prefix(10) + " " + timeOfDay(rfc, digits: 0)
}

/// A confidence as a number and a bar.
func confidenceBar(_ c: Double) -> String {
    let level = c >= 0.8 ? "high" : c >= 0.5 ? "mid" : "low"
    return "<span class=\"conf \(level)\"><span class=\"bar\"><span style=\"width:\(Int((max(0, min(1, c)) * 100).rounded()))%\"></span></span> \(fmt(c))</span>"
}

/// A whole page: navigation, the live fragment in `<main>`, the script.
func page(title: String, active: String, fragment: String, live: Bool = true) -> String {
    let nav = [("incidents", "/", "Incidents"), ("services", "/services", "Service map"), ("events", "/events", "Events"), ("nodes", "/nodes", "Nodes")]
        .map { key, href, label in "<a href=\"\(href)\"\(key == active ? " class=\"active\"" : "")>\(label)</a>" }.joined()
    return """
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
        <title>\(esc(title)) · Tapio</title><style>\(styleSheet)</style><script src="/ui.js" defer></script></head>
        <body\(live ? " data-live=\"1\"" : "")><header><span class="brand">Tapio</span><nav>\(nav)</nav><span id="status" class="status"></span></header>
        <main id="content">\(fragment)</main></body></html>
        """
}

/// Polls `/api/fragment` every 2 s for the page it is on (and at once when
/// `/api/changes` says incidents changed) and swaps the fragment in when it changed (keeping which `<details>` are open, and not
/// while a filter field is being edited); a failed poll is said in the status
/// line and the last answer stays on screen.
let liveScript = """
    (function () {
      var body = document.body, status = document.getElementById('status'), main = document.getElementById('content');
      if (!body || !body.dataset.live || !main) return;
      var last = null, busy = false;
      function stamp() { return new Date().toISOString().substring(11, 19) + ' UTC'; }
      function poll() {
        if (busy) return;
        busy = true;
        fetch('/api/fragment?path=' + encodeURIComponent(location.pathname + location.search), {credentials: 'same-origin', cache: 'no-store'})
          .then(function (r) { return r.json(); })
          .then(function (doc) {
            if (doc.error) { status.textContent = 'not updated: ' + doc.error; status.className = 'status error'; return; }
            var active = document.activeElement;
            if (active && main.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName)) {
              status.textContent = 'live · paused while you edit'; status.className = 'status'; return;
            }
            if (doc.html !== last && last !== null) {
              var open = Array.prototype.map.call(main.querySelectorAll('details'), function (d) { return d.open; });
              main.innerHTML = doc.html;
              main.querySelectorAll('details').forEach(function (d, i) { if (i < open.length) d.open = open[i]; });
            }
            last = doc.html;
            status.textContent = 'live · updated ' + stamp(); status.className = 'status';
          })
          .catch(function (e) { status.textContent = 'not updated: tapio ui does not answer (' + e + ')'; status.className = 'status error'; })
          .then(function () { busy = false; });
      }
      // Incident changes the server pushes: /api/changes answers when there
      // is one (404: this UI has no feed, the 2 s poll does it all). Started
      // once the page has settled: a long-poll is a request that is always
      // open, and renderers that wait for the network to go quiet (headless
      // ones dumping the DOM) would wait forever.
      function follow(after) {
        fetch('/api/changes?after=' + after, {credentials: 'same-origin', cache: 'no-store'})
          .then(function (r) { if (!r.ok) throw r.status; return r.json(); })
          .then(function (d) { if (after >= 0 && d.generation > after) poll(); follow(d.generation); })
          .catch(function (e) { if (e !== 404 && e !== 401) setTimeout(function () { follow(-1); }, 2000); });
      }
      poll();
      setInterval(poll, 2000);
      setTimeout(function () { follow(-1); }, 5000);
    })();
    """

let styleSheet = """
    :root{--fg:#1d232b;--muted:#667085;--line:#d9dee5;--bg:#f6f7f9;--card:#fff;--red:#c8312c;--orange:#d9822b;--green:#2f8f5b;--blue:#2a6fdb;--violet:#7b4fc9}
    *{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
    header{display:flex;gap:24px;align-items:center;padding:10px 24px;background:#18202b;color:#fff}
    .brand{font-weight:700;letter-spacing:.04em}nav a{color:#c9d3e0;text-decoration:none;margin-right:18px}nav a.active,nav a:hover{color:#fff;border-bottom:2px solid #7fb0ff}
    .status{margin-left:auto;font-size:12px;color:#9fb0c5}.status.error{color:#ffb4a8}
    main{padding:18px 24px;max-width:1500px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:22px 0 8px}
    .card{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:12px 16px;margin-bottom:14px}
    table{border-collapse:collapse;width:100%;background:var(--card)}th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
    th{font-size:12px;color:var(--muted);font-weight:600;text-transform:uppercase;letter-spacing:.03em}td.num{text-align:right;font-variant-numeric:tabular-nums}
    a{color:var(--blue)}table.incidents td:first-child{white-space:nowrap}code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px}
    .badge{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600;background:#e8ebf0;color:#344054}
    .badge.open{background:#fde8e7;color:var(--red)}.badge.resolved{background:#e6f4ec;color:var(--green)}
    .badge.page{background:var(--red);color:#fff}.badge.observation{background:#eef0f4;color:var(--muted)}.badge.inferred{background:#fff3e0;color:#9a5a12}
    .conf{white-space:nowrap;font-variant-numeric:tabular-nums}.conf .bar{display:inline-block;width:60px;height:7px;background:#e6e9ee;border-radius:4px;vertical-align:middle;overflow:hidden}
    .conf .bar span{display:block;height:100%;background:var(--orange)}.conf.high .bar span{background:var(--red)}.conf.low .bar span{background:#9aa5b4}
    .muted{color:var(--muted)}.error-box{background:#fff1f0;border:1px solid #f3b8b2;color:#7a1d17;padding:12px 16px;border-radius:6px;white-space:pre-wrap}
    .cause{border-left:4px solid var(--orange)}.cause.top{border-left-color:var(--red)}.cause h3{margin:0 0 6px;font-size:15px}
    .factor-bar{display:inline-block;height:8px;vertical-align:middle;border-radius:2px}.factor-bar.pos{background:var(--blue)}.factor-bar.neg{background:var(--red)}
    .meta{display:flex;flex-wrap:wrap;gap:6px 22px;color:var(--muted);font-size:13px}.meta b{color:var(--fg);font-weight:600}
    form.filters{display:flex;flex-wrap:wrap;gap:10px;align-items:end;margin-bottom:12px}form.filters label{display:flex;flex-direction:column;font-size:12px;color:var(--muted)}
    form.filters input,form.filters select{font:inherit;padding:4px 6px;border:1px solid var(--line);border-radius:4px;min-width:140px}
    form.filters button{font:inherit;padding:5px 14px;border:0;border-radius:4px;background:var(--blue);color:#fff}
    .svgwrap{overflow-x:auto;background:var(--card);border:1px solid var(--line);border-radius:6px;padding:8px}
    .tabs a{margin-right:12px}.tabs a.active{font-weight:700;text-decoration:none;color:var(--fg)}
    """
