"""``natlb demo``: natlb on a network of its own, with a failure in the middle.

It builds dual-stack namespaces (a client, a router running natlb, three
backends that answer HTTP and UDP echo with their own name), shows the same
services over IPv4 and IPv6 side by side, sends a steady stream of new
TCP connections through the VIP, kills one backend midway, brings it back,
prints the timeline, and removes everything it built.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter

from natlb_testbed.testbed import (
    CLIENT_ADDR,
    CLIENT_ADDR6,
    VIP,
    VIP6,
    Testbed,
    backend_addr,
    backend_addr6,
    udp_service,
    web_service,
)

INTERVAL_MS = 20
BUCKET_S = 0.25
VICTIM = 2

CONFIG = """
[lb]
control_socket = "{sock}"

[[service]]
name = "web"
vip = "{vip}"
port = 80
protocol = "tcp"
scheduler = "rr"
[service.health]
kind = "http"
interval_ms = 50
timeout_ms = 100
rise = 3
fall = 1
{web_backends}

{udp_service}
"""


def _families(tb: Testbed) -> None:
    """The same questions over both families: who answers, and from where."""
    for name, vip in (("IPv4", VIP), ("IPv6", VIP6)):
        web = tb.client_run("http-stream", "--host", vip, "--port", "80", "--count", "6")
        udp = tb.client_run("udp-stream", "--host", vip, "--port", "53", "--count", "6")
        peers = sorted({r["peer"] for r in udp if r["ok"]})
        _say(f"  {name}: HTTP answered by {' '.join(r.get('backend', '-') for r in web)}; "
             f"UDP echo by {' '.join(r.get('backend', '-') for r in udp)}, "
             f"replies from {', '.join(peers)}")

def _backends(n: int) -> str:
    return "\n".join(f'[[service.backend]]\naddress = "{backend_addr(k)}"'
                     for k in range(1, n + 1))


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def main(connections: int = 300) -> int:
    victim_name, victim_addr = f"b{VICTIM}", backend_addr(VICTIM)
    kill_at, restart_at = connections // 3, 2 * connections // 3
    with Testbed(n_backends=3) as tb:
        backends = tb.start_backends()
        names = ", ".join(f"b{k} {backend_addr(k)}" for k in range(1, 4))
        names6 = ", ".join(f"b{k} {backend_addr6(k)}" for k in range(1, 4))
        _say(f"natlb demo: client {CLIENT_ADDR} -> VIP {VIP} -> {names}")
        _say(f"            client {CLIENT_ADDR6} -> VIP {VIP6} -> {names6}")
        _say(f"  namespaces: {', '.join(tb.namespaces)}")
        services = (udp_service("echo", [1, 2, 3]) + web_service("web6", [1, 2, 3], family=6)
                    + udp_service("echo6", [1, 2, 3], family=6))
        cfg = tb.write_config(CONFIG.format(sock=tb.control_socket, vip=VIP,
                                            web_backends=_backends(3), udp_service=services))
        natlb = tb.start_natlb(cfg)
        time.sleep(0.3)

        _say("Both families, one natlb: 6 HTTP connections and 6 UDP queries each")
        _families(tb)

        _say(f"HTTP {VIP}:80: {connections} new connections, one every {INTERVAL_MS} ms; "
             f"{victim_name} is killed at #{kill_at} and restarted at #{restart_at}")
        proc, stream = tb.client_stream("http-stream", "--host", VIP, "--port", "80",
                                        "--count", str(connections),
                                        "--interval-ms", str(INTERVAL_MS), "--timeout", "1")
        results, marks = [], {}
        # natlb's view of the backends comes from its control socket (JSON).
        with tb.watch() as watch:
            for r in stream:
                results.append(r)
                if r["i"] == kill_at:
                    marks["killed"] = time.time()
                    tb.stop(backends[VICTIM], signal.SIGKILL)
                elif r["i"] == restart_at:
                    backends[VICTIM] = tb.start_backend(VICTIM)
                    marks["restarted"] = time.time()
            proc.wait()
        status = subprocess.run([sys.executable, "-m", "natlb", "status", "-s",
                                 tb.control_socket], capture_output=True, text=True).stdout
        tb.stop(natlb)

    t0 = results[0]["wall"]
    events = [(c.at, f"natlb: {victim_name} {c.health.upper()}") for c in watch.changes
              if c.service == "web" and c.backend.startswith(victim_addr + ":")]
    events += [(marks["killed"], f"{victim_name} killed (SIGKILL)"),
               (marks["restarted"], f"{victim_name} restarted")]
    events.sort()

    _say()
    _say(f"{'time':>7}  {'b1':>3} {'b2':>3} {'b3':>3} {'fail':>4}  events")
    n_buckets = int((results[-1]["wall"] - t0) / BUCKET_S) + 1
    for b in range(n_buckets):
        lo, hi = t0 + b * BUCKET_S, t0 + (b + 1) * BUCKET_S
        chunk = [r for r in results if lo <= r["wall"] < hi]
        c = Counter(r["backend"] for r in chunk if r["ok"])
        fails = sum(1 for r in chunk if not r["ok"])
        ev = "; ".join(f"{text} at {ts - t0:.3f}s" for ts, text in events if lo <= ts < hi)
        _say(f"{lo - t0:6.2f}s  {c['b1']:>3} {c['b2']:>3} {c['b3']:>3} "
             f"{fails if fails else '':>4}  {ev}")

    _say()
    _say("Summary")
    failed = [r for r in results if not r["ok"]]
    killed = marks["killed"]
    down = next((ts for ts, text in events if text.endswith("DOWN") and ts >= killed), None)
    up = next((ts for ts, text in events if text.endswith("UP") and ts >= marks["restarted"]),
              None)
    to_victim = [r for r in results if r.get("backend") == victim_name]
    last_before = max((r["wall"] for r in results
                       if r["wall"] < (up or 1e18) and r["wall"] >= killed - 1
                       and (r.get("backend") == victim_name or not r["ok"])), default=None)
    if down:
        _say(f"  {victim_name} killed at {killed - t0:.3f}s; natlb marked it DOWN at "
             f"{down - t0:.3f}s ({(down - killed) * 1000:.0f} ms later)")
    if last_before:
        _say(f"  last new connection steered to {victim_name} began at {last_before - t0:.3f}s; "
             f"none after that until it came back")
    _say(f"  failed connections: {len(failed)} of {len(results)} (goal: zero)"
         + (": " + ", ".join(f"#{r['i']} at {r['wall'] - t0:.3f}s ({r['error']})"
                             for r in failed[:5]) if failed else ""))
    if up:
        first_back = min((r["wall"] for r in to_victim if r["wall"] >= up), default=None)
        _say(f"  {victim_name} restarted at {marks['restarted'] - t0:.3f}s; UP at {up - t0:.3f}s"
             + (f"; first new connection to it at {first_back - t0:.3f}s" if first_back else ""))
    _say(f"  answered: {dict(sorted(Counter(r['backend'] for r in results if r['ok']).items()))}")
    _say()
    _say("natlb status just before it stopped:")
    _say(status.rstrip())
    _say()
    _say("natlb stopped and removed its nftables tables and VIPs; namespaces deleted.")
    return 0
