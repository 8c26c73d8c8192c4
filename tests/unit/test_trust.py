"""What the data path believes (issue 9, sections 1-2): a packet with a wrong
checksum is dropped and never timed; an RST or ICMP error is a failure
report only if it matches what natlb sent and its bytes could be checked."""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from natlb.core import (
    HEAD_COPY,
    PKT_CSUM_PARTIAL,
    PKT_CSUM_VERIFIED,
    PKT_HEAD_ONLY,
    Core,
    CoreConfig,
    Verdict,
)

from .services import BACKENDS, CLIENT, VIP, make_service


@pytest.fixture
def tcore():
    c = Core(CoreConfig(max_flows=1024, workers=1, syn_timeout_ms=50, resteer_tries=3))
    c.publish([make_service("rr"), make_service("rr", protocol="udp", port=53,
                                                 backend_port=53, sid=1)])
    yield c
    c.close()


def syn(sport=40000, seq=1000, payload=b""):
    return bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags="S", seq=seq)
                 / payload)


def corrupt_l4(raw: bytes, delta: int = 1) -> bytes:
    """Change the TCP/UDP checksum field, leaving everything else as it was."""
    p = IP(raw)
    off = p.ihl * 4 + (16 if TCP in p else 6)
    b = bytearray(raw)
    b[off + 1] = (b[off + 1] + delta) & 0xFF
    return bytes(b)


def nothing_happens_later(c: Core):
    """No held SYN was timed: no event and nothing re-sent, ever."""
    for t in (200, 1000, 5000):
        c.failover_tick(t)
    assert c.outbox_take() is None and c.read_events() == []


# ---- section 1: checksums ------------------------------------------------------

@pytest.mark.parametrize("mode", ["copy", "mark"])
def test_syn_with_bad_checksum_is_dropped_counted_and_never_timed(tcore, mode):
    bad = corrupt_l4(syn())
    v = tcore.process(bad, 100)[0] if mode == "copy" else tcore.decide(bad, 100)[0]
    assert v == Verdict.DROP
    assert tcore.reasons()["bad_checksum"] == 1 and tcore.flow_count() == 0
    nothing_happens_later(tcore)


def test_bad_ip_header_checksum_is_dropped(tcore):
    b = bytearray(syn())
    b[10] ^= 0x01
    assert tcore.process(bytes(b), 1)[0] == Verdict.DROP
    assert tcore.reasons()["bad_checksum"] == 1


def test_udp_bad_checksum_dropped_and_zero_checksum_accepted(tcore):
    q = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"query")
    assert tcore.process(corrupt_l4(q), 1)[0] == Verdict.DROP
    no_sum = bytearray(q)
    no_sum[26:28] = b"\0\0"
    assert tcore.process(bytes(no_sum), 2)[0] == Verdict.REWRITE
    assert tcore.reasons()["bad_checksum"] == 1


def test_reply_with_bad_checksum_is_dropped(tcore):
    _, out = tcore.process(syn(), 100)
    synack = bytes(IP(src=IP(out).dst, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA",
                                                          ack=1001))
    assert tcore.process(corrupt_l4(synack), 101)[0] == Verdict.DROP
    assert tcore.reasons()["bad_checksum"] == 1


def test_checksums_the_kernel_vouches_for_are_not_checked_again(tcore):
    # CHECKSUM_PARTIAL: made on this host, the field holds only a partial sum.
    assert tcore.process(corrupt_l4(syn(40001)), 1, PKT_CSUM_PARTIAL)[0] == Verdict.REWRITE
    # Verified by the NIC or kernel already (no CSUM_NOTVERIFIED from NFQUEUE).
    assert tcore.process(corrupt_l4(syn(40002)), 1, PKT_CSUM_VERIFIED)[0] == Verdict.REWRITE
    assert tcore.reasons()["bad_checksum"] == 0


def test_icmp_with_bad_checksum_is_dropped(tcore):
    _, out = tcore.process(syn(), 100)
    icmp = bytearray(bytes(IP(src=IP(out).dst, dst=CLIENT) / ICMP(type=3, code=3) / out[:28]))
    icmp[22] ^= 0x01
    assert tcore.process(bytes(icmp), 101)[0] == Verdict.DROP
    assert tcore.reasons()["bad_checksum"] == 1 and tcore.read_events() == []


def test_syn_longer_than_the_head_is_forwarded_but_never_held_or_believed(tcore):
    """Mark mode copies a head; a SYN that does not fit cannot be checked."""
    big = syn(payload=b"d" * 400)       # a SYN with data (TCP Fast Open)
    v, mark = tcore.decide(big[:HEAD_COPY], 100, PKT_HEAD_ONLY)
    assert v == Verdict.MARK
    backend = BACKENDS[mark & 0xFFF]
    nothing_happens_later(tcore)
    # Even an RST that acknowledges it is only passed on to the client.
    rst = bytes(IP(src=backend, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="RA",
                                                   ack=1001 + 400))
    assert tcore.decide(rst, 101)[0] == Verdict.MARK
    assert tcore.read_events() == [] and tcore.outbox_take() is None


# ---- section 2: RSTs and ICMP errors must match what natlb sent ------------------

def first_backend(c, sport=40000, seq=1000):
    v, out = c.process(syn(sport, seq), 100)
    assert v == Verdict.REWRITE
    return IP(out).dst, out


@pytest.mark.parametrize("flags,ack", [("R", 0), ("RA", 1000), ("RA", 1002), ("RA", 77)])
def test_rst_that_does_not_acknowledge_the_held_syn_is_dropped(tcore, flags, ack):
    b1, _ = first_backend(tcore)
    rst = bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags=flags, ack=ack))
    assert tcore.process(rst, 101)[0] == Verdict.DROP
    assert tcore.reasons()["unmatched"] == 1
    assert tcore.read_events() == [] and tcore.outbox_take() is None
    assert tcore.failover_counters()["resteered"] == 0
    # The flow is untouched: the real SYN-ACK still gets through.
    synack = bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA", ack=1001))
    assert tcore.process(synack, 102)[0] == Verdict.REWRITE


def test_rst_acknowledging_the_held_syn_is_believed(tcore):
    b1, _ = first_backend(tcore)
    rst = bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="RA", ack=1001))
    assert tcore.process(rst, 101)[0] == Verdict.DROP
    assert [e.kind for e in tcore.read_events()] == ["syn_rst"]
    assert IP(tcore.outbox_take()).dst not in (b1, VIP)
    assert tcore.reasons()["unmatched"] == 0


def icmp_about(quoted: bytes, src: str, code: int = 1) -> bytes:
    return bytes(IP(src=src, dst=CLIENT) / ICMP(type=3, code=code) / quoted[:28])


def test_icmp_quoting_another_seq_than_the_held_syn_is_not_believed(tcore):
    b1, out = first_backend(tcore, seq=1000)
    forged = bytes(IP(src=CLIENT, dst=b1) / TCP(sport=40000, dport=8080, flags="S", seq=999))
    v, _ = tcore.process(icmp_about(forged, "203.0.113.1"), 101)
    assert v == Verdict.DROP and tcore.reasons()["unmatched"] == 1
    assert tcore.read_events() == [] and tcore.outbox_take() is None
    # The real one (the packet natlb sent) is.
    v, _ = tcore.process(icmp_about(out, "203.0.113.1"), 102)
    assert v == Verdict.DROP and [e.kind for e in tcore.read_events()] == ["icmp_unreachable"]


def test_icmp_about_an_established_flow_must_quote_a_sent_seq(tcore):
    b1, _ = first_backend(tcore, seq=1000)
    tcore.process(bytes(IP(src=b1, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA",
                                                       seq=5000, ack=1001)), 101)
    data = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="PA", seq=1001,
                                          ack=5001) / (b"x" * 100)
    _, sent = tcore.process(bytes(data), 102)
    far = bytes(IP(src=CLIENT, dst=b1) / TCP(sport=40000, dport=8080, seq=1001 + (1 << 30)))
    assert tcore.process(icmp_about(far, b1), 103)[0] == Verdict.DROP
    assert tcore.read_events() == [] and tcore.reasons()["unmatched"] == 1
    assert tcore.process(icmp_about(sent, b1), 104)[0] == Verdict.DROP
    assert [e.kind for e in tcore.read_events()] == ["icmp_unreachable"]


def test_icmp_longer_than_the_head_is_not_believed(tcore):
    q = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / (b"q" * 300))
    _, out = tcore.process(q, 1)
    b1 = IP(out).dst
    icmp = bytes(IP(src=b1, dst=CLIENT) / ICMP(type=3, code=3) / out[:548])
    assert tcore.decide(icmp[:HEAD_COPY], 2, PKT_HEAD_ONLY)[0] == Verdict.DROP
    assert tcore.read_events() == [] and tcore.reasons()["unmatched"] == 1
    # Whole, the same ICMP is believed.
    assert tcore.decide(icmp, 3)[0] == Verdict.DROP
    assert [(e.kind, e.backend_id) for e in tcore.read_events()] == [
        ("icmp_unreachable", 16 + BACKENDS.index(b1))]


def test_icmp_with_ip_options_inside_and_out_fits_the_head(tcore):
    """60-byte outer and quoted IP headers: 136 bytes of headers."""
    from scapy.layers.inet import IPOption_NOP

    q = IP(src=CLIENT, dst=VIP, options=[IPOption_NOP()] * 40) / UDP(sport=5001, dport=53)
    _, out = tcore.process(bytes(q / b"x"), 1)
    b1 = IP(out).dst
    icmp = bytes(IP(src=b1, dst=CLIENT, options=[IPOption_NOP()] * 40) /
                 ICMP(type=3, code=3) / out)
    assert len(icmp) > 136
    v, _ = tcore.decide(icmp[:HEAD_COPY], 2, PKT_HEAD_ONLY if len(icmp) > HEAD_COPY else 0)
    assert v == Verdict.DROP and tcore.reasons()["malformed"] == 0
    assert [e.kind for e in tcore.read_events()] == ["icmp_unreachable"]
