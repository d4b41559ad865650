#!/usr/bin/env python3
"""Switchyard's benchmark suite: the lb against nginx and HAProxy (Debian's packages, configs
in bench/) and the backends hit directly, on the same local backends, in one run.

Layout on the 2-core machine: the proxy under test runs alone on CPU 1; wrk and the backends
share CPU 0 (so "direct" is the limit CPU 0 allows). Runs are interleaved (each round rotates
the target order) so drift cancels, and every figure is the median over rounds.

Stages: `wrk` scenarios (small responses at 16 and 256 keep-alive connections, 1 MiB
responses, a new connection per request; over TLS with keep-alive and with a handshake per
request) and an `h2load` HTTP/2-over-TLS scenario, every TLS listener serving the same
certificate; idle keep-alive client connections (RSS and kernel socket memory per connection); the lb under Consul
churn (100 instance changes/s) against the lb without, and against as many Consul writes
that the lb does not watch; the lb with 10 and with 10,000 instances in its table; system
calls per request by call (`--stages syscalls`, not among the default stages). Started
by scripts/bench, which installs and builds what it needs first.
"""

import argparse
import asyncio
import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import statistics
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CLK = os.sysconf("SC_CLK_TCK")
PROXY_CPU = "1"
LOAD_CPU = "0"
# --two-core: every proxy unpinned with two workers (lb LB_WORKERS=2, nginx worker_processes
# 2, HAProxy nbthread 2), the load and the backends unpinned too: most real nodes have more
# than one core, and this row shows how each proxy uses the second.
WORKERS = 1
BACKENDS = 4


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


_GIVEN_PORTS = set()


def free_port():
    """A loopback port free now and not handed out before in this run: the kernel picks each
    bind's port at random, and two picks can be one port (Consul then refuses to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


def wait_port(port, timeout=15.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def http(method, url, body=None, timeout=10):
    req = urllib.request.Request(url, data=body, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def tree(pid):
    """pid and its descendants."""
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids, which=(11, 12)):
    """CPU seconds of `pids`: user and system by default, `which=(11,)` user only."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(fields[i]) for i in which)
        except OSError:
            pass
    return total / CLK


def core_jiffies():
    """Busy and total jiffies of each CPU (`/proc/stat`), by CPU number. Busy leaves out idle,
    iowait and steal: time a vCPU spends halted or polling before it halts counts as idle."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *v = line.split()
            if name.startswith("cpu") and name != "cpu":
                # Guest time (fields 9 and 10) is counted in user and nice already.
                v = [int(x) for x in v[:8]]
                out[name[3:]] = (sum(v) - v[3] - v[4] - v[7], sum(v))
    return out


def busy_pct(before, after, cpus):
    """How busy `cpus` (a taskset list such as "1" or "0,1") were between two `core_jiffies`."""
    busy = total = 0
    for c in cpus.split(","):
        busy += after[c][0] - before[c][0]
        total += after[c][1] - before[c][1]
    return 100.0 * busy / max(total, 1)


def rss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def socket_mem_bytes(pids):
    """Kernel memory held by the TCP sockets `pids` own, as `ss -m` reports it per socket:
    received and not read (r), queued to send (w), reserved ahead (f) and options (o). The
    struct of each socket is the same for every proxy holding one socket per client, and
    is left out."""
    inodes = set()
    for p in pids:
        try:
            for fd in os.listdir(f"/proc/{p}/fd"):
                try:
                    link = os.readlink(f"/proc/{p}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    out = subprocess.run(["ss", "-tanem"], capture_output=True, text=True).stdout
    total = 0
    ino = None
    for line in out.splitlines():
        m = re.search(r"\bino:(\d+)", line)
        if m:
            ino = m.group(1)
        m = re.search(r"skmem:\(([^)]*)\)", line)
        if m and ino in inodes:
            fields = dict(re.match(r"([a-z]+)(\d+)", f).groups() for f in m.group(1).split(","))
            total += sum(int(fields.get(k, 0)) for k in ("r", "w", "f", "o"))
        if m:
            ino = None
    return total


class Proc:
    """A process pinned to `cpu`, stopped by its PID (and its children's)."""

    def __init__(self, name, argv, cpu, env=None, logdir=None):
        self.name = name
        out = open(os.path.join(logdir, f"{name}.log"), "w") if logdir else subprocess.DEVNULL
        self.p = subprocess.Popen(
            ["taskset", "-c", cpu] + argv,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def pids(self):
        return tree(self.p.pid)

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()


class Stack:
    """Backends, a Consul dev agent, and every target, started once for the whole run."""

    def __init__(self, work, targets, base_lb=None):
        self.work = work
        self.base_lb = base_lb
        self.procs = []
        self.targets = {}
        try:
            self.start(targets)
        except BaseException:
            self.stop()
            raise

    def start(self, targets):
        tools = ROOT / ".tools" / "bin"
        rel = ROOT / "target" / "release"
        self.tls_ports = {}
        # One certificate for every target's TLS listener: ECDSA P-256, as most sites serve now.
        self.cert, self.key = os.path.join(self.work, "cert.pem"), os.path.join(self.work, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", self.key, "-out", self.cert, "-days", "30", "-subj", "/CN=bench.test",
                        "-addext", "subjectAltName=DNS:bench.test"], check=True, capture_output=True)
        self.pem = os.path.join(self.work, "cert+key.pem")
        pathlib.Path(self.pem).write_text(pathlib.Path(self.cert).read_text() + pathlib.Path(self.key).read_text())
        self.backend_ports = [free_port() for _ in range(BACKENDS)]
        for i, port in enumerate(self.backend_ports):
            self.spawn(f"backend{i}", [str(rel / "web-sample")], LOAD_CPU,
                       {"WEB_LISTEN": f"127.0.0.1:{port}", "WEB_NAME": f"b{i}", "WEB_DRAIN_DELAY": "0"})
        for port in self.backend_ports:
            wait_port(port)
        self.extra_backend = free_port()
        self.spawn("backend-churn", [str(rel / "web-sample")], LOAD_CPU,
                   {"WEB_LISTEN": f"127.0.0.1:{self.extra_backend}", "WEB_NAME": "churn", "WEB_DRAIN_DELAY": "0"})
        wait_port(self.extra_backend)

        if "lb" in targets:
            c = {k: free_port() for k in ("http", "serf_lan", "serf_wan", "server")}
            self.consul_port = c["http"]
            self.consul_proc = self.spawn("consul", [str(tools / "consul"), "agent", "-dev", "-bind", "127.0.0.1",
                                  "-client", "127.0.0.1", "-http-port", str(c["http"]),
                                  "-dns-port", "-1", "-grpc-port", "-1",
                                  "-serf-lan-port", str(c["serf_lan"]),
                                  "-serf-wan-port", str(c["serf_wan"]),
                                  "-server-port", str(c["server"]),
                                  # The lb keeps one blocking query (one connection) per routed
                                  # service: the 1,000-service stage needs more than Consul's
                                  # default 200 connections per client address.
                                  "-hcl", "limits { http_max_conns_per_client = 4096 }"], LOAD_CPU)
            wait_port(self.consul_port)
            self.wait_leader()
            # The real backends carry a second route tag that only "lb-small" (tag prefix
            # `small`) reads: the table-scale stage compares it with the lb that also sees
            # thousands of other instances, run for run.
            for i, port in enumerate(self.backend_ports):
                self.register(f"web-{i}", "web", port, ["lb.route=/", "small.route=/"])
                # The same backends on a sticky route, for the instructions stage's
                # `lb-sticky` row (stickiness is an instance's, so these are other instances).
                self.register(f"web-sticky-{i}", "web-sticky", port,
                              ["lb.route=/sticky", "lb.sticky=cookie:sid"])
            lb_port, admin, tls_port = free_port(), free_port(), free_port()
            self.lb_admin = admin
            p = self.start_lb("lb", rel / "lb", lb_port, admin, tls_port)
            if "lb-base" in targets:
                # An earlier build of the lb, started the same way and fed by the same Consul:
                # a change's effect measured run for run against the code it replaces.
                base_port, base_tls = free_port(), free_port()
                base = self.start_lb("lb-base", self.base_lb, base_port, free_port(), base_tls)
                self.targets["lb-base"] = (base_port, base)
            if "lb-log" in targets:
                # The same lb with the JSON access log of every request (to its log file).
                log_port, log_tls = free_port(), free_port()
                logged = self.start_lb("lb-log", rel / "lb", log_port, free_port(), log_tls,
                                       {"LB_ACCESS_LOG": "json"})
                self.targets["lb-log"] = (log_port, logged)
            if "lb-splice" in targets:
                # The same lb splicing plain HTTP/1.1 bodies of 64 KiB or more (LB_SPLICE_MIN).
                splice_port, splice_tls = free_port(), free_port()
                spliced = self.start_lb("lb-splice", rel / "lb", splice_port, free_port(), splice_tls,
                                        {"LB_SPLICE_MIN": "65536"})
                self.targets["lb-splice"] = (splice_port, spliced)
            small_port = free_port()
            small = self.spawn("lb-small", [str(rel / "lb")], PROXY_CPU, {
                "LB_LISTEN": f"127.0.0.1:{small_port}",
                "LB_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
                "LB_CONSUL_ADDR": f"http://127.0.0.1:{self.consul_port}",
                "LB_TAG_PREFIX": "small",
                "RUST_LOG": "warn",
            })
            wait_port(small_port)
            self.targets["lb-small"] = (small_port, small)
            self.wait_backends(BACKENDS)
            self.targets["lb"] = (lb_port, p)
        if "nginx" in targets:
            port, tls_port = free_port(), free_port()
            p = self.spawn("nginx", self.nginx_argv("nginx", port, tls_port), PROXY_CPU)
            wait_port(port)
            wait_port(tls_port)
            self.tls_ports["nginx"] = tls_port
            self.targets["nginx"] = (port, p)
        if "haproxy" in targets:
            port, tls_port = free_port(), free_port()
            p = self.spawn("haproxy", self.haproxy_argv("haproxy", port, tls_port), PROXY_CPU)
            wait_port(port)
            wait_port(tls_port)
            self.tls_ports["haproxy"] = tls_port
            self.targets["haproxy"] = (port, p)
        if "direct" in targets:
            self.targets["direct"] = (self.backend_ports[0], None)

    def start_lb(self, name, binary, port, admin, tls_port, extra_env=None):
        env = {**self.lb_env(port, admin, tls_port), **(extra_env or {})}
        p = self.spawn(name, [str(binary)], PROXY_CPU, env)
        wait_port(port)
        wait_port(tls_port)
        self.tls_ports[name] = tls_port
        return p

    def lb_env(self, port, admin, tls_port=None):
        env = {
            "LB_LISTEN": f"127.0.0.1:{port}",
            "LB_ADMIN_LISTEN": f"127.0.0.1:{admin}",
            "LB_CONSUL_ADDR": f"http://127.0.0.1:{self.consul_port}",
            "LB_WORKERS": str(WORKERS),
            "RUST_LOG": "warn",
        }
        if tls_port:
            env.update({"LB_TLS_LISTEN": f"127.0.0.1:{tls_port}",
                        "LB_TLS_CERTS": f"{self.cert}:{self.key}"})
        return env

    def nginx_argv(self, name, port, tls_port, extra=()):
        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        ups = "\n".join(f"        server 127.0.0.1:{p};" for p in self.backend_ports)
        conf = (BENCH / "nginx.conf.in").read_text().replace("@DIR@", d) \
            .replace("@PORT@", str(port)).replace("@UPSTREAMS@", ups) \
            .replace("@TLSPORT@", str(tls_port)).replace("@CERT@", self.cert).replace("@KEY@", self.key) \
            .replace("worker_processes 1;", f"worker_processes {WORKERS};")
        path = os.path.join(d, "nginx.conf")
        pathlib.Path(path).write_text(conf)
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-c", path, "-p", d,
                "-e", os.path.join(d, "nginx-error.log"), *extra]

    def haproxy_argv(self, name, port, tls_port, small=False):
        srv = "\n".join(f"    server s{i} 127.0.0.1:{p}" for i, p in enumerate(self.backend_ports))
        conf = (BENCH / "haproxy.cfg.in").read_text().replace("@PORT@", str(port)) \
            .replace("@SERVERS@", srv).replace("@TLSPORT@", str(tls_port)).replace("@PEM@", self.pem) \
            .replace("nbthread 1", f"nbthread {WORKERS}")
        if small:
            # Under valgrind, which keeps some descriptors for itself.
            conf = conf.replace("ulimit-n 20000", "ulimit-n 10000").replace("maxconn 9980", "maxconn 4000")
        path = os.path.join(self.work, f"{name}.cfg")
        pathlib.Path(path).write_text(conf)
        return [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", path]

    def spawn(self, name, argv, cpu, env=None):
        p = Proc(name, argv, cpu, env, self.work)
        self.procs.append(p)
        return p

    def consul(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        return http(method, f"http://127.0.0.1:{self.consul_port}{path}", data)

    def wait_leader(self):
        deadline = time.time() + 15
        while time.time() < deadline:
            try:
                if self.consul("GET", "/v1/status/leader")[1].strip() not in (b"", b'""'):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("Consul elected no leader")

    def register_external(self, node, sid, name, address, port, tags):
        """An instance on a node no agent owns, written straight to the catalog: no
        anti-entropy to undo it, and thousands register in seconds rather than minutes."""
        self.consul("PUT", "/v1/catalog/register", {
            "Node": node, "Address": address, "SkipNodeUpdate": True,
            "Service": {"ID": sid, "Service": name, "Address": address, "Port": port,
                        "Tags": tags}})

    def register(self, sid, name, port, tags, address="127.0.0.1"):
        self.consul("PUT", "/v1/agent/service/register",
                    {"ID": sid, "Name": name, "Address": address, "Port": port, "Tags": tags})

    def deregister(self, sid):
        self.consul("PUT", f"/v1/agent/service/deregister/{sid}")

    def lb_backend_count(self):
        _, body = http("GET", f"http://127.0.0.1:{self.lb_admin}/routes")
        # Not the sticky route's: its instances are the same backends again.
        routes = json.loads(body)["routes"]
        return sum(len(r["backends"]) for r in routes if r["route"] != "*/sticky")

    def wait_backends(self, n, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.lb_backend_count() == n:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the lb did not reach {n} backends")

    def stop(self):
        for p in reversed(self.procs):
            p.stop()


def wrk(port, path, conns, duration, close=False, scheme="http"):
    argv = ["taskset", "-c", LOAD_CPU, "wrk", f"-t{WORKERS}", f"-c{conns}", f"-d{duration}s",
            "--timeout", "5s", "-s", str(BENCH / "report.lua")]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"{scheme}://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    line = next((l for l in out.splitlines() if l.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    r = dict(kv.split("=") for kv in line.split()[1:])
    r = {k: int(v) for k, v in r.items()}
    r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def h2load(port, path, conns, streams, duration):
    """HTTP/2 over TLS (ALPN h2) with h2load; percentiles from its per-request log."""
    logf = os.path.join(tempfile.gettempdir(), f"h2load-{os.getpid()}.log")
    argv = ["taskset", "-c", LOAD_CPU, "h2load", "-t1", f"-c{conns}", f"-m{streams}", f"-D{duration}",
            "--log-file", logf, f"https://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    m = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", out)
    fin = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", out)
    if not m or not fin:
        raise RuntimeError(f"h2load printed no result:\n{out}")
    with open(logf) as f:
        lat = sorted(int(line.split("\t")[2]) for line in f if line.count("\t") >= 2)
    os.unlink(logf)
    pct = lambda q: lat[min(len(lat) - 1, int(q / 100 * len(lat)))] if lat else None  # noqa: E731
    ok = int(m.group(2))
    return {"requests": ok, "rps": float(fin.group(2)), "errors": int(m.group(3)) + int(m.group(4)) + int(m.group(5)),
            "p50": pct(50), "p99": pct(99), "p999": pct(99.9)}


class Sampler:
    """Peak RSS of a process tree, sampled every 100 ms while a run lasts."""

    def __init__(self, proc):
        self.proc, self.peak, self.stop_ = proc, 0, threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop_.is_set():
            self.peak = max(self.peak, rss_kib(self.proc.pids()))
            time.sleep(0.1)

    def __enter__(self):
        if self.proc:
            self.t.start()
        return self

    def __exit__(self, *a):
        self.stop_.set()
        if self.proc:
            self.t.join()


def measured_run(stack, target, path, conns, duration, close=False, proto="http"):
    port, proc = stack.targets[target]
    if proto != "http":
        port = stack.tls_ports[target]
    cpu0 = cpu_seconds(proc.pids()) if proc else 0
    user0 = cpu_seconds(proc.pids(), (11,)) if proc else 0
    # The load generator's own CPU (wrk or h2load: this script's only children that end in a
    # run): where a proxy leaves its core idle, the load's cost per request sets the pace.
    load0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cores0 = core_jiffies()
    with Sampler(proc) as s:
        if proto == "h2":
            r = h2load(port, path, conns, H2_STREAMS, duration)
        else:
            r = wrk(port, path, conns, duration, close, scheme=proto)
        # Before the sampler's last 100 ms sleep ends, which would count as idle.
        cores1 = core_jiffies()
    load1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Which core bound the run: a proxy core with time to spare beside a load core near 100%
    # means the load's own cost per request set the pace, whatever the proxy saved.
    r["proxy_core_busy_pct"] = busy_pct(cores0, cores1, PROXY_CPU)
    r["load_core_busy_pct"] = busy_pct(cores0, cores1, LOAD_CPU)
    r["load_cpu_per_100k"] = ((load1.ru_utime + load1.ru_stime) - (load0.ru_utime + load0.ru_stime)) \
        / max(r["requests"], 1) * 1e5
    if proc:
        r["cpu_per_100k"] = (cpu_seconds(proc.pids()) - cpu0) / max(r["requests"], 1) * 1e5
        r["user_per_100k"] = (cpu_seconds(proc.pids(), (11,)) - user0) / max(r["requests"], 1) * 1e5
        r["rss_kib"] = s.peak
    return r


H2_STREAMS = 16
# (key, title, path, connections, Connection: close, protocol: http | https (wrk) | h2 (h2load))
SCENARIOS = [
    ("small16", "small, keep-alive, 16 conns", "/", 16, False, "http"),
    ("small256", "small, keep-alive, 256 conns", "/", 256, False, "http"),
    ("mib", "1 MiB responses, 16 conns", "/bytes/1048576", 16, False, "http"),
    # The smallest body `lb-splice` splices (LB_SPLICE_MIN=65536).
    ("kib64", "64 KiB responses, 16 conns", "/bytes/65536", 16, False, "http"),
    ("close", "new connection per request, 16 conns", "/", 16, True, "http"),
    ("tls", "TLS (HTTP/1.1), small, keep-alive, 16 conns", "/", 16, False, "https"),
    ("tlsclose", "TLS (HTTP/1.1), new connection and handshake per request, 16 conns", "/", 16, True, "https"),
    # wrk keeps a session per connection: 300 clients' sessions, more than a small cache of
    # the server's holds.
    ("tlsclose300", "TLS (HTTP/1.1), new connection and handshake per request, 300 conns", "/", 300, True, "https"),
    ("h2", f"HTTP/2 over TLS (h2load), small, 16 conns x {H2_STREAMS} streams", "/", 16, False, "h2"),
]


def med(runs, key):
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else None


def scenarios(stack, order, rounds, duration, only):
    results = {}
    for key, name, path, conns, close, proto in SCENARIOS:
        if only and key not in only:
            continue
        # The backends themselves speak plain HTTP/1.1 only.
        targets = [t for t in order if proto == "http" or t in stack.tls_ports]
        runs = {t: [] for t in targets}
        for rnd in range(rounds):
            k = rnd % len(targets)
            for t in targets[k:] + targets[:k]:
                r, steal = steal_pct(lambda: measured_run(stack, t, path, conns, duration,
                                                          close, proto))
                r["steal_pct"] = steal
                runs[t].append(r)
                log(f"{name} | round {rnd + 1} | {t}: {r['rps']:.0f} req/s, p99 "
                    f"{r['p99'] / 1000:.2f} ms, errors {r['errors']}, steal {steal:.1f}%")
        results[name] = runs
    return results


async def open_idle(port, n):
    conns = []
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    sem = asyncio.Semaphore(200)

    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(req)
            await w.drain()
            head = await r.readuntil(b"\r\n\r\n")
            length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length"))
            await r.readexactly(length)
            conns.append(w)

    await asyncio.gather(*(one() for _ in range(n)))
    return conns


def idle_rss(stack, order, n):
    out = {}
    for t in order:
        port, proc = stack.targets[t]
        if proc is None:
            continue
        before = rss_kib(proc.pids())

        async def go():
            conns = await open_idle(port, n)
            await asyncio.sleep(2)
            after = rss_kib(proc.pids())
            sock = socket_mem_bytes(proc.pids()) / 1024
            for w in conns:
                w.close()
            await asyncio.sleep(1)
            return after, sock

        sock_before = socket_mem_bytes(proc.pids()) / 1024
        after, sock = asyncio.run(go())
        rss = (after - before) / n
        kernel = (sock - sock_before) / n
        out[t] = {"before_kib": before, "after_kib": after, "rss_per_conn_kib": rss,
                  "socket_per_conn_kib": kernel, "per_conn_kib": rss + kernel}
        log(f"idle: {t}: {n} connections, RSS {before} -> {after} KiB, "
            f"{rss:.2f} KiB RSS + {kernel:.2f} KiB kernel socket memory per connection")
    return out


def steal_cell(runs):
    """`median, max` of the runs' hypervisor steal, in %."""
    steal = [r["steal_pct"] for r in runs if "steal_pct" in r]
    return f"{statistics.median(steal):.1f}, {max(steal):.1f}" if steal else "-"


def steal_pct(fn):
    """Runs `fn`; returns its result and the hypervisor steal over it, in % of all CPU time."""
    def stat():
        with open("/proc/stat") as f:
            # Guest time (fields 9 and 10) is counted in user and nice already.
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[7], sum(v)
    s0, t0 = stat()
    out = fn()
    s1, t1 = stat()
    return out, 100.0 * (s1 - s0) / max(t1 - t0, 1)


def run_floods(stack, target, kind, n, flood_s, probe_s, rate):
    """One flood of `n` connections against `target` with a normal client probing it from a
    second process, both on the load CPU; the proxy's peak RSS over the flood."""
    port, proc = stack.targets[target]
    tool = [sys.executable, str(BENCH / "floods.py")]
    cpu = ["taskset", "-c", LOAD_CPU]
    before = rss_kib(proc.pids())
    with Sampler(proc) as sampler:
        flood = subprocess.Popen(cpu + tool + ["flood", kind, str(port), str(n), str(flood_s)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            # Connections open in about a second; the probe then runs inside the flood.
            time.sleep(min(5, flood_s / 3))
            probe = subprocess.run(cpu + tool + ["probe", str(port), str(probe_s), str(rate)],
                                   capture_output=True, text=True, timeout=probe_s + 30, check=True)
            out, _ = flood.communicate(timeout=flood_s + 60)
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
    p = json.loads(probe.stdout)
    f = json.loads(out)
    lat = sorted(p["latencies_ms"]) or [float("nan")]
    return {"opened": f["opened"], "closed_at": f["closed_at"], "rss_before_kib": before,
            "rss_peak_kib": sampler.peak, "probe_p50_ms": lat[len(lat) // 2],
            "probe_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "probe_max_ms": lat[-1],
            "probe_failures": p["failures"], "probes": len(p["latencies_ms"]) + p["failures"]}


FLOOD_KINDS = ("slow-header", "slow-body", "slow-read")


def floods(stack, order, n):
    """Each flood kind against each target, interleaved: what a normal client gets meanwhile
    and what the flood costs the proxy in memory."""
    out = {}
    for kind in FLOOD_KINDS:
        for t in order:
            r, steal = steal_pct(lambda: run_floods(stack, t, kind, n, 20, 10, 20))
            r["steal_pct"] = steal
            out.setdefault(kind, {})[t] = r
            log(f"flood {kind} x{n} | {t}: probe p99 {r['probe_p99_ms']:.1f} ms, max "
                f"{r['probe_max_ms']:.1f} ms, failures {r['probe_failures']}/{r['probes']}, RSS "
                f"{r['rss_before_kib'] / 1024:.1f} -> {r['rss_peak_kib'] / 1024:.1f} MiB, "
                f"closed by the target {len(r['closed_at'])}/{r['opened']}, steal {steal:.1f}%")
            time.sleep(3)
    return out


def slowloris(stack, order, n, rounds):
    """`n` slowloris connections (a header line every 5 s, the head never ends) for 40 s, and
    a paced normal load without and then with them, per target, interleaved over rounds."""
    out = {t: {"quiet": [], "flood": []} for t in order}
    tool = [sys.executable, str(BENCH / "floods.py")]
    cpu = ["taskset", "-c", LOAD_CPU]
    for rnd in range(rounds):
        k = rnd % len(order)
        for t in order[k:] + order[:k]:
            port, _ = stack.targets[t]
            quiet, steal_q = steal_pct(lambda: subprocess.run(
                cpu + tool + ["probe", str(port), "10", "50"], capture_output=True, text=True,
                timeout=60, check=True))
            r, steal = steal_pct(lambda: run_floods(stack, t, "slowloris", n, 40, 10, 50))
            q = sorted(json.loads(quiet.stdout)["latencies_ms"]) or [float("nan")]
            out[t]["quiet"].append({"p99_ms": q[min(len(q) - 1, int(len(q) * 0.99))],
                                    "steal_pct": steal_q})
            r["steal_pct"] = steal
            out[t]["flood"].append(r)
            closed = r["closed_at"]
            log(f"slowloris x{n} | round {rnd + 1} | {t}: probe p99 quiet "
                f"{out[t]['quiet'][-1]['p99_ms']:.1f} ms, under the flood {r['probe_p99_ms']:.1f} ms "
                f"(failures {r['probe_failures']}); closed by the target {len(closed)}/{r['opened']}"
                f"{f', median at {statistics.median(closed):.1f} s' if closed else ''}; steal {steal:.1f}%")
            time.sleep(3)
    return out


def churn(stack, rounds, duration, rate):
    """p99 of the lb with and without Consul churning one instance of the routed service.

    On this machine Consul shares CPU 0 with wrk and the backends, and each registration
    costs it about 0.9 ms of CPU (measured from its schedstat; the lb's part of a change is
    under 0.1 ms), so 100 a second slow the load side whatever the lb does. A control run
    makes Consul do the same: an instance of a service the lb does not route is registered
    and deregistered in turn (another instance of it stays, so the list of services does not
    change either). churn/control is the lb's share, churn/quiet the whole effect. The
    churner runs on the load CPU too."""
    port, _ = stack.targets["lb"]
    stack.register("control-keep", "bench-control", stack.extra_backend, [])
    res = {"quiet": [], "control": [], "churn": []}
    modes = ["quiet", "control", "churn"]
    for rnd in range(rounds):
        for mode in modes[rnd % 3:] + modes[:rnd % 3]:
            stop = threading.Event()
            changes = [0]

            def churner(mode=mode):
                os.sched_setaffinity(0, {int(LOAD_CPU)})
                on = False
                next_t = time.time()
                while not stop.is_set():
                    sid = "web-churn" if mode == "churn" else "control-churn"
                    if on:
                        stack.deregister(sid)
                    elif mode == "control":
                        stack.register(sid, "bench-control", stack.extra_backend, [])
                    else:
                        stack.register("web-churn", "web", stack.extra_backend, ["lb.route=/"])
                    on = not on
                    changes[0] += 1
                    next_t += 1.0 / rate
                    time.sleep(max(0.0, next_t - time.time()))
                if on:
                    stack.deregister(sid)

            t = threading.Thread(target=churner, daemon=True)
            if mode != "quiet":
                t.start()
            r = measured_run(stack, "lb", "/", 64, duration)
            stop.set()
            if mode != "quiet":
                t.join()
            r["changes_per_s"] = changes[0] / duration
            stack.wait_backends(BACKENDS)
            res[mode].append(r)
            log(f"churn | round {rnd + 1} | {mode}: {r['rps']:.0f} req/s, p99 "
                f"{r['p99'] / 1000:.2f} ms, errors {r['errors']}"
                + (f", {r['changes_per_s']:.0f} changes/s" if mode != "quiet" else ""))
    stack.deregister("control-keep")
    return res


def table_scale(stack, rounds, duration, services, per_service):
    """The request path against table size: `services` x `per_service` instances (on
    addresses nothing listens on, one external node per instance) are added to the catalog;
    then "lb" (which sees them all) and "lb-small" (which sees only the 4 real backends, by
    its tag prefix) are measured alternately on the same route and backends. Consul is paused
    (SIGSTOP) while wrk runs: it shares the load generator's core."""
    log(f"scale: registering {services * per_service} instances of {services} services")
    t0 = time.time()
    sem = threading.Semaphore(16)
    errors = []

    def reg(s, i):
        with sem:
            try:
                addr = f"127.1.{s // 250}.{s % 250 + 1}"
                stack.register_external(f"bench-{s}-{i}", f"svc{s}-{i}", f"svc{s}", addr,
                                        20000 + i, [f"lb.route=svc{s}.bench/"])
            except OSError as e:
                errors.append(e)

    threads = [threading.Thread(target=reg, args=(s, i)) for s in range(services)
               for i in range(per_service)]
    for i in range(0, len(threads), 256):
        batch = threads[i:i + 256]
        for t in batch:
            t.start()
        for t in batch:
            t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} registrations failed, the first: {errors[0]!r}")
    registered = time.time() - t0
    stack.wait_backends(BACKENDS + services * per_service, timeout=900)
    converged = time.time() - t0
    log(f"scale: registrations took {registered:.1f} s; the lb held every instance "
        f"{converged - registered:.1f} s after the last one")
    res = {"small": [], "big": []}
    os.kill(stack.consul_proc.p.pid, signal.SIGSTOP)
    try:
        for rnd in range(rounds):
            order = [("small", "lb-small"), ("big", "lb")]
            for name, target in (order if rnd % 2 == 0 else order[::-1]):
                r = measured_run(stack, target, "/", 64, duration)
                res[name].append(r)
                log(f"scale | round {rnd + 1} | {target}: {r['rps']:.0f} req/s, "
                    f"p99 {r['p99'] / 1000:.2f} ms")
    finally:
        os.kill(stack.consul_proc.p.pid, signal.SIGCONT)
    res.update({"instances": BACKENDS + services * per_service,
                "registered_s": registered, "converged_s": converged})
    return res


def close_requests(port, path, n):
    """`n` requests, one after another, each on a new connection it closes (`Connection:
    close`): the per-connection work of a proxy under callgrind, where load tools that keep
    connections open or run for a time would not give an exact count."""
    head = f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(head)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
        if not got.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"a close request got {got[:80]!r}")


# The calls a proxy makes on its request path, counted by the kernel's tracepoints.
SYSCALLS = ["read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl", "accept4", "close", "shutdown", "futex",
            "ioctl", "setsockopt", "getsockopt", "getsockname", "getpeername", "sched_yield"]


def syscalls(stack, order, duration, only):
    """System calls per request, by call, for each target and scenario: the kernel's
    `syscalls:sys_enter_*` tracepoints counted by `perf stat` on the proxy's processes over
    one load run, and every call at all (`raw_syscalls:sys_enter`) for the total. Like
    instruction counts they do not move with the machine's noise, and they count where most
    of a proxied request's time goes (the kernel), which callgrind does not see."""
    out = {}
    events = ",".join(["raw_syscalls:sys_enter"] + [f"syscalls:sys_enter_{c}" for c in SYSCALLS])
    for key, name, path, conns, close, proto in SCENARIOS:
        if only and key not in only:
            continue
        per_target = {}
        for t in order:
            port, proc = stack.targets[t]
            if proc is None or (proto != "http" and t not in stack.tls_ports):
                continue
            if proto != "http":
                port = stack.tls_ports[t]
            counts_file = os.path.join(stack.work, f"syscalls-{key}-{t}.csv")
            perf = subprocess.Popen(["perf", "stat", "-x,", "-o", counts_file, "-e", events,
                                     "-p", ",".join(str(p) for p in proc.pids())])
            try:
                time.sleep(0.5)  # perf attaches
                if perf.poll() is not None:
                    raise RuntimeError(f"perf stat exited ({perf.returncode}): are the "
                                       "tracepoints readable (perf_event_paranoid, tracefs)?")
                if proto == "h2":
                    r = h2load(port, path, conns, H2_STREAMS, duration)
                else:
                    r = wrk(port, path, conns, duration, close, scheme=proto)
            finally:
                if perf.poll() is None:
                    perf.send_signal(signal.SIGINT)
                try:
                    perf.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    perf.kill()
                    perf.wait()
            counts = {}
            for line in open(counts_file):
                f = line.strip().split(",")
                if len(f) > 3 and f[0].isdigit():
                    event = f[2].split(":", 1)[-1]
                    counts["all" if event == "sys_enter" else event[len("sys_enter_"):]] = int(f[0])
            if "all" not in counts:
                raise RuntimeError(f"perf stat counted nothing for {t}: {counts_file}")
            n = max(r["requests"], 1)
            total = counts.pop("all") / n
            per_target[t] = {"requests": r["requests"], "errors": r["errors"], "total": total,
                             "per_request": {c: v / n for c, v in counts.items() if v}}
            log(f"syscalls: {name} | {t}: {total:.2f} per request, {r['errors']} errors")
        out[name] = per_target
    return out


def instructions(stack, order, small, big, conns, variants=(), closes=None):
    """User-space instructions per proxied request, counted by callgrind. Wall-clock figures
    here move by about 10% between runs of the same binary; instruction counts do not, so a
    change that saves a few percent shows. Each target runs under callgrind twice, serving
    `small` and then `big` requests (h2load, HTTP/1.1 keep-alive over `conns` connections);
    the difference per request cancels start-up and shutdown. Kernel time (about two thirds
    of a proxied request here) is not counted. `variants` adds runs of the lb with a feature
    on: `sticky` (`lb-sticky`: a sticky route, a session cookie on every request), `log`
    (`lb-log`: the JSON access log of every request, to a file; its writer thread counted).
    `closes`, two counts, adds the same difference for requests made one after another, each
    on a new connection (`close_requests`): the work of a connection's whole life."""
    out = {}
    rel = ROOT / "target" / "release"
    runs = [t for t in order if t in ("lb", "lb-base", "nginx", "haproxy")]
    if "lb" in runs:
        for v in reversed([v for v in variants if v]):
            runs.insert(runs.index("lb") + 1, f"lb-{v}")

    def count(t, n, load):
        """callgrind's total for target `t` serving `load(port, path)`, `n` naming the run."""
        port = free_port()
        env = None
        path = "/sticky" if t == "lb-sticky" else "/"
        if t.startswith("lb"):
            binary = stack.base_lb if t == "lb-base" else rel / "lb"
            # One worker thread, as the lb runs on one CPU here.
            argv, env = [str(binary)], {**stack.lb_env(port, free_port()), "LB_WORKERS": "1"}
            if t == "lb-log":
                env["LB_ACCESS_LOG"] = "json"
        elif t == "nginx":
            argv = stack.nginx_argv(f"nginx-cg-{n}", port, free_port(), ("-g", "master_process off;"))
        else:
            argv = stack.haproxy_argv(f"haproxy-cg-{n}", port, free_port(), small=True)
        out_file = os.path.join(stack.work, f"callgrind-{t}-{n}.out")
        p = Proc(f"callgrind-{t}-{n}", ["valgrind", "--tool=callgrind",
                                        f"--callgrind-out-file={out_file}"] + argv,
                 PROXY_CPU, env, stack.work)
        try:
            wait_port(port, timeout=120)
            deadline = time.time() + 120
            while True:  # the lb answers 503 until its table holds the backends
                try:
                    if http("GET", f"http://127.0.0.1:{port}{path}")[0] == 200:
                        break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise RuntimeError(f"{t} under callgrind did not serve")
                time.sleep(0.3)
            load(port, path)
        finally:
            # callgrind writes its counts when the program exits: give it time.
            if p.p.poll() is None:
                os.killpg(p.p.pid, signal.SIGTERM)
                try:
                    p.p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(p.p.pid, signal.SIGKILL)
                    p.p.wait()
        total = next((int(l.split()[1]) for l in open(out_file) if l.startswith("summary:")), None)
        if total is None:
            raise RuntimeError(f"callgrind wrote no summary for {t}")
        return total

    for t in runs:
        extra = ["-H", "cookie: theme=dark; sid=0123456789"] if t == "lb-sticky" else []

        def keep_alive(port, path, n):
            argv = ["taskset", "-c", LOAD_CPU, "h2load", "--h1", "-n", str(n), "-c", str(conns),
                    "-m", "1", *extra, f"http://127.0.0.1:{port}{path}"]
            res = subprocess.run(argv, capture_output=True, text=True, timeout=600).stdout
            if f"{n} succeeded" not in res:
                raise RuntimeError(f"h2load against {t} under callgrind:\n{res}")

        counts = [count(t, n, lambda port, path, n=n: keep_alive(port, path, n)) for n in (small, big)]
        out[t] = {"per_request": (counts[1] - counts[0]) / (big - small), "small": small, "big": big}
        log(f"instructions: {t}: {out[t]['per_request']:.0f} per request")
        if closes and t in ("lb", "lb-base", "nginx", "haproxy"):
            a, b = closes
            counts = [count(t, f"close-{n}", lambda port, path, n=n: close_requests(port, path, n))
                      for n in (a, b)]
            out[t]["per_connection"] = (counts[1] - counts[0]) / (b - a)
            log(f"instructions: {t}: {out[t]['per_connection']:.0f} per new connection")
    return out


def fmt_ms(us):
    return "-" if us is None else f"{us / 1000:.2f}"


def ratio(a, b):
    return "-" if not a or not b else f"{a / b:.2f}"


def report(res, order, args, pinning):
    lines = [f"Run on {time.strftime('%Y-%m-%d')}: `{' '.join(sys.argv[1:]) or '(defaults)'}` "
             f"({args.rounds} interleaved rounds of {args.duration} s per target; {pinning}).", ""]
    for name, runs in res.get("scenarios", {}).items():
        lines += [f"**{name}**", "",
                  "| target | req/s | p50 ms | p99 ms | p99.9 ms | CPU s / 100k req | of which user | load CPU s / 100k req | "
                  + ("busy %: proxy core / load core" if PROXY_CPU != LOAD_CPU else "busy % of both cores")
                  + " | peak RSS MiB | errors | steal % (median, max) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in (t for t in order if t in runs):
            rs = runs[t]
            cpu, user = med(rs, "cpu_per_100k"), med(rs, "user_per_100k")
            load = med(rs, "load_cpu_per_100k")
            pc, lc = med(rs, "proxy_core_busy_pct"), med(rs, "load_core_busy_pct")
            busy = "-" if pc is None else (f"{pc:.0f} / {lc:.0f}" if PROXY_CPU != LOAD_CPU else f"{pc:.0f}")
            rss = max((r.get("rss_kib", 0) for r in rs), default=0)
            lines.append(
                f"| {t} | {med(rs, 'rps'):.0f} | {fmt_ms(med(rs, 'p50'))} | {fmt_ms(med(rs, 'p99'))} "
                f"| {fmt_ms(med(rs, 'p999'))} | {'-' if cpu is None else f'{cpu:.2f}'} "
                f"| {'-' if user is None else f'{user:.2f}'} "
                f"| {'-' if load is None else f'{load:.2f}'} | {busy} "
                f"| {'-' if not rss else f'{rss / 1024:.1f}'} | {sum(r['errors'] for r in rs)} "
                f"| {steal_cell(rs)} |")
        lb = med(runs.get("lb", []), "rps")
        rat, paired = [], []
        for peer in ("nginx", "haproxy", "direct", "lb-base"):
            if peer in runs and lb:
                rat.append(f"lb/{peer} {ratio(lb, med(runs[peer], 'rps'))}")
                # Each round's two runs follow each other: their ratio cancels the machine's
                # drift between rounds, which here moves every target by up to a third.
                pairs = [a["rps"] / b["rps"] for a, b in zip(runs["lb"], runs[peer]) if b["rps"]]
                if pairs:
                    paired.append(f"lb/{peer} {statistics.median(pairs):.2f} "
                                  f"({min(pairs):.2f}-{max(pairs):.2f})")
        if "lb" in runs and "nginx" in runs:
            rat.append(f"p99 lb/nginx {ratio(med(runs['lb'], 'p99'), med(runs['nginx'], 'p99'))}")
        if rat:
            lines += ["", "Ratios (req/s): " + ", ".join(rat)]
        if paired:
            lines += ["", "Ratios within each round (req/s, median and range): " + ", ".join(paired)]
        lines.append("")
    if "idle" in res:
        lines += [f"**{args.idle} idle keep-alive client connections**", "",
                  "| target | RSS before MiB | RSS with the connections MiB | RSS KiB per "
                  "connection | kernel socket KiB per connection | KiB per connection |",
                  "|---|---|---|---|---|---|"]
        for t, v in res["idle"].items():
            lines.append(f"| {t} | {v['before_kib'] / 1024:.1f} | {v['after_kib'] / 1024:.1f} "
                         f"| {v['rss_per_conn_kib']:.2f} | {v['socket_per_conn_kib']:.2f} "
                         f"| {v['per_conn_kib']:.2f} |")
        lines.append("")
    if "floods" in res:
        lines += [f"**Floods of {args.flood_conns} hostile connections** (20 s each; a normal "
                  "client meanwhile: a new connection and `GET /` 20 times a second for 10 s)", "",
                  "| flood | target | normal p50 ms | normal p99 ms | normal max ms | normal failed "
                  "| RSS before MiB | peak RSS MiB | closed by the target | steal % |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for kind, per in res["floods"].items():
            for t, v in per.items():
                lines.append(f"| {kind} | {t} | {v['probe_p50_ms']:.1f} | {v['probe_p99_ms']:.1f} "
                             f"| {v['probe_max_ms']:.1f} | {v['probe_failures']}/{v['probes']} "
                             f"| {v['rss_before_kib'] / 1024:.1f} | {v['rss_peak_kib'] / 1024:.1f} "
                             f"| {len(v['closed_at'])}/{v['opened']} | {v['steal_pct']:.1f} |")
        lines.append("")
    if "slowloris" in res:
        lines += [f"**{args.slowloris} slowloris connections** (a header line every 5 s, for "
                  "40 s; a normal client: a new connection and `GET /` 50 times a second for "
                  "10 s, without and then with the flood; medians over rounds)", "",
                  "| target | normal p99 ms quiet | under the flood | rise ms | closed by the target "
                  "within 40 s | median close s | steal % |", "|---|---|---|---|---|---|---|"]
        for t, v in res["slowloris"].items():
            q = statistics.median(r["p99_ms"] for r in v["quiet"])
            f = statistics.median(r["probe_p99_ms"] for r in v["flood"])
            closed = [c for r in v["flood"] for c in r["closed_at"]]
            opened = sum(r["opened"] for r in v["flood"])
            steal = max(r["steal_pct"] for r in v["flood"])
            lines.append(f"| {t} | {q:.1f} | {f:.1f} | {f - q:.1f} | {len(closed)}/{opened} "
                         f"| {statistics.median(closed) if closed else '-'} | {steal:.1f} |")
        lines.append("")
    if "instructions" in res:
        ins = res["instructions"]
        lines += [f"**User-space instructions per request** (callgrind; HTTP/1.1 keep-alive, "
                  f"{args.cg_conns} connections, h2load; kernel time not counted)", "",
                  "| target | instructions / request | instructions / new connection (one request, "
                  "`Connection: close`, one after another) |", "|---|---|---|"]
        for t, v in ins.items():
            pc = v.get("per_connection")
            lines.append(f"| {t} | {v['per_request']:.0f} | {'-' if pc is None else f'{pc:.0f}'} |")
        rat = [f"lb/{peer} {ratio(ins['lb']['per_request'], ins[peer]['per_request'])}"
               for peer in ("nginx", "haproxy", "lb-base") if "lb" in ins and peer in ins]
        for v in ("lb-sticky", "lb-log"):
            if v in ins and "lb" in ins:
                rat.append(f"{v}/lb {ratio(ins[v]['per_request'], ins['lb']['per_request'])}")
        rat += [f"per new connection lb/{peer} "
                f"{ratio(ins['lb'].get('per_connection'), ins[peer].get('per_connection'))}"
                for peer in ("nginx", "haproxy", "lb-base")
                if "lb" in ins and peer in ins and "per_connection" in ins[peer]]
        if rat:
            lines += ["", "Ratios: " + ", ".join(rat)]
        lines.append("")
    if "syscalls" in res:
        lines += ["**System calls per request** (`perf stat` on the kernel's `sys_enter` "
                  "tracepoints over one load run; the total counts every call, `others` those "
                  "not named; under 0.01 per request left out)", "",
                  "| scenario | target | total | by call |", "|---|---|---|---|"]
        for name, per in res["syscalls"].items():
            for t, v in per.items():
                calls = sorted(v["per_request"].items(), key=lambda kv: -kv[1])
                listed = sum(x for _, x in calls)
                calls.append(("others", max(v["total"] - listed, 0.0)))
                lines.append(f"| {name} | {t} | {v['total']:.2f} | "
                             + ", ".join(f"{c} {x:.2f}" for c, x in calls if x >= 0.01)
                             + (f"; {v['errors']} errors" if v["errors"] else "") + " |")
        lines.append("")
    if "churn" in res:
        ch = res["churn"]
        lines += ["**lb under Consul churn** (64 connections; churn: one instance of the routed "
                  "service registered and deregistered in turn; control: the same for a service "
                  "the lb does not route)", "",
                  "| | req/s | p50 ms | p99 ms | p99.9 ms | changes/s | errors |",
                  "|---|---|---|---|---|---|---|"]
        for mode in ("quiet", "control", "churn"):
            rs = ch[mode]
            lines.append(f"| {mode} | {med(rs, 'rps'):.0f} | {fmt_ms(med(rs, 'p50'))} | "
                         f"{fmt_ms(med(rs, 'p99'))} | {fmt_ms(med(rs, 'p999'))} | "
                         f"{med(rs, 'changes_per_s'):.0f} | {sum(r['errors'] for r in rs)} |")
        p99 = {m: med(ch[m], "p99") for m in ch}
        lines += ["", f"p99 churn/quiet: {ratio(p99['churn'], p99['quiet'])}; "
                      f"churn/control (the lb's share): {ratio(p99['churn'], p99['control'])}; "
                      f"control/quiet (Consul's own work on the load CPU): "
                      f"{ratio(p99['control'], p99['quiet'])}", ""]
    if "scale" in res:
        s, b = res["scale"]["small"], res["scale"]["big"]
        lines += ["**lb request path against table size** (64 connections, same route)", "",
                  "| lb | instances in its table | req/s | p99 ms | lb CPU s / 100k req |", "|---|---|---|---|---|",
                  f"| lb-small | {BACKENDS} | {med(s, 'rps'):.0f} | {fmt_ms(med(s, 'p99'))} | {med(s, 'cpu_per_100k'):.2f} |",
                  f"| lb | {res['scale']['instances']} | {med(b, 'rps'):.0f} | {fmt_ms(med(b, 'p99'))} | {med(b, 'cpu_per_100k'):.2f} |",
                  "", f"req/s big/small: {ratio(med(b, 'rps'), med(s, 'rps'))}; "
                  f"CPU per request big/small: {ratio(med(b, 'cpu_per_100k'), med(s, 'cpu_per_100k'))}. "
                  f"Registering the instances took {res['scale']['registered_s']:.1f} s (catalog API, "
                  f"16 at a time); the lb held them all "
                  f"{res['scale']['converged_s'] - res['scale']['registered_s']:.1f} s after the last.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--targets", default="lb,nginx,haproxy,direct")
    ap.add_argument("--stages", default="scenarios,idle,churn,scale,instructions")
    ap.add_argument("--scenarios", default="",
                    help="scenario keys to run (default all): " + ",".join(s[0] for s in SCENARIOS))
    ap.add_argument("--idle", type=int, default=9900,
                    help="idle client connections (HAProxy holds at most 9,980 under the 20,000 descriptor limit here)")
    ap.add_argument("--flood-conns", type=int, default=1000, help="connections per flood")
    ap.add_argument("--slowloris", type=int, default=5000, help="slowloris connections")
    ap.add_argument("--churn-rate", type=int, default=100, help="instance changes per second")
    ap.add_argument("--churn-duration", type=int, default=30)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--per-service", type=int, default=10)
    ap.add_argument("--cg-requests", default="5000,25000",
                    help="instructions stage: the two request counts whose difference is measured")
    ap.add_argument("--cg-conns", type=int, default=256)
    ap.add_argument("--cg-closes", default="200,1200",
                    help="instructions stage: the two counts of one-request connections whose "
                         "difference is measured ('' to skip)")
    ap.add_argument("--two-core", action="store_true",
                    help="every proxy unpinned with two workers, the load unpinned with two threads")
    ap.add_argument("--cg-variants", default="",
                    help="instructions stage: also count the lb with features on: sticky (a sticky "
                         "route), log (the JSON access log of every request)")
    ap.add_argument("--out", default=str(ROOT / "target" / "bench"))
    ap.add_argument("--base-lb", help="an earlier lb binary, run as target lb-base beside the lb "
                                      "(copy target/release/lb aside before rebuilding)")
    args = ap.parse_args()
    order = [t for t in args.targets.split(",") if t]
    if args.base_lb:
        if "lb" not in order:
            sys.exit("bench: --base-lb needs the lb target (they share its Consul)")
        if "lb-base" not in order:
            order.insert(order.index("lb") + 1, "lb-base")
    stages = set(args.stages.split(","))
    if os.cpu_count() < 2:
        sys.exit("bench: needs 2 CPUs (the proxy and the load run on separate cores)")
    # 10,000 idle connections need about 20,000 descriptors in the proxy and 10,000 here;
    # children inherit the limit. Raising the hard limit needs root; otherwise use what we have.
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, 200_000))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log(f"descriptor limit {hard}: the idle-connection stage may fall short")
    if args.two_core:
        global PROXY_CPU, LOAD_CPU, WORKERS
        PROXY_CPU, LOAD_CPU, WORKERS = "0,1", "0,1", 2
    pinning = (f"proxy pinned to CPU {PROXY_CPU}, wrk and backends to CPU {LOAD_CPU}"
               if WORKERS == 1 else "two cores: proxies unpinned with 2 workers each, "
               "wrk (2 threads) and backends unpinned")
    log(pinning)
    # nginx reads its files relative to its prefix: hand every target absolute paths.
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    stack = Stack(work, order, args.base_lb)
    res = {}
    failed = []

    def stage(name, fn):
        # A failing stage is reported and the others still run; results are written as they come.
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - reported, not swallowed
            log(f"stage {name} failed: {e!r}")
            failed.append(f"{name}: {e!r}")
        text = report(res, order, args, pinning)
        if failed:
            text += "\n\nStages that failed: " + "; ".join(failed) + "\n"
        pathlib.Path(args.out, "results.md").write_text(text + "\n")
        pathlib.Path(args.out, "results.json").write_text(json.dumps(res, indent=1))
        return text

    text = ""
    try:
        if "scenarios" in stages:
            text = stage("scenarios", lambda: scenarios(stack, order, args.rounds, args.duration,
                                                               set(filter(None, args.scenarios.split(",")))))
        if "idle" in stages:
            text = stage("idle", lambda: idle_rss(stack, [t for t in order if t != "direct"], args.idle))
        hostile = [t for t in order if t not in ("direct", "lb-base")]
        if "floods" in stages:
            text = stage("floods", lambda: floods(stack, hostile, args.flood_conns))
        if "slowloris" in stages:
            text = stage("slowloris", lambda: slowloris(stack, hostile, args.slowloris,
                                                        max(1, args.rounds)))
        if "churn" in stages and "lb" in order:
            text = stage("churn", lambda: churn(stack, max(3, args.rounds - 1), args.churn_duration,
                                                args.churn_rate))
        if "syscalls" in stages:
            text = stage("syscalls", lambda: syscalls(stack, [t for t in order if t != "direct"],
                                                      args.duration,
                                                      set(filter(None, args.scenarios.split(",")))))
        if "instructions" in stages:
            small, big = (int(x) for x in args.cg_requests.split(","))
            closes = [int(x) for x in args.cg_closes.split(",")] if args.cg_closes else None
            text = stage("instructions", lambda: instructions(stack, order, small, big, args.cg_conns,
                                                                    args.cg_variants.split(","),
                                                                    closes))
        if "scale" in stages and "lb" in order:
            text = stage("scale", lambda: table_scale(stack, args.rounds, args.duration,
                                                      args.services, args.per_service))
    finally:
        stack.stop()
    print(text)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
