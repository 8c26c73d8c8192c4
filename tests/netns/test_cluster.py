"""Several natlb nodes behind ECMP routers running BIRD (natlb_testbed/cluster.py,
configs from examples/cluster/): losing a node, by a hard death or a planned
drain, loses no connection."""

import shutil
import signal
import time

import pytest

from .cluster_traffic import finish, running_cluster

if not shutil.which("bird") or not shutil.which("nginx"):
    pytest.skip("needs bird2 and nginx (scripts/setup --test installs them)",
                allow_module_level=True)

LOAD = {"conns": 20, "interval_ms": 15, "seconds": 7, "timeout": 8}


@pytest.fixture(scope="module")
def cluster():
    with running_cluster() as net:
        yield net


def test_node_dies_the_hard_way_and_no_connection_is_lost(cluster):
    load = cluster.load(**LOAD)
    time.sleep(2.5)
    assert all(cluster.natlb_status(i)["flows"] > 0 for i in (1, 2, 3)), "a node carried nothing"
    cluster.kill_node(3)
    cluster.wait_paths(2, timeout=10)      # BFD withdrew it from R1 and R2
    r = finish(load)
    assert r["new"] > 300 and r["keepalive_requests"] > 20 * 10
    assert (r["established_lost"], r["new_failed"]) == (0, 0), r
    assert len(r["keepalive_backends"]) == 3
    # Node 3's established connections went on through nodes 1 and 2, which
    # had never seen them start.
    assert sum(cluster.natlb_status(i)["failover"]["adopted"] for i in (1, 2)) > 0
    print(f"\nhard kill: {r['new_delayed']} of {r['new']} new connections delayed past 1 s, "
          f"longest keep-alive request {r['keepalive_max_ms']} ms")


def test_planned_drain_loses_and_delays_nothing(cluster):
    cluster.wait_paths(2)
    load = cluster.load(**LOAD)
    time.sleep(2.5)
    # Withdraw, wait for the routers, stop.
    for session in ("upstream", "downstream"):
        cluster.birdc("n1", "disable", session)
    cluster.wait_paths(1, timeout=10)
    time.sleep(1.0)
    cluster.stop(cluster.natlb[1])
    r = finish(load)
    assert (r["established_lost"], r["new_failed"], r["new_delayed"]) == (0, 0, 0), r
    assert cluster.natlb[1].returncode == 0


def test_vip_is_announced_only_while_a_backend_is_up(cluster):
    cluster.wait_paths(1)
    backends = ("203.0.113.6", "203.0.113.10", "203.0.113.14")
    for b in backends:
        assert cluster.natlb_cli(2, "backend", "disable", "web", b).returncode == 0
    cluster.wait_paths(0, down=1, timeout=10)   # natlb still runs: replies may come
    assert cluster.natlb_cli(2, "backend", "enable", "web", backends[0]).returncode == 0
    cluster.wait_paths(1, timeout=10)


def test_natlb_killed_withdraws_both_announcements(cluster):
    """SIGKILL: natlb cannot clean up, its guardian removes the VIP and the
    route BIRD announces downstream; a new natlb announces them again."""
    cluster.wait_paths(1)
    cluster.stop(cluster.natlb[2], signal.SIGKILL)
    cluster.wait_paths(0, timeout=10)
    cluster.start_natlb(2)
    cluster.wait_paths(1, timeout=10)
