"""Writes the fuzz seeds (fuzz/corpus/<target>/) from scapy packets:
python fuzz/seeds.py.  The addresses are those of fuzz/fixture.c's snapshot;
the record format is described in fuzz/fuzz_core.c and fuzz/fuzz_nfq.c."""

import hashlib
import struct
import sys
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6PacketTooBig,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    fragment6,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.unit.nfqmsg import (  # noqa: E402
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_SKB_INFO,
    SKB_CSUMNOTREADY,
    SKB_GSO,
    attr,
    message,
    queued_packet,
)

CLIENT, ROUTER = "198.51.100.7", "198.51.100.1"
VIP, VIP2, VIP3, VIP4 = "192.0.2.100", "192.0.2.101", "192.0.2.102", "192.0.2.103"
B0, B1 = "203.0.113.10", "203.0.113.11"      # service 0 (rr, port 8080): ids 0, 1
B3 = "203.0.113.13"                           # service 1 (lc, udp 53): id 3

# IPv6 (fixture.c): service 7 tcp [VIP6]:80 -> [B0_6]:8080, [B1_6]:8080; service 8 udp
# [VIP6]:53 maglev -> B3_6, B4_6 port 53; service 9 cluster maglev [VIP6_2]:443 -> [B5_6]:443.
CLIENT6, ROUTER6 = "2001:db8:1::7", "2001:db8:1::1"
VIP6, VIP6_2 = "2001:db8::64", "2001:db8::65"
B0_6, B1_6, B3_6, B5_6 = ("2001:db8:113::12", "2001:db8:113::13", "2001:db8:113::14",
                          "2001:db8:113::10")

# Record ops (fuzz_core.c)
COPY, MARK, FIX, PARTIAL, GSO, HEAD = 0, 1, 4, 8, 16, 32
ADVANCE, CONTROL = 2, 3


def pkt(p, op: int = COPY) -> bytes:
    raw = bytes(p)
    assert len(raw) < 256, len(raw)
    return bytes([op | FIX, len(raw)]) + raw


def advance(ms: int) -> bytes:
    return bytes([ADVANCE]) + struct.pack("<H", ms)


def control(op: int) -> bytes:
    return bytes([CONTROL, op])


def c2v(flags: str, seq: int = 1000, ack: int = 0, data: bytes = b"", sport: int = 40000,
        vip: str = VIP, port: int = 80):
    return IP(src=CLIENT, dst=vip) / TCP(sport=sport, dport=port, flags=flags, seq=seq,
                                         ack=ack) / data


def b2c(flags: str, seq: int = 5000, ack: int = 1001, data: bytes = b"", backend: str = B0,
        sport: int = 40000, port: int = 8080):
    return IP(src=backend, dst=CLIENT) / TCP(sport=port, dport=sport, flags=flags, seq=seq,
                                             ack=ack) / data


def c2v6(flags: str, seq: int = 1000, ack: int = 0, data: bytes = b"", sport: int = 40000,
         vip: str = VIP6, port: int = 80, ext=None):
    ip = IPv6(src=CLIENT6, dst=vip)
    if ext is not None:
        ip = ip / ext
    return ip / TCP(sport=sport, dport=port, flags=flags, seq=seq, ack=ack) / data


def b2c6(flags: str, seq: int = 5000, ack: int = 1001, data: bytes = b"", backend: str = B0_6,
         sport: int = 40000, port: int = 8080):
    return IPv6(src=backend, dst=CLIENT6) / TCP(sport=port, dport=sport, flags=flags, seq=seq,
                                                ack=ack) / data


def conversation6(mode: int) -> bytes:
    return b"".join([
        pkt(c2v6("S"), mode), pkt(b2c6("SA"), mode), pkt(c2v6("A", 1001, 5001), mode),
        pkt(c2v6("PA", 1001, 5001, b"GET / HTTP/1.0\r\n\r\n"), mode),
        pkt(b2c6("PA", 5001, 1019, b"HTTP/1.0 200 OK\r\n\r\nhello"), mode),
        pkt(b2c6("FA", 5025, 1019), mode), pkt(c2v6("FA", 1019, 5026), mode),
        pkt(b2c6("A", 5026, 1020), mode), advance(2500),
    ])


def ipv6_seeds() -> dict[str, bytes]:
    udp_q = IPv6(src=CLIENT6, dst=VIP6) / UDP(sport=5353, dport=53) / b"query"
    quoted_reply = bytes(IPv6(src=VIP6, dst=CLIENT6) / TCP(sport=80, dport=40000, flags="A",
                                                           seq=5001, ack=1001) / (b"x" * 20))
    quoted_syn = bytes(IPv6(src=CLIENT6, dst=B0_6) / TCP(sport=40000, dport=8080, flags="S",
                                                         seq=1000))
    big = IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(id=0x10203) / UDP(
        sport=5353, dport=53) / (b"f" * 300)
    frags = [bytes(f) for f in fragment6(big, 160)]
    assert all(len(f) < 256 for f in frags)
    return {
        "tcp6-copy": b"\x00" + conversation6(COPY),
        "tcp6-mark": b"\x01" + conversation6(MARK),
        "udp6": b"\x00" + pkt(udp_q) + pkt(IPv6(src=B3_6, dst=CLIENT6) / UDP(sport=53, dport=5353)
                                          / b"answer") + pkt(udp_q, MARK) + advance(6000),
        "ext6": b"\x00" + pkt(c2v6("S", ext=IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                                    / IPv6ExtHdrRouting(addresses=[], segleft=0)))
        + pkt(c2v6("S", sport=40001, ext=IPv6ExtHdrRouting(addresses=[VIP6], segleft=1)))
        + pkt(c2v6("S", sport=40002, ext=IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop()))
        + pkt(IPv6(src=CLIENT6, dst=VIP6, nh=50) / (b"\0" * 16)),
        "frag6": b"\x00" + b"".join(pkt(f) for f in frags[1:] + frags[:1]),
        "icmp6": b"\x00" + conversation6(COPY)[:-3] + pkt(
            IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / quoted_reply)
        + pkt(c2v6("S", sport=40000)) + pkt(
            IPv6(src=B0_6, dst=CLIENT6) / ICMPv6DestUnreach(code=4) / quoted_syn),
        "syn6-rst": b"\x00" + pkt(c2v6("S"), MARK) + pkt(b2c6("RA", 0, 1001), MARK)
        + pkt(b2c6("SA", backend=B1_6), MARK) + pkt(c2v6("S", sport=40001)) + advance(60),
        "reset6": b"\x00" + pkt(c2v6("S")) + pkt(b2c6("SA")) + pkt(c2v6("A", 1001, 5001))
        + control(0x80 | 14) + control(0x00 | 15),
        "cluster6": b"\x00" + pkt(c2v6("A", 7, 9, vip=VIP6_2, port=443))
        + pkt(IPv6(src=B5_6, dst=CLIENT6) / TCP(sport=443, dport=40003, flags="SA", ack=1)),
        "dual": b"\x00" + pkt(c2v("S")) + pkt(c2v6("S")) + pkt(b2c("SA")) + pkt(b2c6("SA")),
    }


def conversation(mode: int) -> bytes:
    return b"".join([
        pkt(c2v("S"), mode), pkt(b2c("SA"), mode), pkt(c2v("A", 1001, 5001), mode),
        pkt(c2v("PA", 1001, 5001, b"GET / HTTP/1.0\r\n\r\n"), mode),
        pkt(b2c("PA", 5001, 1019, b"HTTP/1.0 200 OK\r\n\r\nhello"), mode),
        pkt(b2c("FA", 5025, 1019), mode), pkt(c2v("FA", 1019, 5026), mode),
        pkt(b2c("A", 5026, 1020), mode), advance(2500),
    ])


def core_seeds() -> dict[str, bytes]:
    quoted_reply = bytes(IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000, flags="A"))[:28]
    quoted_fwd = bytes(IP(src=CLIENT, dst=B0) / TCP(sport=40000, dport=8080, flags="S"))[:28]
    udp_q = IP(src=CLIENT, dst=VIP) / UDP(sport=5353, dport=53) / b"query"
    quoted_udp = bytes(IP(src=CLIENT, dst=B3) / UDP(sport=5353, dport=53) / b"query")[:28]
    return {
        "tcp-copy": b"\x00" + conversation(COPY),
        "tcp-mark": b"\x01" + conversation(MARK),
        "udp": b"\x00" + pkt(udp_q) + pkt(IP(src=B3, dst=CLIENT) / UDP(sport=53, dport=5353)
                                          / b"answer") + pkt(udp_q, MARK) + advance(6000),
        "syn-timeout": b"\x00" + pkt(c2v("S")) + advance(60)
        + pkt(b2c("SA", backend=B1)) + pkt(c2v("A", 1001, 5001)),
        "syn-rst": b"\x00" + pkt(c2v("S"), MARK) + pkt(b2c("RA", 0, 1001), MARK)
        + pkt(b2c("SA", backend=B1), MARK),
        "icmp-unreach": b"\x00" + pkt(c2v("S")) + pkt(
            IP(src=B0, dst=CLIENT) / ICMP(type=3, code=3) / quoted_fwd) + pkt(udp_q)
        + pkt(IP(src=B3, dst=CLIENT) / ICMP(type=3, code=3) / quoted_udp, MARK),
        "frag-needed": b"\x00" + conversation(COPY)[:-3] + pkt(
            IP(src=ROUTER, dst=VIP) / ICMP(type=3, code=4, nexthopmtu=1400) / quoted_reply),
        "backend-dies": b"\x00" + pkt(c2v("S")) + pkt(udp_q) + control(0x00) + control(0x03)
        + pkt(c2v("S")) + pkt(udp_q) + pkt(c2v("S", sport=40001)) + pkt(b2c("SA", backend=B1))
        + pkt(c2v("A", 1001, 5001)) + control(0x81) + control(0x40 | 13) + control(0xc0),
        "partial-gso": b"\x00" + pkt(c2v("S")) + pkt(b2c("SA"))
        + pkt(c2v("A", 1001, 5001, b"x" * 100), COPY | PARTIAL)
        + pkt(c2v("A", 1101, 5001, b"y" * 150), COPY | PARTIAL | GSO)
        + pkt(b2c("A", 5001, 1251, b"z" * 99), COPY | PARTIAL),
        "head-only": b"\x00" + pkt(c2v("S", data=b"d" * 120), MARK | HEAD)
        + pkt(b2c("SA", data=b"e" * 150), MARK | HEAD | PARTIAL | GSO),
        "schedulers": b"\x00" + pkt(c2v("S", vip=VIP2, port=443)) + pkt(c2v("S", vip=VIP2, port=25))
        + pkt(IP(src=CLIENT, dst=VIP3) / UDP(sport=9, dport=5353) / b"m")
        + pkt(c2v("S", vip=VIP4, port=80)) + pkt(c2v("S", vip=VIP4, port=8080)),
        "options": b"\x00" + pkt(IP(src=CLIENT, dst=VIP, options=[IPOption_RR(routers=[ROUTER])])
                                 / TCP(sport=40002, dport=80, flags="S",
                                       options=[("MSS", 1460), ("SAckOK", b""),
                                                ("Timestamp", (1, 0)), ("WScale", 7)])),
        "time-wrap": b"\xff" + pkt(c2v("S")) + advance(0xffff) + pkt(b2c("SA"))
        + advance(0xffff) + pkt(c2v("A", 1001, 5001)) + advance(0xffff) + advance(0xffff),
        "table-full": b"\x00" + b"".join(pkt(c2v("S", sport=1000 + i)) for i in range(70)),
    }


def nfq_seeds() -> dict[str, bytes]:
    syn = bytes(c2v("S"))
    data = bytes(c2v("PA", 1001, 5001, b"x" * 64))
    syn6 = bytes(c2v6("S"))
    return {
        "syn6-copy": b"\x00" + queued_packet(syn6, 8),
        "syn6-mark-head": b"\x01" + queued_packet(syn6[:60], 9, cap_len=len(syn6)),
        "syn-copy": b"\x00" + queued_packet(syn, 1),
        "syn-mark-head": b"\x01" + queued_packet(syn[:40], 2, cap_len=len(syn)),
        "batch": b"\x00" + queued_packet(syn, 3) + queued_packet(bytes(b2c("SA")), 4)
        + queued_packet(data, 5, skb_info=SKB_CSUMNOTREADY | SKB_GSO),
        "no-payload": b"\x01" + queued_packet(None, 6, skb_info=0),
        # The kernel's order varies with the attributes present: here the
        # fixed-size one comes last, where a short one would end the buffer.
        "skb-info-last": b"\x00" + message(
            attr(NFQA_PACKET_HDR, struct.pack("!IHBx", 7, 0x0800, 0)) + attr(NFQA_PAYLOAD, syn)
            + attr(NFQA_SKB_INFO, struct.pack("!I", SKB_CSUMNOTREADY))),
    }


def write(target: str, seeds: dict[str, bytes]) -> None:
    d = ROOT / "fuzz" / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    for name, raw in seeds.items():
        digest = hashlib.sha1(raw).hexdigest()[:8]
        for old in d.glob(f"{name}-*"):
            old.unlink()
        (d / f"{name}-{digest}").write_bytes(raw)


if __name__ == "__main__":
    write("core", core_seeds() | ipv6_seeds())
    write("nfq", nfq_seeds())
