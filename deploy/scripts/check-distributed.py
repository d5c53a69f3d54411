#!/usr/bin/env python3
"""Checks the rendered distributed overlay (`kubectl kustomize
kubernetes/overlays/distributed`, run by validate.sh): the base's single
server is gone; ingest (2+), correlate (2) and query (2+) Deployments run
tapio-server in their role with the flags docs/scaling.md describes, ready on
/readyz, with resources and the server's TLS secret; the agents' Service
selects only ingest pods and the operators' only query pods; NATS is a
3-server JetStream StatefulSet on volumes and every --nats URL names one of
its pods; ClickHouse is a StatefulSet on a volume behind the --clickhouse URL;
PodDisruptionBudgets cover every role and NATS; every NetworkPolicy selects
pods of the overlay and opens only ports they declare.

Usage: check-distributed.py RENDERED.yaml SCALING.md
"""
import re
import sys

import yaml

path, docs_path = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
scaling = open(docs_path).read()
objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
problems = []


def need(kind, name):
    if (kind, name) not in objects:
        problems.append(f"no {kind} {name}")
    return objects.get((kind, name))


def flags(container):
    out = {}
    for a in container.get("args", []):
        name, _, value = a.partition("=")
        out.setdefault(name, []).append(value)
    return out


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


for kind, name in (("Deployment", "tapio-server"), ("PersistentVolumeClaim", "tapio-server-data")):
    if (kind, name) in objects:
        problems.append(f"the base's {kind} {name} (role all) is still there")

nats = need("StatefulSet", "tapio-nats")
nats_pods = set()
if nats:
    replicas = nats["spec"]["replicas"]
    if replicas != 3:
        problems.append(f"StatefulSet tapio-nats: {replicas} servers, not 3")
    nats_pods = {f"tapio-nats-{i}.{nats['spec']['serviceName']}:4222" for i in range(replicas)}
    if not nats["spec"].get("volumeClaimTemplates"):
        problems.append("StatefulSet tapio-nats: no volumeClaimTemplates (JetStream file storage)")
    config = (need("ConfigMap", "tapio-nats") or {}).get("data", {}).get("nats.conf", "")
    for word in ("jetstream", "store_dir", "cluster", "routes"):
        if word not in config:
            problems.append(f"ConfigMap tapio-nats: nats.conf has no {word}")
clickhouse = need("StatefulSet", "tapio-clickhouse")
if clickhouse and not clickhouse["spec"].get("volumeClaimTemplates"):
    problems.append("StatefulSet tapio-clickhouse: no volumeClaimTemplates")

templates = {}
roles = {"ingest": ("tapio-ingest", 2), "correlate": ("tapio-correlate", 2), "query": ("tapio-query", 2)}
for role, (name, minimum) in roles.items():
    workload = need("Deployment", name)
    if not workload:
        continue
    template = templates[name] = workload["spec"]["template"]
    if workload["spec"].get("replicas", 1) < minimum:
        problems.append(f"{name}: {workload['spec'].get('replicas', 1)} replicas, fewer than {minimum}")
    labels = template["metadata"]["labels"]
    if labels.get("app.kubernetes.io/name") != "tapio-server" or labels.get("app.kubernetes.io/component") != role:
        problems.append(f"{name}: pod labels {labels}")
    container = template["spec"]["containers"][0]
    f = flags(container)
    if f.get("--role") != [role]:
        problems.append(f"{name}: --role {f.get('--role')}, not {role}")
    for flag in f:
        if flag.startswith("--") and f"`{flag}" not in scaling and f"{flag} " not in scaling:
            problems.append(f"{name}: {flag} is not described in docs/scaling.md")
    if "--data-dir" in f:
        problems.append(f"{name}: --data-dir is refused in role {role}")
    urls = f.get("--nats", [])
    if len(urls) < 3:
        problems.append(f"{name}: {len(urls)} --nats servers, not 3")
    for url in urls:
        if re.sub(r"^(nats|tls)://", "", url) not in nats_pods:
            problems.append(f"{name}: --nats {url} names no server of StatefulSet tapio-nats")
    if f.get("--nats-replicas") != ["3"]:
        problems.append(f"{name}: --nats-replicas {f.get('--nats-replicas')}, not 3")
    if role == "query" and f.get("--clickhouse") != ["http://tapio-clickhouse:8123"]:
        problems.append(f"{name}: --clickhouse {f.get('--clickhouse')} is not the Service tapio-clickhouse")
    probe = container.get("readinessProbe", {}).get("httpGet", {})
    if probe.get("path") != "/readyz" or probe.get("port") != "metrics":
        problems.append(f"{name}: readiness is not /readyz on the metrics port")
    resources = container.get("resources", {})
    if not resources.get("requests") or not resources.get("limits"):
        problems.append(f"{name}: no resource requests and limits")
    secrets = {v["secret"]["secretName"] for v in template["spec"].get("volumes", []) if "secret" in v}
    if "tapio-server-tls" not in secrets or f.get("--tls-dir") != ["/etc/tapio/tls"]:
        problems.append(f"{name}: the server identity tapio-server-tls is not its --tls-dir")
    annotations = template["metadata"].get("annotations", {})
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if annotations.get("prometheus.io/port") != str(ports.get("metrics")):
        problems.append(f"{name}: the prometheus.io annotations do not name its metrics port")
    if not any(d["kind"] == "PodDisruptionBudget" and selects(d["spec"]["selector"]["matchLabels"], labels) for d in docs):
        problems.append(f"{name}: no PodDisruptionBudget")
for name in ("tapio-nats", "tapio-clickhouse"):
    if (("StatefulSet", name)) in objects:
        templates[name] = objects[("StatefulSet", name)]["spec"]["template"]
if nats and not any(d["kind"] == "PodDisruptionBudget" and selects(d["spec"]["selector"]["matchLabels"], nats["spec"]["template"]["metadata"]["labels"]) for d in docs):
    problems.append("tapio-nats: no PodDisruptionBudget")

# Services: who reaches which role.
for service, expected in (("tapio-server", "tapio-ingest"), ("tapio-query", "tapio-query"), ("tapio-correlate", "tapio-correlate")):
    s = need("Service", service)
    if not s:
        continue
    selected = [n for n, t in templates.items() if selects(s["spec"]["selector"], t["metadata"]["labels"])]
    if selected != [expected]:
        problems.append(f"Service {service} selects {selected}, not [{expected}]")
agent = need("DaemonSet", "tapio-agent")
if agent and "--server=tapio-server.tapio-system.svc:7400" not in agent["spec"]["template"]["spec"]["containers"][0]["args"]:
    problems.append("the agents do not connect to the Service tapio-server")
certificate = need("Certificate", "tapio-server")
if certificate:
    for host in ("tapio-server", "tapio-query", "tapio-correlate"):
        if host not in certificate["spec"]["dnsNames"]:
            problems.append(f"the server certificate does not name {host}")

# NetworkPolicies: each selects pods of this overlay and opens only their ports.
for (kind, name), policy in objects.items():
    if kind != "NetworkPolicy" or name == "tapio-agent":
        continue
    selected = [n for n, t in templates.items() if selects(policy["spec"]["podSelector"].get("matchLabels", {}), t["metadata"]["labels"])]
    if not selected:
        problems.append(f"NetworkPolicy {name} selects none of the overlay's pods")
    for rule in policy["spec"].get("ingress", []):
        if not rule.get("ports"):
            problems.append(f"NetworkPolicy {name}: a rule opens every port")
        for port in rule.get("ports", []):
            for n in selected:
                declared = {p["name"] for p in templates[n]["spec"]["containers"][0].get("ports", [])}
                declared |= {p["containerPort"] for p in templates[n]["spec"]["containers"][0].get("ports", [])}
                if port["port"] not in declared and name != "tapio-server":
                    problems.append(f"NetworkPolicy {name}: port {port['port']} is not a port of {n}")
for name in ("tapio-nats", "tapio-clickhouse"):
    if not any(k == "NetworkPolicy" and selects(p["spec"]["podSelector"].get("matchLabels", {}), templates.get(name, {}).get("metadata", {}).get("labels", {}))
               for (k, _), p in objects.items()):
        problems.append(f"no NetworkPolicy selects {name}")

for p in problems:
    print(f"FAIL distributed: {p}")
sys.exit(1 if problems else 0)
