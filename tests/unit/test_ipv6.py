"""IPv6 through the C core on scapy-built packets: parsing with extension
headers, rewriting with the L4 checksum over the IPv6 pseudo-header (bytes
and checksums checked by scapy), both modes, conntrack, failover, ICMPv6 and
malformed input.  An IPv4 service beside an IPv6 one keeps its own flows."""

import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from natlb.core import (
    MARK_FAST,
    MARK_FORWARD,
    MARK_REPLY,
    PKT_CSUM_PARTIAL,
    PKT_CSUM_VERIFIED,
    PKT_GSO,
    PKT_HEAD_ONLY,
    BackendEntry,
    Core,
    CoreConfig,
    CoreError,
    ServiceTable,
    Verdict,
)
from natlb.schedulers import Candidate, build_table

from .services import BACKENDS6, CLIENT, CLIENT6, VIP, VIP6, make_service


def v6_service(scheduler="rr", port=80, backend_port=8080, protocol="tcp", sid=0,
               addrs=BACKENDS6, down=(), vip=VIP6, cluster=False):
    entries = tuple(BackendEntry(a, backend_port, 1, sid * 16 + i, a not in down, a not in down)
                    for i, a in enumerate(addrs))
    cands = [Candidate(f"[{b.address}]:{b.port}", b.weight, b.eligible) for b in entries]
    return ServiceTable(vip, port, protocol, scheduler, sid, entries,
                        tuple(build_table(scheduler, cands)), cluster)


def l4_of(pkt):
    return pkt[TCP] if TCP in pkt else pkt[UDP]


def checksum_ok(raw: bytes) -> bool:
    """scapy recomputes the L4 checksum (pseudo-header included) and agrees."""
    pkt = IPv6(raw)
    got = l4_of(pkt).chksum
    del l4_of(pkt).chksum
    return l4_of(IPv6(bytes(pkt))).chksum == got


def syn6(sport=40000, flags="S", seq=1000, src=CLIENT6, dst=VIP6, dport=80, ext=None,
         data=b"", **kw):
    ip = IPv6(src=src, dst=dst)
    if ext is not None:
        ip = ip / ext
    return bytes(ip / TCP(sport=sport, dport=dport, flags=flags, seq=seq, **kw) / data)


@pytest.fixture
def core6():
    # Every packet decided as if queued (tests/unit/test_fastpath.py has the
    # fast path over both families).
    c = Core(CoreConfig(max_flows=1024, workers=1, syn_timeout_ms=50, resteer_tries=3,
                        fastpath=False))
    c.publish([v6_service()])
    yield c
    c.check_table()
    c.close()


EXT_CASES = [
    ("plain", None),
    ("hop-by-hop", IPv6ExtHdrHopByHop()),
    ("destination options", IPv6ExtHdrDestOpt()),
    ("routing, no segments left", IPv6ExtHdrRouting(addresses=[], segleft=0)),
    ("all three", IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() /
     IPv6ExtHdrRouting(addresses=[], segleft=0)),
]


@pytest.mark.parametrize("name,ext", EXT_CASES, ids=[c[0] for c in EXT_CASES])
def test_forward_and_reply_rewrite_addresses_ports_and_checksum(core6, name, ext):
    pkt = syn6(ext=ext, options=[("MSS", 1440), ("SAckOK", b"")], data=b"x" * 101)
    v, out = core6.process(pkt, 1000)
    assert v == Verdict.REWRITE
    got = IPv6(out)
    assert got.src == CLIENT6 and got.dst in BACKENDS6
    assert (got[TCP].sport, got[TCP].dport) == (40000, 8080)
    assert bytes(got[TCP].payload) == b"x" * 101
    assert len(out) == len(pkt) and checksum_ok(out)
    # Only the address, the port and the checksum changed.
    changed = [i for i in range(len(pkt)) if pkt[i] != out[i]]
    l4 = len(pkt) - len(bytes(IPv6(pkt)[TCP]))
    assert all(24 <= i < 40 or i in (l4 + 2, l4 + 3, l4 + 16, l4 + 17) for i in changed)
    reply = IPv6(src=got.dst, dst=CLIENT6)
    if ext is not None:
        reply = reply / ext
    reply = reply / TCP(sport=8080, dport=40000, flags="SA", ack=1001) / Raw(b"hello")
    v, back = core6.process(bytes(reply), 1001)
    assert v == Verdict.REWRITE
    got = IPv6(back)
    assert (got.src, got[TCP].sport, got.dst, got[TCP].dport) == (VIP6, 80, CLIENT6, 40000)
    assert bytes(got[TCP].payload) == b"hello" and checksum_ok(back)


def test_udp_both_directions_and_zero_checksum_never_emitted(core6):
    core6.publish([v6_service(protocol="udp", port=53, backend_port=5353)])
    q = bytes(IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5000, dport=53) / b"query")
    v, out = core6.process(q, 1)
    assert v == Verdict.REWRITE and IPv6(out)[UDP].dport == 5353 and checksum_ok(out)
    backend = IPv6(out).dst
    r = bytes(IPv6(src=backend, dst=CLIENT6) / UDP(sport=5353, dport=5000) / b"answer")
    v, back = core6.process(r, 2)
    assert v == Verdict.REWRITE and IPv6(back).src == VIP6 and checksum_ok(back)
    # A reply whose rewritten checksum comes out as 0 gets 0xffff (RFC 8200 8.1).
    target = IPv6(src=VIP6, dst=CLIENT6) / UDP(sport=53, dport=5000) / (b"\0\0" + b"z" * 9)
    target = IPv6(bytes(target))
    want = target[UDP].chksum           # with the two free bytes at zero
    # Adding word x to the sum turns the checksum into ~(~want + x): pick x
    # so that the sum is 0xffff, i.e. the checksum 0.
    x = want if want != 0xffff else 0
    payload = struct.pack("!H", x) + b"z" * 9
    r = bytes(IPv6(src=backend, dst=CLIENT6) / UDP(sport=5353, dport=5000) / payload)
    v, back = core6.process(r, 3)
    assert v == Verdict.REWRITE and IPv6(back)[UDP].chksum == 0xFFFF and checksum_ok(back)


def test_udp_without_checksum_is_dropped_as_bad_checksum(core6):
    core6.publish([v6_service(protocol="udp", port=53, backend_port=53)])
    raw = bytearray(bytes(IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5001, dport=53) / b"q"))
    raw[46:48] = b"\0\0"
    for flags in (0, PKT_CSUM_VERIFIED):
        v, out = core6.process(bytes(raw), 1, flags)
        assert v == Verdict.DROP and out == bytes(raw)
    assert core6.reasons()["bad_checksum"] == 2 and core6.flow_count() == 0


def test_bad_tcp_checksum_dropped_unless_the_kernel_vouched(core6):
    raw = bytearray(syn6())
    raw[40 + 16] ^= 0x55
    assert core6.process(bytes(raw), 1)[0] == Verdict.DROP
    assert core6.reasons()["bad_checksum"] == 1
    v, out = core6.process(bytes(raw), 2, PKT_CSUM_VERIFIED)
    assert v == Verdict.REWRITE


def test_partial_and_gso_checksums(core6):
    pkt = IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=41000, dport=80, flags="S") / Raw(b"d" * 64)
    raw = bytearray(bytes(pkt))
    # CHECKSUM_PARTIAL: the field holds the (uncomplemented) pseudo-header sum.
    def pseudo(b):
        words = struct.unpack("!16H", bytes(b[8:40]))
        s = sum(words) + 6 + (len(b) - 40)
        while s >> 16:
            s = (s & 0xFFFF) + (s >> 16)
        return s
    raw[56:58] = struct.pack("!H", pseudo(raw))
    v, out = core6.process(bytes(raw), 1, PKT_CSUM_PARTIAL)
    assert v == Verdict.REWRITE and checksum_ok(out)       # finished in full
    raw2 = bytearray(bytes(IPv6(src=CLIENT6, dst=VIP6) /
                           TCP(sport=41001, dport=80, flags="S") / Raw(b"d" * 64)))
    raw2[56:58] = struct.pack("!H", pseudo(raw2))
    v, out = core6.process(bytes(raw2), 1, PKT_CSUM_PARTIAL | PKT_GSO)
    assert v == Verdict.REWRITE
    assert struct.unpack("!H", out[56:58])[0] == pseudo(bytearray(out))


def test_mark_mode_gives_ipv6_the_same_marks_and_fast_bits_as_ipv4():
    """One exchange over each family: the same verdicts and marks, and the
    fast bit (the kernel carries the flow) on the same packets; a packet
    with an extension header is marked all the same (the kernel leaves it
    to natlb: csrc/bpf/fastpath.bpf.c)."""
    c = Core(CoreConfig(max_flows=64, workers=1, fastpath=True))
    c.publish([v6_service(sid=3), make_service(sid=1)])
    backends4 = ["203.0.113.10", "203.0.113.11", "203.0.113.12"]

    def exchange(ip, client, vip, backends, sid):
        def tcp(src, dst, sport, dport, flags, seq, ack=0):
            return bytes(ip(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags,
                                                    seq=seq, ack=ack))
        v, mark = c.decide(tcp(client, vip, 40000, 80, "S", 1000), 1, PKT_HEAD_ONLY)
        out = [(v, mark & ~0xFFFFF)]
        backend = backends[(mark & 0xFFFFF) - sid * 16]
        for t, pkt in enumerate((tcp(backend, client, 8080, 40000, "SA", 5000, 1001),
                                 tcp(client, vip, 40000, 80, "A", 1001, 5001),
                                 tcp(client, vip, 40000, 80, "PA", 1001, 5001),
                                 tcp(backend, client, 8080, 40000, "A", 5001, 1001),
                                 tcp(client, vip, 40000, 80, "FA", 1001, 5001)), 2):
            v, mark = c.decide(pkt, t)
            out.append((v, mark & ~0xFFFFF))
        return out

    v6 = exchange(IPv6, CLIENT6, VIP6, BACKENDS6, 3)
    assert v6 == exchange(IP, CLIENT, VIP, backends4, 1)
    fast, fwd = MARK_FORWARD | MARK_FAST, MARK_FORWARD
    assert v6 == [(Verdict.MARK, m) for m in (fast, MARK_REPLY, fast, fast, MARK_REPLY, fwd)]
    ext = syn6(sport=40001, ext=IPv6ExtHdrDestOpt())
    v, mark = c.decide(ext, 8)
    assert v == Verdict.MARK and mark & ~0xFFFFF == fast
    c.close()


def test_conntrack_states_and_gauges(core6):
    v, out = core6.process(syn6(), 1)
    backend = IPv6(out).dst
    bid = BACKENDS6.index(backend)
    assert core6.backend_counters(3)[bid].active_flows == 1
    core6.process(bytes(IPv6(src=backend, dst=CLIENT6) /
                        TCP(sport=8080, dport=40000, flags="SA", seq=5000, ack=1001)), 2)
    core6.process(syn6(flags="A", seq=1001, ack=5001), 3)
    # A non-SYN of an unknown flow is dropped; a FIN moves the flow to inactive.
    assert core6.process(syn6(sport=40001, flags="A"), 4)[0] == Verdict.DROP
    core6.process(syn6(flags="FA", seq=1001, ack=5001), 5)
    c = core6.backend_counters(3)[bid]
    assert (c.active_flows, c.inactive_flows, c.new_flows) == (0, 1, 1)
    assert core6.reasons()["no_flow"] == 1
    core6.sweep(10**7)
    assert core6.flow_count() == 0


def test_ipv4_and_ipv6_services_on_one_config_keep_apart(core6):
    core6.publish([v6_service(sid=0), make_service(sid=1)])
    v6, out6 = core6.process(syn6(sport=5555), 1)
    v4, out4 = core6.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=5555, dport=80,
                                                                 flags="S")), 1)
    assert v6 == v4 == Verdict.REWRITE
    assert IPv6(out6).dst in BACKENDS6 and IP(out4).dst.startswith("203.0.113.")
    assert core6.flow_count() == 2
    sc = core6.service_counters(2)
    assert sc[0].new_flows == 1 and sc[1].new_flows == 1


def test_a_backend_of_the_other_family_is_refused(core6):
    with pytest.raises(CoreError, match="address family"):
        core6.publish([v6_service(addrs=["203.0.113.10"])])
    with pytest.raises(CoreError, match="IPv4-mapped"):
        core6.publish([v6_service(addrs=["::ffff:203.0.113.10"])])


@pytest.mark.parametrize("scheduler", ["sh", "maglev"])
def test_hashing_schedulers_use_the_whole_address(scheduler):
    c = Core(CoreConfig(max_flows=4096, workers=1))
    addrs = [f"2001:db8:113::{i:x}" for i in range(1, 9)]
    c.publish([v6_service(scheduler, addrs=addrs)])
    seen = set()
    # Clients that differ only in the high words (their /64) still spread.
    for i in range(64):
        src = f"2001:db8:{i:x}::7"
        v, out = c.process(syn6(src=src, sport=1000), 1)
        seen.add(IPv6(out).dst)
        v, again = c.process(syn6(src=src, sport=1000 + (scheduler == "sh")), 1)
        if scheduler == "sh":
            assert IPv6(again).dst == IPv6(out).dst     # same client, same backend
    assert len(seen) >= 5
    c.close()


MALFORMED = [
    ("shorter than the fixed header", syn6()[:39]),
    ("payload length beyond the buffer", syn6()[:50]),
    ("extension header past the end",
     bytes(IPv6(src=CLIENT6, dst=VIP6, nh=60, plen=4) / Raw(b"\x06\x05\0\0"))),
    ("hop-by-hop not first", syn6(ext=IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop())),
    ("nine extension headers", syn6(ext=IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                                    IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                                    IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                                    IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() /
                                    IPv6ExtHdrDestOpt())),
    ("two fragment headers", syn6(ext=IPv6ExtHdrFragment() / IPv6ExtHdrFragment())),
    ("mapped source", syn6(src="::ffff:198.51.100.7")),
    ("TCP header cut", syn6()[:40 + 12]),
]


@pytest.mark.parametrize("name,raw", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_is_counted_and_dropped(core6, name, raw):
    raw = bytearray(raw)
    if name != "payload length beyond the buffer" and len(raw) >= 40:
        raw[4:6] = struct.pack("!H", len(raw) - 40)
    v, out = core6.process(bytes(raw), 1)
    assert v == Verdict.DROP and out == bytes(raw)
    assert core6.reasons()["malformed"] == 1 and core6.flow_count() == 0


def test_eight_extension_headers_are_still_read(core6):
    ext = IPv6ExtHdrHopByHop()
    for _ in range(7):
        ext = ext / IPv6ExtHdrDestOpt()
    v, out = core6.process(syn6(ext=ext), 1)
    assert v == Verdict.REWRITE and checksum_ok(out)


@pytest.mark.parametrize("name,raw", [
    ("routing header with segments left",
     syn6(ext=IPv6ExtHdrRouting(addresses=["2001:db8::5"], segleft=1))),
    ("ESP", bytes(IPv6(src=CLIENT6, dst=VIP6, nh=50) / Raw(b"\0" * 16))),
    ("no next header", bytes(IPv6(src=CLIENT6, dst=VIP6, nh=59))),
])
def test_what_natlb_cannot_read_passes_untouched(core6, name, raw):
    v, out = core6.process(raw, 1)
    assert v == Verdict.ACCEPT and out == raw
    assert core6.reasons()["unsupported"] == 1


def test_every_truncation_of_a_packet_with_extension_headers_is_safe(core6):
    raw = syn6(ext=IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(), options=[("MSS", 1400)])
    for n in range(len(raw)):
        for flags in (0, PKT_HEAD_ONLY):
            core6.process(raw[:n], 1, flags)
            core6.decide(raw[:n], 1, flags)
    assert core6.flow_count() == 0


def test_mark_mode_head_must_hold_the_headers(core6):
    raw = syn6(ext=IPv6ExtHdrDestOpt(options=[]) / IPv6ExtHdrDestOpt(), options=[("MSS", 1400)])
    v, mark = core6.decide(raw[:40 + 16 + 24], 1, PKT_HEAD_ONLY)
    assert v == Verdict.MARK
    v, _ = core6.decide(raw[:40 + 8], 2, PKT_HEAD_ONLY)
    assert v == Verdict.DROP and core6.reasons()["malformed"] == 1


# ---- failover ------------------------------------------------------------


def first_backend(c, sport=40000):
    v, out = c.process(syn6(sport, options=[("MSS", 1440)]), 100)
    assert v == Verdict.REWRITE
    return IPv6(out).dst


def test_rst_to_syn_resends_the_held_syn_to_another_backend(core6):
    b1 = first_backend(core6)
    rst = IPv6(src=b1, dst=CLIENT6) / TCP(sport=8080, dport=40000, flags="RA", ack=1001)
    assert core6.process(bytes(rst), 101)[0] == Verdict.DROP
    resent = core6.outbox_take()
    assert resent is not None and core6.outbox_take() is None
    p = IPv6(resent)
    assert p.dst in BACKENDS6 and p.dst != b1
    assert (p.src, p[TCP].sport, p[TCP].dport, p[TCP].flags, p[TCP].seq) == (
        CLIENT6, 40000, 8080, "S", 1000)
    assert p[TCP].options == [("MSS", 1440)] and checksum_ok(resent)
    assert [(e.kind, e.client) for e in core6.read_events()] == [("syn_rst", CLIENT6)]
    synack = IPv6(src=p.dst, dst=CLIENT6) / TCP(sport=8080, dport=40000, flags="SA", ack=1001)
    v, out = core6.process(bytes(synack), 102)
    assert v == Verdict.REWRITE and IPv6(out).src == VIP6
    # The first backend was only slow: its late SYN-ACK is dropped and it gets an RST.
    late = IPv6(src=b1, dst=CLIENT6) / TCP(sport=8080, dport=40000, flags="SA", seq=7000,
                                          ack=1001)
    assert core6.process(bytes(late), 103)[0] == Verdict.DROP
    rst = IPv6(core6.outbox_take())
    assert (rst.src, rst.dst, rst[TCP].sport, rst[TCP].dport, rst[TCP].flags,
            rst[TCP].seq) == (CLIENT6, b1, 40000, 8080, "R", 1001)
    assert checksum_ok(bytes(rst))
    assert core6.failover_counters()["late_synacks"] == 1


def test_unanswered_syn_is_resent_after_timeout(core6):
    b1 = first_backend(core6)
    core6.failover_tick(150)
    p = IPv6(core6.outbox_take())
    assert p.dst != b1 and p[TCP].flags == "S" and checksum_ok(bytes(p))
    assert [e.kind for e in core6.read_events()] == ["syn_timeout"]


def test_reset_backend_sends_ipv6_rsts_both_ways(core6):
    b1 = first_backend(core6)
    core6.process(bytes(IPv6(src=b1, dst=CLIENT6) /
                        TCP(sport=8080, dport=40000, flags="SA", seq=5000, ack=1001)), 101)
    core6.process(syn6(flags="A", seq=1001, ack=5001), 102)
    core6.process(syn6(flags="PA", seq=1001, ack=5001, data=b"abc"), 103)
    assert core6.reset_backend(BACKENDS6.index(b1)) == 1
    to_client, to_backend = IPv6(core6.outbox_take()), IPv6(core6.outbox_take())
    assert (to_client.src, to_client.dst, to_client[TCP].sport, to_client[TCP].seq) == (
        VIP6, CLIENT6, 80, 5001)
    assert (to_backend.src, to_backend.dst, to_backend[TCP].dport, to_backend[TCP].seq) == (
        CLIENT6, b1, 8080, 1004)
    for p in (to_client, to_backend):
        assert p[TCP].flags == "R" and p.plen == 20 and checksum_ok(bytes(p))
    assert core6.flow_count() == 0


# ---- ICMPv6 ----------------------------------------------------------------


def test_packet_too_big_about_a_reply_is_relayed_to_its_backend(core6):
    b1 = first_backend(core6)
    # What the client's router saw: the reply from the VIP, with data.
    seg = IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40000, flags="PA", seq=5001,
                                            ack=1001) / Raw(b"y" * 1400)
    router = "2001:db8:1::1"
    ptb = IPv6(src=router, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / Raw(bytes(seg)[:1232])
    assert core6.process(bytes(ptb), 101)[0] == Verdict.DROP
    out = core6.outbox_take()
    assert out is not None and len(out) <= 128
    got = IPv6(out)
    assert (got.src, got.dst) == (router, b1) and got.plen == len(out) - 40
    icmp = got[ICMPv6PacketTooBig]
    assert icmp.mtu == 1280
    chk = icmp.cksum
    del icmp.cksum
    assert IPv6(bytes(got))[ICMPv6PacketTooBig].cksum == chk     # ICMPv6 checksum
    quoted = bytes(icmp.payload)
    inner = IPv6(quoted)
    assert (inner.src, inner.dst) == (b1, CLIENT6)
    assert struct.unpack("!HHI", quoted[40:48]) == (8080, 40000, 5001)
    # The quoted TCP checksum is the backend's own: the same packet from b1.
    own = IPv6(src=b1, dst=CLIENT6) / TCP(sport=8080, dport=40000, flags="PA", seq=5001,
                                          ack=1001) / Raw(b"y" * 1400)
    assert quoted[40 + 16:40 + 18] == bytes(own)[56:58]
    assert quoted == bytes(own)[:len(quoted)]
    assert core6.failover_counters()["pmtu_relayed"] == 1


def test_packet_too_big_about_no_flow_passes(core6):
    seg = IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=1, flags="A")
    ptb = IPv6(src="2001:db8:1::1", dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / Raw(bytes(seg))
    assert core6.process(bytes(ptb), 1)[0] == Verdict.ACCEPT
    assert core6.reasons()["not_ours"] == 1


def test_destination_unreachable_about_a_syn_resteers_it(core6):
    b1 = first_backend(core6)
    quoted = syn6(options=[("MSS", 1440)], dst=b1, dport=8080)
    err = IPv6(src=b1, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / Raw(quoted)
    assert core6.process(bytes(err), 101)[0] == Verdict.DROP
    ev = core6.read_events()
    assert [(e.kind, e.backend_id, e.client) for e in ev] == [
        ("icmp_unreachable", BACKENDS6.index(b1), CLIENT6)]
    assert IPv6(core6.outbox_take()).dst != b1


def test_destination_unreachable_with_the_wrong_seq_is_not_believed(core6):
    b1 = first_backend(core6)
    quoted = syn6(seq=999, dst=b1, dport=8080)
    err = IPv6(src=b1, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / Raw(quoted)
    assert core6.process(bytes(err), 101)[0] == Verdict.DROP
    assert core6.read_events() == [] and core6.reasons()["unmatched"] == 1
    bad = bytearray(bytes(IPv6(src=b1, dst=CLIENT6) / ICMPv6DestUnreach(code=4) /
                          Raw(syn6(dst=b1, dport=8080))))
    bad[42] ^= 1                                    # the ICMPv6 checksum
    assert core6.process(bytes(bad), 102)[0] == Verdict.DROP
    assert core6.reasons()["bad_checksum"] == 1 and core6.read_events() == []


def test_other_icmpv6_passes(core6):
    echo = bytes(IPv6(src=CLIENT6, dst=VIP6, nh=58) / Raw(b"\x80\0\0\0\0\1\0\1"))
    assert core6.process(echo, 1) == (Verdict.ACCEPT, echo)


# ---- cluster ---------------------------------------------------------------


def test_cluster_service_adopts_ipv6_flows_and_replies():
    c = Core(CoreConfig(max_flows=64, workers=1))
    svc = v6_service("maglev", cluster=True)
    c.publish([svc])
    mid = syn6(flags="A", seq=5, ack=9)           # mid-flow: its SYN went elsewhere
    v, out = c.process(mid, 1)
    assert v == Verdict.REWRITE and IPv6(out).dst in BACKENDS6
    other = BACKENDS6[(BACKENDS6.index(IPv6(out).dst) + 1) % 3]
    reply = IPv6(src=other, dst=CLIENT6) / TCP(sport=8080, dport=41000, flags="A")
    v, back = c.process(bytes(reply), 2)
    assert v == Verdict.REWRITE and IPv6(back).src == VIP6 and checksum_ok(back)
    assert c.failover_counters()["reply_adopted"] == 1
    # Another process picks the same backend for the same client.
    c2 = Core(CoreConfig(max_flows=64, workers=1))
    c2.publish([svc])
    assert IPv6(c2.process(mid, 1)[1]).dst == IPv6(out).dst
    c.close()
    c2.close()


def test_event_client_is_ipv6_text_and_ipv4_still_ipv4(core6):
    core6.publish([v6_service(sid=0), make_service(sid=1)])
    b6 = first_backend(core6)
    core6.process(bytes(IPv6(src=b6, dst=CLIENT6) / TCP(sport=8080, dport=40000, flags="RA",
                                                        ack=1001)), 101)
    v, out = core6.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=7, dport=80, flags="S",
                                                               seq=1)), 102)
    b4 = IP(out).dst
    core6.process(bytes(IP(src=b4, dst=CLIENT) / TCP(sport=8080, dport=7, flags="RA",
                                                     ack=2)), 103)
    assert [e.client for e in core6.read_events()] == [CLIENT6, CLIENT]


def test_jumbogram_and_mapped_destination_are_malformed(core6):
    from scapy.layers.inet6 import Jumbo

    jumbo = bytearray(syn6(ext=IPv6ExtHdrHopByHop(options=[Jumbo(jumboplen=48)])))
    jumbo[4:6] = b"\0\0"                      # payload length 0: the jumbo option's
    mapped = syn6(dst="::ffff:192.0.2.100")
    for raw in (bytes(jumbo), mapped):
        assert core6.process(raw, 1)[0] == Verdict.DROP
    assert core6.reasons()["malformed"] == 2 and core6.flow_count() == 0


@pytest.mark.parametrize("family", [4, 6])
def test_cluster_flow_started_by_a_client_synack_has_a_state(family):
    """Found by the fuzzer once it had an IPv6 cluster service: a SYN-ACK
    from the client (not a plain SYN) is mid-flow, like any other packet."""
    from dataclasses import replace

    c = Core(CoreConfig(max_flows=64, workers=1))
    if family == 4:
        c.publish([replace(make_service("maglev"), cluster=True)])
        pkt = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=5, dport=80, flags="SA"))
    else:
        c.publish([v6_service("maglev", cluster=True)])
        pkt = syn6(sport=5, flags="SA")
    assert c.process(pkt, 1)[0] == Verdict.REWRITE
    c.check_table()
    assert c.failover_counters()["adopted"] == 1
    c.close()
