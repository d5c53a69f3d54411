#!/usr/bin/env bash
# make demo: a local tapio-server and tapio-agent on this machine's kernel,
# a few real processes that exit, get killed and run out of memory, and what
# the server then answers through the tapio CLI.
set -euo pipefail

bin=${1:?usage: demo.sh BIN_DIR}
work=$(mktemp -d /tmp/tapio-demo.XXXXXX)
memcg=/sys/fs/cgroup/memory/tapio-demo-$$
ingest=127.0.0.1:17400
query=127.0.0.1:17401
pids=()

cleanup() {
	for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
	rmdir "$memcg" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "development PKI (tapio certs init)"
"$bin/tapio" certs init --dir "$work/pki" --nodes "$(hostname)" --operators demo

step "tapio-server and tapio-agent (node $(hostname))"
"$bin/tapio-server" --data-dir "$work/data" --tls-dir "$work/pki/server" \
	--listen "$ingest" --query-listen "$query" --metrics-listen 127.0.0.1:19400 2>"$work/server.log" &
pids+=($!)
sleep 1
"$bin/tapio-agent" --server "$ingest" --server-name localhost --node-name "$(hostname)" \
	--tls-dir "$work/pki/nodes/$(hostname)" --spool-dir "$work/spool" 2>"$work/agent.log" &
pids+=($!)
tapio() { "$bin/tapio" --server "$query" --tls-dir "$work/pki/operators/demo" "$@"; }
for _ in $(seq 50); do tapio nodes -o json 2>/dev/null | grep -q '"connected":true' && break; sleep 0.2; done
grep -h "BPF program" "$work/agent.log" | sed 's/^/  /'

step "workload: a crash (exit 3), a SIGKILL, an OOM kill in a 32M memory cgroup"
ln -s /bin/sh "$work/payments-api"
"$work/payments-api" -c 'exit 3' || echo "  payments-api exited with $?"
"$work/payments-api" -c 'kill -9 $$' || echo "  payments-api killed (status $?)"
if [ -d /sys/fs/cgroup/memory ]; then
	mkdir "$memcg" && echo 32M >"$memcg/memory.limit_in_bytes"
	ln -s /bin/sh "$work/cache-warmer"
	"$work/cache-warmer" -c "echo \$\$ > $memcg/cgroup.procs && exec tail /dev/zero" || echo "  cache-warmer (tail) killed by the kernel (status $?)"
fi
sleep 1.5

step "tapio nodes"
tapio nodes
step "tapio events --kind oom_kill"
tapio events --since 1m --kind oom_kill
step "tapio events --kind process_exit (non-zero exits and signals)"
tapio events --since 1m --kind process_exit -o json |
	python3 -c 'import json,sys; [print("  %s  %-15s pid=%-7d exit_code=%d signal=%d" % (e["time"], e["comm"], e["pid"], e["exit_code"], e["signal"])) for e in json.load(sys.stdin)["events"] if e["exit_code"] or e["signal"]]'
step "server metrics (excerpt)"
curl -s 127.0.0.1:19400/metrics 2>/dev/null | grep -E '^tapio_(server_(batches|events)_total|node_clock)' | sed 's/^/  /' || true
echo
echo "The root-cause timeline arrives with the correlation engine and the fault lab (docs/architecture.md)."
