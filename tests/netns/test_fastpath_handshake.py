"""A new connection's handshake carried by the kernel (lb.fastpath): natlb
queues only the SYN, and everything it must act on still reaches it.  A
backend's RST to the SYN is never seen by the client (natlb re-steers the
SYN), and after the held-SYN timer moved a connection, the first backend's
late SYN-ACK never reaches the client (natlb drops it and resets that
backend)."""

import json
import time
import uuid

import pytest

from natlb_testbed.testbed import CLIENT_ADDR, VIP, backend_addr, basic_config

from .conftest import natlb_cli

FAST = 'rewrite = "mark"\nfastpath = true'
VICTIM = 2


def status(tb) -> dict:
    return json.loads(natlb_cli(tb, "status", "--json", "-s", tb.control_socket).stdout)


@pytest.fixture
def seen_by_client(testbed):
    """Counters in the client's namespace of what it receives from the VIP:
    RSTs and SYN-ACKs (read with the returned function)."""
    table = f"nlhs{uuid.uuid4().hex[:6]}"
    rules = [f"add table ip {table}",
             f"add chain ip {table} in {{ type filter hook input priority 0; }}",
             f"add rule ip {table} in ip saddr {VIP} tcp flags & rst == rst counter",
             f"add rule ip {table} in ip saddr {VIP} tcp flags & (syn | ack) == syn | ack "
             "counter"]
    for rule in rules:
        r = testbed.client_cmd("nft", rule)
        assert r.returncode == 0, r.stderr

    def read() -> tuple[int, int]:
        out = json.loads(testbed.client_cmd("nft", "-j", "list", "table", "ip", table).stdout)
        counts = [e["rule"]["expr"][-1]["counter"]["packets"] for e in out["nftables"]
                  if "rule" in e]
        return counts[0], counts[1]

    yield read
    testbed.client_cmd("nft", "delete", "table", "ip", table)


def run(testbed, n: int) -> list[dict]:
    return testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count",
                              str(n), "--interval-ms", "10", "--timeout", "5")


def test_a_backends_rst_to_a_carried_syn_never_reaches_the_client(testbed, natlb,
                                                                   seen_by_client):
    natlb(basic_config(testbed, interval_ms=60_000, lb_extra=FAST))
    testbed.wait_state(f"{backend_addr(VICTIM)}:80", lambda b: b["health"] == "up", "up")
    testbed.fail_backend(VICTIM, "kill")          # its kernel answers SYNs with RST
    try:
        res = run(testbed, 12)
        st = status(testbed)
    finally:
        testbed.repair_backend(VICTIM, "kill")
    assert all(r["ok"] for r in res), [r for r in res if not r["ok"]]
    assert {r["backend"] for r in res} <= {"b1", "b3"}
    assert st["failover"]["syn_resent"] >= 1, st["failover"]
    rsts, synacks = seen_by_client()
    assert rsts == 0 and synacks == len(res), (rsts, synacks)


def test_a_late_synack_after_the_held_syn_timer_moved_the_connection_never_reaches_the_client(
        testbed, natlb, seen_by_client):
    """The victim's SYN-ACKs to the client are swallowed on its side while
    the client connects: the held-SYN timer (30 ms) moves each of its
    connections (the kernel forgets the victim's entries).  Its kernel sends
    them again a second later, when they pass: each reaches the router late,
    is queued, and natlb drops it and resets the victim.  (With neither the
    forgetting nor the SYN-ACK window of the fast path, the client sees them:
    more SYN-ACKs than connections.)"""
    natlb(basic_config(testbed, syn_timeout_ms=30, interval_ms=60_000, lb_extra=FAST))
    testbed.wait_state(f"{backend_addr(VICTIM)}:80", lambda b: b["health"] == "up", "up")
    table = f"nlsa{uuid.uuid4().hex[:6]}"
    for rule in (f"add table ip {table}",
                 f"add chain ip {table} out {{ type filter hook output priority 0; }}",
                 # Only the client's: natlb's health checks still pass, so
                 # the victim stays up and the kernel's map is not emptied.
                 f"add rule ip {table} out ip daddr {CLIENT_ADDR} "
                 "tcp flags & (syn | ack) == syn | ack drop"):
        r = testbed.backend_cmd(VICTIM, "nft", rule)
        assert r.returncode == 0, r.stderr
    try:
        res = run(testbed, 12)
    finally:
        testbed.backend_cmd(VICTIM, "nft", "delete", "table", "ip", table)
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
