#!/usr/bin/env python3
"""Hostile-client floods for the benchmark suite: many connections that are slow on purpose,
against one target, while a normal client measures what everyone else gets.

Run as a program (one flood, or the normal client, per process: a flood's own event loop
must not delay the normal client's clock), driven by bench/run.py's `floods` and `slowloris`
stages. Every loop is bounded by a count and a deadline.

  floods.py flood KIND PORT N SECONDS      slow-header | slow-body | slow-read | slowloris
  floods.py probe PORT SECONDS RATE        normal requests, a new connection each; JSON out
"""

import asyncio
import json
import socket
import sys
import time

SLOW_READ_PATH = "/bytes/8388608"


async def open_flood(kind, port, n, seconds):
    """Opens `n` connections of `kind` and keeps each slow for `seconds`. Prints one JSON
    line: how many opened, and when (seconds from the start) each was closed by the target."""
    start = time.monotonic()
    deadline = start + seconds
    closed = []
    opened = 0
    sem = asyncio.Semaphore(256)

    async def one():
        nonlocal opened
        async with sem:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if kind == "slow-read":
                # A small receive window (set before connecting, so the handshake offers it):
                # the response waits in the target rather than here.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), 10)
                r, w = await asyncio.open_connection(sock=sock)
            except (OSError, asyncio.TimeoutError):
                sock.close()
                return
        opened += 1
        chunk, every = {"slow-body": (b"X", 1), "slowloris": (b"X-a: b\r\n", 5)}.get(kind, (b"X", 1))
        if kind == "slow-read":
            w.write(f"GET {SLOW_READ_PATH} HTTP/1.1\r\nHost: flood\r\n\r\n".encode())
        elif kind == "slow-body":
            w.write(b"POST / HTTP/1.1\r\nHost: flood\r\nContent-Length: 1000000\r\n\r\n")
        else:
            w.write(b"GET / HTTP/1.1\r\nHost: flood\r\n")
        try:
            while time.monotonic() < deadline:
                if kind == "slow-read":
                    # 1 KiB a second: an 8 MiB response would take over two hours.
                    data = await asyncio.wait_for(r.read(1024), deadline - time.monotonic() + 1)
                    if not data:
                        break
                    await asyncio.sleep(1)
                    continue
                # A little now and then: a byte of the head or body, or a header line.
                w.write(chunk)
                await w.drain()
                try:
                    data = await asyncio.wait_for(r.read(4096), every)
                    if not data:
                        break
                except asyncio.TimeoutError:
                    pass
            else:
                w.close()
                return
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        closed.append(round(time.monotonic() - start, 2))
        w.close()

    await asyncio.gather(*(one() for _ in range(n)))
    print(json.dumps({"opened": opened, "closed_at": sorted(closed)}))


async def probe(port, seconds, rate):
    """A normal client: `GET /` on a new connection `rate` times a second, each bounded by 5 s.
    Prints one JSON line with every latency (ms) and the failures."""
    lat, failures = [], 0
    start = time.monotonic()

    async def one():
        nonlocal failures
        t0 = time.monotonic()
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            w.write(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 5)
            w.close()
            if not data.startswith(b"HTTP/1.1 200"):
                failures += 1
                return
            lat.append((time.monotonic() - t0) * 1000)
        except (OSError, asyncio.TimeoutError):
            failures += 1

    tasks = []
    for i in range(int(seconds * rate)):
        due = start + i / rate
        await asyncio.sleep(max(0, due - time.monotonic()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    print(json.dumps({"latencies_ms": lat, "failures": failures}))


def main():
    if sys.argv[1] == "flood":
        kind, port, n, seconds = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
        asyncio.run(open_flood(kind, port, n, seconds))
    elif sys.argv[1] == "probe":
        asyncio.run(probe(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
