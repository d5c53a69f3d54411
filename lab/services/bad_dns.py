#!/usr/bin/python3
"""A broken upstream DNS server: answers every query with SERVFAIL. The lab's
dnsmasq forwards a name to it (servers-file + SIGHUP) for the SERVFAIL fault."""
import argparse
import socket
import struct


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True, help="IP:PORT")
    args = p.parse_args()
    host, port = args.listen.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    while True:
        data, peer = s.recvfrom(2048)
        if len(data) < 12:
            continue
        qid, flags = struct.unpack(">HH", data[:4])
        flags = 0x8000 | (flags & 0x0100) | 0x0080 | 2  # response, RD copied, RA, SERVFAIL
        s.sendto(struct.pack(">HH", qid, flags) + data[4:6] + b"\0\0\0\0\0\0" + data[12:], peer)


if __name__ == "__main__":
    main()
