"""A new connection's handshake carried by the kernel (lb.fastpath): natlb
queues only the SYN, and everything it must act on still reaches it.  A
backend's RST to the SYN is never seen by the client (natlb re-steers the
SYN), and after the held-SYN timer moved a connection, the first backend's
late SYN-ACK never reaches the client (natlb drops it and resets that
backend).  Over IPv4 and IPv6."""

import json
import time
import uuid

import pytest

from natlb_testbed.hosts import host_port
from natlb_testbed.testbed import CLIENT_ADDR, CLIENT_ADDR6, basic_config, family_addresses

from .conftest import natlb_cli

FAST = 'rewrite = "mark"\nfastpath = true'
VICTIM = 2
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def status(tb) -> dict:
    return json.loads(natlb_cli(tb, "status", "--json", "-s", tb.control_socket).stdout)


def nft_family(family: int) -> str:
    return "ip6" if family == 6 else "ip"


@pytest.fixture
def seen_by_client(testbed, family):
    """Counters in the client's namespace of what it receives from the VIP:
    RSTs and SYN-ACKs (read with the returned function)."""
    table = f"nlhs{uuid.uuid4().hex[:6]}"
    nf, (vip, _) = nft_family(family), family_addresses(family)
    rules = [f"add table {nf} {table}",
             f"add chain {nf} {table} in {{ type filter hook input priority 0; }}",
             f"add rule {nf} {table} in {nf} saddr {vip} tcp flags & rst == rst counter",
             f"add rule {nf} {table} in {nf} saddr {vip} tcp flags & (syn | ack) == syn | ack "
             "counter"]
    for rule in rules:
        r = testbed.client_cmd("nft", rule)
        assert r.returncode == 0, r.stderr

    def read() -> tuple[int, int]:
        out = json.loads(testbed.client_cmd("nft", "-j", "list", "table", nf, table).stdout)
        counts = [e["rule"]["expr"][-1]["counter"]["packets"] for e in out["nftables"]
                  if "rule" in e]
        return counts[0], counts[1]

    yield read
    testbed.client_cmd("nft", "delete", "table", nf, table)


def run(testbed, family: int, n: int) -> list[dict]:
    vip, _ = family_addresses(family)
    return testbed.client_run("http-stream", "--host", vip, "--port", "80", "--count",
                              str(n), "--interval-ms", "10", "--timeout", "5")


def victim_key(family: int) -> str:
    _, addr = family_addresses(family)
    return host_port(addr(VICTIM), 80)


@FAMILIES
def test_a_backends_rst_to_a_carried_syn_never_reaches_the_client(testbed, natlb,
                                                                   seen_by_client, family):
    natlb(basic_config(testbed, interval_ms=60_000, lb_extra=FAST, family=family))
    testbed.wait_state(victim_key(family), lambda b: b["health"] == "up", "up")
    testbed.fail_backend(VICTIM, "kill")          # its kernel answers SYNs with RST
    try:
        res = run(testbed, family, 12)
        st = status(testbed)
    finally:
        testbed.repair_backend(VICTIM, "kill")
    assert all(r["ok"] for r in res), [r for r in res if not r["ok"]]
    assert {r["backend"] for r in res} <= {"b1", "b3"}
    assert st["failover"]["syn_resent"] >= 1, st["failover"]
    rsts, synacks = seen_by_client()
    assert rsts == 0 and synacks == len(res), (rsts, synacks)


@FAMILIES
def test_a_late_synack_after_the_held_syn_timer_moved_the_connection_never_reaches_the_client(
        testbed, natlb, seen_by_client, family):
    """The victim's SYN-ACKs to the client are swallowed on its side while
    the client connects: the held-SYN timer (30 ms) moves each of its
    connections (the kernel forgets the victim's entries).  Its kernel sends
    them again a second later, when they pass: each reaches the router late,
    is queued, and natlb drops it and resets the victim.  (With neither the
    forgetting nor the SYN-ACK window of the fast path, the client sees them:
    more SYN-ACKs than connections.)"""
    natlb(basic_config(testbed, syn_timeout_ms=30, interval_ms=60_000, lb_extra=FAST,
                       family=family))
    testbed.wait_state(victim_key(family), lambda b: b["health"] == "up", "up")
    table, nf = f"nlsa{uuid.uuid4().hex[:6]}", nft_family(family)
    client = CLIENT_ADDR6 if family == 6 else CLIENT_ADDR
    for rule in (f"add table {nf} {table}",
                 f"add chain {nf} {table} out {{ type filter hook output priority 0; }}",
                 # Only the client's: natlb's health checks still pass, so
                 # the victim stays up and the kernel's map is not emptied.
                 f"add rule {nf} {table} out {nf} daddr {client} "
                 "tcp flags & (syn | ack) == syn | ack drop"):
        r = testbed.backend_cmd(VICTIM, "nft", rule)
        assert r.returncode == 0, r.stderr
    try:
        res = run(testbed, family, 12)
    finally:
        testbed.backend_cmd(VICTIM, "nft", "delete", "table", nf, table)
    deadline = time.monotonic() + 10         # its first retransmission: after 1 s
    while status(testbed)["failover"]["late_synacks"] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    st = status(testbed)
    assert all(r["ok"] for r in res), [r for r in res if not r["ok"]]
    assert {r["backend"] for r in res} <= {"b1", "b3"}
    assert st["failover"]["late_synacks"] >= 1, st["failover"]
    rsts, synacks = seen_by_client()
    assert rsts == 0 and synacks == len(res), (rsts, synacks)
    rsts, synacks = seen_by_client()
    assert rsts == 0 and synacks == len(res), (rsts, synacks)
