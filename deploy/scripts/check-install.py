#!/usr/bin/env python3
"""Checks what `deploy/scripts/install.sh --render OPTIONS` printed (run by
validate.sh): the objects the one-command install promises are there, each
NetworkPolicy selects one of Tapio's pods and opens only ports that pod
declares, the prometheus.io annotations name each pod's metrics port, and
--registry/--tag/--nodes/--prometheus-operator take effect.

Usage: check-install.py RENDERED.yaml [INSTALL OPTIONS...]
"""
import sys

import yaml

path, options = sys.argv[1], sys.argv[2:]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
problems = []


def need(kind, name):
    if (kind, name) not in objects:
        problems.append(f"no {kind} {name}")
    return objects.get((kind, name))


def option(name):
    return options[options.index(name) + 1] if name in options else None


need("Namespace", "tapio-system")
for name in ("tapio-ca", "tapio-server", "tapio-operator-admin"):
    need("Certificate", name)
for node in (option("--nodes") or "").split(","):
    if node:
        need("Certificate", f"tapio-node-{node}")
if "--host-certificates" in options and any(k == "Certificate" and n.startswith("tapio-node-") for k, n in objects):
    problems.append("--host-certificates still issues node certificates")

templates = {}
for kind, name in (("Deployment", "tapio-server"), ("DaemonSet", "tapio-agent")):
    workload = need(kind, name)
    if not workload:
        continue
    template = templates[name] = workload["spec"]["template"]
    container = template["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    annotations = template["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or annotations.get("prometheus.io/port") != str(ports.get("metrics")):
        problems.append(f"{name}: the prometheus.io annotations do not name its metrics port {ports.get('metrics')}")
    if option("--registry"):
        expected = f"{option('--registry')}/{name}:{option('--tag')}"
        if container["image"] != expected:
            problems.append(f"{name}: image {container['image']}, not {expected}")

covered = set()
for (kind, name), policy in objects.items():
    if kind != "NetworkPolicy":
        continue
    selector = policy["spec"]["podSelector"].get("matchLabels", {})
    selected = [n for n, t in templates.items() if all(t["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    if len(selected) != 1:
        problems.append(f"NetworkPolicy {name} selects {len(selected)} of Tapio's pods")
        continue
    covered.add(selected[0])
    declared = {p["name"] for p in templates[selected[0]]["spec"]["containers"][0].get("ports", [])}
    declared |= {p["containerPort"] for p in templates[selected[0]]["spec"]["containers"][0].get("ports", [])}
    for rule in policy["spec"].get("ingress", []):
        if not rule.get("ports"):
            problems.append(f"NetworkPolicy {name}: a rule opens every port")
        for port in rule.get("ports", []):
            if port["port"] not in declared:
                problems.append(f"NetworkPolicy {name}: port {port['port']} is not a port of {selected[0]}")
for name in templates:
    if name not in covered:
        problems.append(f"no NetworkPolicy selects {name}")

if "--prometheus-operator" in options:
    need("ServiceMonitor", "tapio-server")
    need("PodMonitor", "tapio-agent")

for p in problems:
    print(f"FAIL install {' '.join(options)}: {p}")
sys.exit(1 if problems else 0)
