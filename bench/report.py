#!/usr/bin/env python3
"""Prints one section of `make bench` as a table, from what scripts/bench.sh
recorded in a directory during that one run:

  vals                    key=value lines (the storm's own counts, durations)
  agent.N.prom            the agent's /metrics at point N
  server.N.prom           the server's /metrics at point N
  rss                     VmRSS samples (kB), one a line, taken during the run
  hwm                     the agent's VmHWM (kB) at the end

Points: 0 before the storm, 1 when it ended, 2 after the agent and server
drained what was read (or gave up waiting). Counters are taken as
differences between points, so whatever the agent did before the storm is
not counted.
"""
import os
import re
import sys

LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def prom(path):
    out = {}
    if not os.path.exists(path):
        return out
    for line in open(path):
        m = LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def vals(path):
    out = {}
    for line in open(path):
        for word in line.split():
            if "=" in word:
                k, v = word.split("=", 1)
                out[k] = v
    return out


def n(x):
    return f"{x:,.0f}".replace(",", " ")


def rate(count, secs):
    return f"{n(count)} ({n(count / secs)}/s)" if secs > 0 else n(count)


class Section:
    def __init__(self, d):
        self.d = d
        self.v = vals(os.path.join(d, "vals"))
        self.agent = [prom(os.path.join(d, f"agent.{i}.prom")) for i in range(3)]
        self.server = [prom(os.path.join(d, f"server.{i}.prom")) for i in range(3)]
        self.rows = []

    def f(self, key, default=0.0):
        return float(self.v.get(key, default))

    def delta(self, side, name, a, b):
        m = self.agent if side == "agent" else self.server
        return m[b].get(name, 0) - m[a].get(name, 0)

    def read(self, a, b, ring):
        """Records the agent read from one ring (when it reports rings),
        else events read from every ring."""
        key = f'tapio_agent_ring_records_total{{ring="{ring}"}}'
        if ring and key in self.agent[b]:
            return self.delta("agent", key, a, b), f"{ring} ring"
        return self.delta("agent", "tapio_agent_events_read_total", a, b), "all rings"

    def drops(self, a, b):
        out = []
        for key, value in sorted(self.agent[b].items()):
            if key.startswith("tapio_agent_dropped_events_total"):
                d = value - self.agent[a].get(key, 0)
                if d:
                    out.append((key[len("tapio_agent_dropped_events_total"):], d))
        return out

    def row(self, figure, value):
        self.rows.append((figure, value))

    def agent_rows(self, secs, events):
        events_storm = self.delta("agent", "tapio_agent_events_read_total", 0, 1)
        cpu_storm = self.f("cpu1") - self.f("cpu0")
        cpu_all = self.f("cpu2") - self.f("cpu0")
        delivered_storm = self.delta("server", "tapio_server_events_total", 0, 1)
        delivered_all = self.delta("server", "tapio_server_events_total", 0, 2)
        self.row("events delivered to the server, during the storm", rate(delivered_storm, secs))
        self.row("events delivered to the server, in all",
                 f"{n(delivered_all)} ({self.f('drain'):.1f} s after the storm"
                 + (", still draining" if self.v.get("drained") == "0" else "") + ")")
        self.row("agent CPU (user + system)",
                 f"{cpu_storm:.2f} s during the storm ({100 * cpu_storm / secs:.0f} % of one core); "
                 f"{cpu_all:.2f} s with the drain")
        wakeups = self.delta("agent", "tapio_agent_ring_wakeups_total", 0, 1)
        if wakeups > 0:
            self.row("agent ring-buffer wakeups, during the storm", f"{n(wakeups)} ({n(events_storm / wakeups)} records per wakeup)")
        batches = self.delta("agent", "tapio_agent_batches_sent_total", 0, 2)
        if batches > 0:
            self.row("batches sent", f"{n(batches)} ({n(delivered_all / batches)} events per batch)")
        server_cpu = self.f("server_cpu2") - self.f("server_cpu0")
        self.row("server CPU (user + system)", f"{server_cpu:.2f} s, storm and drain")
        if events > 0:
            self.row("agent CPU per 1k events read",
                     f"{1000 * cpu_all / events * 1000:.1f} ms ({n(events / cpu_all) if cpu_all else '-'} events per CPU-second)")
        drops = self.drops(0, 2)
        self.row("drops (kernel and agent, by kind and reason)",
                 ", ".join(f"{k} {n(v)}" for k, v in drops) if drops else "0")
        rss = [int(x) for x in open(os.path.join(self.d, "rss")) if x.strip().isdigit()] if os.path.exists(os.path.join(self.d, "rss")) else []
        hwm = self.f("hwm")
        if rss:
            self.row("agent RSS", f"VmRSS max {max(rss) / 1024:.1f} MiB, at the end {rss[-1] / 1024:.1f} MiB "
                     f"({len(rss)} samples); VmHWM {hwm / 1024:.1f} MiB")
        if "RssAnon" in self.v:
            self.row("agent RSS at the end, by kind",
                     ", ".join(f"{k[3:].lower()} {self.f(k) / 1024:.1f} MiB" for k in ("RssAnon", "RssFile", "RssShmem")))

    def print(self, title):
        print()
        print(title)
        width = max(len(f) for f, _ in self.rows)
        for figure, value in self.rows:
            print(f"  {figure:<{width}}  {value}")


def events(s):
    secs_bare = s.f("bare_storm_seconds")
    calls_bare = s.f("bare_storm_calls")
    records = s.f("bare_records")
    bare_rate = records / secs_bare
    secs = s.f("storm_seconds")
    calls = s.f("storm_calls")
    read, where = s.read(0, 1, "process")
    delivered = s.delta("server", "tapio_server_events_total", 0, 1)
    if s.f("alone_seconds"):
        s.row("storm alone (no program emitting)", rate(s.f("alone_calls"), s.f("alone_seconds")))
    if s.f("bare_ring_bytes"):
        s.row("ring / wakeup fill mark (both runs)",
              f"{s.f('bare_ring_bytes') / 1048576:g} MiB / {s.f('bare_wakeup_bytes') / 1024:g} KiB")
    s.row("bare consumer: storm (getppid calls)", rate(calls_bare, secs_bare))
    s.row("bare consumer: records read", rate(records, secs_bare) + f", {n(s.f('bare_drops'))} dropped")
    s.row("bare consumer: CPU", f"{s.f('bare_cpu'):.2f} s ({1000 * s.f('bare_cpu') / max(records, 1) * 1000:.2f} ms per 1k records)")
    if s.f("loaded_seconds"):
        s.row("agent loaded, storm under another comm", rate(s.f("loaded_calls"), s.f("loaded_seconds")))
    s.row("agent: storm (getppid calls)", rate(calls, secs))
    s.row(f"agent: events read ({where})", rate(read, secs))
    s.agent_rows(secs, s.delta("agent", "tapio_agent_events_read_total", 0, 2))
    s.row("ratio agent / bare (events read per second)", f"{read / secs / bare_rate:.2f}")
    s.row("ratio agent / bare (delivered per second)", f"{delivered / secs / bare_rate:.2f}")
    agent_cpu = s.f("cpu2") - s.f("cpu0")
    events_all = s.delta("agent", "tapio_agent_events_read_total", 0, 2)
    if agent_cpu > 0 and s.f("bare_cpu") > 0 and events_all > 0:
        s.row("ratio agent / bare (events per CPU-second)",
              f"{(events_all / agent_cpu) / (records / s.f('bare_cpu')):.2f}")
    s.print(f"per-event storm: {s.v.get('threads', '1')} thread(s) calling getppid() for {secs:.1f} s, "
            f"bare consumer first, then the agent")


def dns(s):
    secs = s.f("storm_seconds")
    read, where = s.read(0, 1, "dns")
    s.row("queries sent / answered", f"{rate(s.f('sent'), secs)} / {n(s.f('answered'))}")
    s.row(f"agent: events read during the storm ({where})", rate(read, secs))
    s.agent_rows(secs, s.delta("agent", "tapio_agent_events_read_total", 0, 2))
    s.print(f"DNS storm: {s.v.get('qps')} queries/s asked, for {secs:.1f} s, answered on {s.v.get('server')}:53")


def exec_(s):
    secs = s.f("storm_seconds")
    read, where = s.read(0, 1, "process")
    s.row("execs made", rate(s.f("execs"), secs) + (f", {n(s.f('failed'))} failed" if s.f("failed") else ""))
    s.row(f"agent: events read during the storm ({where})", rate(read, secs) + " (exec and exit, two per process)")
    s.agent_rows(secs, s.delta("agent", "tapio_agent_events_read_total", 0, 2))
    s.print(f"exec storm: {s.v.get('workers', '1')} worker(s) running a static exit(0) program for {secs:.1f} s")


if __name__ == "__main__":
    section, directory = sys.argv[1], sys.argv[2]
    {"events": events, "dns": dns, "exec": exec_}[section](Section(directory))
