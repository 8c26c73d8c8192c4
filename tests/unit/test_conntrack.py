"""Conntrack through the public API: insert, lookup both ways, expiry, full table."""

from scapy.layers.inet import IP, TCP, UDP

from natlb.core import Core, CoreConfig, Verdict

from .services import BACKENDS, CLIENT, VIP, make_service, many_syns

TIMEOUTS = {"tcp_syn": 5_000, "tcp_established": 60_000, "tcp_fin": 3_000,
            "tcp_close": 1_000, "udp": 2_000}


def small_core(max_flows=8):
    c = Core(CoreConfig(max_flows=max_flows, workers=1, timeouts_ms=TIMEOUTS))
    c.publish([make_service(), make_service(protocol="udp", port=53, sid=1)])
    return c


def syn(sport, flags="S"):
    return bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags))


def open_flow(c, sport, t):
    v, out = c.process(syn(sport), t)
    assert v == Verdict.REWRITE
    backend = IP(out).dst
    v, _ = c.process(bytes(IP(src=backend, dst=CLIENT) / TCP(sport=8080, dport=sport,
                                                             flags="SA")), t)
    assert v == Verdict.REWRITE
    v, _ = c.process(syn(sport, "A"), t)
    assert v == Verdict.REWRITE
    return backend


def test_flow_sticks_to_its_backend():
    c = small_core()
    backend = open_flow(c, 1000, 0)
    for t in range(1, 50):
        v, out = c.process(syn(1000, "PA"), t)
        assert v == Verdict.REWRITE and IP(out).dst == backend
    assert c.flow_count() == 1


def test_established_expires_after_timeout_and_sweep_frees():
    c = small_core()
    open_flow(c, 1001, 0)
    assert c.process(syn(1001, "A"), 59_000)[0] == Verdict.REWRITE
    assert c.sweep(59_000 + 59_999) == 0
    assert c.process(syn(1001, "A"), 59_000 + 60_001)[0] == Verdict.DROP  # expired: no flow
    assert c.sweep(59_000 + 60_001) == 1
    assert c.flow_count() == 0
    assert c.backend_counters(3)[0].active_flows + c.backend_counters(3)[1].active_flows == 0


def test_rst_shortens_timeout():
    c = small_core()
    open_flow(c, 1002, 0)
    c.process(syn(1002, "R"), 10)
    # Established would last 60 s; after RST the entry is gone after 1 s.
    assert c.process(syn(1002, "A"), 10 + 1_001)[0] == Verdict.DROP


def test_fin_moves_flow_from_active_to_inactive():
    c = small_core()
    backend = open_flow(c, 1004, 0)
    i = BACKENDS.index(backend)

    def gauges():
        b = c.backend_counters(3)[i]
        return b.active_flows, b.inactive_flows

    assert gauges() == (1, 0)
    c.process(syn(1004, "FA"), 5)
    assert gauges() == (0, 1)
    c.sweep(5 + 3_001)
    assert gauges() == (0, 0)


def test_syn_after_fin_starts_new_flow():
    c = small_core()
    open_flow(c, 1003, 0)
    c.process(syn(1003, "FA"), 5)
    v, _ = c.process(syn(1003), 6)
    assert v == Verdict.REWRITE
    assert c.flow_count() == 1
    assert c.service_counters(1)[0].new_flows == 2


def test_full_table_of_established_flows_drops_new_ones_and_counts():
    c = small_core(max_flows=4)
    for p in range(4):
        open_flow(c, 2000 + p, 0)
    assert c.process(syn(2004), 1)[0] == Verdict.DROP
    assert c.reasons()["table_full"] == 1 and c.flow_count() == 4
    assert c.conntrack_counters() == {"reclaimed": 0, "evicted_tcp": 0, "evicted_udp": 0}
    for p in range(4):   # no established flow was touched
        assert c.process(syn(2000 + p, "A"), 2)[0] == Verdict.REWRITE


def test_full_table_evicts_the_least_recently_active_embryonic_flow():
    c = small_core(max_flows=4)
    open_flow(c, 2100, 0)                     # established: never evicted
    for t, p in ((1, 2101), (2, 2102), (3, 2103)):
        assert c.process(syn(p), t)[0] == Verdict.REWRITE
    c.process(syn(2101), 4)                   # a retransmission: now the newest
    assert c.process(syn(2104), 5)[0] == Verdict.REWRITE
    assert c.conntrack_counters()["evicted_tcp"] == 1 and c.flow_count() == 4
    # 2102 was the oldest embryonic flow: it is gone, the others are not.
    assert c.process(syn(2102, "A"), 6)[0] == Verdict.DROP
    for p in (2100, 2101, 2103, 2104):
        assert c.process(syn(p, "A"), 6)[0] == Verdict.REWRITE


def test_syn_recv_is_embryonic_until_the_client_acks():
    """A spoofed SYN's backend answers SYN-ACK to nobody: still evictable."""
    c = small_core(max_flows=2)
    _, out = c.process(syn(2200), 0)
    c.process(bytes(IP(src=IP(out).dst, dst=CLIENT) / TCP(sport=8080, dport=2200,
                                                          flags="SA")), 0)
    open_flow(c, 2201, 1)
    assert c.process(syn(2202), 2)[0] == Verdict.REWRITE
    assert c.conntrack_counters()["evicted_tcp"] == 1
    assert c.process(syn(2201, "A"), 3)[0] == Verdict.REWRITE


def test_unanswered_udp_is_evicted_answered_udp_is_not():
    c = small_core(max_flows=2)

    def q(sport):
        return bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=sport, dport=53) / b"q")

    _, out = c.process(q(7100), 0)
    c.process(bytes(IP(src=IP(out).dst, dst=CLIENT) / UDP(sport=8080, dport=7100) / b"a"), 0)
    c.process(q(7101), 1)                     # nobody answers this one
    assert c.process(q(7102), 2)[0] == Verdict.REWRITE
    assert c.conntrack_counters()["evicted_udp"] == 1
    assert c.process(q(7103), 3)[0] == Verdict.REWRITE   # evicts 7102, not 7100
    reply = IP(src=IP(out).dst, dst=CLIENT) / UDP(sport=8080, dport=7100) / b"a"
    assert c.process(bytes(reply), 4)[0] == Verdict.REWRITE


def test_expired_flows_are_reclaimed_by_a_new_flow_before_any_sweep():
    """Issue 9: 64/64 expired UDP flows made a new flow fail as table_full."""
    c = small_core(max_flows=64)
    for p in range(64):
        q = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=7000 + p, dport=53))
        _, out = c.process(q, 0)
        c.process(bytes(IP(src=IP(out).dst, dst=CLIENT) / UDP(sport=8080, dport=7000 + p)), 0)
    later = 2_001                             # the UDP timeout is 2 s; no sweep ran
    again = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=7000, dport=53))   # its own tuple
    assert c.process(again, later)[0] == Verdict.REWRITE
    fresh = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=9999, dport=53))
    assert c.process(fresh, later)[0] == Verdict.REWRITE
    assert c.reasons()["table_full"] == 0
    assert c.conntrack_counters()["reclaimed"] >= 2


def test_syn_flood_of_three_times_the_table_cannot_starve_real_clients():
    """6,000 spoofed SYNs into 2,000 flows, 20 connections held open, and 30
    real clients connecting in the middle of it: all 30 get through."""
    c = Core(CoreConfig(max_flows=2000, workers=1, syn_timeout_ms=100))
    c.publish([make_service()])
    held = [open_flow(c, 30000 + i, 0) for i in range(20)]
    spoofed = many_syns(6000, src=lambda i: f"198.51.100.{10 + i % 200}")
    ok = 0
    for i in range(6000):
        t = 1 + i // 10                       # 6,000 SYNs over 600 ms
        c.process(spoofed[i], t)
        if i % 200 == 100:                    # a real client, mid-flood
            sport = 40000 + i
            v, out = c.process(syn(sport), t)
            if v != Verdict.REWRITE:
                continue
            c.process(spoofed[i + 1], t)      # the flood goes on during the handshake
            synack = IP(src=IP(out).dst, dst=CLIENT) / TCP(sport=8080, dport=sport, flags="SA")
            ok += (c.process(bytes(synack), t)[0] == Verdict.REWRITE and
                   c.process(syn(sport, "A"), t)[0] == Verdict.REWRITE)
    assert ok == 30
    for i, backend in enumerate(held):
        v, out = c.process(syn(30000 + i, "A"), 700)
        assert v == Verdict.REWRITE and IP(out).dst == backend
    evicted = c.conntrack_counters()["evicted_tcp"]
    assert evicted >= 6000 + 30 - 2000 and c.reasons()["table_full"] == 0
    c.close()


def test_udp_timeout_refreshed_by_traffic():
    c = small_core()
    q = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=7000, dport=53))
    _, out = c.process(q, 0)
    backend = IP(out).dst
    for t in (1_500, 3_000, 4_500):
        v, out = c.process(q, t)
        assert v == Verdict.REWRITE and IP(out).dst == backend
    assert c.flow_count() == 1
    c.sweep(4_500 + 2_001)
    assert c.flow_count() == 0


def test_memory_bound():
    assert Core.entry_size() <= 128
    c = Core(CoreConfig(max_flows=1_000_000, workers=1))
    assert c.conntrack_memory() <= 256 << 20
    c.close()
