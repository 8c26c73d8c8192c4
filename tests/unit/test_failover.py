"""Failover in the sans-IO core: held SYNs re-sent elsewhere, flows moved off
dead backends, RSTs for established flows, events for the control plane."""

import pytest
from scapy.layers.inet import IP, TCP, UDP

from natlb.core import PKT_CSUM_VERIFIED, PKT_HEAD_ONLY, Core, CoreConfig, Verdict

from .services import BACKENDS, CLIENT, VIP, make_service, many_syns
from .test_rewrite import checksums_ok


@pytest.fixture
def fcore():
    c = Core(CoreConfig(max_flows=1024, workers=1, syn_timeout_ms=50, resteer_tries=3,
                        fastpath=False))     # the fast path's resets: test_fastpath.py
    c.publish([make_service("rr")])
    yield c
    c.close()


def syn(sport=40000, flags="S", seq=1000):
    return bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags, seq=seq,
                                                 options=[("MSS", 1460)]))


def first_backend(c, sport=40000):
    v, out = c.process(syn(sport), 100)
    assert v == Verdict.REWRITE
    return IP(out).dst


def test_rst_to_syn_resends_held_syn_to_another_backend(fcore):
    b1 = first_backend(fcore)
    rst = IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="RA", ack=1001)
    v, _ = fcore.process(bytes(rst), 101)
    assert v == Verdict.DROP  # the client never sees the refusal
    resent = fcore.outbox_take()
    assert resent is not None and fcore.outbox_take() is None
    p = IP(resent)
    assert p.dst in BACKENDS and p.dst != b1
    assert (p.src, p[TCP].sport, p[TCP].dport, p[TCP].flags, p[TCP].seq) == (
        CLIENT, 40000, 8080, "S", 1000)
    assert p[TCP].options == [("MSS", 1460)]
    assert checksums_ok(resent)
    events = fcore.read_events()
    assert [(e.kind, e.backend_id, e.client) for e in events] == [
        ("syn_rst", BACKENDS.index(b1), CLIENT)]  # the client: for counting distinct ones
    # The new backend's SYN-ACK is rewritten back to the client from the VIP.
    synack = IP(src=p.dst, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", ack=1001)
    v, out = fcore.process(bytes(synack), 102)
    assert v == Verdict.REWRITE and IP(out).src == VIP
    assert fcore.failover_counters()["resteered"] == 1


def test_unanswered_syn_is_resent_after_timeout(fcore):
    b1 = first_backend(fcore)
    fcore.failover_tick(100 + 49)
    assert fcore.outbox_take() is None
    fcore.failover_tick(100 + 50)
    resent = fcore.outbox_take()
    assert resent is not None and IP(resent).dst not in (b1, VIP)
    assert [e.kind for e in fcore.read_events()] == ["syn_timeout"]


def test_syn_vouched_for_but_cut_is_not_held(fcore):
    # fuzz/crashes/nfq/syn-head-vouched-for: mark mode, the kernel verified the
    # checksum (no NFQA_SKB_INFO) and copied only the head of a SYN with data.
    # Holding it read past the head (ASan: heap-buffer-overflow in nl_hold_syn).
    whole = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S") / (b"d" * 60))
    v, _ = fcore.decide(whole[:60], 100, PKT_HEAD_ONLY | PKT_CSUM_VERIFIED)
    assert v == Verdict.MARK
    fcore.failover_tick(100 + 50)
    assert fcore.outbox_take() is None     # nothing held, so nothing re-sent


def test_late_synack_from_the_first_backend_is_dropped_and_that_backend_reset(fcore):
    b1 = first_backend(fcore)
    fcore.failover_tick(100 + 50)
    b2 = IP(fcore.outbox_take()).dst
    # The first backend was only slow: its SYN-ACK must not reach the client
    # (it carries the backend's address) and its half-open connection is reset.
    late = IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", seq=7000, ack=1001)
    v, _ = fcore.process(bytes(late), 160)
    assert v == Verdict.DROP
    rst = fcore.outbox_take()
    assert rst is not None and checksums_ok(rst)
    r = IP(rst)
    assert (r.src, r.dst, r[TCP].sport, r[TCP].dport, r[TCP].flags, r[TCP].seq) == (
        CLIENT, b1, 40000, 8080, "R", 1001)
    assert fcore.failover_counters()["late_synacks"] == 1
    # One that does not acknowledge the client's SYN is not believed: passed as before.
    forged = IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", ack=555)
    assert fcore.process(bytes(forged), 161)[0] == Verdict.ACCEPT
    assert fcore.outbox_take() is None
    # The backend the flow moved to still completes the handshake.
    synack = IP(src=b2, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", ack=1001)
    v, out = fcore.process(bytes(synack), 162)
    assert v == Verdict.REWRITE and IP(out).src == VIP


def test_answered_syn_is_not_resent(fcore):
    b1 = first_backend(fcore)
    fcore.process(bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA")), 110)
    fcore.failover_tick(1000)
    assert fcore.outbox_take() is None and fcore.read_events() == []


def test_resteer_gives_up_after_tries(fcore):
    first_backend(fcore)
    tried = set()
    for t in (150, 200, 250, 300):
        fcore.failover_tick(t)
        while (p := fcore.outbox_take()) is not None:
            tried.add(IP(p).dst)
    assert len(tried) == 2  # 3 tries in all: the first backend and two more
    assert fcore.failover_counters()["syn_resent"] == 2


def test_syn_retransmit_moves_off_dead_backend(fcore):
    b1 = first_backend(fcore)
    fcore.publish([make_service("rr", down=[b1])])
    v, out = fcore.process(syn(), 1100)
    assert v == Verdict.REWRITE and IP(out).dst != b1
    assert fcore.flow_count() == 1


def test_udp_flow_moves_on_next_packet_but_not_when_draining():
    c = Core(CoreConfig(max_flows=64, workers=1))
    c.publish([make_service("rr", protocol="udp", port=53, backend_port=53)])
    q = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"q")
    b1 = IP(c.process(q, 1)[1]).dst
    c.publish([make_service("rr", protocol="udp", port=53, backend_port=53, draining=[b1])])
    assert IP(c.process(q, 2)[1]).dst == b1  # draining keeps existing flows
    c.publish([make_service("rr", protocol="udp", port=53, backend_port=53, down=[b1])])
    b2 = IP(c.process(q, 3)[1]).dst
    assert b2 != b1 and IP(c.process(q, 4)[1]).dst == b2
    reply = IP(src=b2, dst=CLIENT) / UDP(sport=53, dport=5000) / b"a"
    v, back = c.process(bytes(reply), 5)
    assert v == Verdict.REWRITE and IP(back).src == VIP


def test_reset_backend_sends_in_window_rsts_both_ways(fcore):
    b1 = first_backend(fcore)
    fcore.process(bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA",
                                                       seq=5000, ack=1001)), 101)
    fcore.process(syn(flags="A", seq=1001), 102)
    data = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="PA", seq=1001) / (b"x" * 10)
    fcore.process(bytes(data), 103)
    resp = IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="PA", seq=5001) / (b"y" * 7)
    fcore.process(bytes(resp), 104)
    assert fcore.reset_backend(BACKENDS.index(b1)) == 1
    to_client, to_backend = IP(fcore.outbox_take()), IP(fcore.outbox_take())
    assert (to_client.src, to_client[TCP].sport, to_client.dst, to_client[TCP].dport) == (
        VIP, 80, CLIENT, 40000)
    assert to_client[TCP].flags == "R" and to_client[TCP].seq == 5008  # client's rcv_nxt
    assert (to_backend.dst, to_backend[TCP].dport, to_backend[TCP].seq) == (b1, 8080, 1011)
    assert checksums_ok(bytes(to_client)) and checksums_ok(bytes(to_backend))
    assert fcore.flow_count() == 0
    assert fcore.failover_counters()["resets_sent"] == 1


def test_reset_backend_skips_flows_closed_by_both_sides(fcore):
    b1 = first_backend(fcore)
    fcore.process(bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA")), 101)
    fcore.process(syn(flags="A", seq=1001), 102)
    fcore.process(syn(flags="FA", seq=1001), 103)
    fcore.process(bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="FA")), 104)
    assert fcore.reset_backend(BACKENDS.index(b1)) == 1  # forgotten ...
    assert fcore.outbox_take() is None                    # ... but nobody is reset


def icmp_about(inner, code=3, src=None):
    from scapy.layers.inet import ICMP

    src = src or IP(inner).dst
    return bytes(IP(src=src, dst=CLIENT) / ICMP(type=3, code=code) / inner[:28])


def test_icmp_port_unreachable_from_backend_is_an_event():
    c = Core(CoreConfig(max_flows=64, workers=1))
    c.publish([make_service("rr", protocol="udp", port=53, backend_port=53)])
    v, out = c.process(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"q"), 1)
    b1 = IP(out).dst
    v, _ = c.process(icmp_about(out), 2)
    assert v == Verdict.DROP  # it quotes the backend's address: not for the client
    assert [(e.kind, e.backend_id) for e in c.read_events()] == [
        ("icmp_unreachable", BACKENDS.index(b1))]


def test_icmp_host_unreachable_resteers_a_pending_syn(fcore):
    _, out = fcore.process(syn(), 100)
    b1 = IP(out).dst
    v, _ = fcore.process(icmp_about(out, code=1, src="203.0.113.1"), 101)
    assert v == Verdict.DROP
    resent = fcore.outbox_take()
    assert resent is not None and IP(resent).dst not in (b1, VIP)


def test_icmp_not_about_a_flow_passes(fcore):
    stray = bytes(IP(src=CLIENT, dst="203.0.113.10") / UDP(sport=1, dport=2) / b"x")
    assert fcore.process(icmp_about(stray), 1)[0] == Verdict.ACCEPT
    _, out = fcore.process(syn(), 2)
    # "Fragmentation needed" is path MTU news, not a failure.
    assert fcore.process(icmp_about(out, code=4), 3)[0] == Verdict.ACCEPT
    assert fcore.read_events() == []


def test_frag_needed_about_a_reply_is_relayed_to_its_backend(fcore):
    from scapy.layers.inet import ICMP, IPerror, TCPerror

    b1 = first_backend(fcore)
    reply = IP(src=b1, dst=CLIENT, flags="DF") / TCP(sport=8080, dport=40000, flags="A",
                                                      seq=777) / (b"z" * 1400)
    v, out = fcore.process(bytes(reply), 101)
    assert IP(out).src == VIP
    # A router on the client's side cannot forward it and tells the sender,
    # which it takes to be the VIP.
    icmp = IP(src="198.51.100.1", dst=VIP) / ICMP(type=3, code=4, nexthopmtu=1400) / out[:28]
    v, _ = fcore.process(bytes(icmp), 102)
    assert v == Verdict.DROP
    # Mark mode sees only the first 128 bytes of an ICMP quoting 576.
    big = IP(src="198.51.100.1", dst=VIP) / ICMP(type=3, code=4, nexthopmtu=1400) / out[:548]
    assert fcore.decide(bytes(big)[:128], 103, PKT_HEAD_ONLY) == (Verdict.DROP, 0)
    assert fcore.outbox_take() is not None
    sent = fcore.outbox_take()
    got = IP(sent)
    assert (got.src, got.dst) == ("198.51.100.1", b1)
    assert (got[ICMP].type, got[ICMP].code, got[ICMP].nexthopmtu) == (3, 4, 1400)
    inner = got[IPerror]
    assert (inner.src, inner.dst, got[TCPerror].sport, got[TCPerror].dport,
            got[TCPerror].seq) == (b1, CLIENT, 8080, 40000, 777)
    # Every checksum (outer IP, ICMP, quoted IP) as scapy computes it.
    again = IP(sent)
    del again.chksum, again[ICMP].chksum, again[IPerror].chksum
    assert bytes(IP(bytes(again))) == sent
    assert fcore.failover_counters()["pmtu_relayed"] == 2


# ---- events: no lost wakeups, a full ring keeps the newest ----------------------

def udp_core_with_icmp():
    """A UDP flow and an ICMP port unreachable about it: one event per copy."""
    c = Core(CoreConfig(max_flows=64, workers=1))
    c.publish([make_service("rr", protocol="udp", port=53, backend_port=53)])
    _, out = c.process(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"q"), 1)
    return c, icmp_about(out)


def readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_more_events_than_one_read_are_all_delivered():
    c, icmp = udp_core_with_icmp()
    for t in range(300):
        c.process(icmp, 10 + t)
    assert readable(c.event_fd())
    events = c.read_events(max_events=256)
    assert [e.time_ms for e in events] == list(range(10, 310))
    assert not readable(c.event_fd())      # all taken: the signal is cleared
    c.process(icmp, 400)
    assert readable(c.event_fd()) and len(c.read_events()) == 1
    c.close()


def test_full_event_ring_drops_the_oldest_and_counts():
    c, icmp = udp_core_with_icmp()
    for t in range(1024 + 10):
        c.process(icmp, 10 + t)
    events = c.read_events()
    assert len(events) == 1024
    assert events[0].time_ms == 20 and events[-1].time_ms == 10 + 1033   # newest kept
    assert c.failover_counters()["events_lost"] == 10
    c.close()


# ---- held SYNs go with their flows; a full ring is counted -----------------------

def test_evicted_flow_takes_its_held_syn_with_it():
    c = Core(CoreConfig(max_flows=2, workers=1, syn_timeout_ms=50))
    c.publish([make_service("rr")])
    c.process(syn(40000), 100)
    c.process(syn(40001), 101)
    c.process(syn(40002), 102)                # evicts 40000, the oldest
    assert c.conntrack_counters()["evicted_tcp"] == 1
    c.failover_tick(150)                      # 40000's deadline passed: nothing
    assert c.outbox_take() is None and c.read_events() == []
    c.failover_tick(151)                      # 40001's: re-sent as usual
    resent = c.outbox_take()
    assert resent is not None and IP(resent)[TCP].sport == 40001
    c.close()


def test_held_ring_overflow_is_counted():
    c = Core(CoreConfig(max_flows=10_000, workers=1, syn_timeout_ms=1000))
    c.publish([make_service("rr")])
    batch = c.process_many(many_syns(9000), now_ms=1)
    assert c.process_batch(batch) == 9000
    assert c.failover_counters()["held_lost"] == 9000 - 8192
    c.close()


def test_tick_ignores_a_held_entry_whose_flow_was_freed_and_reused():
    c = Core(CoreConfig(max_flows=1, workers=1, syn_timeout_ms=50))
    c.publish([make_service("rr")])
    c.process(syn(40000), 100)
    # Another client's SYN takes the only entry (the first one is evicted).
    other = bytes(IP(src="198.51.100.99", dst=VIP) / TCP(sport=40000, dport=80, flags="S"))
    c.process(other, 120)
    c.failover_tick(150)
    assert c.outbox_take() is None and c.read_events() == []
    c.failover_tick(170)
    assert IP(c.outbox_take()).src == "198.51.100.99"
    c.close()
