#!/usr/bin/env python3
"""How long the kernel takes to drop a connection whose peer went silent, for a given
TCP_USER_TIMEOUT: the time from a send on an established loopback connection, after every
packet to the peer's port is dropped (iptables, as a host that died or was cut off), to the
send's ETIMEDOUT. This is what one attempt on a silent backend costs the lb at
`LB_UPSTREAM_USER_TIMEOUT`: the kernel checks the timeout only when its retransmission timer
fires, so the connection ends at the first retransmission timer past it.

Run as root (iptables): `python3 bench/user_timeout.py [--rounds 3] [MS ...]`. Prints a
markdown table; each rule it adds is removed before it exits.
"""

import argparse
import select
import socket
import statistics
import subprocess
import time

TCP_USER_TIMEOUT = 18


def one(timeout_ms):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, timeout_ms)
    peer, _ = srv.accept()
    # A few exchanges first, so the RTT estimate is a live connection's.
    for _ in range(3):
        c.sendall(b"x")
        peer.recv(1)
    rule = ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-w", "-I", *rule], check=True)
    try:
        t0 = time.monotonic()
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ready, _, _ = select.select([c], [], [], 30)
        if not ready:
            return None
        try:
            c.recv(1)
            return None
        except OSError:
            return (time.monotonic() - t0) * 1000
    finally:
        subprocess.run(["iptables", "-w", "-D", *rule], check=False)
        for s in (c, peer, srv):
            s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("timeouts", nargs="*", type=int, default=[100, 250, 300, 500, 1000])
    args = ap.parse_args()
    rows = {t: [] for t in args.timeouts}
    # Interleaved, so that a noisy moment touches every setting alike.
    for _ in range(args.rounds):
        for t in args.timeouts:
            rows[t].append(one(t))
    print("| TCP_USER_TIMEOUT | dropped after, ms (median; all) | past the timeout, ms |")
    print("|---|---|---|")
    for t, got in rows.items():
        ok = [g for g in got if g is not None]
        m = statistics.median(ok) if ok else float("nan")
        all_ = ", ".join(f"{g:.0f}" if g is not None else "never" for g in got)
        print(f"| {t} ms | {m:.0f} ({all_}) | {m - t:.0f} |")


if __name__ == "__main__":
    main()
