#!/usr/bin/python3
"""A noisy neighbour: --procs processes spinning on the CPU."""
import argparse
import hashlib
import multiprocessing


def spin():
    x = b"h" * 64
    while True:
        x = hashlib.sha256(x).digest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--procs", type=int, default=2)
    args = p.parse_args()
    for _ in range(args.procs - 1):
        multiprocessing.Process(target=spin, daemon=True).start()
    spin()


if __name__ == "__main__":
    main()
