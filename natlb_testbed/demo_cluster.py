"""``natlb demo --cluster``: three natlb nodes carry one VIP behind ECMP
routers running BIRD, and one node dies under traffic.

It builds the network of natlb_testbed/cluster.py (configs from
examples/cluster/), keeps keep-alive connections busy and opens a new
connection every 15 ms, drops every packet in and out of node 3 midway,
prints per interval the new flows each node took and the paths the routers
use, then the timeline and the summary, and removes everything it built.
"""

from __future__ import annotations

import json
import time
from typing import Any

from natlb_testbed.cluster import VIP, ClusterNet

SECONDS = 9.0
KILL_AT = 3.0
SAMPLE_S = 0.5
VICTIM = 3


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _counts(net: ClusterNet, i: int) -> tuple[int, int, int]:
    """(new flows, adopted mid-way, replies adopted) of node i so far."""
    try:
        st = net.natlb_status(i)
    except Exception:   # a dead node does not answer: no change
        return -1, -1, -1
    return (sum(s["new_flows"] for s in st["services"]), st["failover"]["adopted"],
            st["failover"]["reply_adopted"])


def main() -> int:
    net = ClusterNet(n_nodes=3)
    try:
        net.build()
        net.start_backends()
        net.start_bird()
        for i in (1, 2, 3):
            net.start_natlb(i)
        net.wait_paths(3)
        _say(f"natlb demo --cluster: client 198.51.100.2 -> R1 -> nodes n1 n2 n3 (natlb + BIRD) "
             f"-> R2 -> nginx b1 b2 b3; VIP {VIP}")
        _say(f"  namespaces: {', '.join(net.namespaces)}")
        _say("  R1 and R2 run BIRD: ECMP over the nodes (L4 hash), BFD 3 x 50 ms; each node "
             "announces the VIP up and a default route down")
        _say(f"  load: 20 keep-alive connections busy, a new connection every 15 ms, "
             f"{SECONDS:.0f} s; node {VICTIM} dies the hard way at {KILL_AT:.1f} s "
             f"(every packet in and out dropped, no carrier change, no BGP goodbye)")
        _say()
        load = net.load(conns=20, interval_ms=15, seconds=SECONDS, timeout=10)
        t0 = time.monotonic()
        events: list[tuple[float, str]] = []
        killed = False
        prev = {i: _counts(net, i) for i in (1, 2, 3)}
        _say(f"{'time':>6}  {'new flows n1 n2 n3':>19}  {'adopted':>8}  R1 R2  events")
        next_sample = t0 + SAMPLE_S
        paths = (3, 3)
        while time.monotonic() - t0 < SECONDS + 0.5:
            now = time.monotonic()
            if not killed and now - t0 >= KILL_AT:
                net.kill_node(VICTIM)
                killed = True
                events.append((now - t0, f"node {VICTIM} dies"))
            p = (net.paths("r1", VIP), net.paths("r2", "default"))
            if p != paths:
                events.append((time.monotonic() - t0,
                               f"BFD: R1 has {p[0]} paths to the VIP, R2 {p[1]} back"))
                paths = p
            if now >= next_sample:
                cur = {i: _counts(net, i) for i in (1, 2, 3)}
                new = [cur[i][0] - prev[i][0] if cur[i][0] >= 0 else None for i in (1, 2, 3)]
                adopted = sum(cur[i][1] - prev[i][1] for i in (1, 2) if cur[i][1] >= 0)
                lo = next_sample - SAMPLE_S - t0
                ev = "; ".join(f"{text} at {t:.3f}s" for t, text in events
                               if lo <= t < next_sample - t0)
                cells = " ".join(f"{n:>3}" if n is not None else "  -" for n in new)
                _say(f"{lo:5.1f}s  {cells:>19}  {adopted:>8}  {paths[0]:>2} {paths[1]:>2}  {ev}")
                prev = {i: cur[i] if cur[i][0] >= 0 else prev[i] for i in (1, 2, 3)}
                next_sample += SAMPLE_S
            time.sleep(0.02)
        out, _ = load.communicate(timeout=60)
        r: dict[str, Any] = json.loads(out)
        final = {i: _counts(net, i) for i in (1, 2)}
    finally:
        net.close()

    _say()
    _say("Timeline")
    for t, text in events:
        _say(f"  {t:6.3f}s  {text}")
    _say()
    _say("Summary")
    _say(f"  established connections lost: {r['established_lost']} of {r['established']} "
         f"(keep-alive requests answered: {r['keepalive_requests']}, each connection always by "
         f"the same backend; longest wait {r['keepalive_max_ms']:.0f} ms)")
    _say(f"  new connections failed: {r['new_failed']} of {r['new']}; delayed past 1 s (a SYN "
         f"lost in the dead node before BFD withdrew it): {r['new_delayed']}")
    _say(f"  flows nodes 1 and 2 took up mid-way (they never saw them start): "
         f"{sum(final[i][1] for i in (1, 2))}; replies they mapped back without having seen "
         f"the flow's client side: {sum(final[i][2] for i in (1, 2))}")
    _say()
    _say("natlb and BIRD stopped; namespaces deleted.")
    return 0
