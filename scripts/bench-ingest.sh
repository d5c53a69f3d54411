#!/usr/bin/env bash
# make bench, section ingest (BENCH=ingest; also runs when BENCH is unset):
# the server under simulated agents, every figure from this one run.
#
#   1. the decode-only sink (`tapio-server bench-sink`: TLS, frames,
#      EventBatch decode, an ack at once) under the load generator
#      (`tapio-server bench-ingest`): BENCH_INGEST_NODES simulated agents
#      (default a,b,c,d), each with its own node certificate, protocol 2,
#      an inventory, 512-event batches of a mixed workload (connects,
#      latency aggregates, DNS, process churn, retransmits, drops, resets,
#      throttling, pressure) within the window, as fast as acks come;
#   2. the same generator against a fresh tapio-server (store and
#      correlation on);
#   3. the server again at half the rate it reached in 2;
#   4. the distributed mode's ingest (docs/scaling.md): a nats-server
#      (JetStream, file storage in a fresh directory beside the server's
#      data) and BENCH_INGEST_REPLICAS (1 or 2, default 1) `tapio-server
#      --role ingest` replicas, under the same generator with the same
#      simulated agents (with 2 replicas the agents are split between them,
#      one generator each, at once), then at half the rate they reached;
#      skipped, saying so, when nats-server is not installed;
#   5. the engine alone: `tapio-server bench-engine` replays the recorded lab
#      runs (lab/recordings), then the log the server stored in 2 and 3, on
#      one thread, and reports events per CPU-second of replay.
#
# Reported: acked events/s of sink, server and ingest replicas and their
# ratios, ack latency p50/p99 at full and half load, the server's CPU (cores)
# and peak RSS, the replicas' and nats-server's CPU and peak RSS, bytes per
# event on the wire, on disk and in the stream, the time of an operator's
# events query over what was stored, and the server's restart time on that
# data.
#
# Usage: scripts/bench-ingest.sh BIN_DIR [SECONDS=10]
# BENCH_INGEST_DATA=DIR puts the server's data directory and the JetStream
# store in DIR (e.g. under /dev/shm, to take the disk's fsync out of the
# figures); they are removed after.
set -euo pipefail
bin=${1:?usage: bench-ingest.sh BIN_DIR [SECONDS]}
duration=${2:-10}
nodes=${BENCH_INGEST_NODES:-a,b,c,d}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/tapio-bench-ingest.XXXXXX)
data=${BENCH_INGEST_DATA:-$work}/tapio-bench-ingest-data.$$
natsdir=${BENCH_INGEST_DATA:-$work}/tapio-bench-ingest-nats.$$
replicas=${BENCH_INGEST_REPLICAS:-1}
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$work" "$data" "$natsdir"
}
trap cleanup EXIT INT TERM

"$bin/tapio" certs init --dir "$work/pki" --nodes "$nodes" >/dev/null
gen() { "$bin/tapio-server" bench-ingest --pki "$work/pki" --nodes "$nodes" --seconds "$duration" "$@"; }
val() { awk -F= -v k="$2" '$1 == k {print $2}' "$1"; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

"$bin/tapio-server" bench-sink --tls-dir "$work/pki/server" --listen 127.0.0.1:17610 >"$work/sink.out" 2>&1 &
sink=$!
pids+=($sink)
for _ in $(seq 50); do grep -q '^ready' "$work/sink.out" && break; sleep 0.1; done
gen --server 127.0.0.1:17610 >"$work/sink.vals"
kill -TERM "$sink"
wait "$sink" || true

"$bin/tapio-server" --data-dir "$data" --tls-dir "$work/pki/server" --listen 127.0.0.1:17611 \
	--query-listen 127.0.0.1:17612 --metrics-listen 127.0.0.1:17613 2>"$work/server.log" &
server=$!
pids+=($server)
for _ in $(seq 100); do python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:17613/readyz", timeout=1)' 2>/dev/null && break; sleep 0.1; done
t0=$(ticks "$server")
s0=$(date +%s.%N)
gen --server 127.0.0.1:17611 >"$work/full.vals"
s1=$(date +%s.%N)
t1=$(ticks "$server")
events=$(python3 -c 'import urllib.request; print(next(l.split()[1] for l in urllib.request.urlopen("http://127.0.0.1:17613/metrics", timeout=5).read().decode().splitlines() if l.startswith("tapio_server_events_total ")))')
disk=$(du -sb "$data" | cut -f1)
half=$(awk -v r="$(val "$work/full.vals" events_per_second)" 'BEGIN {printf "%.0f", r / 2}')
gen --server 127.0.0.1:17611 --rate "$half" >"$work/half.vals"
hwm=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$server/status")
# CPU seconds per thread over the server's life (storage is the first TP-#0,
# tapio-engine the engine, NIO-ELT the event loops).
threads=$(for t in /proc/$server/task/*; do awk -v hz="$(getconf CLK_TCK)" -v n="$(cat "$t/comm")" '$14 + $15 > 0 {printf "%s=%.2f ", n, ($14 + $15) / hz}' "$t/stat"; done)
# An operator's query over everything stored: the newest 1000 DNS events of
# the last 10 minutes, as `tapio events` asks for them.
tapio_q() { "$bin/tapio" --server 127.0.0.1:17612 --tls-dir "$work/pki/operators/admin" "$@"; }
q0=$(date +%s.%N)
tapio_q events --since 10m --kind dns --limit 1000 -o json >"$work/query.json"
q1=$(date +%s.%N)
kill -TERM "$server"
wait "$server" || true

# Restart on the same data: until /readyz answers, then until a query does.
r0=$(date +%s.%N)
"$bin/tapio-server" --data-dir "$data" --tls-dir "$work/pki/server" --listen 127.0.0.1:17611 \
	--query-listen 127.0.0.1:17612 --metrics-listen 127.0.0.1:17613 2>"$work/restart.log" &
server=$!
pids+=($server)
for _ in $(seq 3000); do python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:17613/readyz", timeout=1)' 2>/dev/null && break; sleep 0.1; done
r1=$(date +%s.%N)
tapio_q incidents -o json >/dev/null
r2=$(date +%s.%N)
kill -TERM "$server"
wait "$server" || true

# The distributed mode's ingest: nats-server and the ingest replicas, after
# the single process stopped, with the same generator and agents.
metric_sum() { python3 -c 'import sys, urllib.request
t = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(sum(float(l.split()[-1]) for l in t.splitlines() if l.split("{")[0].split(" ")[0] == sys.argv[2]))' "$@"; }
# A metric summed over every ingest replica.
replicas_sum() {
	local i total=0
	for i in $(seq "$replicas"); do total=$(awk -v a="$total" -v b="$(metric_sum "1765$i" "$1")" 'BEGIN {printf "%.0f", a + b}'); done
	echo "$total"
}
hwm_kib() { awk '$1 == "VmHWM:" {print $2}' "/proc/$1/status"; }
natsbin=$(command -v nats-server || ls /usr/sbin/nats-server 2>/dev/null || true)
if [ -n "$natsbin" ] && [ "$replicas" -ge 1 ] && [ "$replicas" -le 2 ]; then
	mkdir -p "$natsdir/store"
	printf 'server_name: tapio-bench\nlisten: 127.0.0.1:17630\njetstream { store_dir: "%s/store", max_memory_store: 64MB, max_file_store: 16GB }\n' "$natsdir" >"$natsdir/nats.conf"
	"$natsbin" -c "$natsdir/nats.conf" >"$work/nats.log" 2>&1 &
	nats=$!
	pids+=($nats)
	for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/17630) 2>/dev/null && break; sleep 0.1; done
	rpids=()
	for i in $(seq "$replicas"); do
		"$bin/tapio-server" --role ingest --tls-dir "$work/pki/server" --listen "127.0.0.1:1764$i" \
			--metrics-listen "127.0.0.1:1765$i" --nats nats://127.0.0.1:17630 2>"$work/ingest$i.log" &
		rpids+=($!)
		pids+=($!)
	done
	for i in $(seq "$replicas"); do
		for _ in $(seq 300); do python3 -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=1)' "1765$i" 2>/dev/null && break; sleep 0.1; done
	done
	# One generator per replica, the agents split between them, all at once.
	IFS=, read -ra all <<<"$nodes"
	share=$(( (${#all[@]} + replicas - 1) / replicas ))
	dist_run() {  # $1: name of the .vals files, then extra generator options
		local name=$1 i gpids=()
		shift
		for i in $(seq "$replicas"); do
			local mine
			mine=$(IFS=,; echo "${all[*]:$(( (i - 1) * share )):$share}")
			"$bin/tapio-server" bench-ingest --pki "$work/pki" --nodes "$mine" --seconds "$duration" \
				--server "127.0.0.1:1764$i" "$@" >"$work/$name$i.vals" &
			gpids+=($!)
		done
		for i in "${gpids[@]}"; do wait "$i"; done
	}
	dt0=0; for p in "${rpids[@]}"; do dt0=$((dt0 + $(ticks "$p"))); done
	dn0=$(ticks "$nats")
	ds0=$(date +%s.%N)
	dist_run dist
	ds1=$(date +%s.%N)
	dt1=0; for p in "${rpids[@]}"; do dt1=$((dt1 + $(ticks "$p"))); done
	dn1=$(ticks "$nats")
	dstream=$(du -sb "$natsdir/store" | cut -f1)
	devents=$(replicas_sum tapio_server_events_total)
	dhalf=$(cat "$work"/dist[0-9].vals | awk -F= '$1 == "events_per_second" {s += $2} END {printf "%.0f", s / 2 / '"$replicas"'}')
	dist_run disthalf --rate "$dhalf"
	{
		echo "replicas=$replicas"
		echo "wall=$(awk -v a="$ds0" -v b="$ds1" 'BEGIN {print b - a}')"
		echo "replica_cores=$(awk -v a="$dt0" -v b="$dt1" -v s0="$ds0" -v s1="$ds1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) / hz / (s1 - s0)}')"
		echo "nats_cores=$(awk -v a="$dn0" -v b="$dn1" -v s0="$ds0" -v s1="$ds1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.2f", (b - a) / hz / (s1 - s0)}')"
		echo "replica_hwm_kib=$(for p in "${rpids[@]}"; do hwm_kib "$p"; done | sort -n | tail -1)"
		echo "nats_hwm_kib=$(hwm_kib "$nats")"
		echo "stream_bytes=$dstream"
		echo "events_full=$devents"
		echo "events=$(replicas_sum tapio_server_events_total)"
		echo "batches=$(replicas_sum tapio_server_batches_total)"
		echo "duplicates=$(replicas_sum tapio_server_duplicate_batches_total)"
		echo "publish_failures=$(replicas_sum tapio_server_nats_publish_failures_total)"
	} >"$work/distmeta.vals"
	for p in "${rpids[@]}"; do kill -TERM "$p"; wait "$p" || true; done
	kill -TERM "$nats"
	wait "$nats" || true
else
	echo "bench-ingest: no nats-server (Debian package nats-server) or BENCH_INGEST_REPLICAS not 1 or 2: the distributed mode is not measured" >&2
fi

# A recording this build cannot read (one newer than the binary) fails the
# replay, not the figures measured above.
"$bin/tapio-server" bench-engine --recordings "$root/lab/recordings" --repeats 1 >"$work/engine.vals" 2>"$work/engine.err" || true
"$bin/tapio-server" bench-engine --data-dir "$data" --repeats 1 >"$work/replay.vals" 2>/dev/null || true

python3 - "$work" "$s0" "$s1" "$t0" "$t1" "$(getconf CLK_TCK)" "$events" "$disk" "$hwm" "$nodes" "$(stat -f -c %T "$(dirname "$data")")" "$threads" \
	"$q0" "$q1" "$r0" "$r1" "$r2" <<'PY'
import json, os, sys
work, s0, s1, t0, t1, hz, events, disk, hwm, nodes, fs, threads, q0, q1, r0, r1, r2 = sys.argv[1:]
def vals(name):
    return dict(l.strip().split("=", 1) for l in open(f"{work}/{name}.vals") if "=" in l) if os.path.exists(f"{work}/{name}.vals") else {}
def merged(name, n):
    """The generators of one distributed run (one per replica): rates add up, latencies per replica."""
    parts = [vals(f"{name}{i}") for i in range(1, n + 1)]
    parts = [p for p in parts if p]
    if not parts:
        return None
    rate = sum(float(p["events_per_second"]) for p in parts)
    lat = lambda k: " / ".join(p[k] for p in parts)
    return rate, lat("ack_p50_ms"), lat("ack_p99_ms"), sum(int(p.get("errors", "0")) for p in parts)
sink, full, half, engine, replay = vals("sink"), vals("full"), vals("half"), vals("engine"), vals("replay")
cores = (float(t1) - float(t0)) / float(hz) / (float(s1) - float(s0))
rs, rf = float(sink["events_per_second"]), float(full["events_per_second"])
print()
print(f"server ingest: {len(nodes.split(','))} simulated agents, batches of 512, {float(full['seconds']):.1f} s per run, server data on {fs}")
print(f"  decode-only sink        {rs:>12,.0f} events/s acked  (ack p50 {sink['ack_p50_ms']} ms, p99 {sink['ack_p99_ms']} ms)")
print(f"  tapio-server            {rf:>12,.0f} events/s acked  (ack p50 {full['ack_p50_ms']} ms, p99 {full['ack_p99_ms']} ms)")
print(f"  server / sink           {rf / rs:>12.3f}")
print(f"  at half that rate       {float(half['events_per_second']):>12,.0f} events/s acked  (ack p50 {half['ack_p50_ms']} ms, p99 {half['ack_p99_ms']} ms)")
print(f"  server CPU              {cores:>12.2f} cores (full-rate run)")
print(f"  server threads, CPU-s    {threads.strip()}  (whole life, both runs)")
print(f"  server peak RSS         {int(hwm) / 1024:>12.0f} MiB")
print(f"  bytes per event         {float(full['wire_bytes_per_event']):>12.1f} on the wire, {int(disk) / max(1, int(float(events))):.0f} on disk ({int(float(events)):,} stored)")
answered = json.load(open(f"{work}/query.json")).get("count", 0)
print(f"  events query            {float(q1) - float(q0):>12.2f} s  (tapio events --since 10m --kind dns --limit 1000: {answered} events, the CLI's start included)")
print(f"  restart                 {float(r1) - float(r0):>12.1f} s to /readyz, {float(r2) - float(r0):.1f} s to an answered query ({int(float(events)):,} events stored)")
errors = [l for l in open(f"{work}/full.vals") if l.startswith("error=")] + [l for l in open(f"{work}/sink.vals") if l.startswith("error=")]
for e in errors:
    print("  " + e.strip())
meta = vals("distmeta")
if meta:
    n = int(meta["replicas"])
    d, dh = merged("dist", n), merged("disthalf", n)
    each = " (per replica)" if n > 1 else ""
    print(f"distributed mode: nats-server (JetStream, file storage, one node) and {n} tapio-server --role ingest replica{'s' if n > 1 else ''}, the same {len(nodes.split(','))} simulated agents{', split between them' if n > 1 else ''}")
    print(f"  ingest replica{'s' if n > 1 else ' '}         {d[0]:>12,.0f} events/s acked  (ack p50 {d[1]} ms, p99 {d[2]} ms{each})")
    print(f"  replicas / sink         {d[0] / rs:>12.3f}")
    print(f"  replicas / server       {d[0] / rf:>12.3f}")
    print(f"  at half that rate       {dh[0]:>12,.0f} events/s acked  (ack p50 {dh[1]} ms, p99 {dh[2]} ms{each})")
    print(f"  replica CPU             {float(meta['replica_cores']):>12.2f} cores{' (all replicas)' if n > 1 else ''}, nats-server {float(meta['nats_cores']):.2f} cores (full-rate run)")
    print(f"  peak RSS                {int(meta['replica_hwm_kib']) / 1024:>12.0f} MiB replica{' (largest)' if n > 1 else ''}, nats-server {int(meta['nats_hwm_kib']) / 1024:.0f} MiB")
    print(f"  stream bytes per event  {int(meta['stream_bytes']) / max(1, int(meta['events_full'])):>12.0f} in the JetStream file store after the full-rate run ({int(meta['events_full']):,} events; {int(meta['events']):,} in {int(meta['batches']):,} batches over both runs, {meta['duplicates']} duplicates)")
    print(f"  publish failures        {int(meta['publish_failures']):>12}  (batches JetStream did not acknowledge, over both runs; generator errors {d[3] + dh[3]})")
print("engine alone (replay on one thread):")
if "events_per_cpu_second" in engine:
    print(f"  recorded lab runs       {float(engine['events_per_cpu_second']):>12,.0f} events per CPU-second  ({int(engine['events']):,} events of {engine.get('logs', engine.get('recordings'))} runs, {float(engine['cpu_seconds']):.2f} CPU-s)")
else:
    print("  recorded lab runs       failed: " + " ".join(open(f"{work}/engine.err").read().split())[:300])
if replay:
    print(f"  this run's stored log   {float(replay['events_per_cpu_second']):>12,.0f} events per CPU-second  ({int(replay['events']):,} events, {float(replay['cpu_seconds']):.2f} CPU-s)")
PY
