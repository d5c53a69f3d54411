#!/usr/bin/env bash
# make bench: the agent under a connection storm. A release tapio-server and
# tapio-agent run on this kernel; N client processes in a network namespace
# hammer a closed port for D seconds. Reported, all from one run:
#   - connect attempts per second made, and counted by Tapio (they must match),
#   - the agent's CPU use (user+system seconds per second of storm),
#   - events read by the agent, batches and bytes sent, bytes per event,
#   - kernel and agent drop counters.
# Usage: scripts/bench.sh BIN_DIR [CLIENTS=4] [SECONDS=10]
# BENCH_SPOOL=1 runs the agent with its spool, as deployed (every sealed batch
# written and fsynced as a spool record, docs/protocol.md); without it the
# agent runs with --no-spool. Every agent gets a fresh --data-dir.
set -euo pipefail
bin=${1:?usage: bench.sh BIN_DIR [CLIENTS] [SECONDS]}
clients=${2:-4}
duration=${3:-10}
work=$(mktemp -d /tmp/tapio-bench.XXXXXX)
ns=tapio-bench-$$
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	ip netns del "$ns" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$bin/tapio" certs init --dir "$work/pki" --nodes bench --operators bench >/dev/null
"$bin/tapio-server" --data-dir "$work/data" --tls-dir "$work/pki/server" --listen 127.0.0.1:17500 \
	--query-listen 127.0.0.1:17501 --metrics-listen off 2>"$work/server.log" &
pids+=($!)
sleep 1
"$bin/tapio-agent" --server 127.0.0.1:17500 --server-name localhost --node-name bench --tls-dir "$work/pki/nodes/bench" \
	--metrics-listen 127.0.0.1:17502 --data-dir "$work/agent" $([ -n "${BENCH_SPOOL:-}" ] || echo --no-spool) 2>"$work/agent.log" &
agent=$!
pids+=($agent)
tapio() { "$bin/tapio" --server 127.0.0.1:17501 --tls-dir "$work/pki/operators/bench" "$@"; }
for _ in $(seq 50); do tapio nodes -o json 2>/dev/null | grep -q '"connected":true' && break; sleep 0.2; done
ip netns add "$ns"
ip -n "$ns" link set lo up

cpu() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
hz=$(getconf CLK_TCK)
before=$(cpu)
start=$(date +%s.%N)
storm=()
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
attempts=$(python3 -c 'import sys; print(sum(int(l) for l in open(sys.argv[1])))' "$work/attempts")
counted=$(tapio events --kind tcp_connect --limit 100000 -o json | python3 -c '
import json, sys
print(sum(e.get("count", 1) for e in json.load(sys.stdin)["events"] if e.get("dst_port") == 9 and e.get("outcome") == "refused"))')
metrics=$(python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:17502/metrics").read().decode())')
get() { echo "$metrics" | awk -v m="$1" '$1 == m {print $2}'; }
events=$(get tapio_agent_events_read_total)
bytes=$(get tapio_agent_batch_bytes_sent_total)
batches=$(get tapio_agent_batches_sent_total)
drops=$(echo "$metrics" | awk '/^tapio_agent_dropped_events_total/ {s += $2} END {print s + 0}')
python3 - "$start" "$end" "$before" "$after" "$hz" "$attempts" "$counted" "$events" "$bytes" "$batches" "$drops" "$clients" <<'PY'
import os, sys
start, end, before, after, hz, attempts, counted, events, bytes_, batches, drops, clients = sys.argv[1:]
secs = float(end) - float(start)
cpu = (float(after) - float(before)) / float(hz)
print(f"storm: {clients} clients for {secs:.1f} s" + (" (agent with a spool directory)" if os.environ.get("BENCH_SPOOL") else ""))
print(f"connect attempts        {int(attempts):>10}  ({int(attempts)/secs:,.0f}/s)")
print(f"counted by tapio        {int(counted):>10}  ({'equal' if int(counted) == int(attempts) else 'DIFFERENT'})")
print(f"agent CPU               {cpu:>10.2f} s  ({100*cpu/secs:.1f} % of one core)")
print(f"agent events read       {int(events):>10}  (whole run, all kinds)")
print(f"batches / bytes sent    {int(batches):>10} / {int(bytes_)}  ({int(bytes_)/max(1,int(events)):.1f} bytes per event)")
print(f"drops counted           {int(drops):>10}")
PY

# ingest: the server under simulated agents, against a decode-only sink, and
# the engine alone (scripts/bench-ingest.sh: its own server and PKI). Runs
# with BENCH=ingest, and when BENCH is unset.
if [ -z "${BENCH:-}" ] || [[ ",$BENCH," == *",ingest,"* ]]; then "$(dirname "$0")/bench-ingest.sh" "$bin" "$duration"; fi
