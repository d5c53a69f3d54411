#!/usr/bin/python3
"""Open-loop client load: requests start on a Poisson schedule drawn from a
fixed seed, whether or not earlier ones have answered (a slow server does not
slow the load down). One line per finished request on --out:

    <start unix ns> <status or error> <latency ms>

status is the HTTP code, or `timeout`, `refused`, `reset`, `error`; `shed`
means the client itself had too many requests in flight.
"""
import argparse
import http.client
import random
import socket
import sys
import threading
import time


def one(host, port, path, timeout, out, lock, start_ns, sem):
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        r.read()
        status = str(r.status)
        c.close()
    except socket.timeout:
        status = "timeout"
    except ConnectionRefusedError:
        status = "refused"
    except ConnectionResetError:
        status = "reset"
    except Exception:
        status = "error"
    finally:
        sem.release()
    ms = (time.monotonic() - t0) * 1000
    with lock:
        out.write("%d %s %.1f\n" % (start_ns, status, ms))
        out.flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", required=True, help="IP:PORT")
    p.add_argument("--path", default="/")
    p.add_argument("--rate", type=float, default=20.0, help="requests per second (mean)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    host, port = args.target.rsplit(":", 1)
    rng = random.Random(args.seed)
    lock = threading.Lock()
    sem = threading.Semaphore(args.max_in_flight)
    out = open(args.out, "a")
    print("loadgen: %.1f req/s to %s seed %d" % (args.rate, args.target, args.seed), file=sys.stderr, flush=True)
    next_t = time.monotonic()
    while True:
        next_t += rng.expovariate(args.rate)
        delay = next_t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        start_ns = time.time_ns()
        if not sem.acquire(blocking=False):
            with lock:
                out.write("%d shed 0\n" % start_ns)
                out.flush()
            continue
        threading.Thread(target=one, args=(host, int(port), args.path, args.timeout, out, lock, start_ns, sem), daemon=True).start()


if __name__ == "__main__":
    main()
