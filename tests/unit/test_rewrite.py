"""The C core on scapy-built packets: rewritten bytes, both checksums
verified by scapy, both directions, with IP and TCP options."""

import pytest
from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.packet import Raw

from natlb.core import PKT_CSUM_PARTIAL, PKT_GSO, Verdict

from .services import BACKENDS, CLIENT, VIP, make_service


def checksums_ok(raw: bytes) -> bool:
    """Let scapy recompute both checksums and compare with what we wrote."""
    pkt = IP(raw)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    ip_sum, l4_sum = pkt.chksum, l4.chksum
    del pkt.chksum
    del l4.chksum
    again = IP(bytes(pkt))
    l4b = again[TCP] if TCP in again else again[UDP]
    return again.chksum == ip_sum and l4b.chksum == l4_sum


FORWARD_CASES = [
    ("plain SYN", IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S")),
    ("IP options", IP(src=CLIENT, dst=VIP, options=[IPOption_RR()]) /
     TCP(sport=40001, dport=80, flags="S")),
    ("TCP options", IP(src=CLIENT, dst=VIP) /
     TCP(sport=40002, dport=80, flags="S",
         options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)])),
    ("odd payload", IP(src=CLIENT, dst=VIP) / TCP(sport=40003, dport=80, flags="S") /
     Raw(b"x" * 1001)),
]


@pytest.mark.parametrize("name,pkt", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rewrites_destination_and_checksums(core, name, pkt):
    core.publish([make_service()])
    verdict, out = core.process(bytes(pkt), now_ms=1000)
    assert verdict == Verdict.REWRITE
    got = IP(out)
    assert got.src == CLIENT and got.dst in BACKENDS
    assert got[TCP].dport == 8080 and got[TCP].sport == pkt[TCP].sport
    assert bytes(got[TCP].payload) == bytes(pkt[TCP].payload)
    assert got[TCP].options == IP(bytes(pkt))[TCP].options
    assert checksums_ok(out)


def test_reply_rewritten_back_to_vip(core):
    core.publish([make_service()])
    _, out = core.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S")),
                          now_ms=1000)
    backend = IP(out).dst
    synack = IP(src=backend, dst=CLIENT, options=[IPOption_RR()]) / TCP(
        sport=8080, dport=40000, flags="SA", options=[("MSS", 1400)]) / Raw(b"hello")
    verdict, back = core.process(bytes(synack), now_ms=1001)
    assert verdict == Verdict.REWRITE
    got = IP(back)
    assert (got.src, got[TCP].sport, got.dst, got[TCP].dport) == (VIP, 80, CLIENT, 40000)
    assert bytes(got[TCP].payload) == b"hello"
    assert checksums_ok(back)


def test_udp_both_directions(core):
    core.publish([make_service(protocol="udp", port=53, backend_port=5353)])
    q = IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / Raw(b"query")
    v, out = core.process(bytes(q), now_ms=1)
    assert v == Verdict.REWRITE and IP(out)[UDP].dport == 5353 and checksums_ok(out)
    r = IP(src=IP(out).dst, dst=CLIENT) / UDP(sport=5353, dport=5000) / Raw(b"answer")
    v, back = core.process(bytes(r), now_ms=2)
    got = IP(back)
    assert v == Verdict.REWRITE and (got.src, got[UDP].sport) == (VIP, 53) and checksums_ok(back)


def test_udp_zero_checksum_stays_zero(core):
    core.publish([make_service(protocol="udp", port=53, backend_port=53)])
    raw = bytearray(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5001, dport=53) / Raw(b"q")))
    raw[26:28] = b"\x00\x00"
    v, out = core.process(bytes(raw), now_ms=1)
    assert v == Verdict.REWRITE
    assert out[26:28] == b"\x00\x00"
    assert IP(out).dst in BACKENDS


def _partial(pkt) -> bytes:
    """What the kernel hands over for CHECKSUM_PARTIAL: the L4 checksum field
    holds the folded pseudo-header sum, not a full checksum."""
    raw = bytearray(bytes(pkt))
    ihl = (raw[0] & 15) * 4
    off = ihl + (16 if pkt.haslayer(TCP) else 6)
    l4len = len(raw) - ihl
    words = raw[12:20] + bytes([0, raw[9], l4len >> 8, l4len & 255])
    s = sum(int.from_bytes(words[i:i + 2], "big") for i in range(0, 12, 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    raw[off:off + 2] = s.to_bytes(2, "big")
    return bytes(raw)


def test_partial_checksum_gets_full_checksum(core):
    core.publish([make_service()])
    pkt = IP(src=CLIENT, dst=VIP) / TCP(sport=41000, dport=80, flags="S") / Raw(b"abc" * 50)
    v, out = core.process(_partial(pkt), now_ms=1, flags=PKT_CSUM_PARTIAL)
    assert v == Verdict.REWRITE and checksums_ok(out)


def test_gso_partial_checksum_keeps_pseudo_header_only(core):
    core.publish([make_service()])
    pkt = IP(src=CLIENT, dst=VIP) / TCP(sport=41001, dport=80, flags="S") / Raw(b"z" * 3000)
    v, out = core.process(_partial(pkt), now_ms=1, flags=PKT_CSUM_PARTIAL | PKT_GSO)
    assert v == Verdict.REWRITE
    got = IP(out)
    expected = _partial(IP(src=CLIENT, dst=got.dst) / TCP(sport=41001, dport=8080, flags="S") /
                        Raw(b"z" * 3000))
    assert out[20 + 16:20 + 18] == expected[20 + 16:20 + 18]
    assert IP(out).chksum == IP(expected).chksum


def test_unknown_reply_passes_unchanged(core):
    core.publish([make_service()])
    stray = bytes(IP(src="203.0.113.10", dst=CLIENT) / TCP(sport=8080, dport=1234, flags="A"))
    v, out = core.process(stray, now_ms=1)
    assert v == Verdict.ACCEPT and out == stray
    assert core.reasons()["not_ours"] == 1


def test_tcp_non_syn_without_flow_is_dropped(core):
    core.publish([make_service()])
    v, _ = core.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, flags="A")), 1)
    assert v == Verdict.DROP and core.reasons()["no_flow"] == 1


def test_no_eligible_backend_drops(core):
    core.publish([make_service(down=BACKENDS)])
    v, _ = core.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=2, dport=80, flags="S")), 1)
    assert v == Verdict.DROP and core.reasons()["no_backend"] == 1


def test_counters_follow_traffic(core):
    core.publish([make_service()])
    syn = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S")
    _, out = core.process(bytes(syn), 1)
    b = IP(out).dst
    core.process(bytes(IP(src=b, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA")), 2)
    svc = core.service_counters(1)[0]
    assert (svc.packets_in, svc.packets_out, svc.new_flows) == (1, 1, 1)
    assert svc.bytes_in == len(syn) and svc.bytes_out == 40
    be = core.backend_counters(3)[BACKENDS.index(b)]
    assert be.active_flows == 1 and be.new_flows == 1
