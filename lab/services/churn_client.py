#!/usr/bin/python3
"""Healthy client traffic that churns: what the lab's healthy-churn scenarios
run next to the services (docs/lab.md, "Healthy churn").

  --mode pool  a connection pool that does not keep its connections: every
               request opens a new TCP connection, sends one request (HTTP GET
               or, with --protocol redis, a RESP PING), reads the whole answer
               and closes. A share of the closes (--abort-fraction) are aborts
               with SO_LINGER 0 (an RST after the answer was read), as pools
               that evict connections on timeout do. Every request succeeds.
  --mode slow  clients that read their answers slowly (--read-bytes every
               --read-interval-ms): the server's send buffer fills and its
               side of the exchange takes long, yet every request completes.

Each request is logged as one line `<start ns> <outcome> <ms>` to --out, so a
run can show that none failed.
"""
import argparse
import socket
import struct
import sys
import threading
import time


def http_get(sock, host, path):
    sock.sendall(("GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path, host)).encode())


def read_all(sock, chunk, interval):
    """Reads until the server closes; returns the bytes read."""
    data = bytearray()
    while True:
        b = sock.recv(chunk)
        if not b:
            return bytes(data)
        data += b
        if interval > 0:
            time.sleep(interval)


def one(args, host, port):
    s = socket.create_connection((host, port), timeout=args.timeout)
    abort = False
    try:
        s.settimeout(args.timeout if args.mode == "pool" else args.timeout * 20)
        if args.protocol == "redis":
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
            ok = reply.startswith(b"+PONG")
        else:
            http_get(s, host, args.path)
            interval = args.read_interval_ms / 1000.0 if args.mode == "slow" else 0
            chunk = args.read_bytes if args.mode == "slow" else 65536
            reply = read_all(s, chunk, interval)
            ok = reply.startswith(b"HTTP/1.1 200") or reply.startswith(b"HTTP/1.0 200")
        abort = args.mode == "pool" and args.rng.random() < args.abort_fraction
        return ok, len(reply)
    finally:
        if abort:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()


def worker(args, host, port, out, lock, period):
    nxt = time.monotonic()
    while True:
        start = time.time_ns()
        t0 = time.monotonic()
        try:
            ok, n = one(args, host, port)
            outcome = "ok" if ok else "bad"
        except Exception as e:  # noqa: BLE001 - every failure is logged, none hidden
            outcome = "error:" + type(e).__name__
        ms = (time.monotonic() - t0) * 1000
        with lock:
            out.write("%d %s %.1f\n" % (start, outcome, ms))
            out.flush()
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()


def main():
    import random

    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, help="IP:PORT")
    p.add_argument("--mode", choices=["pool", "slow"], default="pool")
    p.add_argument("--protocol", choices=["http", "redis"], default="http")
    p.add_argument("--path", default="/")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second per client (pool)")
    p.add_argument("--abort-fraction", type=float, default=0.0, help="pool: share of closes that are aborts (RST)")
    p.add_argument("--read-bytes", type=int, default=1024, help="slow: bytes per read")
    p.add_argument("--read-interval-ms", type=float, default=20.0, help="slow: pause between reads")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    args.rng = random.Random(args.seed)
    host, port = args.target.rsplit(":", 1)
    out = open(args.out, "a")
    lock = threading.Lock()
    period = 1.0 / args.rate if args.mode == "pool" else 0.0
    print("churn_client %s: %d clients to %s" % (args.mode, args.clients, args.target), file=sys.stderr, flush=True)
    threads = [threading.Thread(target=worker, args=(args, host, int(port), out, lock, period), daemon=True)
               for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


if __name__ == "__main__":
    main()
