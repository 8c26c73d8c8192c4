"""Restart benchmark: 20 busy keep-alive connections and a new connection
every 10 ms through natlb while it is reloaded, restarted (`natlb restart`,
with and without an [lb] change), killed with SIGKILL and started again at
once, or stopped with SIGTERM and started again.

Reported per kind: established connections lost, new connections failed
and delayed past 1 s (a client retransmit), and the kernel's NFQUEUE drops
(queue full or failed delivery, /proc/net/netfilter/nfnetlink_queue,
sampled every 20 ms because a queue's counters vanish with its reader).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from natlb_testbed.testbed import VIP, Testbed, basic_config

KINDS = ("sighup", "restart", "restart-max-flows", "sigkill", "sigterm")


class QueueDrops:
    """Sums the kernel's per-queue drop counters across reader lifetimes."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.last: dict[int, int] = {}
        self.total = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        out = self.tb.router_cmd("cat", "/proc/net/netfilter/nfnetlink_queue").stdout
        for line in out.splitlines():
            v = line.split()
            q, dropped = int(v[0]), int(v[5]) + int(v[6])
            prev = self.last.get(q, 0)
            self.total += dropped - prev if dropped >= prev else dropped
            self.last[q] = dropped

    def _run(self) -> None:
        while not self.done.is_set():
            self._sample()
            time.sleep(0.02)

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        return self.total


def natlb_cli(tb: Testbed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", tb.router, sys.executable, "-m", "natlb",
                           *args], capture_output=True, text=True, timeout=120)


def one(tb: Testbed, kind: str, seconds: float, at: float) -> dict:
    # No health checks: on a loaded machine a check that times out marks a
    # backend down and resets its connections, which is not what is measured.
    cfg = basic_config(tb, health="none", lb_extra="max_flows = 65536")
    p = tb.start_natlb(tb.write_config(cfg))
    load = tb.python(tb.client, "natlb_testbed.hosts", "churn", "--host", VIP, "--port", "80",
                     "--keepalive", "20", "--interval-ms", "10", "--seconds", str(seconds),
                     "--timeout", "20", stdout=subprocess.PIPE, text=True)
    drops = QueueDrops(tb)
    time.sleep(at)
    running: list[int] = [p.pid]
    note = ""
    t0 = time.monotonic()
    if kind == "sighup":
        p.send_signal(signal.SIGHUP)
    elif kind.startswith("restart"):
        new = cfg if kind == "restart" else cfg.replace("max_flows = 65536", "max_flows = 131072")
        r = natlb_cli(tb, "restart", "-c", str(tb.write_config(new)))
        if r.returncode != 0:
            note = r.stderr.strip()
        else:
            running = [int(r.stdout.split()[2])]
            note = r.stdout.splitlines()[1]
    elif kind == "sigkill":
        p.kill()
        p.wait()
        running = [tb.start_natlb(tb.write_config(cfg)).pid]
    elif kind == "sigterm":
        p.send_signal(signal.SIGTERM)
        p.wait()
        running = [tb.start_natlb(tb.write_config(cfg)).pid]
    took = time.monotonic() - t0
    out, _ = load.communicate(timeout=seconds + 60)
    res = json.loads(out.strip().splitlines()[-1])
    res["queue_drops"] = drops.stop()
    res["kind"] = kind
    res["event_s"] = round(took, 3)
    res["note"] = note
    for pid in running:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{x}") for x in running):
        time.sleep(0.05)
    if p.poll() is None:
        tb.stop(p)
    return res


def table(rows: list[dict]) -> str:
    out = ["| event | established lost | new failed | new delayed past 1 s | "
           "kernel queue drops | slowest new connection | event took |",
           "|---|---|---|---|---|---|---|"]
    names = {"sighup": "SIGHUP (same config)", "restart": "`natlb restart` (same config)",
             "restart-max-flows": "`natlb restart`, max_flows 65536 -> 131072",
             "sigkill": "SIGKILL, then `natlb run` at once",
             "sigterm": "SIGTERM, then `natlb run` at once"}
    for r in rows:
        out.append(f"| {names[r['kind']]} | {r['established_lost']} / {r['established']} | "
                   f"{r['new_failed']} / {r['new']} | {r['new_delayed']} | "
                   f"{r['queue_drops']} | {r['new_max_ms']:.0f} ms | {r['event_s']:.2f} s |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--at", type=float, default=2.0, help="when the event happens")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", default="docs/bench/restart")
    a = ap.parse_args()
    rows = []
    with Testbed(n_backends=3) as tb:
        tb.start_backends()
        for kind in a.kinds.split(","):
            rows.append(one(tb, kind, a.seconds, a.at))
            print(json.dumps(rows[-1]), flush=True)
    md = table(rows)
    md += (f"\n\n20 keep-alive connections (a request every 20 ms each) and a new "
           f"connection every 10 ms for {a.seconds:.0f} s; the event at {a.at:.0f} s; no "
           f"health checks. 'event took': until `natlb restart` returned, or until the new "
           f"natlb served after the kill or stop. "
           f"{datetime.now().strftime('%Y-%m-%d')}.\n")
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
