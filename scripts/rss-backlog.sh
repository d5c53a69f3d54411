#!/usr/bin/env bash
# The agent's memory through a server backlog (docs/performance.md, "Memory
# through a backlog"). A release tapio-server and tapio-agent; once the agent
# is connected the server is stopped (SIGSTOP: it lags, reads nothing, acks
# nothing) while bench/storm makes the agent read a per-event storm for
# SECONDS; then the server continues and the backlog drains. Reported: the
# agent's VmRSS before, its peak (VmHWM) and VmRSS at the end of the storm,
# and VmRSS once every batch is acknowledged, with what was read, kept and
# dropped.
# Usage: scripts/rss-backlog.sh BIN_DIR STORM [SECONDS=10] [agent arguments...]
#   BIN_DIR: tapio, tapio-agent, tapio-server (release); STORM: bench/storm as
#   built by make bench-tools (.build-bench/storm). Needs root and BPF.
set -euo pipefail
bin=${1:?usage: rss-backlog.sh BIN_DIR STORM [SECONDS] [agent arguments]}
storm=${2:?usage: rss-backlog.sh BIN_DIR STORM [SECONDS] [agent arguments]}
secs=${3:-10}
shift $(($# < 3 ? $# : 3))
work=$(mktemp -d /tmp/tapio-rss.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

"$bin/tapio" certs init --dir "$work/pki" --nodes rss --operators rss >/dev/null
"$bin/tapio-server" --data-dir "$work/data" --tls-dir "$work/pki/server" --listen 127.0.0.1:17600 \
	--query-listen 127.0.0.1:17601 --metrics-listen off 2>"$work/server.log" &
server=$!
pids+=("$server")
sleep 1
"$bin/tapio-agent" --server 127.0.0.1:17600 --server-name localhost --node-name rss --tls-dir "$work/pki/nodes/rss" \
	--data-dir "$work/agent" --metrics-listen 127.0.0.1:17602 --bench-storm-comm tapio-rss "$@" 2>"$work/agent.log" &
agent=$!
pids+=("$agent")
metrics() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' http://127.0.0.1:17602/metrics; }
metric() { metrics | awk -v m="$1" '$1 == m {print $2}'; }
drops() { metrics | awk '/^tapio_agent_dropped_events_total/ {sub(/^tapio_agent_dropped_events_total/, ""); printf "%s ", $0}'; }
mib() { awk -v k="$1:" '$1 == k {printf "%.1f", $2 / 1024}' "/proc/$agent/status"; }
for _ in $(seq 100); do [ "$(metric tapio_agent_connected 2>/dev/null)" = 1 ] && break; sleep 0.2; done
[ "$(metric tapio_agent_connected)" = 1 ] || { echo "agent did not connect"; cat "$work/agent.log"; exit 1; }
sleep 2
idle=$(mib VmRSS)
kill -STOP "$server"
"$storm" -c tapio-rss -d "$secs" >/dev/null
sleep 1
peak=$(mib VmHWM) during=$(mib VmRSS)
read=$(metric tapio_agent_events_read_total) unacked=$(metric tapio_agent_unacknowledged_batches)
memory=$(metric tapio_agent_outbox_memory_bytes) spool=$(metric tapio_agent_spool_bytes)
kill -CONT "$server"
start=$(date +%s)
until [ "$(metric tapio_agent_unacknowledged_batches)" = 0 ]; do
	[ $(($(date +%s) - start)) -lt 600 ] || { echo "backlog did not drain in 600 s"; exit 1; }
	sleep 1
done
drained=$(($(date +%s) - start))
sleep 5
after=$(mib VmRSS) peak2=$(mib VmHWM)
echo "agent arguments: ${*:-(none)}"
echo "read $read events in a ${secs} s storm; at its end: $unacked batches unacknowledged, $((memory / 1048576)) MiB of batches in memory, $((spool / 1048576)) MiB in the spool"
echo "VmRSS idle ${idle} MiB, end of storm ${during} MiB, peak (VmHWM) ${peak} MiB; drained in ${drained} s; VmRSS after ${after} MiB (VmHWM ${peak2} MiB)"
echo "dropped: $(drops)"
