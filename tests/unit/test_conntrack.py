"""Conntrack through the public API: insert, lookup both ways, expiry, full table."""

from scapy.layers.inet import IP, TCP, UDP

from natlb.core import Core, CoreConfig, Verdict

from .services import BACKENDS, CLIENT, VIP, make_service

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


def test_full_table_drops_new_flows_and_counts():
    c = small_core(max_flows=4)
    for p in range(4):
        assert c.process(syn(2000 + p), 0)[0] == Verdict.REWRITE
    assert c.process(syn(2004), 0)[0] == Verdict.DROP
    assert c.reasons()["table_full"] == 1
    assert c.flow_count() == 4
    # SYN-state flows expire; their slots come back.
    assert c.sweep(5_001) == 4
    assert c.process(syn(2005), 5_001)[0] == Verdict.REWRITE


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
