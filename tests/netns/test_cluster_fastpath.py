"""The kernel's fast path on cluster nodes (natlb_testbed/cluster.py, the
configs of examples/cluster/, fast path on as by default): an established
connection of a cluster service is carried by the kernel on the nodes it
crosses, whichever direction each sees, counted per backend all the same;
and connections that a dying node carried are adopted mid-way by the
others, which carry them in turn, none lost."""

import shutil
import time

import pytest

from .cluster_traffic import (
    PER_CONN,
    assert_carried_by_the_kernel,
    counts,
    delta,
    finish,
    keepalive_load,
    running_cluster,
)

if not shutil.which("bird") or not shutil.which("nginx"):
    pytest.skip("needs bird2 and nginx (scripts/setup --test installs them)",
                allow_module_level=True)

NODES = (1, 2, 3)


@pytest.fixture(scope="module")
def cluster():
    with running_cluster() as net:
        yield net


def test_established_connections_are_carried_by_the_kernel_on_each_node(cluster):
    """Ten connections over three nodes: the routers hash each direction
    apart, so most connections' replies cross another node than their
    requests (reply_adopted counts those; that none does is a chance of
    3^-10).  Thousands of requests go
    through while the nodes together queue only a few packets per
    connection; the per-backend counters still hold every packet and byte."""
    assert_carried_by_the_kernel(cluster, NODES)


def test_a_disabled_backends_carried_connections_are_reset_and_the_others_go_on(cluster):
    """Idle keep-alive connections, each carried by the kernel on the nodes
    it crosses after its first request.  Backend b2 disabled on every node
    (on_backend_down = "reset", the default): natlb's RSTs need sequence
    numbers the kernel moved without it, and a node that saw one direction
    never had the other's, so each node probes both ends and resets them with
    the numbers they answer, wherever the answer comes through.  Every b2
    connection ends reset; every other one still answers, from its backend."""
    victim = "203.0.113.10"              # b2
    holds = []
    while len(holds) < 30 and ({"b1", "b2", "b3"} - {h.backend for h in holds} or
                               sum(h.backend == "b2" for h in holds) < 3):
        holds += [cluster.hold() for _ in range(6)]
    assert {h.backend for h in holds} == {"b1", "b2", "b3"}, [h.backend for h in holds]
    try:
        for i in NODES:
            r = cluster.natlb_cli(i, "backend", "disable", "web", victim)
            assert r.returncode == 0, r.stderr
        victims = [h for h in holds if h.backend == "b2"]
        outcomes = [h.end() for h in victims]
        # Without an RST the client would say "open" after 60 s.
        assert [o["outcome"] for o in outcomes] == ["reset"] * len(victims), outcomes
        others = [h for h in holds if h.backend != "b2"]
        assert [h.survived() for h in others] == [True] * len(others)
    finally:
        for i in NODES:
            cluster.natlb_cli(i, "backend", "enable", "web", victim)
        for h in holds:
            if h.proc.poll() is None:
                h.proc.kill()
                h.proc.wait()
    print(f"\nreset: {len(victims)} connections of b2 reset within "
          f"{max(o['after'] for o in outcomes)} s, {len(others)} others answered")


def test_a_dying_nodes_carried_connections_are_adopted_and_carried_by_the_others(cluster):
    """Keep-alive connections busy while node 3 dies the hard way: the
    routers move what it carried (either direction) to nodes 1 and 2, which
    adopt each connection mid-way from its first packet there (not having
    seen its handshake, maybe seeing only its replies) and carry it from
    then on: no request fails, and once the routers settled the survivors
    queue next to nothing of the requests that follow."""
    conns = 12
    survivors = (1, 2)
    load = keepalive_load(cluster, conns, seconds=7, pause_ms=20)
    time.sleep(2.0)
    start = counts(cluster, survivors)
    cluster.kill_node(3)
    cluster.wait_paths(2, timeout=10)
    time.sleep(0.5)                 # each moved flow's first packet at its new node
    settled = counts(cluster, survivors)
    r = finish(load)
    time.sleep(0.3)
    end = counts(cluster, survivors)
    assert (r["established_lost"], r["new_failed"]) == (0, 0), r
    adopted = delta(settled, start)
    assert adopted["adopted"] + adopted["reply_adopted"] > 0, adopted
    after = delta(end, settled)
    # Thousands of packets after the routers settled, the kernel's: natlb
    # queued at most the closes (and a straggler's adoption).
    assert after["packets"] > conns * 100, after
    assert after["queued"] <= conns * PER_CONN, after
    print(f"\nnode 3 died: {adopted['adopted']} flows adopted by their requests, "
          f"{adopted['reply_adopted']} by their replies; after: {after['packets']} packets "
          f"counted, {after['queued']} queued")
