#!/usr/bin/env python3
"""A stand-in for the Kubernetes API's pod endpoints, for TapioAttributionTests.

No API server can run on the test machines, so this serves the recorded pods in
this directory (real objects captured with `kubectl get -o json`) in the API's
own shapes: a PodList for `GET /api/v1/pods?fieldSelector=spec.nodeName=N`, and
for `...&watch=1&resourceVersion=V` newline-delimited watch events sent with the
chunked transfer coding, split at awkward places (mid-line, one byte) so the
client's line reassembly is exercised.

The conversation is a fixed script, one step per request, to cover what a real
agent meets:

  list 1   -> PodList at resourceVersion 1000 (the node's pods)
  watch 1  -> MODIFIED elephant (label app=elephant-svc), ADDED queue-l4dv8
              (rescheduled to this node), BOOKMARK 1003, DELETED rabbit; stream ends
  watch 2  -> an ERROR event with a 410 Status (resourceVersion too old)
  list 2   -> the state after watch 1, at resourceVersion 2000
  watch 3  -> HTTP 410 Gone
  list 3   -> the same state at 3000
  watch 4+ -> held open with nothing to say until the client goes away

Every request is appended to --log as one JSON line (path, authorization).
A request without `Authorization: Bearer <--token>` gets 401.
"""
import argparse
import copy
import glob
import http.server
import json
import os
import threading
import time
import urllib.parse

args = None
lock = threading.Lock()
counters = {"list": 0, "watch": 0}
pods = {}  # uid -> pod


def load_fixtures(directory):
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        with open(path) as f:
            doc = json.load(f)
        for pod in doc.get("items", [doc]):
            pods[pod["metadata"]["uid"]] = pod


def by_name(name):
    return next(p for p in pods.values() if p["metadata"]["name"] == name)


def on_node(node):
    return [p for p in pods.values() if node is None or p.get("spec", {}).get("nodeName") == node]


def watch_one_events(node):
    elephant = copy.deepcopy(by_name("elephant"))
    elephant["metadata"].setdefault("labels", {})["app"] = "elephant-svc"
    elephant["metadata"]["resourceVersion"] = "1001"
    queue = copy.deepcopy(by_name("queue-l4dv8"))
    queue["spec"]["nodeName"] = node
    queue["metadata"]["resourceVersion"] = "1002"
    rabbit = copy.deepcopy(by_name("rabbit"))
    rabbit["metadata"]["resourceVersion"] = "1004"
    events = [
        {"type": "MODIFIED", "object": elephant},
        {"type": "ADDED", "object": queue},
        {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": "1003"}}},
        {"type": "DELETED", "object": rabbit},
    ]
    # The state the next lists show.
    pods[elephant["metadata"]["uid"]] = elephant
    pods[queue["metadata"]["uid"]] = queue
    del pods[rabbit["metadata"]["uid"]]
    return events


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send_json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def status(self, code, reason, message):
        return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}

    def send_chunks(self, data):
        sizes = [1, 7, 300, 2, 4096, 13]
        i = k = 0
        while i < len(data):
            piece = data[i:i + sizes[k % len(sizes)]]
            self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
            self.wfile.flush()
            if k % 5 == 0:
                time.sleep(0.002)
            i += len(piece)
            k += 1

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        with open(args.log, "a") as log:
            log.write(json.dumps({"path": self.path, "authorization": auth}) + "\n")
        if auth != "Bearer " + args.token:
            return self.send_json(401, self.status(401, "Unauthorized", "Unauthorized"))
        if url.path != "/api/v1/pods":
            return self.send_json(404, self.status(404, "NotFound", "the server could not find the requested resource"))
        node = None
        for sel in query.get("fieldSelector", []):
            if sel.startswith("spec.nodeName="):
                node = sel.split("=", 1)[1]
        if query.get("watch", ["0"])[0] not in ("1", "true"):
            with lock:
                counters["list"] += 1
                rv = {1: "1000", 2: "2000"}.get(counters["list"], "3000")
                items = copy.deepcopy(on_node(node))
            return self.send_json(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})
        with lock:
            counters["watch"] += 1
            n = counters["watch"]
            events = watch_one_events(node) if n == 1 else None
        if n == 3:
            return self.send_json(410, self.status(410, "Expired", "too old resource version: 2000 (2500)"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if n == 1:
            self.send_chunks(b"".join(json.dumps(e).encode() + b"\n" for e in events))
        elif n == 2:
            self.send_chunks(json.dumps({"type": "ERROR", "object": self.status(410, "Expired", "too old resource version: 1004 (1500)")}).encode() + b"\n")
        else:
            deadline = time.time() + 60
            while time.time() < deadline:
                time.sleep(0.1)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        self.close_connection = True


def main():
    global args
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fixtures", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--tls-cert", help="serve https with this certificate (PEM)")
    p.add_argument("--tls-key", help="and this key (PEM)")
    args = p.parse_args()
    load_fixtures(args.fixtures)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.tls_cert:
        import ssl
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print("listening on 127.0.0.1:%d" % args.port, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
