#!/usr/bin/python3
"""The lab's api tier: an HTTP server that answers each request by resolving
the redis name through the lab's DNS server (a raw UDP query, no system
resolver: the lab's network namespaces share the host's /etc/resolv.conf)
and talking RESP to redis over a plain socket.

GET /        -> INCR hits, GET blob from redis; 200, or 502 (redis), 503 (DNS)
               (with --upstream-http: GET / from the upstream api instead, a
               second application tier; 502 when it fails)
GET /healthz -> 200 without touching redis
GET /alloc?mb=N -> 202; a thread of the service allocates N MiB, 1 MiB every
               10 ms, and holds it (a request that makes the service itself
               grow: past its memory limit the kernel OOM-kills this process)

The configuration file is read at start; a file that is not valid JSON makes
the process exit 1 (how the lab's crash-loop fault breaks it: a bad rollout).
"""
import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DNSError(Exception):
    pass


def resolve(name, server, timeout=1.0, tries=2, refused_retries=5):
    """An A query for `name` to `server` (IP), answered address or DNSError(rcode name).

    A query refused because nothing listens (the DNS server restarting) is
    retried after 0.1 s, up to `refused_retries` times, as a stub resolver
    retries its server; a timeout is retried `tries` times."""
    qid = random.randint(0, 0xFFFF)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", 1, 1)
    last = "timeout"
    attempt = 0
    refused = 0
    while attempt < tries:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            s.connect((server, 53))
            s.send(query)
            data = s.recv(2048)
        except socket.timeout:
            attempt += 1
            continue
        except ConnectionRefusedError:
            refused += 1
            if refused > refused_retries:
                raise DNSError("refused")
            last = "refused"
            time.sleep(0.1)
            continue
        finally:
            s.close()
        rid, flags, qd, an, _, _ = struct.unpack(">HHHHHH", data[:12])
        if rid != qid:
            attempt += 1
            continue
        rcode = flags & 0xF
        if rcode != 0:
            raise DNSError({2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}.get(rcode, "RCODE%d" % rcode))
        off = 12
        for _ in range(qd):
            off = skip_name(data, off) + 4
        for _ in range(an):
            off = skip_name(data, off)
            rtype, _, _, rdlen = struct.unpack(">HHIH", data[off:off + 10])
            off += 10
            if rtype == 1 and rdlen == 4:
                return socket.inet_ntoa(data[off:off + 4])
            off += rdlen
        raise DNSError("NOANSWER")
    raise DNSError(last)


def skip_name(data, off):
    while True:
        n = data[off]
        if n == 0:
            return off + 1
        if n & 0xC0 == 0xC0:
            return off + 2
        off += n + 1


def resp_command(sock, *args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    sock.sendall(out)
    return resp_read(sock.makefile("rb"))


def resp_read(f):
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RuntimeError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2]
    raise RuntimeError("unexpected RESP reply %r" % line)


class Worker:
    def __init__(self, args, config):
        self.args = args
        self.config = config
        self.spin = 0
        if args.work_ms > 0:
            t0 = time.process_time()
            n = 0
            while time.process_time() - t0 < 0.05:
                hashlib.sha256(b"x" * 64).digest()
                n += 1
            self.spin = int(n / 50.0 * args.work_ms)

    def work(self):
        for _ in range(self.spin):
            hashlib.sha256(b"x" * 64).digest()

    def handle(self):
        self.work()
        try:
            addr = resolve(self.args.redis_name, self.args.dns)
        except DNSError as e:
            return 503, "dns %s: %s\n" % (self.args.redis_name, e)
        if self.args.upstream_http:
            return self.call_api(addr)
        try:
            with socket.create_connection((addr, self.args.redis_port), timeout=self.args.redis_timeout) as s:
                s.settimeout(self.args.redis_timeout)
                hits = resp_command(s, "INCR", "hits")
                blob = resp_command(s, "GET", "blob")
                if blob is None and self.args.blob_bytes > 0:
                    blob = b"b" * self.args.blob_bytes
                    resp_command(s, "SET", "blob", blob)
                blob = blob or b""
        except Exception as e:  # refused, timeout, reset, MISCONF ...
            return 502, "redis %s:%d: %s\n" % (addr, self.args.redis_port, e)
        return 200, "hits=%d blob=%d\n%s" % (hits, len(blob), blob[: self.args.echo_bytes].decode(errors="replace"))

    def call_api(self, addr):
        """GET / from the upstream api (HTTP/1.1, a new connection a request)."""
        try:
            with socket.create_connection((addr, self.args.redis_port), timeout=self.args.redis_timeout) as s:
                s.settimeout(self.args.redis_timeout)
                s.sendall(b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % self.args.redis_name.encode())
                f = s.makefile("rb")
                status = f.readline().split()
                code = int(status[1]) if len(status) > 1 else 0
                length = 0
                while True:
                    line = f.readline()
                    if not line or line in (b"\r\n", b"\n"):
                        break
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v.strip())
                body = f.read(length) if length else b""
        except Exception as e:  # refused, timeout, reset
            return 502, "upstream %s:%d: %s\n" % (addr, self.args.redis_port, e)
        if code != 200:
            return 502, "upstream %s:%d answered %d\n" % (addr, self.args.redis_port, code)
        return 200, "via %s\n%s" % (self.args.redis_name, body[: max(self.args.echo_bytes, 64)].decode(errors="replace"))


HELD = []


def allocate(mb):
    """Allocates and touches `mb` MiB, 1 MiB every 10 ms, and keeps it."""
    for _ in range(mb):
        HELD.append(bytearray(b"\x01" * (1 << 20)))
        time.sleep(0.01)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True, help="IP:PORT")
    p.add_argument("--dns", required=True, help="DNS server IP")
    p.add_argument("--redis-name", required=True, help="the upstream's DNS name (redis, or an api with --upstream-http)")
    p.add_argument("--redis-port", type=int, default=6379, help="the upstream's port")
    p.add_argument("--upstream-http", action="store_true", help="the upstream is another api: GET / over HTTP instead of redis")
    p.add_argument("--redis-timeout", type=float, default=1.0)
    p.add_argument("--work-ms", type=float, default=0.0, help="CPU work per request")
    p.add_argument("--blob-bytes", type=int, default=0, help="size of the blob value, written when redis has none")
    p.add_argument("--echo-bytes", type=int, default=0, help="bytes of the blob returned to the caller")
    p.add_argument("--config", help="JSON configuration file; invalid JSON exits 1")
    args = p.parse_args()
    config = {}
    if args.config:
        try:
            with open(args.config) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            print("api: bad configuration %s: %s" % (args.config, e), file=sys.stderr)
            sys.exit(1)
    worker = Worker(args, config)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/healthz":
                code, body = 200, "ok\n"
            elif self.path.startswith("/alloc"):
                mb = int(dict(kv.split("=", 1) for kv in self.path.partition("?")[2].split("&") if "=" in kv).get("mb", "400"))
                threading.Thread(target=allocate, args=(mb,), daemon=True).start()
                print("api: allocating %d MiB on request" % mb, file=sys.stderr, flush=True)
                code, body = 202, "allocating %d MiB\n" % mb
            else:
                code, body = worker.handle()
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *a):
            pass

    host, port = args.listen.rsplit(":", 1)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer((host, int(port)), Handler)
    print("api listening on %s" % args.listen, file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
