"""Writes the fuzz seeds (fuzz/corpus/<target>/) from scapy packets:
python fuzz/seeds.py.  The addresses are those of fuzz/fixture.c's snapshot;
the record format is described in fuzz/fuzz_core.c and fuzz/fuzz_nfq.c."""

import hashlib
import struct
import sys
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR

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
    return {
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
    write("core", core_seeds())
    write("nfq", nfq_seeds())
