#!/usr/bin/python3
"""Grows redis's memory: SETs of --value-kb values until --mb are written or
redis goes away (an OOM kill through its memory limit ends the connection)."""
import argparse
import socket
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--addr", required=True, help="IP:PORT")
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--value-kb", type=int, default=1024)
    p.add_argument("--pause-ms", type=float, default=20)
    args = p.parse_args()
    host, port = args.addr.rsplit(":", 1)
    value = b"m" * (args.value_kb * 1024)
    written = 0
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        f = s.makefile("rb")
        i = 0
        while written < args.mb * 1024 * 1024:
            key = b"fill:%d" % i
            s.sendall(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value))
            line = f.readline()
            if not line:
                raise ConnectionError("closed")
            written += len(value)
            i += 1
            time.sleep(args.pause_ms / 1000)
        print("redis_fill: wrote %d MB, redis still up" % (written >> 20), file=sys.stderr)
    except Exception as e:
        print("redis_fill: stopped after %d MB: %s" % (written >> 20, e), file=sys.stderr)


if __name__ == "__main__":
    main()
