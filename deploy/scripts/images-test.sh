#!/usr/bin/env bash
# Smoke test of the images `make images` built (docs/operations.md, "Container
# images"), run by `make images` after building them:
#
#  1. The static CLI alone in an empty chroot (its root filesystem: the binary,
#     the C libraries `ldd` lists and the loader; no Swift library anywhere)
#     with only a /proc mounted (as in every container: Swift's runtime, linked
#     statically, reads the program's arguments from /proc/self/cmdline) prints
#     `tapio --version` and writes a development PKI with `tapio certs init`.
#     Each image's program prints the version the image is tagged with.
#  2. The server image runs as the Deployment runs it: uid 65532, read-only
#     root, a tmpfs /tmp, the data and TLS directories mounted.
#  3. The agent image runs with the DaemonSet's container securityContext
#     (runAsUser, capabilities, no privilege escalation, read-only root), its
#     hostPath mounts and its arguments, all read from
#     deploy/kubernetes/base/agent.yaml: every BPF program attaches
#     (tapio_agent_program_attached is 1 for each, no "BPF program degraded"
#     line) and it connects to the server.
#  4. The CLI image asks the server `nodes -o json`: the agent's node is
#     connected, with capabilities and nothing degraded.
#
# Where this differs from a pod, on purpose:
#  - host network for all three, so they meet on loopback (the pod network and
#    the Service are the cluster's): --server and --metrics-listen are the
#    manifest's flags with loopback addresses;
#  - hostPaths outside /sys, /proc and /dev (TLS, spool, data) are directories
#    of the test; the `tls` volume holds the PKI's nodes/;
#  - no Kubernetes API (no KUBERNETES_SERVICE_HOST): events are not attributed
#    to pods here (Tests/EndToEndTests/PodShapeTests.swift covers that);
#  - seccomp RuntimeDefault is podman's default profile with bpf() allowed
#    under CAP_BPF and perf_event_open() under CAP_PERFMON, as in recent
#    runtimes (Debian 12's profile allows them only with CAP_SYS_ADMIN, like
#    older containerd releases: see the manifest's comment);
#  - podman runs runc, with RLIMIT_NOFILE and RLIMIT_NPROC set within this
#    machine's limits: crun 1.8 (Debian 12) refuses hybrid cgroup hosts, and
#    here podman's default rlimits exceed what a process without
#    CAP_SYS_RESOURCE may set. A Kubernetes node's runtime does neither.
#
# Usage: [KEEP=1] deploy/scripts/images-test.sh OUT VERSION
#   KEEP=1   leave the containers and the scratch directory for a look
#   OUT      the directory `make images` used (OUT/stage/out/<program>/ are the
#            root filesystems, deploy/scripts/image-rootfs.sh)
#   VERSION  the images' tag (localhost/tapio-{server,agent,cli}:VERSION)
set -euo pipefail
cd "$(dirname "$0")/../.."

[ $# -eq 2 ] || { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit 2; }
out=$1
version=$2
python=/usr/bin/python3
manifest=deploy/kubernetes/base/agent.yaml
node=images-test-node
podman=(podman --runtime runc)
nofile=$(ulimit -Sn)
[[ "$nofile" =~ ^[0-9]+$ ]] && [ "$nofile" -le 65536 ] || nofile=65536
limits=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)

d=$(mktemp -d /tmp/tapio-images-test.XXXXXX)
tag=$$
server=tapio-images-test-server-$tag
agent=tapio-images-test-agent-$tag
passed=0
failures=0
cleanup() {
	if [ -n "${KEEP:-}" ]; then echo "KEEP: left $server, $agent and $d" >&2; return; fi
	"${podman[@]}" rm -f -t 5 "$server" "$agent" >/dev/null 2>&1 || true
	rm -rf "$d"
}
trap cleanup EXIT
check() { # check DESCRIPTION COMMAND...: a line per check, and the count of failures
	local what=$1; shift
	if "$@"; then echo "ok   $what"; passed=$((passed + 1)); else echo "FAIL $what"; failures=$((failures + 1)); fi
}
get() { # get URL: the body, or nothing
	"$python" -c 'import sys, urllib.request
try: print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())
except Exception: pass' "$1"
}
free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# 1. The static CLI in an empty chroot.
root=$d/chroot
cp -a "$out/stage/out/tapio" "$root"
swift_files=$(find "$root" \( -name 'libswift*' -o -name 'libFoundation*' -o -name 'lib_Foundation*' -o -name 'libdispatch*' -o -path '*/swift/*' \) -print)
check "the CLI's chroot holds no Swift library ($(find "$root" -type f | wc -l) files, $(du -sh "$root" | cut -f1))" test -z "$swift_files"
echo "     $(find "$root" -name '*.so*' -printf '%f ' | sort)"
mkdir -p "$root/proc" "$root/pki"
in_chroot() { unshare --mount --pid --fork --mount-proc="$root/proc" chroot "$root" "$@"; }
printed=$(in_chroot /usr/local/bin/tapio --version 2>&1 || true)
check "tapio --version in the chroot prints $version (printed: $printed)" test "$printed" = "$version"
check "tapio certs init in the chroot writes a PKI" \
	in_chroot /usr/local/bin/tapio certs init --dir /pki --nodes "$node" --operators admin
pki=$d/pki
mv "$root/pki" "$pki"
for f in server/tls.crt "nodes/$node/tls.key" operators/admin/tls.key; do
	[ -s "$pki/$f" ] || { echo "FAIL the PKI has no $f"; exit 1; }
done

# Every image's program says the version it is tagged with.
for image in server agent cli; do
	printed=$("${podman[@]}" run --rm "${limits[@]}" --network none "localhost/tapio-$image:$version" --version 2>&1 || true)
	check "tapio-$image:$version --version prints $version (printed: $printed)" test "$printed" = "$version"
done

# 2. The server image, as the Deployment runs it.
ingest=$(free_port); query=$(free_port); metrics=$(free_port); agent_metrics=$(free_port)
mkdir -p "$d/server-data"
chown -R 65532:65532 "$d/server-data" "$pki/server" "$pki/operators"
"${podman[@]}" run -d --name "$server" --network host "${limits[@]}" \
	--user 65532:65532 --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
	-v "$d/server-data:/var/lib/tapio" -v "$pki/server:/etc/tapio/tls:ro" \
	"localhost/tapio-server:$version" \
	--data-dir=/var/lib/tapio --tls-dir=/etc/tapio/tls --listen="127.0.0.1:$ingest" \
	--query-listen="127.0.0.1:$query" --metrics-listen="127.0.0.1:$metrics" >/dev/null
for _ in $(seq 60); do
	[ "$(get "http://127.0.0.1:$metrics/readyz")" ] && break
	sleep 0.5
done
check "the server image is ready (GET /readyz)" test -n "$(get "http://127.0.0.1:$metrics/readyz")"

# 3. The agent image in the DaemonSet's shape: podman arguments from the manifest.
mapfile -t agent_run < <("$python" - "$manifest" "$d" "$pki/nodes" "$node" "127.0.0.1:$ingest" "127.0.0.1:$agent_metrics" <<'EOF'
import os, sys, yaml
manifest, scratch, tls, node, server, metrics = sys.argv[1:]
ds = next(d for d in yaml.safe_load_all(open(manifest)) if d and d.get("kind") == "DaemonSet")
pod = ds["spec"]["template"]["spec"]
c = pod["containers"][0]
sc = c.get("securityContext", {})
volumes = {v["name"]: v for v in pod.get("volumes", [])}
out = []
if sc.get("privileged"):
    sys.exit("the DaemonSet asks for privileged: the test does not reproduce that")
if "runAsUser" in sc:
    out += ["--user", str(sc["runAsUser"])]
caps = sc.get("capabilities", {})
out += [f"--cap-drop={c}" for c in caps.get("drop", [])]
out += [f"--cap-add={c}" for c in caps.get("add", [])]
if sc.get("allowPrivilegeEscalation") is False:
    out += ["--security-opt", "no-new-privileges"]
if sc.get("readOnlyRootFilesystem"):
    out += ["--read-only"]
profile = sc.get("seccompProfile", {}).get("type", "RuntimeDefault")
if profile == "Unconfined":
    out += ["--security-opt", "seccomp=unconfined"]
elif profile == "RuntimeDefault":
    # podman's default profile as a recent runtime ships it: Debian 12's
    # (containers-common 0.50) allows bpf() and perf_event_open() only with
    # CAP_SYS_ADMIN, as older containerd releases do (the manifest says so);
    # recent ones also allow bpf() with CAP_BPF and perf_event_open() with
    # CAP_PERFMON. Everything else as the default profile has it.
    import json
    default = json.load(open("/usr/share/containers/seccomp.json"))
    needs = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}
    rules = []
    for rule in default["syscalls"]:
        names = [n for n in rule["names"] if n not in needs]
        if names:
            rules.append(dict(rule, names=names))
        for name in set(rule["names"]) & set(needs):
            if rule["action"] == "SCMP_ACT_ALLOW":
                rules.append(dict(rule, names=[name]))
                if rule.get("includes", {}).get("caps") == ["CAP_SYS_ADMIN"]:
                    rules.append(dict(rule, names=[name], includes={"caps": [needs[name]]}))
            else:
                excludes = dict(rule.get("excludes", {}))
                excludes["caps"] = sorted(set(excludes.get("caps", [])) | {needs[name]})
                rules.append(dict(rule, names=[name], excludes=excludes))
    path = os.path.join(scratch, "seccomp.json")
    json.dump(dict(default, syscalls=rules), open(path, "w"))
    out += ["--security-opt", f"seccomp={path}"]
else:
    sys.exit(f"seccompProfile {profile}: not reproduced by this test")
for m in c.get("volumeMounts", []):
    v = volumes[m["name"]]
    host = v.get("hostPath", {}).get("path")
    if m["name"] == "tls":
        source = tls
    elif host and host.split("/")[1] in ("sys", "proc", "dev"):
        source = host
    else:  # a node directory or an emptyDir: the test's own
        source = os.path.join(scratch, "volumes", m["name"])
        os.makedirs(source, exist_ok=True)
    out += ["-v", f"{source}:{m['mountPath']}" + (":ro" if m.get("readOnly") else "")]
for e in c.get("env", []):
    if e["name"] == "NODE_NAME":
        out += ["-e", f"NODE_NAME={node}"]
out.append("--")  # the image follows, then its arguments
for a in c.get("args", []):
    a = a.replace("$(NODE_NAME)", node)
    if a.startswith("--server="):
        a = "--server=" + server
    elif a.startswith("--metrics-listen="):
        a = "--metrics-listen=" + metrics
    out.append(a)
print("\n".join(out))
EOF
)
sep=0
while [ "${agent_run[$sep]}" != "--" ]; do sep=$((sep + 1)); done
echo "agent: podman run ${agent_run[*]:0:$sep} tapio-agent:$version ${agent_run[*]:$((sep + 1))}"
"${podman[@]}" run -d --name "$agent" --network host "${limits[@]}" \
	"${agent_run[@]:0:$sep}" "localhost/tapio-agent:$version" "${agent_run[@]:$((sep + 1))}" >/dev/null

attached=""
for _ in $(seq 60); do
	attached=$(get "http://127.0.0.1:$agent_metrics/metrics" | grep '^tapio_agent_program_attached' || true)
	[ -n "$attached" ] && get "http://127.0.0.1:$agent_metrics/readyz" | grep -q . && break
	sleep 0.5
done
while read -r line; do echo "     $line"; done <<<"$attached"
check "the agent image reports its BPF programs ($(grep -c . <<<"$attached") in tapio_agent_program_attached)" test -n "$attached"
check "every BPF program of the agent image is attached" test -z "$(grep -v ' 1$' <<<"$attached")"
logs=$("${podman[@]}" logs "$agent" 2>&1)
check "the agent logs 'BPF program running' $(grep -c 'BPF program running' <<<"$logs") times and 'degraded' never" \
	test "$(grep -c 'BPF program running' <<<"$logs")" -gt 0 -a "$(grep -c 'BPF program degraded' <<<"$logs")" -eq 0

# 4. The CLI image asks the server about the agent.
nodes=""
for _ in $(seq 30); do
	nodes=$("${podman[@]}" run --rm --network host "${limits[@]}" --read-only --cap-drop ALL \
		-v "$pki/operators/admin:/tls:ro" "localhost/tapio-cli:$version" \
		--server "127.0.0.1:$query" --tls-dir /tls nodes -o json 2>&1 || true)
	grep -q "\"$node\"" <<<"$nodes" && grep -q '"connected" *: *true' <<<"$nodes" && break
	sleep 1
done
summary=$(NODES="$nodes" "$python" - "$node" <<'EOF' || true
import json, os, sys
doc = json.loads(os.environ["NODES"])
rows = doc if isinstance(doc, list) else doc.get("nodes", [])
row = next(r for r in rows if r.get("node", r.get("name")) == sys.argv[1])
print(f"connected={row['connected']} capabilities={','.join(row['capabilities'])} degraded={len(row['degraded'])}")
EOF
)
echo "     $summary"
check "the CLI image sees the agent's node connected with its capabilities and 0 degraded" \
	grep -Eq '^connected=True capabilities=[^ ]+ degraded=0$' <<<"$summary"

if [ "$failures" -gt 0 ]; then
	echo "--- agent log"; "${podman[@]}" logs "$agent" 2>&1 | tail -40
	echo "--- server log"; "${podman[@]}" logs "$server" 2>&1 | tail -20
	echo "--- nodes"; echo "$nodes"
fi
echo "images-test: $passed passed, $failures failed"
[ "$failures" -eq 0 ]
