"""The cluster over IPv6 (natlb_testbed/cluster.py is dual-stack; the
configs of examples/cluster/ carry the service web6, VIP 2001:db8::100,
announced by BGP sessions of their own over the links' IPv6 addresses):
the VIP is announced only while a backend is up and withdrawn when natlb
is killed, the kernel carries established connections on each node, and a
node dying the hard way loses no connection."""

import shutil
import signal
import time

import pytest

from natlb_testbed.cluster import VIP, VIP6, backend_addr6

from .cluster_traffic import assert_carried_by_the_kernel, counts, delta, finish, running_cluster

if not shutil.which("bird") or not shutil.which("nginx"):
    pytest.skip("needs bird2 and nginx (scripts/setup --test installs them)",
                allow_module_level=True)

NODES = (1, 2, 3)
PREFIX = f"{VIP6}/128"


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(family=6) as net:
        yield net


def web6_flows(cluster, i: int) -> int:
    st = cluster.natlb_status(i)
    (svc,) = (s for s in st["services"] if s["name"] == "web6")
    return svc["active_flows"] + svc["inactive_flows"]


def test_ipv6_vip_is_announced_only_while_a_backend_is_up(cluster):
    """Node 2 with no IPv6 backend up withdraws the IPv6 VIP (R1's BIRD has
    it from nodes 1 and 3 only) and keeps its default route towards R2 and
    its IPv4 VIP; one backend back and it announces the VIP again."""
    backends = [backend_addr6(k) for k in (1, 2, 3)]
    try:
        for b in backends:
            assert cluster.natlb_cli(2, "backend", "disable", "web6", b).returncode == 0
        cluster.wait_paths(2, down=3, timeout=10, family=6)   # natlb still runs
        assert cluster.bird_routes("r1", PREFIX) == {"node1v6", "node3v6"}
        assert cluster.bird_routes("r2", "::/0") == {"node1v6", "node2v6", "node3v6"}
        assert cluster.paths("r1", VIP) == 3
        assert cluster.natlb_cli(2, "backend", "enable", "web6", backends[0]).returncode == 0
        cluster.wait_paths(3, timeout=10, family=6)
        assert cluster.bird_routes("r1", PREFIX) == {"node1v6", "node2v6", "node3v6"}
    finally:
        for b in backends:
            cluster.natlb_cli(2, "backend", "enable", "web6", b)


def test_established_ipv6_connections_are_carried_by_the_kernel_on_each_node(cluster):
    """As test_cluster_fastpath's IPv4 test: nine connections over three
    nodes, most of whose replies cross another node than their requests;
    thousands of requests while the nodes queue a few packets per
    connection, and the per-backend counters hold every packet and byte."""
    assert_carried_by_the_kernel(cluster, NODES, "web6", VIP6)


def test_node_dies_the_hard_way_and_no_ipv6_connection_is_lost(cluster):
    """As test_cluster's IPv4 test: busy keep-alive connections and a new
    connection every 15 ms while node 3 drops every packet (those its
    kernel would carry too); the survivors take its connections up
    mid-way, none is lost or fails."""
    load = cluster.load(VIP6, conns=20, interval_ms=15, seconds=7, timeout=8)
    time.sleep(2.5)
    assert all(web6_flows(cluster, i) > 0 for i in NODES), "a node carried nothing"
    adopted = sum(cluster.natlb_status(i)["failover"]["adopted"] for i in (1, 2))
    cluster.kill_node(3)
    dead = counts(cluster, (3,), "web6")       # its natlb still answers, over the Unix socket
    cluster.wait_paths(2, timeout=10, family=6)
    r = finish(load)
    # Dead: not even its kernel's fast path carried a packet after that.
    assert delta(counts(cluster, (3,), "web6"), dead)["packets"] == 0
    assert r["new"] > 300 and r["keepalive_requests"] > 20 * 10
    assert (r["established_lost"], r["new_failed"]) == (0, 0), r
    assert len(r["keepalive_backends"]) == 3
    assert sum(cluster.natlb_status(i)["failover"]["adopted"] for i in (1, 2)) > adopted
    print(f"\nIPv6 hard kill: {r['new_delayed']} of {r['new']} new connections delayed past "
          f"1 s, longest keep-alive request {r['keepalive_max_ms']} ms")


def test_natlb_killed_withdraws_both_ipv6_announcements(cluster):
    """SIGKILL: its guardian removes the IPv6 VIP and the ::/0 route BIRD
    announces downstream; a new natlb announces both again."""
    cluster.wait_paths(2, family=6)
    cluster.stop(cluster.natlb[2], signal.SIGKILL)
    cluster.wait_paths(1, timeout=10, family=6)
    assert cluster.bird_routes("r1", PREFIX) == {"node1v6"}
    assert cluster.bird_routes("r2", "::/0") == {"node1v6"}
    cluster.start_natlb(2)
    cluster.wait_paths(2, timeout=10, family=6)
    assert cluster.bird_routes("r1", PREFIX) == {"node1v6", "node2v6"}


def test_planned_drain_of_an_ipv6_node_loses_and_delays_nothing(cluster):
    """As test_cluster's IPv4 drain: node 1 withdraws its IPv6 routes, the
    routers move its flows to node 2 (which adopts them mid-way), then its
    natlb stops; no IPv6 connection is lost, fails or waits past 1 s.
    (Node 3 is dead since the hard-way test: node 2 is left alone.)"""
    cluster.wait_paths(2, timeout=10, family=6)
    load = cluster.load(VIP6, conns=20, interval_ms=15, seconds=7, timeout=8)
    time.sleep(2.5)
    for session in ("upstream6", "downstream6"):
        cluster.birdc("n1", "disable", session)
    cluster.wait_paths(1, timeout=10, family=6)
    assert cluster.bird_routes("r1", PREFIX) == {"node2v6"}
    time.sleep(1.0)
    cluster.stop(cluster.natlb[1])
    r = finish(load)
    assert r["new"] > 300 and r["keepalive_requests"] > 20 * 10
    assert (r["established_lost"], r["new_failed"], r["new_delayed"]) == (0, 0, 0), r
    assert cluster.natlb[1].returncode == 0
