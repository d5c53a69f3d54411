#!/usr/bin/env bash
# Installs Tapio into the current kubectl context in one command: namespace,
# cert-manager PKI (CA, server, example operator), one node certificate per
# node, server, agents, NetworkPolicy, scrape annotations, and with
# --prometheus-operator a ServiceMonitor and a PodMonitor. cert-manager must
# already run in the cluster. docs/operations.md, "Deploying on Kubernetes",
# says what each object does.
#
# Usage:
#   deploy/scripts/install.sh [--overlay dev|production|DIR] [--registry PREFIX]
#                             [--tag TAG] [--host-certificates]
#                             [--prometheus-operator] [--nodes a,b,...]
#                             [--render] [--timeout 5m]
#
#   --overlay              kustomize overlay under deploy/kubernetes/overlays,
#                          or a directory (default: production)
#   --registry PREFIX      images PREFIX/tapio-server:TAG and PREFIX/tapio-agent:TAG
#                          (default: the overlay's images)
#   --tag TAG              with --registry: the images' tag (default: `make version`)
#   --host-certificates    no node Certificates: each node provides
#                          /etc/tapio-agent/tls/<node>/ itself (the base's volume)
#   --prometheus-operator  add deploy/kubernetes/components/prometheus-operator
#   --nodes a,b            node names (default: `kubectl get nodes`)
#   --render               print the manifests instead of applying them; with
#                          --nodes (or --host-certificates) no cluster is contacted
#   --timeout D            how long to wait for certificates and rollouts (default 5m)
#
# Without --render: checks that cert-manager's (and with --prometheus-operator
# the Prometheus Operator's) CRDs exist, applies, then waits until every
# Certificate is Ready and the server and agents have rolled out. Run it again
# when nodes join or leave: it regenerates the node certificates.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
overlay=production
registry=""
tag=$(sed -n 's/^ *public static let current = "\(.*\)"$/\1/p' "$repo/Sources/TapioWire/Version.swift" 2>/dev/null || true)
node_certificates=1
prometheus_operator=0
nodes=""
render=0
timeout=5m

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
	case "$1" in
	--overlay) overlay=$2; shift 2 ;;
	--registry) registry=${2%/}; shift 2 ;;
	--tag) tag=$2; shift 2 ;;
	--host-certificates) node_certificates=0; shift ;;
	--prometheus-operator) prometheus_operator=1; shift ;;
	--nodes) nodes=$2; shift 2 ;;
	--render) render=1; shift ;;
	--timeout) timeout=$2; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) echo "unknown argument $1" >&2; usage >&2; exit 2 ;;
	esac
done

command -v kubectl >/dev/null || { echo "install.sh needs kubectl (its built-in kustomize renders the manifests)" >&2; exit 2; }
[ -d "$overlay" ] || overlay=$repo/deploy/kubernetes/overlays/$overlay
[ -f "$overlay/kustomization.yaml" ] || { echo "no kustomization.yaml in $overlay" >&2; exit 2; }
overlay=$(cd "$overlay" && pwd)
[ -z "$registry" ] || [ -n "$tag" ] || { echo "--registry needs --tag (no version found in the repository)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$render" -eq 0 ]; then
	crds=(certificates.cert-manager.io issuers.cert-manager.io)
	[ "$prometheus_operator" -eq 0 ] || crds+=(servicemonitors.monitoring.coreos.com podmonitors.monitoring.coreos.com)
	if ! out=$(kubectl get --raw /version 2>&1); then
		echo "cannot reach the cluster of the current kubectl context: $out" >&2
		exit 1
	fi
	for crd in "${crds[@]}"; do
		kubectl get crd "$crd" >/dev/null 2>&1 || {
			echo "the cluster has no $crd: install cert-manager (and with --prometheus-operator the Prometheus Operator) first" >&2
			exit 1
		}
	done
fi

# The installation: the overlay, plus the components asked for.
components=()
if [ "$node_certificates" -eq 1 ]; then
	names=()
	if [ -n "$nodes" ]; then IFS=, read -r -a names <<<"$nodes"; fi
	"$repo/deploy/scripts/node-certificates.sh" -o "$work/node-certificates" "${names[@]}"
	components+=(node-certificates)
fi
[ "$prometheus_operator" -eq 0 ] || components+=("$(realpath --relative-to="$work" "$repo/deploy/kubernetes/components/prometheus-operator")")

{
	echo "apiVersion: kustomize.config.k8s.io/v1beta1"
	echo "kind: Kustomization"
	echo "resources:"
	# kustomize takes only relative paths.
	echo "  - $(realpath --relative-to="$work" "$overlay")"
	if [ ${#components[@]} -gt 0 ]; then
		echo "components:"
		printf '  - %s\n' "${components[@]}"
	fi
	if [ -n "$registry" ]; then
		# The overlay may have renamed the images already: match what it renders.
		echo "images:"
		kubectl kustomize "$overlay" | sed -n 's/^ *image: *//p' | sort -u | while read -r image; do
			name=${image%@*}
			[[ "${name##*/}" != *:* ]] || name=${name%:*}
			echo "  - name: $name"
			echo "    newName: $registry/${name##*/}"
			echo "    newTag: \"$tag\""
		done
	fi
} >"$work/kustomization.yaml"

kubectl kustomize "$work" >"$work/install.yaml"
if [ "$render" -eq 1 ]; then
	cat "$work/install.yaml"
	exit 0
fi

kubectl apply -f "$work/install.yaml"
echo "waiting (up to $timeout) for the certificates, the server and the agents" >&2
kubectl -n tapio-system wait --for=condition=Ready certificates --all --timeout="$timeout"
kubectl -n tapio-system rollout status deployment/tapio-server --timeout="$timeout"
kubectl -n tapio-system rollout status daemonset/tapio-agent --timeout="$timeout"
kubectl -n tapio-system get certificates,pods -o wide
