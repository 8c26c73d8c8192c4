"""What the cluster tests (test_cluster*.py) share: a running cluster, client
load through it, and its nodes' counters summed."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from natlb_testbed.cluster import VIP, ClusterNet

# Per connection, what a node may queue besides what the kernel carries:
# the handshake (a cluster service's SYN is queued, so its SYN-ACK and the
# client's ACK are too), the first packet of each direction a node adopts,
# and the close (FINs and their ACKs, which the kernel tells natlb of but
# may also leave to it once the entries' deadlines are cut).
PER_CONN = 12


@contextmanager
def running_cluster(family: int = 4) -> Iterator[ClusterNet]:
    """Three nodes running BIRD and natlb, backends up, from when R1 and R2
    route the `family` VIP over all three; everything removed after."""
    net = ClusterNet(n_nodes=3).build()
    try:
        net.start_backends()
        net.start_bird()
        for i in range(1, net.n_nodes + 1):
            net.start_natlb(i)
        net.wait_paths(3, family=family)
        yield net
    finally:
        net.close()


def counts(net: ClusterNet, nodes: tuple[int, ...], service: str = "web") -> dict[str, int]:
    """Summed over the nodes: what natlb queued, what its counters for
    `service` (its own plus the kernel's, read from the fast path's
    per-backend map) hold, and the flows adopted mid-way (client side,
    reply side; of every service)."""
    total = {"queued": 0, "packets": 0, "bytes_in": 0, "bytes_out": 0, "adopted": 0,
             "reply_adopted": 0}
    for i in nodes:
        st = net.natlb_status(i)
        total["queued"] += st["queued_packets"]
        total["adopted"] += st["failover"]["adopted"]
        total["reply_adopted"] += st["failover"]["reply_adopted"]
        (svc,) = (s for s in st["services"] if s["name"] == service)
        for b in svc["backends"]:
            total["packets"] += b["packets_in"] + b["packets_out"]
            total["bytes_in"] += b["bytes_in"]
            total["bytes_out"] += b["bytes_out"]
    return total


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def keepalive_load(net: ClusterNet, conns: int, seconds: float, pause_ms: float,
                   vip: str = VIP) -> subprocess.Popen:
    """Keep-alive connections only (one new connection besides, at the start):
    each sends request after request on its one connection."""
    return net.load(vip, conns=conns, interval_ms=seconds * 1000, seconds=seconds, timeout=8,
                    pause_ms=pause_ms)


def finish(load: subprocess.Popen) -> dict:
    out, _ = load.communicate(timeout=120)
    return json.loads(out)


def assert_carried_by_the_kernel(net: ClusterNet, nodes: tuple[int, ...], service: str = "web",
                                 vip: str = VIP, conns: int = 9) -> None:
    """Thousands of keep-alive requests while the nodes queue a few packets
    per connection, some replies crossing a node of their own, and the
    per-backend counters hold every packet and byte."""
    before = counts(net, nodes, service)
    r = finish(keepalive_load(net, conns, seconds=3, pause_ms=2, vip=vip))
    time.sleep(0.3)                 # the observers apply the closing FINs
    d = delta(counts(net, nodes, service), before)
    requests = r["keepalive_requests"]
    assert r["established_lost"] == 0 and r["new_failed"] == 0, r
    assert requests > conns * 100, r
    assert d["reply_adopted"] > 0, d     # some replies crossed a node of their own
    assert d["queued"] <= (conns + 1) * PER_CONN, (d, requests)
    # Each request and each answer is at least one packet, an answer at
    # least its status line and headers (and nginx's "bN\n").
    assert d["packets"] >= 2 * requests, (d, requests)
    assert d["bytes_out"] >= requests * 150 and d["bytes_in"] >= requests * 60, (d, requests)
    print(f"\n{vip}: {requests} requests on {conns} connections, {d['queued']} packets "
          f"queued on the three nodes together, {d['packets']} counted")
