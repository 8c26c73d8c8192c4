"""Mark mode: the core decides from the packet's head alone and returns a
mark for the nftables rewrite chain; it never touches the bytes."""

from scapy.layers.inet import IP, TCP, UDP

from natlb.core import MARK_FORWARD, MARK_REPLY, PKT_HEAD_ONLY, Verdict

from .services import BACKENDS, CLIENT, VIP, make_service


def head(pkt, n=60):
    return bytes(pkt)[:n]


def test_forward_and_reply_marks_from_heads(core):
    core.publish([make_service(sid=5)])
    big = IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S") / (b"d" * 9000)
    buf = head(big)
    v, mark = core.decide(buf, 1, PKT_HEAD_ONLY)
    assert v == Verdict.MARK and mark & ~0xFFF == MARK_FORWARD
    backend = BACKENDS[(mark & 0xFFF) - 5 * 16]
    reply = IP(src=backend, dst=CLIENT) / TCP(sport=8080, dport=40000, flags="SA") / (b"r" * 9000)
    v, mark = core.decide(head(reply), 2, PKT_HEAD_ONLY)
    assert (v, mark) == (Verdict.MARK, MARK_REPLY | 5)
    svc = core.service_counters(6)[5]
    assert svc.bytes_in == len(big) and svc.bytes_out == len(reply)  # from IP total length


def test_head_must_hold_the_l4_header(core):
    core.publish([make_service()])
    syn = IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, flags="S",
                                        options=[("MSS", 1460), ("WScale", 7)])
    v, _ = core.decide(head(syn, 30), 1, PKT_HEAD_ONLY)   # TCP header cut
    assert v == Verdict.DROP and core.reasons()["malformed"] == 1
    v, _ = core.decide(head(syn, 20 + 24), 1, PKT_HEAD_ONLY)  # options cut
    assert v == Verdict.DROP


def test_udp_and_passing_packets(core):
    core.publish([make_service(protocol="udp", port=53, backend_port=53)])
    v, mark = core.decide(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=9, dport=53) / b"q"), 1)
    assert v == Verdict.MARK and mark & ~0xFFF == MARK_FORWARD
    stray = bytes(IP(src="203.0.113.50", dst=CLIENT) / UDP(sport=53, dport=9))
    assert core.decide(stray, 1) == (Verdict.ACCEPT, 0)


def test_rewriting_needs_the_whole_packet(core):
    core.publish([make_service()])
    syn = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, flags="S") / (b"x" * 100))
    assert core.process(syn[:60], 1, PKT_HEAD_ONLY)[0] == Verdict.DROP
    assert core.reasons()["truncated"] == 1
