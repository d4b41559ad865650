#!/usr/bin/env python3
"""Hostile inputs side by side: the same raw requests, and the same hostile backend responses,
through the lb, nginx and HAProxy (each as the bench runs it: bench/nginx.conf.in,
bench/haproxy.cfg.in, the lb with its defaults), against one recording backend that keeps
every byte each proxy sends it.

Each case names the rule it checks (RFC 9110, 9112) and what counts as safe: refused (a 4xx or
5xx, or a closed connection) without the backend seeing it, or forwarded only in a form that
cannot be read two ways. Prints a markdown table and, with --json, every answer and every
request the backend received. Run by `python3 bench/hostile.py` after `scripts/bench`'s build
(release lb and web-sample, nginx and haproxy installed).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the suite's stack: Consul, process handling, configs)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Hostile responses, by path: what a compromised or broken backend might send.
RESPONSES = {
    "/resp/connection-listed": b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\n"
                               b"Content-Length: 2\r\n\r\nok",
    "/resp/proxy-connection": b"HTTP/1.1 200 OK\r\nProxy-Connection: keep-alive\r\n"
                              b"Content-Length: 2\r\n\r\nok",
    "/resp/keep-alive": b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=77\r\n"
                        b"Content-Length: 2\r\n\r\nok",
    "/resp/upgrade": b"HTTP/1.1 200 OK\r\nUpgrade: foo\r\nContent-Length: 2\r\n\r\nok",
    "/resp/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "/resp/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nhello",
    "/resp/obs-fold": b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
    "/resp/nul": b"HTTP/1.1 200 OK\r\nX-Nul: a\x00b\r\nContent-Length: 2\r\n\r\nok",
}


class Recorder:
    """A backend that keeps every request it receives, raw, and answers from RESPONSES."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.requests = []
        threading.Thread(target=self.accept, daemon=True).start()

    def take(self):
        with self.lock:
            out, self.requests = self.requests, []
        return out

    def accept(self):
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        conn.settimeout(5)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                fields = parse_fields(head)
                body = b""
                if "chunked" in fields.get("transfer-encoding", [""])[-1].lower():
                    while b"0\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    end = buf.find(b"0\r\n\r\n")
                    end = len(buf) if end < 0 else end + 5
                    body, buf = buf[:end], buf[end:]
                elif "content-length" in fields:
                    try:
                        n = int(fields["content-length"][0])
                    except ValueError:
                        n = 0
                    while len(buf) < n:
                        data = conn.recv(65536)
                        if not data:
                            break
                        buf += data
                    body, buf = buf[:n], buf[n:]
                with self.lock:
                    self.requests.append({"head": head.decode("latin-1"), "body": body.decode("latin-1")})
                path = head.split(b" ")[1].decode("latin-1") if head.count(b" ") >= 2 else "/"
                conn.sendall(RESPONSES.get(path, OK))
        except OSError:
            return
        finally:
            conn.close()


def parse_fields(head):
    """Field name (lower case) -> values, from a raw head; the first line is skipped."""
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            out.setdefault(name.decode("latin-1").strip().lower(), []).append(value.decode("latin-1").strip())
    return out


def exchange(port, raw, timeout=3.0):
    """Sends `raw` on a new connection and reads the answer until the close or the timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    try:
        s.sendall(raw)
        deadline = time.time() + timeout
        while time.time() < deadline:
            data = s.recv(65536)
            if not data:
                break
            out += data
    except OSError:
        pass
    finally:
        s.close()
    return out


def answer(raw):
    """(status or None, fields, body with chunked coding removed) of the first response."""
    if b"\r\n\r\n" not in raw:
        return None, {"__head__": [""]}, b""
    head, body = raw.split(b"\r\n\r\n", 1)
    try:
        status = int(head.split(b" ")[1])
    except (IndexError, ValueError):
        return None, {"__head__": [""]}, b""
    fields = parse_fields(head)
    fields["__head__"] = [head.decode("latin-1")]
    if "chunked" in ",".join(fields.get("transfer-encoding", [])).lower():
        out, rest = b"", body
        while b"\r\n" in rest:
            size, rest = rest.split(b"\r\n", 1)
            try:
                n = int(size.split(b";")[0], 16)
            except ValueError:
                break
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, fields, body


def refused(status, seen):
    """Refused: an error status or none at all, and the backend saw nothing."""
    return (status is None or status >= 400) and not seen


def req(first, *fields, body=b""):
    lines = [first, *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def lacks(name):
    """Safe when no request the backend saw carries field `name`."""
    return lambda st, f, b, seen: all(name not in parse_fields(r["head"].encode("latin-1")) for r in seen)


def client_lacks(name, marker=None):
    def verdict(st, f, b, seen):
        if st is None or st >= 500:
            return True
        return not any(marker is None or marker in v for v in f.get(name, []))
    return verdict


def heads(seen):
    return [parse_fields(r["head"].encode("latin-1")) for r in seen]


CASES = [
    # (class, rule, request, verdict(status, client fields, client body, backend requests))
    ("request: Content-Length beside Transfer-Encoding", "RFC 9112 6.1: remove the length or refuse",
     req("POST / HTTP/1.1", "Host: h", "Content-Length: 6", "Transfer-Encoding: chunked", "Connection: close",
         body=b"0\r\n\r\nX"),
     lambda st, f, b, seen: all(not ("content-length" in h and "transfer-encoding" in h) for h in heads(seen))),
    ("request: two different Content-Length", "RFC 9112 6.3: unrecoverable, 400",
     req("POST / HTTP/1.1", "Host: h", "Content-Length: 3", "Content-Length: 4", "Connection: close",
         body=b"abcd"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: chunked not the last coding", "RFC 9112 6.3: 400 and close",
     req("POST / HTTP/1.1", "Host: h", "Transfer-Encoding: chunked, gzip", "Connection: close", body=b"abc"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: space before the colon", "RFC 9112 5.1: 400",
     req("POST / HTTP/1.1", "Host: h", "Transfer-Encoding : chunked", "Content-Length: 5", "Connection: close",
         body=b"0\r\n\r\n"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: obs-fold line", "RFC 9112 5.2: 400, or unfolded before forwarding",
     req("GET / HTTP/1.1", "Host: h", "X-A: a", " b", "Connection: close"),
     lambda st, f, b, seen: all("\r\n " not in r["head"] and "\r\n\t" not in r["head"] for r in seen)),
    ("request: two Host fields", "RFC 9112 3.2: 400",
     req("GET / HTTP/1.1", "Host: a.example", "Host: b.example", "Connection: close"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: no Host", "RFC 9112 3.2: 400",
     req("GET / HTTP/1.1", "Connection: close"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: invalid Host value", "RFC 9112 3.2: 400",
     req("GET / HTTP/1.1", "Host: a b/c", "Connection: close"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: absolute-form target beside another Host", "RFC 9112 3.2.2: the target's authority wins",
     req("GET http://a.example/ HTTP/1.1", "Host: b.example", "Connection: close"),
     lambda st, f, b, seen: all(h.get("host", [""])[0].split(":")[0] == "a.example" for h in heads(seen))),
    ("request: fields named in Connection", "RFC 9110 7.6.1: removed",
     req("GET / HTTP/1.1", "Host: h", "Connection: x-secret, close", "X-Secret: 1"),
     lacks("x-secret")),
    ("request: Proxy-Connection", "RFC 9110 7.6.1: removed",
     req("GET / HTTP/1.1", "Host: h", "Proxy-Connection: keep-alive", "Connection: close"),
     lacks("proxy-connection")),
    ("request: Keep-Alive", "RFC 9110 7.6.1: removed",
     req("GET / HTTP/1.1", "Host: h", "Keep-Alive: timeout=5", "Connection: close"),
     lacks("keep-alive")),
    ("request: Upgrade without Connection: upgrade", "RFC 9110 7.6.1, 7.8: removed",
     req("GET / HTTP/1.1", "Host: h", "Upgrade: websocket", "Connection: close"),
     lacks("upgrade")),
    ("request: h2c upgrade", "smuggling an HTTP/2 connection past the proxy",
     req("GET / HTTP/1.1", "Host: h", "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c",
         "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA"),
     lambda st, f, b, seen: st != 101 and lacks("upgrade")(st, f, b, seen)),
    ("request: CONNECT", "a reverse proxy opens no tunnel on request",
     req("CONNECT 127.0.0.1:22 HTTP/1.1", "Host: 127.0.0.1:22"),
     lambda st, f, b, seen: st != 200 and not seen),
    ("request: space inside the target", "RFC 9112 3: invalid request line, 400",
     req("GET /a b HTTP/1.1", "Host: h", "Connection: close"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: NUL in a field value", "RFC 9110 5.5: reject or replace with SP",
     req("GET / HTTP/1.1", "Host: h", "X-A: a\x00b", "Connection: close"),
     lambda st, f, b, seen: all("\x00" not in r["head"] for r in seen)),
    ("request: bare CR in a field value", "RFC 9110 5.5: reject or replace with SP",
     req("GET / HTTP/1.1", "Host: h", "X-A: a\rb", "Connection: close"),
     lambda st, f, b, seen: all("a\rb" not in r["head"] for r in seen)),
    ("request: chunk size overflow", "RFC 9112 7.1: a size that cannot be held is an error",
     req("POST / HTTP/1.1", "Host: h", "Transfer-Encoding: chunked", "Connection: close",
         body=b"10000000000000001\r\nab\r\n0\r\n\r\n"),
     lambda st, f, b, seen: all("10000000000000001" not in r["body"] for r in seen) and st != 200),
    ("request: 70 KiB of fields", "bounded head (431 or 400), never forwarded",
     req("GET / HTTP/1.1", "Host: h", *[f"X-Filler-{i}: {'f' * 60}" for i in range(1000)], "Connection: close"),
     lambda st, f, b, seen: refused(st, seen)),
    ("request: dot segments in the path", "RFC 3986 5.2.4: the path matched is the path forwarded",
     req("GET /a/%2e%2e/b/../c HTTP/1.1", "Host: h", "Connection: close"),
     lambda st, f, b, seen: all(not any(s in r["head"].split(" ")[1].lower() for s in ("/../", "%2e"))
                                for r in seen)),
    ("response: fields named in Connection", "RFC 9110 7.6.1: removed",
     req("GET /resp/connection-listed HTTP/1.1", "Host: h", "Connection: close"), client_lacks("x-secret")),
    ("response: Proxy-Connection", "RFC 9110 7.6.1: removed",
     req("GET /resp/proxy-connection HTTP/1.1", "Host: h", "Connection: close"), client_lacks("proxy-connection")),
    ("response: Keep-Alive", "RFC 9110 7.6.1: removed (the proxy may send its own)",
     req("GET /resp/keep-alive HTTP/1.1", "Host: h", "Connection: close"), client_lacks("keep-alive", "max=77")),
    ("response: Upgrade without a 101", "RFC 9110 7.6.1: removed",
     req("GET /resp/upgrade HTTP/1.1", "Host: h", "Connection: close"), client_lacks("upgrade")),
    ("response: Content-Length beside chunked", "RFC 9112 6.3: the coding wins, the length is removed",
     req("GET /resp/cl-te HTTP/1.1", "Host: h", "Connection: close"),
     lambda st, f, b, seen: st is None or st >= 500
     or (b == b"hello world" and not ("content-length" in f and "transfer-encoding" in f))),
    ("response: two different Content-Length", "RFC 9112 6.3: unrecoverable, 502",
     req("GET /resp/two-lengths HTTP/1.1", "Host: h", "Connection: close"),
     lambda st, f, b, seen: st is None or st >= 500),
    ("response: obs-fold line", "RFC 9112 5.2: 502, or unfolded",
     req("GET /resp/obs-fold HTTP/1.1", "Host: h", "Connection: close"),
     lambda st, f, b, seen: st is None or st >= 500 or "\r\n b" not in f["__head__"][0]),
    ("response: NUL in a field value", "RFC 9110 5.5: reject or replace with SP",
     req("GET /resp/nul HTTP/1.1", "Host: h", "Connection: close"),
     lambda st, f, b, seen: st is None or st >= 500 or all("\x00" not in v for v in f.get("x-nul", []))),
]


def version(argv):
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (p.stdout + p.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write every answer and backend request here")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="switchyard-hostile-")
    rec = Recorder()
    stack = run.Stack(work, ["lb"])
    try:
        # The suite's own proxies are pointed at its web-sample backends; these three point
        # at the recorder only.
        stack.backend_ports = [rec.port]
        stack.register("hostile-0", "hostile", rec.port, ["hostile.route=/"])
        ports = {}
        lb_port, admin = run.free_port(), run.free_port()
        env = stack.lb_env(lb_port, admin)
        env["LB_TAG_PREFIX"] = "hostile"
        stack.spawn("lb-hostile", [str(run.ROOT / "target" / "release" / "lb")], run.PROXY_CPU, env)
        run.wait_port(lb_port)
        ports["lb"] = lb_port
        port = run.free_port()
        stack.spawn("nginx-hostile", stack.nginx_argv("nginx-hostile", port, run.free_port()), run.PROXY_CPU)
        run.wait_port(port)
        ports["nginx"] = port
        port = run.free_port()
        stack.spawn("haproxy-hostile", stack.haproxy_argv("haproxy-hostile", port, run.free_port()), run.PROXY_CPU)
        run.wait_port(port)
        ports["haproxy"] = port
        deadline = time.time() + 30
        while time.time() < deadline:
            st, _, _ = answer(exchange(lb_port, req("GET / HTTP/1.1", "Host: h", "Connection: close")))
            if st == 200:
                break
            time.sleep(0.2)
        rec.take()

        results = []
        for cls, rule, raw, verdict in CASES:
            row = {"case": cls, "rule": rule, "targets": {}}
            for name, port in ports.items():
                rec.take()
                got = exchange(port, raw)
                time.sleep(0.2)
                seen = rec.take()
                st, f, b = answer(got)
                row["targets"][name] = {"safe": bool(verdict(st, f, b, seen)), "status": st,
                                        "forwarded": len(seen), "answer": got[:600].decode("latin-1"),
                                        "backend": seen}
            results.append(row)
        names = list(ports)
        commit = subprocess.run(["git", "-C", str(run.ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip() or "?"
        print(f"lb: release build of {commit}; nginx: {version([shutil.which('nginx') or 'nginx', '-v'])}; "
              f"haproxy: {version([shutil.which('haproxy') or 'haproxy', '-v'])}")
        print()
        print("| input | rule | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for r in results:
            cells = []
            for n in names:
                t = r["targets"][n]
                how = f"{t['status'] or 'closed'}" + (f", forwarded" if t["forwarded"] else "")
                cells.append(("safe" if t["safe"] else "**UNSAFE**") + f" ({how})")
            print(f"| {r['case']} | {r['rule']} | " + " | ".join(cells) + " |")
        for n in names:
            print(f"{n}: {sum(r['targets'][n]['safe'] for r in results)}/{len(results)} safe")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
