#!/usr/bin/env bash
# Offline checks of deploy/, run by `make test` (its deploy-check step): every
# YAML file parses, every file a kustomization.yaml names exists, and, where
# the tools are installed, the overlays build (`kubectl kustomize`), the
# one-command install renders (scripts/install.sh --render) with what it must
# hold (scripts/check-install.py), the distributed overlay holds what
# docs/scaling.md describes (scripts/check-distributed.py), the core objects
# match the Kubernetes schema (`kubernetes-validate`, pip) and the scripts
# pass shellcheck.
# No cluster is contacted. cert-manager and Prometheus Operator objects are
# not schema-checked.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$python" - <<'EOF' || status=1
import pathlib, sys, yaml
bad = 0
for path in sorted(pathlib.Path("kubernetes").rglob("*.yaml")):
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        print(f"FAIL {path}: {e}"); bad += 1; continue
    if path.name != "kustomization.yaml":
        continue
    k = docs[0]
    named = list(k.get("resources", [])) + list(k.get("components", []))
    named += [p["path"] for p in k.get("patches", []) if "path" in p]
    for ref in named:
        if not (path.parent / ref).exists():
            print(f"FAIL {path}: names {ref}, which does not exist"); bad += 1
print(f"yaml: {'ok' if bad == 0 else f'{bad} problem(s)'}")
sys.exit(1 if bad else 0)
EOF

# The PrometheusRule of components/prometheus-operator carries the groups of
# prometheus/rules.yaml (the file for Prometheus without the Operator).
"$python" - <<'EOF' || status=1
import sys, yaml
plain = yaml.safe_load(open("prometheus/rules.yaml"))["groups"]
rule = yaml.safe_load(open("kubernetes/components/prometheus-operator/rules.yaml"))["spec"]["groups"]
if plain != rule:
    print("FAIL rules: kubernetes/components/prometheus-operator/rules.yaml differs from prometheus/rules.yaml"); sys.exit(1)
print(f"rules: the PrometheusRule matches prometheus/rules.yaml ({sum(len(g['rules']) for g in plain)} rules)")
EOF
if command -v promtool >/dev/null; then
	if promtool check rules prometheus/rules.yaml >/dev/null; then
		echo "promtool: rules ok"
	else
		echo "FAIL promtool check rules prometheus/rules.yaml"; status=1
	fi
fi

if command -v kubectl >/dev/null; then
	for dir in kubernetes/base kubernetes/overlays/*/; do
		dir=${dir%/}
		if out=$(kubectl kustomize "$dir" 2>&1); then
			echo "kustomize: $dir ok ($(grep -c '^kind:' <<<"$out") objects)"
			if command -v kubernetes-validate >/dev/null; then
				kubernetes-validate --strict --quiet --no-warn - <<<"$out" || { echo "FAIL schema: $dir"; status=1; }
			fi
		else
			echo "FAIL kustomize: $dir"; echo "$out"; status=1
		fi
	done
	# The distributed overlay: roles, NATS, ClickHouse, Services, budgets and
	# policies as docs/scaling.md describes them (scripts/check-distributed.py).
	if kubectl kustomize kubernetes/overlays/distributed >"$tmp/distributed.yaml" 2>/dev/null \
		&& "$python" scripts/check-distributed.py "$tmp/distributed.yaml" ../docs/scaling.md; then
		echo "distributed: the overlay's roles, NATS, ClickHouse, Services, budgets and policies ok"
	else
		status=1
	fi
	# The one-command install as shipped and with every option, rendered
	# without a cluster (scripts/install.sh --render), and what it must hold.
	for options in "--nodes node-a,node-b" \
		"--overlay dev --nodes node-a --registry registry.test/tapio --tag 1.2.3 --prometheus-operator" \
		"--host-certificates"; do
		# shellcheck disable=SC2086 # the options are words
		if ! out=$(scripts/install.sh --render $options 2>&1 >"$tmp/install.yaml"); then
			echo "FAIL install: $options"; echo "$out"; status=1; continue
		fi
		# shellcheck disable=SC2086
		"$python" scripts/check-install.py "$tmp/install.yaml" $options || { status=1; continue; }
		echo "install: $options ok ($(grep -c '^kind:' "$tmp/install.yaml") objects)"
		if command -v kubernetes-validate >/dev/null; then
			kubernetes-validate --strict --quiet --no-warn "$tmp/install.yaml" || { echo "FAIL schema: install $options"; status=1; }
		fi
	done
else
	echo "kustomize: skipped (no kubectl)"
fi

if command -v shellcheck >/dev/null; then
	shellcheck scripts/*.sh && echo "shellcheck: ok" || status=1
else
	echo "shellcheck: skipped"
fi
exit $status
