"""How much CPU the health checker needs: 1,000 backends checked every 50 ms
(tcp connect).  The checker and the servers run in two namespaces joined by
a veth pair, as a balancer and its backends would be, and only the checker
process's CPU time is counted.

    sudo .venv/bin/python -m bench.healthload [--backends 1000 --interval-ms 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time

ADDRS = [f"203.0.113.{i}" for i in range(1, 9)]


def endpoints(n: int) -> list[tuple[str, int]]:
    per = -(-n // len(ADDRS))
    return [(ADDRS[i // per], 20000 + i % per) for i in range(n)]


def serve(n: int) -> None:
    """Accept and drop connections on every endpoint, as cheaply as Python can."""
    import selectors
    import socket

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sel = selectors.DefaultSelector()
    for addr, port in endpoints(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(4096)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            try:
                while True:
                    c, _ = key.fileobj.accept()
                    c.close()
            except BlockingIOError:
                pass


def measure(n: int, interval_ms: int, seconds: float) -> dict:
    from natlb.config import parse
    from natlb.core import Core, CoreConfig
    from natlb.health import Monitor
    from natlb.pool import Pool

    raw = {"service": [{
        "name": "many", "vip": "192.0.2.100", "port": 80,
        "health": {"kind": "tcp", "interval_ms": interval_ms, "timeout_ms": 200, "fall": 3},
        "backend": [{"address": a, "port": p} for a, p in endpoints(n)],
    }]}
    cfg = parse(raw)
    core = Core(CoreConfig(max_flows=1024, workers=1))
    pool = Pool(cfg, core)
    pool.publish()
    checks = 0

    async def run() -> float:
        monitor = Monitor(pool)
        monitor.start()
        await asyncio.sleep(1.0)  # warm up: every task has started its cycle
        nonlocal checks
        done_before = monitor.completed
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        wall = time.monotonic() - t0
        checks = monitor.completed - done_before
        await monitor.stop()
        return ((r1.ru_utime - r0.ru_utime) / wall, (r1.ru_stime - r0.ru_stime) / wall)

    user, system = asyncio.run(run())
    core_fraction = user + system
    down = sum(1 for s in pool.services for b in s.backends if b.health != "up")
    return {"backends": n, "interval_ms": interval_ms, "seconds": seconds,
            "checks_per_s": round(checks / seconds), "expected_checks_per_s": n * 1000 //
            interval_ms, "cpu_fraction_of_one_core": round(core_fraction, 3),
            "user": round(user, 3), "system": round(system, 3),
            "backends_not_up": down}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", type=int, default=1000)
    ap.add_argument("--interval-ms", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--child", choices=["serve", "measure"])
    a = ap.parse_args()
    if a.child == "serve":
        serve(a.backends)
        return 0
    if a.child == "measure":
        print(json.dumps(measure(a.backends, a.interval_ms, a.seconds)))
        return 0
    ns = f"nlhc{os.getpid()}"
    srv = f"nlhs{os.getpid()}"
    server = None

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True)

    try:
        for n in (ns, srv):
            ip("netns", "add", n)
            ip("-n", n, "link", "set", "lo", "up")
        ip("link", "add", f"{ns}a", "type", "veth", "peer", "name", f"{ns}b")
        ip("link", "set", f"{ns}a", "netns", ns)
        ip("link", "set", f"{ns}b", "netns", srv)
        ip("-n", ns, "addr", "add", "198.51.100.1/24", "dev", f"{ns}a")
        ip("-n", srv, "addr", "add", "198.51.100.2/24", "dev", f"{ns}b")
        ip("-n", ns, "link", "set", f"{ns}a", "up")
        ip("-n", srv, "link", "set", f"{ns}b", "up")
        ip("-n", ns, "route", "add", "203.0.113.0/24", "via", "198.51.100.2")
        for addr in ADDRS:
            ip("-n", srv, "addr", "add", f"{addr}/32", "dev", "lo")
        server = subprocess.Popen(["ip", "netns", "exec", srv, sys.executable, "-m",
                                   "bench.healthload", "--child", "serve", "--backends",
                                   str(a.backends)], stdout=subprocess.PIPE, text=True)
        assert server.stdout and server.stdout.readline().strip() == "ready"
        out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m",
                              "bench.healthload", "--child", "measure", "--backends",
                              str(a.backends), "--interval-ms", str(a.interval_ms),
                              "--seconds", str(a.seconds)], capture_output=True, text=True,
                             check=True).stdout
        result = json.loads(out)
        print(json.dumps(result, indent=2))
        print(f"\n{result['backends']} backends every {result['interval_ms']} ms: "
              f"{result['checks_per_s']} checks/s, {result['cpu_fraction_of_one_core']:.0%} "
              f"of one core")
    finally:
        if server:
            server.kill()
            server.wait()
        for n in (ns, srv):
            subprocess.run(["ip", "netns", "del", n])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
