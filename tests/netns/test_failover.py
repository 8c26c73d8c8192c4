"""Failover with real traffic: a new connection every 10 ms through the VIP
while a backend dies in one of three ways.  natlb must lose none of them."""

import json
import time

import pytest

from natlb_testbed.testbed import VIP, backend_addr, basic_config, family_addresses, udp_service

from .conftest import natlb_cli
from .test_traffic import queued_packets

VICTIM = 2
VICTIM_KEY = f"{backend_addr(VICTIM)}:80"
# The kernel fast path for established flows (lb.fastpath) keeps every promise.
FAST = 'rewrite = "mark"\nfastpath = true'
QUEUED = 'rewrite = "mark"\nfastpath = false'    # every packet through natlb
LB_MODES = pytest.mark.parametrize("lb_extra", [QUEUED, FAST], ids=["mark", "fastpath"])


def stream(testbed, count, on_index, interval_ms=10):
    proc, results = testbed.client_stream("http-stream", "--host", VIP, "--port", "80",
                                          "--count", str(count), "--interval-ms",
                                          str(interval_ms), "--timeout", "3")
    seen = []
    for r in results:
        seen.append(r)
        if r["i"] in on_index:
            on_index[r["i"]]()
    proc.wait()
    return seen


@pytest.mark.parametrize("kind,lb_extra", [
    ("kill", 'rewrite = "copy"'), ("link", 'rewrite = "copy"'), ("blackhole", 'rewrite = "copy"'),
    ("kill", QUEUED), ("kill", FAST), ("blackhole", FAST)],
    ids=["kill-copy", "link-copy", "blackhole-copy", "kill-mark", "kill-fastpath",
         "blackhole-fastpath"])
def test_no_new_connection_fails_when_a_backend_dies(testbed, natlb, kind, lb_extra):
    # A silent backend's SYNs move on after 30 ms.  On a loaded machine a
    # healthy backend's SYN-ACK may come later than that: the connection
    # moves all the same and the backend is only suspect until a check
    # (generous timeout) clears it.
    natlb(basic_config(testbed, interval_ms=50, syn_timeout_ms=30,
                       lb_extra=lb_extra))
    dead_since: list[float] = []

    def fail() -> None:
        testbed.fail_backend(VICTIM, kind)
        dead_since.append(time.time())  # the clients' clock: same host

    try:
        res = stream(testbed, 150, {40: fail})
        # A link or a blackhole is proved dead by a check timing out: wait for
        # the verdict, then new connections must not even be tried on it.
        testbed.wait_state(VICTIM_KEY, lambda b: b["health"] == "down", "down")
        before = testbed.backend_state(VICTIM_KEY)["new_flows"]
        after = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count",
                                   "15", "--interval-ms", "10", "--timeout", "3")
        tried = testbed.backend_state(VICTIM_KEY)["new_flows"] - before
    finally:
        testbed.repair_backend(VICTIM, kind)
    # No handshake failed, and nothing started after the failure failed at
    # all.  The only connections allowed to fail were established with the
    # victim before it died: an L4 balancer cannot save those (their count
    # depends on how slow the machine is, so it is not asserted).
    lost = [r for r in res if not r["ok"]
            and (r["stage"] == "connect" or r["wall"] >= dead_since[0])]
    assert lost == [], lost
    assert {r["backend"] for r in res if r["ok"] and r["wall"] >= dead_since[0]} <= {"b1", "b3"}
    assert all(r["ok"] for r in after), after
    assert tried == 0 and {r["backend"] for r in after} <= {"b1", "b3"}, (tried, after)


def status(testbed):
    return json.loads(natlb_cli(testbed, "status", "--json", "-s", testbed.control_socket).stdout)


def backend_status(testbed, k):
    svc = status(testbed)["services"][0]
    return next(b for b in svc["backends"] if b["address"] == backend_addr(k))


@LB_MODES
def test_drain_keeps_old_flows_and_takes_no_new_ones(testbed, natlb, lb_extra):
    natlb(basic_config(testbed, scheduler="rr", lb_extra=lb_extra))
    holds = testbed.hold_each_backend(VIP, {"b1", "b2", "b3"})
    on_victim = sum(h.backend == "b2" for h in holds)
    assert backend_status(testbed, VICTIM)["active_flows"] == on_victim
    r = natlb_cli(testbed, "backend", "drain", "web", backend_addr(VICTIM), "-s",
                  testbed.control_socket)
    assert r.returncode == 0, r.stderr
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "12",
                             "--timeout", "5")
    assert all(x["ok"] for x in res) and "b2" not in {x["backend"] for x in res}, res
    # Nobody was cut off: every held connection still answers, from its backend.
    assert [h.survived() for h in holds] == [True] * len(holds)
    b = testbed.wait_state(VICTIM_KEY, lambda b: b["active_flows"] == 0, "without flows")
    assert b["admin"] == "draining"


@pytest.mark.parametrize("lb_extra,family", [(QUEUED, 4), (FAST, 4), (FAST, 6)],
                         ids=["mark", "fastpath", "fastpath-ipv6"])
@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_established_flows_of_a_disabled_backend(testbed, natlb, policy, lb_extra, family):
    """With the fast path the kernel carried the flows: it must forget them
    at once, so that natlb's probes and RSTs (reset) see the answers they
    provoke, and kept flows go on (keep).  Only the victim's: the other
    backends' flows stay carried by the kernel, none of their packets
    queued (forgetting every flow sent each one's next packet through the
    queue at once)."""
    natlb(basic_config(testbed, lb_extra=lb_extra, family=family,
                       service_extra=f'[service.failover]\non_backend_down = "{policy}"'))
    vip, addr = family_addresses(family)
    holds = testbed.hold_each_backend(vip, {"b1", "b2", "b3"})
    r = natlb_cli(testbed, "backend", "disable", "web", addr(VICTIM), "-s",
                  testbed.control_socket)
    assert r.returncode == 0, r.stderr
    victims = [h for h in holds if h.backend == "b2"]
    if policy == "reset":
        # The RST ends the client's wait; without it the client would say
        # "open" after 60 s.
        assert [h.end()["outcome"] for h in victims] == ["reset"] * len(victims)
    else:
        assert [h.survived() for h in victims] == [True] * len(victims)
    others = [h for h in holds if h.backend != "b2"]
    queued = settled_queue(testbed)
    assert [h.survived() for h in others] == [True] * len(others)
    if lb_extra == FAST:
        assert queued_packets(testbed) == queued, "a surviving flow's packets were queued"
    natlb_cli(testbed, "backend", "enable", "web", addr(VICTIM), "-s",
              testbed.control_socket)


def settled_queue(testbed, quiet_s: float = 0.3, limit_s: float = 10.0) -> int:
    """Packets queued so far, once none came for quiet_s (the reset's own
    exchanges with the victim, queued by design, are over)."""
    last, since = queued_packets(testbed), time.monotonic()
    deadline = since + limit_s
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = queued_packets(testbed)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


UDP_ONLY = '[lb]\ncontrol_socket = "{sock}"\n' + udp_service("dns", [1, 2, 3], 1000, 500)


def test_udp_backend_dead_is_seen_from_icmp_before_any_check(testbed, natlb):
    # Health checks every second: the ICMP port unreachable the backend's
    # kernel sends for the first query is what tells natlb.
    natlb(UDP_ONLY.format(sock=testbed.control_socket))
    testbed.fail_backend(VICTIM, "kill")
    key = f"{backend_addr(VICTIM)}:53"
    try:
        res = testbed.client_run("udp-stream", "--host", VIP, "--port", "53", "--count",
                                 "30", "--interval-ms", "10", "--timeout", "0.5")
        # The immediate check's verdict may come after the stream on a loaded
        # machine: wait for it rather than for a clock.
        victim = testbed.wait_state(key, lambda b: b["health"] == "down", "down")
    finally:
        testbed.repair_backend(VICTIM, "kill")
    # The ICMP reached natlb as a passive failure (it then checks at once and
    # the check confirms: the status JSON keeps the count, the log the story).
    assert victim["passive_failures"] >= 1, victim
    lost = [r for r in res if not r["ok"]]
    assert len(lost) <= 1, lost  # at most the query that found it dead
    assert "b2" not in {r.get("backend") for r in res[3:]}
