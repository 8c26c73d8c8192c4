"""Failover benchmark: a new TCP connection through the VIP every 10 ms while
one of three backends dies (process killed, link down, blackholed), for
natlb, HAProxy (`check inter 100ms fall 1`) and the kernel's DNAT, in one
run on the same namespaces.

natlb runs as configured by default, with the tc fast path (`--fastpath
off`: every packet queued); each natlb row says which, from natlb's own
status (the interfaces carrying the fast path's programs), and how many
packets natlb's queues saw per connection.

Reported per (balancer, failure kind): failed connections, time from the
failure until the balancer marked the backend down (detection), and time
from the failure until the last connection that failed (after that, no new
connection was lost to the dead backend).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import threading
import time
from pathlib import Path

from bench.netbench import KERNEL_NAT
from bench.report import publish
from natlb_testbed.testbed import VIP, Testbed, backend_addr, basic_config

KINDS = ("kill", "link", "blackhole")
PATHS = ("natlb", "haproxy", "kernel")
VICTIM = 2


HAPROXY = """
global
  nbthread 1
  log stdout format raw local0
defaults
  mode tcp
  log global
  timeout connect 1s
  timeout client 5s
  timeout server 5s
frontend web
  bind {vip}:80
  default_backend web
backend web
  balance roundrobin
{servers}
"""


class LineClock:
    """Reads a process's output in a thread and stamps each line on arrival."""

    def __init__(self, stream) -> None:
        self.lines: list[tuple[float, str]] = []
        self.thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self.thread.start()

    def _run(self, stream) -> None:
        for line in stream:
            self.lines.append((time.time(), line.rstrip()))

    def first(self, pattern: str, after: float) -> float | None:
        for t, line in list(self.lines):
            if t >= after and re.search(pattern, line):
                return t
        return None


def queued(tb: Testbed) -> int:
    """Packets the router's queues have handed to natlb so far."""
    text = tb.router_cmd("cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return sum(int(line.split()[7]) for line in text.splitlines() if line.strip())


def run_one(tb: Testbed, path: str, kind: str, count: int, interval_ms: int,
            fastpath: bool = True) -> dict:
    procs: list[subprocess.Popen] = []
    clock = None
    extra: dict = {}
    if path == "natlb":
        # The default configuration has the fast path on: say it only to turn it off.
        cfg = tb.write_config(basic_config(tb, interval_ms=20, timeout_ms=25,
                                           syn_timeout_ms=20,
                                           lb_extra="" if fastpath else "fastpath = false"))
        procs.append(tb.start_natlb(cfg))
        fast = tb.status().get("fastpath")
        assert bool(fast) == fastpath, f"natlb's fast path is {'on' if fast else 'off'}"
        extra["fastpath_interfaces"] = fast["interfaces"] if fast else []
        queued_before = queued(tb)
    else:
        tb.router_cmd("ip", "addr", "add", f"{VIP}/32", "dev", "lo")
        tb.router_cmd("sysctl", "-qw", "net.ipv4.ip_forward=1")
    if path == "kernel":
        (tb.workdir / "dnat.nft").write_text(KERNEL_NAT.format(
            nft="ip", vip=VIP, b1=backend_addr(1), b2=backend_addr(2), b3=backend_addr(3)))
        tb.router_cmd("nft", "-f", str(tb.workdir / "dnat.nft"))
    if path == "haproxy":
        servers = "\n".join(f"  server b{k} {backend_addr(k)}:80 check inter 100ms fall 1 rise 2"
                            for k in range(1, 4))
        (tb.workdir / "haproxy.cfg").write_text(HAPROXY.format(vip=VIP, servers=servers))
        p = tb.spawn(tb.router, ["haproxy", "-db", "-f", str(tb.workdir / "haproxy.cfg")],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        clock = LineClock(p.stdout)
    time.sleep(0.6)  # health checks settle
    failed_at = None
    fail_index = count // 3

    proc, results = tb.client_stream("http-stream", "--host", VIP, "--port", "80", "--count",
                                     str(count), "--interval-ms", str(interval_ms),
                                     "--timeout", "1")
    seen = []
    watch = tb.watch() if path == "natlb" else None
    try:
        if watch:
            watch.__enter__()
        for r in results:
            seen.append(r)
            if r["i"] == fail_index:
                tb.fail_backend(VICTIM, kind)
                failed_at = time.time()
        proc.wait()
        if path == "natlb":
            extra["queued_per_connection"] = round((queued(tb) - queued_before) / len(seen), 1)
    finally:
        if watch:
            watch.__exit__()
        tb.repair_backend(VICTIM, kind)
        for p in procs:
            tb.stop(p)
            tb.procs.remove(p)
        if path == "kernel":
            tb.router_cmd("nft", "delete", "table", "ip", "natlb_bench_dnat")
        if path != "natlb":
            tb.router_cmd("ip", "addr", "del", f"{VIP}/32", "dev", "lo")
    assert failed_at is not None
    failures = [r for r in seen if not r["ok"]]
    if path == "natlb":
        # natlb's own timestamp of the change, from its control socket.
        assert watch is not None
        down = next((c.at for c in watch.changes if c.backend == f"{backend_addr(VICTIM)}:80"
                     and c.health in ("down", "suspect") and c.at >= failed_at - 0.001), None)
    elif path == "haproxy" and clock:
        down = clock.first(r"Server web/b2 is DOWN", failed_at)
    else:
        down = None
    last_fail = max((r["wall"] for r in failures), default=None)
    ms = lambda t: None if t is None else round((t - failed_at) * 1000, 1)  # noqa: E731
    return {"failed": len(failures), "connections": len(seen), "detect_ms": ms(down),
            "last_failure_ms": ms(last_fail), **extra}


def label(path: str, r: dict) -> str:
    if path != "natlb":
        return path
    if not r["fastpath_interfaces"]:
        return f"natlb, every packet queued ({r['queued_per_connection']}/conn)"
    return f"natlb, fast path ({r['queued_per_connection']} queued/conn)"


def table(results: dict) -> str:
    lines = ["| balancer | failure | failed new connections | detected after | "
             "last failure after |", "|---|---|---|---|---|"]
    for path in results:
        for kind in KINDS:
            r = results[path][kind]
            det = f"{r['detect_ms']:.0f} ms" if r["detect_ms"] is not None else "never"
            last = f"{r['last_failure_ms']:.0f} ms" if r["last_failure_ms"] is not None else "-"
            if path == "kernel" and r["failed"]:
                last += " (until the end of the run)"
            lines.append(f"| {label(path, r)} | {kind} | {r['failed']} of {r['connections']} | "
                         f"{det} | {last} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=300)
    ap.add_argument("--interval-ms", type=int, default=10)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--fastpath", choices=("on", "off"), default="on",
                    help="natlb's tc fast path (on: the default configuration)")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"which balancers, comma-separated (default {','.join(PATHS)})")
    a = ap.parse_args()
    paths = [p for p in a.paths.split(",") if p]
    if not paths or set(paths) - set(PATHS):
        ap.error(f"--paths: choose from {', '.join(PATHS)}")
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    results: dict = {p: {} for p in paths}
    with Testbed(n_backends=3) as tb:
        tb.start_backends()
        for path in paths:
            for kind in KINDS:
                r = run_one(tb, path, kind, a.count, a.interval_ms, a.fastpath == "on")
                results[path][kind] = r
                print(f"{path:8} {kind:10} {r}", flush=True)
    md = table(results)
    meta = (f"A new connection every {a.interval_ms} ms, {a.count} in all, backend b2 of 3 "
            f"fails at connection {a.count // 3}. natlb: tcp checks every 20 ms (timeout 25 ms), "
            f"syn_timeout_ms 20, fast path {a.fastpath}"
            f"{' (the default)' if a.fastpath == 'on' else ''}; HAProxy 2.6: check inter "
            f"100ms fall 1; kernel: nft DNAT numgen round robin.")
    name = "failover" if a.fastpath == "on" else "failover-queued"
    publish(out, name, md, meta, {"fastpath": a.fastpath, **results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
