"""natlb beside the host firewall an operator already has: an nftables
ruleset with `policy drop`, iptables-nft chains (Docker's FORWARD policy).
What natlb needs of it, and which of natlb's packets meet it, is in
README, "Beside a host firewall"; these hold natlb to that, and to leaving
the operator's rules exactly as they were."""

import re
import signal

import pytest

from natlb_testbed.testbed import CLIENT_ADDR, basic_config

from .conftest import router_state
from .firewall import FIREWALL, UNTRACKED, answered, clear, load, ruleset


@pytest.mark.parametrize("lb_extra,scheduler", [
    ("fastpath = false", "rr"),     # every packet through the queue
    ("", "lc"),                     # fast path on: an lc flow's first packet is queued
])
def test_policy_drop_in_forward_needs_untracked_accepted(testbed, natlb, lb_extra, scheduler):
    """natlb's queued packets leave by the forward hook untracked: an
    operator's `policy drop` with only `ct state established,related
    accept` drops them; `ct state untracked accept` lets them pass.  The
    input hook's policy drop costs natlb nothing (its health checks' answers
    are tracked).  The operator's ruleset is as it was after natlb stops."""
    before = router_state(testbed)
    load(testbed, FIREWALL.format(allow=""))
    try:
        p = natlb(basic_config(testbed, scheduler=scheduler, lb_extra=lb_extra))
        assert answered(testbed, 2) == 0
        r = testbed.router_cmd("nft", "add", "rule", "inet", "opfw", "forward", *UNTRACKED.split())
        assert r.returncode == 0, r.stderr
        assert answered(testbed) == 4
        assert {b["health"] for s in testbed.status()["services"] for b in s["backends"]} == {"up"}
        operators = testbed.router_cmd("nft", "list", "table", "inet", "opfw").stdout
        testbed.stop(p, signal.SIGTERM)
        assert ruleset(testbed) == operators
    finally:
        clear(testbed)
    assert router_state(testbed) == before


def test_dockers_forward_policy_drop_needs_untracked_accepted_in_docker_user(testbed, natlb):
    """Docker sets iptables' FORWARD policy to DROP and leaves DOCKER-USER
    to the operator (iptables-nft: a table ip filter at the forward hook)."""
    had_filter = "table ip filter" in ruleset(testbed)
    cmds = [["-N", "DOCKER-USER"], ["-A", "DOCKER-USER", "-j", "RETURN"],
            ["-P", "FORWARD", "DROP"], ["-A", "FORWARD", "-j", "DOCKER-USER"],
            ["-A", "FORWARD", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED",
             "-j", "ACCEPT"]]
    for c in cmds:
        r = testbed.router_cmd("iptables", *c)
        assert r.returncode == 0, r.stderr
    try:
        p = natlb(basic_config(testbed, lb_extra="fastpath = false"))
        assert answered(testbed, 2) == 0
        r = testbed.router_cmd("iptables", "-I", "DOCKER-USER", "-m", "conntrack", "--ctstate",
                               "UNTRACKED", "-j", "ACCEPT")
        assert r.returncode == 0, r.stderr
        assert answered(testbed) == 4
        saved = testbed.router_cmd("iptables-save").stdout
        testbed.stop(p, signal.SIGTERM)
        after = testbed.router_cmd("iptables-save").stdout
        assert rules(after) == rules(saved)
    finally:
        if not had_filter:
            testbed.router_cmd("nft", "delete", "table", "ip", "filter")


def rules(saved: str) -> list[str]:
    """iptables-save's lines without its comments and counters."""
    return [re.sub(r"\[\d+:\d+\]", "", ln) for ln in saved.splitlines()
            if not ln.startswith("#")]


@pytest.mark.parametrize("decide", ["true", "false"])
def test_which_first_packets_the_forward_filter_sees(testbed, natlb, decide):
    """With kernel decisions (the default) a flow's packets never meet the
    forward hook: a rule there that drops a client does not stop it.  Without
    them, each flow's first packet is queued and forwarded, so the rule
    stops the flow (later packets are carried only once one passed)."""
    load(testbed, FIREWALL.format(allow=f"ip saddr {CLIENT_ADDR} drop\n        {UNTRACKED}"))
    try:
        natlb(basic_config(testbed, lb_extra=f"fastpath = true\nfastpath_decide = {decide}"))
        assert answered(testbed, 2) == (2 if decide == "true" else 0)
        # natlb says which of the host's chains its carried packets skip.
        warned = [ln for ln in testbed.natlb_log().splitlines()
                  if "meets these nftables chains: inet opfw forward" in ln]
        assert len(warned) == 1, testbed.natlb_log()
        assert ("kernel decisions" in warned[0]) == (decide == "true")
    finally:
        clear(testbed)


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
