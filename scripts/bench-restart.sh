#!/usr/bin/env bash
# The server's restart after a long run (issue #9: "a server that ran an hour
# of load at 100k events/s restarts and answers queries within 10 s, with the
# same open incidents").
#
#   1. a fresh tapio-server (role all, its data directory on this machine's
#      disk) under `tapio-server bench-ingest` at RATE events/s for SECONDS
#      (4 simulated agents with their own node certificates, the mixed
#      workload of the ingest bench); every 30 s the server's RSS, CPU,
#      events stored and data directory size go to samples.tsv;
#   2. the incidents it holds (`tapio incidents -o json`), then SIGTERM (the
#      engine writes its checkpoint), a start on the same data: the time to
#      /readyz and to an answered incidents query, and the incidents compared;
#   3. the same generator for CRASH_SECONDS more at RATE, kill -9 in the
#      middle of it, a start on the same data: the same times and comparison
#      (a crash replays the log after the last periodic checkpoint).
#
# Prints one block of figures; the raw files stay in the work directory when
# BENCH_KEEP=1.
#
# Usage: scripts/bench-restart.sh BIN_DIR [SECONDS=3600] [RATE=100000]
# BENCH_RESTART_DATA=DIR puts the data directory under DIR (default: the
# work directory under /var/tmp; an hour at 100k events/s stores about
# 7 GB). CRASH_SECONDS (default 60) is the load before the kill -9.
set -euo pipefail
bin=${1:?usage: bench-restart.sh BIN_DIR [SECONDS] [RATE]}
duration=${2:-3600}
rate=${3:-100000}
crash_seconds=${CRASH_SECONDS:-60}
nodes=a,b,c,d
work=$(mktemp -d /var/tmp/tapio-bench-restart.XXXXXX)
data=${BENCH_RESTART_DATA:-$work}/data.$$
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	if [ "${BENCH_KEEP:-0}" = 1 ]; then echo "kept: $work (data: $data)"; else rm -rf "$work" "$data"; fi
}
trap cleanup EXIT INT TERM

# Ports of their own, so the ingest bench can run at the same time.
listen=127.0.0.1:17711 query=127.0.0.1:17712 metrics=17713
"$bin/tapio" certs init --dir "$work/pki" --nodes "$nodes" >/dev/null
start_server() {
	"$bin/tapio-server" --data-dir "$data" --tls-dir "$work/pki/server" --listen "$listen" \
		--query-listen "$query" --metrics-listen "127.0.0.1:$metrics" >/dev/null 2>>"$work/server.log" &
	server=$!
	pids+=($server)
}
ready() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=1)' "$metrics" 2>/dev/null; }
wait_ready() { for _ in $(seq 1200); do ready && return 0; sleep 0.05; done; echo "server not ready after 60 s" >&2; return 1; }
metric() { python3 -c 'import sys, urllib.request
t = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
print(sum(float(l.split()[-1]) for l in t.splitlines() if l.split("{")[0].split(" ")[0] == sys.argv[2]))' "$metrics" "$1"; }
tapio_q() { "$bin/tapio" --server "$query" --tls-dir "$work/pki/operators/admin" "$@"; }
incidents() { tapio_q incidents -o json >"$1"; }
gen() { "$bin/tapio-server" bench-ingest --pki "$work/pki" --nodes "$nodes" --server "$listen" "$@"; }
# Open incidents as "id status top-cause confidence", one per line, sorted:
# what an operator sees of them.
summary() { python3 -c 'import json, sys
d = json.load(open(sys.argv[1]))
for i in sorted(d["incidents"], key=lambda i: i["id"]):
    c = i.get("topCause") or {}
    print(i["id"], i["status"], c.get("kind", "-"), c.get("entity", "-"), "%.2f" % c.get("confidence", 0))' "$1"; }
# Times of a start on the same data: to /readyz, then to an answered query,
# in $times (not printed: the server started here must stay this shell's).
restart() {
	local r0 r1 r2
	r0=$(date +%s.%N)
	start_server
	wait_ready
	r1=$(date +%s.%N)
	incidents "$work/$1.json"
	r2=$(date +%s.%N)
	times=$(awk -v a="$r0" -v b="$r1" -v c="$r2" 'BEGIN {printf "%.2f %.2f", b - a, c - a}')
}

start_server
wait_ready
clk=$(getconf CLK_TCK)
(
	printf 'seconds\trss_kib\tcpu_s\tevents\tdisk_bytes\n'
	t0=$(date +%s)
	while kill -0 "$server" 2>/dev/null; do
		rss=$(awk '$1 == "VmRSS:" {print $2}' "/proc/$server/status" 2>/dev/null || echo 0)
		cpu=$(awk -v hz="$clk" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$server/stat" 2>/dev/null || echo 0)
		ev=$(metric tapio_server_events_total 2>/dev/null || echo 0)
		printf '%s\t%s\t%s\t%.0f\t%s\n' "$(( $(date +%s) - t0 ))" "$rss" "$cpu" "$ev" "$(du -sb "$data" 2>/dev/null | cut -f1)"
		sleep 30
	done
) >"$work/samples.tsv" &
sampler=$!
pids+=($sampler)

gen --seconds "$duration" --rate "$rate" >"$work/load.vals"
sleep 2  # the engine's last pass over the load
events=$(metric tapio_server_events_total)
hwm=$(awk '$1 == "VmHWM:" {print $2}' "/proc/$server/status")
disk=$(du -sb "$data" | cut -f1)
incidents "$work/before.json"
s0=$(date +%s.%N)
kill -TERM "$server"
wait "$server" || true
s1=$(date +%s.%N)
kill "$sampler" 2>/dev/null || true
restart after
graceful=$times

# The crash: load again, kill -9 in the middle of it, start again.
incidents "$work/before-crash-load.json"
gen --seconds "$crash_seconds" --rate "$rate" >"$work/crash-load.vals" &
g=$!
pids+=($g)
sleep $(( crash_seconds / 2 ))
incidents "$work/before-crash.json"
kill -KILL "$server"
wait "$server" 2>/dev/null || true
wait "$g" 2>/dev/null || true
restart after-crash
crash=$times
replayed=$(grep 'correlation engine restored' "$work/server.log" | tail -n 1 | grep -o 'batches_replayed=[0-9]*\|from=[a-z]*' | tr '\n' ' ' || true)

summary "$work/before.json" >"$work/before.txt"
summary "$work/after.json" >"$work/after.txt"
# Incidents open before the kill: each must be there after the start (the
# log after the last checkpoint may have updated or resolved some since).
summary "$work/before-crash.json" | awk '$2 == "open" {print $1}' >"$work/open-before-crash.txt"
summary "$work/after-crash.json" | awk '{print $1}' >"$work/after-crash-ids.txt"
missing=$(grep -vxF -f "$work/after-crash-ids.txt" "$work/open-before-crash.txt" | wc -l || true)

val() { awk -F= -v k="$2" '$1 == k {print $2}' "$1"; }
printf '\nserver restart after a long run (%s s at %s events/s asked, 4 agents)\n' "$duration" "$rate"
printf '  load acked              %12.0f events/s (%s events stored; generator errors: %s)\n' "$(val "$work/load.vals" events_per_second)" "$(printf '%.0f' "$events")" "$(val "$work/load.vals" errors)"
printf '  ack p50 / p99           %12s / %s ms\n' "$(val "$work/load.vals" ack_p50_ms)" "$(val "$work/load.vals" ack_p99_ms)"
printf '  server peak RSS         %12.0f MiB; at the end of each 30 s: %s MiB (min..max over the last half)\n' "$(( hwm / 1024 ))" \
	"$(awk -F'\t' 'NR > 1 {r[++n] = $2} END {lo = 1e18; hi = 0; for (i = int(n / 2) + 1; i <= n; i++) {if (r[i] < lo) lo = r[i]; if (r[i] > hi) hi = r[i]}; printf "%.0f..%.0f", lo / 1024, hi / 1024}' "$work/samples.tsv")"
printf '  server CPU              %12s s over the load\n' "$(awk -F'\t' 'END {print $3}' "$work/samples.tsv")"
printf '  data directory          %12.0f MiB (%.1f bytes per event)\n' "$(( disk / 1048576 ))" "$(awk -v d="$disk" -v e="$events" 'BEGIN {print d / e}')"
printf '  SIGTERM to exit         %12.2f s (checkpoint written)\n' "$(awk -v a="$s0" -v b="$s1" 'BEGIN {print b - a}')"
printf '  start after SIGTERM     %12s s to /readyz, %s s to an answered incidents query\n' ${graceful}
printf '  incidents               %12s before, %s after; %s\n' "$(wc -l <"$work/before.txt")" "$(wc -l <"$work/after.txt")" \
	"$(cmp -s "$work/before.txt" "$work/after.txt" && echo 'the same ids, status and top causes' || echo 'DIFFERENT (see before.txt/after.txt)')"
printf '  start after kill -9     %12s s to /readyz, %s s to an answered incidents query (%s)\n' ${crash} "${replayed:-replay not logged}"
printf '  open before the kill    %12s, missing after the start: %s\n' "$(wc -l <"$work/open-before-crash.txt")" "$missing"
