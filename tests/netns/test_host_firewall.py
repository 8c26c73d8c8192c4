"""natlb beside what an operator already has on the host: a firewall over
bridged traffic (br_netfilter).  README, "Beside a host firewall"."""

import signal

import pytest

from natlb_testbed.testbed import basic_config


def test_turning_bridge_netfilter_off_is_said_and_undone(testbed, natlb):
    """natlb turns bridge-nf-call-iptables off (a reply bridged by the router
    would reach its prerouting hook with the bridge port as its ingress, which
    natlb does not believe): the host's rules stop seeing bridged frames, so
    natlb says so, and puts it back when it stops."""
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    was = testbed.router_cmd("cat", path).stdout.strip()
    if was != "1":
        pytest.skip(f"bridge-nf-call-iptables is {was!r} here (no br_netfilter)")
    p = natlb(basic_config(testbed))
    assert testbed.router_cmd("cat", path).stdout.strip() == "0"
    assert ("net.bridge.bridge-nf-call-iptables 1 -> 0 while natlb runs: iptables and "
            "nftables rules no longer see the frames this host bridges") in testbed.natlb_log()
    testbed.stop(p, signal.SIGTERM)
    assert testbed.router_cmd("cat", path).stdout.strip() == "1"
