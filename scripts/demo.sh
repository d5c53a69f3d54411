#!/usr/bin/env bash
# make demo: the fault lab's OOM-kill scenario on this machine. Three "nodes"
# (network namespaces + cgroups) run nginx → a python api → redis-server with
# a steady load; a tapio-agent watches each node's kernel; a memory limit then
# makes the kernel OOM-kill Redis. What tapio-server concluded is printed at
# the end: the incident, its ranked root causes and its timeline across nodes.
set -euo pipefail

bin=${1:?usage: demo.sh BIN_DIR}
exec "$bin/tapio-lab" run oom-kill
