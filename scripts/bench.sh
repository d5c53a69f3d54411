#!/usr/bin/env bash
# make bench: the agent under storms, release build. One tapio-server runs
# throughout; each section starts a fresh tapio-agent on this kernel, runs
# its storm for D seconds and reports, every figure from this one run:
#
#   connect  N client processes in a network namespace hammer a closed port:
#            attempts made and counted by Tapio (they must match), the agent's
#            CPU, events read, batches and bytes sent, drops. The kernel folds
#            this storm into a few aggregates.
#   events   a per-event storm the kernel cannot fold: bench/storm calls
#            getppid() in a tight loop and the benchmark-only program
#            tapio_bench_storm (bpf/process.bpf.c) emits one record per call.
#            First the bare ring-buffer consumer (bench/ringbuf_bare: libbpf,
#            counting only) with the storm, then the agent with
#            --bench-storm-comm and the same storm, its records going the whole
#            way to the server. Reported: storm rate, bare records/s, agent
#            events read/s, events delivered to the server/s, the ratios
#            agent / bare, agent CPU per 1k events, drops, agent RSS.
#   dns      bench/dnsstorm: a query flood at BENCH_DNS_QPS (default 90 000/s)
#            to a local responder on 127.53.0.1:53 that answers each query.
#   exec     bench/execstorm: vfork + exec of a static exit(0) program in a
#            loop (BENCH_EXEC_WORKERS processes, default 1).
#
# Usage: scripts/bench.sh BIN_DIR [CLIENTS=4] [SECONDS=10]
# BENCH=connect,events,dns,exec,ingest picks the sections (default: all, in
# that order; ingest is scripts/bench-ingest.sh, at the end; restart,
# scripts/bench-restart.sh, an hour long, only when named). BENCH_TOOLS is
# where `make bench-tools` put bench/'s programs (default .build-bench).
# BENCH_STORM_THREADS: getppid threads (default 1). BENCH_DNS_QPS,
# BENCH_EXEC_WORKERS: see above. BENCH_DRAIN_SECONDS: how long a section waits
# after its storm for the server to have every event read (default 30).
# BENCH_KEEP=1 keeps the work directory (logs, metrics, samples).
# The agent runs as deployed, with its spool (every sealed batch written as a
# spool record and synced, docs/protocol.md); BENCH_SPOOL=0 runs it with
# --no-spool (unacknowledged batches in memory only, up to 64 MiB of them).
# Every agent gets a fresh --data-dir.
set -euo pipefail
bin=${1:?usage: bench.sh BIN_DIR [CLIENTS] [SECONDS]}
clients=${2:-4}
duration=${3:-10}
sections=${BENCH:-connect,events,dns,exec}
tools=${BENCH_TOOLS:-$(cd "$(dirname "$0")/.." && pwd)/.build-bench}
report=$(cd "$(dirname "$0")/.." && pwd)/bench/report.py
# The storm's comm, unique to this run: a storm of anyone else on the machine
# (another bench, a test) never feeds this run's consumers.
comm=tstorm-$$
work=$(mktemp -d /tmp/tapio-bench.XXXXXX)
ns=tapio-bench-$$
pids=()
agent=
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	ip netns del "$ns" 2>/dev/null || true
	if [ -n "${BENCH_KEEP:-}" ]; then echo "bench.sh: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT INT TERM
want() { [[ ",$sections," == *",$1,"* ]]; }
for s in events dns exec; do
	if want "$s" && [ ! -x "$tools/storm" ]; then echo "bench.sh: no $tools/storm: run make bench-tools" >&2; exit 1; fi
done

echo "tapio bench: commit $(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$(dirname "$0")" diff --quiet HEAD 2>/dev/null || echo ' (with local changes)'), $(nproc) cores, kernel $(uname -r), $(date -u +%Y-%m-%dT%H:%MZ)"

"$bin/tapio" certs init --dir "$work/pki" --nodes bench --operators bench >/dev/null
"$bin/tapio-server" --data-dir "$work/data" --tls-dir "$work/pki/server" --listen 127.0.0.1:17500 \
	--query-listen 127.0.0.1:17501 --metrics-listen 127.0.0.1:17503 2>"$work/server.log" &
server=$!
pids+=($server)
tapio() { "$bin/tapio" --server 127.0.0.1:17501 --tls-dir "$work/pki/operators/bench" "$@"; }
# GET /metrics from 127.0.0.1:$1 with bash alone: no process started, so no
# exec and exit events of our own while a section measures. Body only.
scrape() {
	local line body=
	exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
	printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
	while IFS= read -r -t 5 line <&3 || [ -n "$line" ]; do
		if [ -n "$body" ]; then echo "$line"; elif [ "${line%$'\r'}" = "" ]; then body=1; fi
	done
	exec 3<&-
}
agent_metrics() { scrape 17502; }
server_metrics() { scrape 17503; }
metric() { awk -v m="$2" '$1 == m {print $2}' "$1"; }
# Whether the agent's metrics have the line $1 (read whole first: grep -q
# would end a pipe early, which pipefail reports as a failure).
agent_has() {
	local m
	m=$(agent_metrics 2>/dev/null) || return 1
	grep -qx "$1" <<<"$m"
}

# A fresh agent for a section; extra arguments are added to its command line.
start_agent() {
	"$bin/tapio-agent" --server 127.0.0.1:17500 --server-name localhost --node-name bench --tls-dir "$work/pki/nodes/bench" \
		--metrics-listen 127.0.0.1:17502 --data-dir "$(mktemp -d "$work/agent.XXXXXX")" $([ "${BENCH_SPOOL:-1}" != 0 ] || echo --no-spool) "$@" 2>>"$work/agent.log" &
	agent=$!
	pids+=($agent)
	for _ in $(seq 100); do
		agent_has 'tapio_agent_connected 1' && return 0
		sleep 0.2
	done
	echo "bench.sh: the agent did not connect; its log:" >&2
	tail -20 "$work/agent.log" >&2
	exit 1
}
stop_agent() {
	kill -TERM "$agent" 2>/dev/null || true
	wait "$agent" 2>/dev/null || true
	agent=
}
# User + system CPU seconds of process $1 (default: the agent).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f\n", ($14 + $15) / hz}' "/proc/${1:-$agent}/stat"; }
# VmRSS of the agent every 100 ms into $1 until the agent exits.
sample_rss() {
	local k v _
	while [ -r "/proc/$agent/status" ]; do
		while read -r k v _; do [ "$k" = VmRSS: ] && echo "$v"; done <"/proc/$agent/status" 2>/dev/null || true
		sleep 0.1
	done >>"$1"
}
hwm() { awk '$1 == "VmHWM:" {print $2}' "/proc/$agent/status"; }
# Snapshot N of the agent's and the server's metrics and CPU into dir $1.
snapshot() {
	agent_metrics >"$1/agent.$2.prom"
	server_metrics >"$1/server.$2.prom"
	echo "cpu$2=$(cpu) server_cpu$2=$(cpu "$server")" >>"$1/vals"
}
# Seconds since $1 (date +%s.%N), less $2.
since() { awk -v now="$(date +%s.%N)" -v start="$1" -v less="$2" 'BEGIN {printf "%.2f\n", now - start - less}'; }
# Events the agent read and then dropped (reasons other than the kernel's).
agent_drops() {
	awk '/^tapio_agent_dropped_events_total/ && !/reason="(ringbuf_full|rate_limited|map_full)"/ {s += $2} END {print s + 0}'
}
# Waits (at most BENCH_DRAIN_SECONDS, default 30) until the server has the
# events the agent read up to the end of the storm: its count has grown by at
# least as many as the agent read, less what the agent dropped after reading
# them, and no batch
# is unacknowledged. (Other events of the machine only make this end sooner
# by as many as they are: a few hundred a second at most.)
drain() {
	local d=$1 start need got
	start=$(date +%s.%N)
	need=$(awk -v a="$(metric "$d/agent.1.prom" tapio_agent_events_read_total)" -v b="$(metric "$d/agent.0.prom" tapio_agent_events_read_total)" \
		-v s0="$(metric "$d/server.0.prom" tapio_server_events_total)" 'BEGIN {print s0 + (a - b)}')
	while :; do
		got=$(server_metrics | awk '$1 == "tapio_server_events_total" {print $2}')
		echo "$(since "$start" 0) need=$need got=$got $(agent_metrics | grep -E '^tapio_agent_(unacknowledged_batches|events_read_total) ' | tr '\n' ' ')" >>"$d/drain.log"
		if awk -v g="$got" -v n="$need" -v dr="$(agent_metrics | agent_drops)" -v dr0="$(agent_drops <"$d/agent.0.prom")" \
			'BEGIN {exit !(g >= n - (dr - dr0))}' &&
			agent_has 'tapio_agent_unacknowledged_batches 0'; then
			echo "drained=1 drain=$(since "$start" 0)" >>"$d/vals"
			return
		fi
		if awk -v t="$(since "$start" 0)" -v max="${BENCH_DRAIN_SECONDS:-30}" 'BEGIN {exit !(t >= max)}'; then
			echo "drained=0 drain=$(since "$start" 0)" >>"$d/vals"
			return
		fi
		sleep 0.2
	done
}
# Runs the command in "$@" as the storm of section dir $1 (output appended to
# vals), with snapshots before and after, the drain, and RSS sampling.
measure() {
	local d=$1
	shift
	sample_rss "$d/rss" &
	local sampler=$!
	snapshot "$d" 0
	"$@" >>"$d/vals"
	snapshot "$d" 1
	drain "$d"
	snapshot "$d" 2
	echo "hwm=$(hwm) $(awk '$1 ~ /^Rss(Anon|File|Shmem):$/ {sub(":", "", $1); printf "%s=%s ", $1, $2}' "/proc/$agent/status")" >>"$d/vals"
	stop_agent
	wait "$sampler" 2>/dev/null || true
}

section_connect() {
	start_agent
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	local before after start end storm=()
	before=$(cpu)
	start=$(date +%s.%N)
	for _ in $(seq "$clients"); do
		ip netns exec "$ns" python3 -c "
import socket, time
n = 0; end = time.time() + $duration
while time.time() < end:
    s = socket.socket()
    try: s.connect(('127.0.0.1', 9))
    except ConnectionRefusedError: pass
    s.close(); n += 1
print(n)" >>"$work/attempts" &
		storm+=($!)
	done
	wait "${storm[@]}"
	end=$(date +%s.%N)
	sleep 3 # two harvest intervals and a batch
	after=$(cpu)
	local attempts counted metrics events bytes batches drops
	attempts=$(python3 -c 'import sys; print(sum(int(l) for l in open(sys.argv[1])))' "$work/attempts")
	counted=$(tapio events --kind tcp_connect --limit 100000 -o json | python3 -c '
import json, sys
print(sum(e.get("count", 1) for e in json.load(sys.stdin)["events"] if e.get("dst_port") == 9 and e.get("outcome") == "refused"))')
	metrics=$(agent_metrics)
	get() { echo "$metrics" | awk -v m="$1" '$1 == m {print $2}'; }
	events=$(get tapio_agent_events_read_total)
	bytes=$(get tapio_agent_batch_bytes_sent_total)
	batches=$(get tapio_agent_batches_sent_total)
	drops=$(echo "$metrics" | awk '/^tapio_agent_dropped_events_total/ {s += $2} END {print s + 0}')
	stop_agent
	ip netns del "$ns"
	python3 - "$start" "$end" "$before" "$after" "$attempts" "$counted" "$events" "$bytes" "$batches" "$drops" "$clients" <<'PY'
import os, sys
start, end, before, after, attempts, counted, events, bytes_, batches, drops, clients = sys.argv[1:]
secs = float(end) - float(start)
cpu = float(after) - float(before)
print()
print(f"connection storm: {clients} clients for {secs:.1f} s" + (" (agent without a spool: BENCH_SPOOL=0)" if os.environ.get("BENCH_SPOOL") == "0" else ""))
print(f"  connect attempts        {int(attempts):>10}  ({int(attempts)/secs:,.0f}/s)")
print(f"  counted by tapio        {int(counted):>10}  ({'equal' if int(counted) == int(attempts) else 'DIFFERENT'})")
print(f"  agent CPU               {cpu:>10.2f} s  ({100*cpu/secs:.1f} % of one core)")
print(f"  agent events read       {int(events):>10}  (whole run, all kinds)")
print(f"  batches / bytes sent    {int(batches):>10} / {int(bytes_)}  ({int(bytes_)/max(1,int(events)):.1f} bytes per event)")
print(f"  drops counted           {int(drops):>10}")
PY
}

section_events() {
	local d=$work/events threads=${BENCH_STORM_THREADS:-1} bare out control ring
	mkdir -p "$d"
	echo "threads=$threads" >"$d/vals"
	# Controls, at most 5 s each: the storm with nothing emitting, and with
	# the agent loaded but the storm under another comm, so what the agent's
	# other programs cost each system call shows apart from its records. The
	# agent's process ring size is read then, for the bare consumer.
	control=$((duration < 5 ? duration : 5))
	"$tools/storm" -c "${comm}x" -d "$control" -t "$threads" | sed 's/\([a-z_]*\)=/alone_\1=/g' >>"$d/vals"
	start_agent --bench-storm-comm "$comm"
	"$tools/storm" -c "${comm}x" -d "$control" -t "$threads" | sed 's/\([a-z_]*\)=/loaded_\1=/g' >>"$d/vals"
	ring=$(agent_metrics | awk '$1 == "tapio_agent_ring_buffer_bytes{ring=\"process\"}" {print $2}')
	stop_agent
	# The bare consumer alone (the agent's copy of the program is gone), with
	# the agent's ring size and its default fill mark (1/16 of the ring).
	"$tools/ringbuf_bare" -c "$comm" ${ring:+-r "$ring"} >"$d/bare.out" 2>"$d/bare.err" &
	bare=$!
	pids+=($bare)
	for _ in $(seq 50); do grep -q '^ready' "$d/bare.out" && break; sleep 0.1; done
	grep -q '^ready' "$d/bare.out" || { cat "$d/bare.err" >&2; exit 1; }
	head -1 "$d/bare.out" | sed 's/^ready //; s/\([a-z_]*\)=/bare_\1=/g' >>"$d/vals"
	out=$("$tools/storm" -c "$comm" -d "$duration" -t "$threads")
	kill -INT "$bare"
	wait "$bare"
	echo "$out" | sed 's/\([a-z_]*\)=/bare_storm_\1=/g' >>"$d/vals"
	tail -1 "$d/bare.out" | sed 's/\([a-z_]*\)=/bare_\1=/g' >>"$d/vals"
	start_agent --bench-storm-comm "$comm"
	measure "$d" sh -c "'$tools/storm' -c '$comm' -d '$duration' -t '$threads' | sed 's/\\([a-z_]*\\)=/storm_\\1=/g'"
	python3 "$report" events "$d"
}

section_dns() {
	local d=$work/dns qps=${BENCH_DNS_QPS:-90000} address=127.53.0.1 responder
	mkdir -p "$d"
	echo "qps=$qps server=$address" >"$d/vals"
	"$tools/dnsstorm" -R -a "$address" >"$d/responder.out" 2>&1 &
	responder=$!
	pids+=($responder)
	for _ in $(seq 50); do grep -q '^ready' "$d/responder.out" && break; sleep 0.1; done
	grep -q '^ready' "$d/responder.out" || { cat "$d/responder.out" >&2; exit 1; }
	start_agent
	measure "$d" sh -c "'$tools/dnsstorm' -a '$address' -q '$qps' -d '$duration' | sed 's/seconds=/storm_seconds=/'"
	kill -TERM "$responder"
	wait "$responder" || true
	python3 "$report" dns "$d"
}

section_exec() {
	local d=$work/exec workers=${BENCH_EXEC_WORKERS:-1}
	mkdir -p "$d"
	echo "workers=$workers" >"$d/vals"
	start_agent
	measure "$d" sh -c "'$tools/execstorm' -d '$duration' -p '$workers' | sed 's/seconds=/storm_seconds=/'"
	python3 "$report" exec "$d"
}

for s in connect events dns exec; do
	want "$s" && "section_$s"
done

# ingest: the server under simulated agents, against a decode-only sink, and
# the engine alone (scripts/bench-ingest.sh: its own server and PKI). Runs
# with BENCH=ingest, and when BENCH is unset.
if [ -z "${BENCH:-}" ] || [[ ",$BENCH," == *",ingest,"* ]]; then "$(dirname "$0")/bench-ingest.sh" "$bin" "$duration"; fi

# restart: the server's restart after a long run (scripts/bench-restart.sh:
# BENCH_RESTART_SECONDS of load at BENCH_RESTART_RATE events/s, an hour at
# 100 000 by default, then a SIGTERM and a kill -9 restart). Runs only with
# BENCH=restart.
if [[ ",${BENCH:-}," == *",restart,"* ]]; then
	"$(dirname "$0")/bench-restart.sh" "$bin" "${BENCH_RESTART_SECONDS:-3600}" "${BENCH_RESTART_RATE:-100000}"
fi
