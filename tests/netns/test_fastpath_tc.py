"""The tc fast path on the host: natlb's filters on every interface of the
router while it runs, carrying traffic of both families; nothing of it left
after SIGTERM, nor after SIGKILL once the guardian's grace is over; a clsact
qdisc that was there before natlb is left in place."""

import json
import signal
import time
import uuid

import pytest

from natlb_testbed.testbed import VIP, basic_config, family_addresses

from .conftest import natlb_cli, router_state, tc_state
from .test_traffic import queued_packets

FAST = "fastpath = true"
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def interfaces(tb) -> list[str]:
    links = tb.router_cmd("ip", "-o", "link", "show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
            if "link/ether" in line]


def filters(tb, dev: str, where: str) -> str:
    return tb.router_cmd("tc", "filter", "show", "dev", dev, where).stdout


def status(tb) -> dict:
    return json.loads(natlb_cli(tb, "status", "--json", "-s", tb.control_socket).stdout)


@FAMILIES
def test_filters_on_every_interface_and_gone_after_sigterm(testbed, natlb, family):
    before = router_state(testbed)
    p = natlb(basic_config(testbed, lb_extra=FAST, family=family))
    devs = interfaces(testbed)
    assert len(devs) >= 2
    for dev in devs:
        for where, prog in (("ingress", "carry"), ("egress", "learn")):
            assert prog in filters(testbed, dev, where), (dev, where)
    vip, _ = family_addresses(family)
    r = testbed.client_run("blob", "--host", vip, "--port", "80", "--size", str(4 << 20),
                           "--seed", "3", "--timeout", "30")[0]
    assert r["ok"], r
    st = status(testbed)
    # 4 MiB is thousands of packets: natlb saw few, yet counts every byte
    # (the kernel's counters added).
    web = st["services"][0]
    assert web["bytes_out"] > 4 << 20 and st["queued_packets"] < 200, st
    testbed.stop(p, signal.SIGTERM)
    assert router_state(testbed) == before


def test_gso_packets_whose_segments_fit_are_carried(testbed, natlb):
    """The backend's TCP hands its veth GSO packets (TSO): several
    segments each, every one within the links' MTU.  The fast path carries
    them (bpf_check_mtu checks each segment, not the whole packet)."""
    natlb(basic_config(testbed, lb_extra=FAST))
    size = 32 << 20
    before, queued_before = status(testbed)["services"][0], queued_packets(testbed)
    r = testbed.client_run("blob", "--host", VIP, "--port", "80", "--size", str(size),
                           "--seed", "5", "--timeout", "60")[0]
    assert r["ok"], r
    web = status(testbed)["services"][0]
    packets = web["packets_out"] - before["packets_out"]
    assert web["bytes_out"] - before["bytes_out"] > size
    # Fewer packets than a third of the segments: most were GSO packets.
    assert packets < size / 1448 / 3, packets
    # ...and nearly none of them went through natlb's queue.
    assert queued_packets(testbed) - queued_before < 64


def test_sigkill_leaves_filters_for_a_successor_then_the_guardian_removes_them(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed, lb_extra=f"{FAST}\nrestart_grace_ms = 1500"))
    p.kill()
    p.wait()
    assert "carry" in tc_state(testbed)         # left for a successor...
    deadline = time.monotonic() + 10
    while router_state(testbed) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert router_state(testbed) == before      # ...and gone after the grace


def test_a_clsact_qdisc_that_was_there_stays(testbed, natlb):
    dev = interfaces(testbed)[0]
    testbed.router_cmd("tc", "qdisc", "add", "dev", dev, "clsact")
    try:
        before = router_state(testbed)
        assert "clsact" in before
        p = natlb(basic_config(testbed, lb_extra=FAST))
        assert "carry" in filters(testbed, dev, "ingress")
        testbed.stop(p, signal.SIGTERM)
        after = router_state(testbed)
        assert after == before and "clsact" in after
    finally:
        testbed.router_cmd("tc", "qdisc", "del", "dev", dev, "clsact")


def client_counters(tb, nft_family: str, table: str) -> tuple[int, int, int]:
    """Packets the client sent to the VIP's port 80 and got from it, and the
    SYNs among those it sent."""
    out = tb.client_cmd("nft", "-j", "list", "table", nft_family, table).stdout
    counts = [r["counter"]["packets"] for item in json.loads(out)["nftables"]
              if "rule" in item for r in item["rule"]["expr"] if "counter" in r]
    return counts[0], counts[2], counts[1]   # listed by chain: out (all, SYNs), in


def queued_by_kind(tb, table: str) -> dict[str, int]:
    """The router's count of the service's packets that reached prerouting,
    by TCP flags: the fast path redirects what it carries at tc ingress, so
    these are the ones queued (health checks, addressed to the router, are
    left out)."""
    out = tb.router_cmd("nft", "-j", "list", "table", "inet", table).stdout
    return {item["rule"]["comment"]: r["counter"]["packets"]
            for item in json.loads(out)["nftables"] if "rule" in item
            for r in item["rule"]["expr"] if "counter" in r}


def count_queued_by_kind(tb, vip: str, table: str) -> None:
    kinds = {"syn": "tcp flags & (syn|ack) == syn", "synack": "tcp flags & (syn|ack) == syn|ack",
             "other": "tcp flags & syn == 0"}
    ip = "ip6" if ":" in vip else "ip"
    rules = [f"add table inet {table}",
             f"add chain inet {table} pre {{ type filter hook prerouting priority -400; }}"]
    for kind, match in kinds.items():
        rules.append(f"add rule inet {table} pre {ip} daddr {vip} tcp dport 80 {match} "
                     f"counter comment \"client {kind}\"")
        rules.append(f"add rule inet {table} pre tcp sport 80 fib daddr type != local {match} "
                     f"counter comment \"backend {kind}\"")
    for rule in rules:
        r = tb.router_cmd("nft", rule)
        assert r.returncode == 0, (rule, r.stderr)


@FAMILIES
@pytest.mark.parametrize("decide", [
    pytest.param(("rr", True), id="kernel-decides"),
    pytest.param(("rr", False), id="queued-syn"),
    pytest.param(("lc", True), id="lc-queued-syn"),
])
def test_short_connections_queue_only_their_syn_and_end_closed_counted_exactly(testbed, natlb,
                                                                               family, decide):
    """Connection: close, one after another: each one's SYN is queued and
    marked fast; the kernel carries everything after it (the SYN-ACK and the
    handshake's last ACK told to natlb through the ring buffer, as the FINs
    are): every flow ends closing in natlb, the counts equal what the client
    sent and got, and one packet per connection was queued: its SYN.

    The one fallback a loaded machine brings is the client's own: a SYN it
    sends again when natlb's verdict on the first came after its 1 s
    retransmission timeout.  natlb sees that SYN again, the kernel forgets
    the flow, and that connection's handshake is queued (its SYN-ACK, its
    ACKs up to the one natlb marks fast again: 3 packets each, seen with
    natlb's threads starved under SCHED_IDLE).  Counted on the client, each
    such SYN allows at most 5; without one, not a single packet but the SYNs
    is queued.

    With kernel decisions (lb.fastpath_decide, an rr service) not even the
    SYN is queued: the kernel places it and tells natlb, and a connection
    queues nothing (but a SYN the client sends again, and what follows it
    as above).  An lc service's SYN is still queued (natlb's live counts
    decide), whatever the setting."""
    scheduler, on = decide
    natlb(basic_config(testbed, scheduler=scheduler, family=family,
                       lb_extra=f"{FAST}\nfastpath_decide = {str(on).lower()}\n"
                       # A closed flow leaves the table after tcp_close (10 s):
                       # on a loaded machine the first ones did before the
                       # last connection ended (CI: 97 of 100 counted).
                       "[lb.timeouts]\ntcp_fin = 600\ntcp_close = 600"))
    placed = on and scheduler != "lc"
    vip, _ = family_addresses(family)
    table = f"nlfin{uuid.uuid4().hex[:6]}"
    queued_table = f"nlq{uuid.uuid4().hex[:6]}"
    nf, ip = ("ip6", "ip6") if family == 6 else ("ip", "ip")
    for rule in (f"add table {nf} {table}",
                 f"add chain {nf} {table} out {{ type filter hook output priority 0; }}",
                 f"add chain {nf} {table} in {{ type filter hook input priority 0; }}",
                 f"add rule {nf} {table} out {ip} daddr {vip} tcp dport 80 counter",
                 f"add rule {nf} {table} in {ip} saddr {vip} tcp sport 80 counter",
                 f"add rule {nf} {table} out {ip} daddr {vip} tcp dport 80 "
                 "tcp flags & (syn|ack) == syn counter"):
        assert testbed.client_cmd("nft", rule).returncode == 0, rule
    count_queued_by_kind(testbed, vip, queued_table)
    try:
        before, queued_before = status(testbed)["services"][0], queued_packets(testbed)
        n = 100
        res = testbed.client_run("http-stream", "--host", vip, "--port", "80", "--count",
                                 str(n), "--interval-ms", "10", "--timeout", "5")
        assert len(res) == n and all(r["ok"] for r in res), [r for r in res if not r["ok"]]
        # natlb applies the carried FINs shortly after they pass.
        deadline = time.monotonic() + 10
        while True:
            web = status(testbed)["services"][0]
            sent, got, syns = client_counters(testbed, nf, table)
            counted = (web["packets_in"] - before["packets_in"],
                       web["packets_out"] - before["packets_out"])
            if (web["active_flows"] == 0 and counted == (sent, got)) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.2)
        observer = status(testbed)["fastpath"]["observer"]
        kinds = queued_by_kind(testbed, queued_table)
        why = (web, kinds, observer, syns)
        assert web["active_flows"] == 0 and web["inactive_flows"] == n, why
        assert web["new_flows"] - before["new_flows"] == n, why
        assert counted == (sent, got), why
        queued = queued_packets(testbed) - queued_before
        decisions = status(testbed)["fastpath"]["decisions"]
        why = (*why, decisions)
        resent = syns - n
        assert syns >= n, why
        # Every queued packet is one the router counted by kind...
        assert sum(kinds.values()) == queued, why
        if placed:
            # ...every first SYN placed by the kernel, none queued, but
            # those the client sent again...
            assert decisions["placed"] == n and decisions["refused"] == 0, why
            assert kinds["client syn"] == resent, why
        else:
            # ...every SYN the client sent was queued (none carried)...
            assert decisions["placed"] == 0, why
            assert kinds["client syn"] == syns, why
        others = queued - kinds["client syn"]
        # ...and nothing else but the handshakes of the connections whose
        # SYN was sent again.
        assert others == 0 if resent == 0 else others <= 5 * resent, why
        assert observer["applied"] >= 4 * (n - resent) and observer["ring_full"] == 0, why
    finally:
        testbed.client_cmd("nft", "delete", "table", nf, table)
        testbed.router_cmd("nft", "delete", "table", "inet", queued_table)
