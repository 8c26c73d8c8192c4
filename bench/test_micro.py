"""Micro-benchmarks of the C core (no root): ns per packet.

Run: scripts/microbench   (not part of the default test run)
Each benchmark runs one C call over a batch of N packets, so the figure is
C time per packet, not the cost of a Python-to-C call.
"""

import ipaddress
import struct

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import checksum

from natlb.core import PKT_CSUM_VERIFIED, BackendEntry, Core, CoreConfig, ServiceTable, Verdict
from natlb.schedulers import Candidate, build_table
from tests.unit.services import VIP, make_service

N = 20_000


def syns(n, dport=80):
    tmpl = bytes(IP(src="198.51.100.1", dst=VIP) / TCP(sport=1, dport=dport, flags="S"))
    out = []
    for i in range(n):
        b = bytearray(tmpl)
        b[12:16] = struct.pack("!I", 0xC6336400 + (i >> 16))   # 198.51.100.x
        b[20:22] = struct.pack("!H", 1024 + (i & 0xFFFF) % 60000)
        b[15] = (i * 7) & 255
        p = IP(bytes(b))
        del p.chksum, p[TCP].chksum       # natlb checks them: let scapy redo them
        out.append(bytes(p))
    return out


def fix_ip_checksum(b: bytearray) -> None:
    b[10:12] = b"\0\0"
    total = sum(struct.unpack("!10H", bytes(b[:20])))
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    b[10:12] = struct.pack("!H", ~total & 0xFFFF)


def per_packet(benchmark, core, batch, rounds=15):
    """Time one C call over the batch, restoring its bytes between rounds."""
    def setup():
        batch.reset()
        return (), {}

    benchmark.pedantic(lambda: core.process_batch(batch), setup=setup, rounds=rounds)
    benchmark.extra_info["ns_per_packet"] = round(benchmark.stats.stats.median / batch.n * 1e9,
                                                  1)


@pytest.fixture(scope="module")
def established():
    """A core with N flows set up, and a batch of ACKs for them."""
    c = Core(CoreConfig(max_flows=1 << 17, workers=1))
    c.publish([make_service("rr")])
    pkts = syns(N)
    first = c.process_many(pkts, now_ms=1)
    assert c.process_batch(first) == N
    acks = []
    for p in pkts:                                              # flags = ACK
        a = IP(p[:33] + bytes([0x10]) + p[34:])
        del a[TCP].chksum                                       # natlb checks it
        acks.append(bytes(a))
    return c, c.process_many(acks, now_ms=2)


def test_rewrite_established_tcp(benchmark, established):
    """Checksums checked in C: what natlb does when the kernel has not."""
    c, batch = established
    per_packet(benchmark, c, batch)
    assert batch.verdict_list() == [Verdict.REWRITE] * N


def test_rewrite_established_tcp_kernel_verified(benchmark, established):
    """The usual case: the NIC or kernel verified the checksum already (or
    the packet was made on this host), so natlb does not again."""
    c, batch = established
    batch.flags = PKT_CSUM_VERIFIED
    per_packet(benchmark, c, batch)
    assert batch.verdict_list() == [Verdict.REWRITE] * N


@pytest.mark.parametrize("scheduler", ["rr", "wrr", "lc", "sh", "maglev"])
def test_new_flow_per_scheduler(benchmark, scheduler):
    """SYN of a new flow: lookup miss, backend choice, insert, rewrite."""
    pkts = syns(N)
    state = {}

    def setup():
        c = Core(CoreConfig(max_flows=1 << 16, workers=1))
        c.publish([make_service(scheduler, addrs=[f"203.0.113.{i}" for i in range(1, 11)])])
        state["c"], state["b"] = c, c.process_many(pkts, now_ms=1)
        return (), {}

    benchmark.pedantic(lambda: state["c"].process_batch(state["b"]), setup=setup, rounds=10)
    benchmark.extra_info["ns_per_packet"] = round(benchmark.stats.stats.median / N * 1e9, 1)
    assert state["b"].verdict_list() == [Verdict.REWRITE] * N


def test_lookup_with_one_million_flows(benchmark):
    total = 1_000_000
    c = Core(CoreConfig(max_flows=total, workers=1))
    c.publish([make_service("rr")])
    tmpl = bytes(IP(src="198.51.100.1", dst=VIP) / UDP(sport=1, dport=80) / b"x")
    c.publish([make_service("rr", protocol="udp")])
    pkts = []
    for i in range(total):
        b = bytearray(tmpl)
        b[12:16] = struct.pack("!I", 0xC6336400 + i // 65535)
        b[20:22] = struct.pack("!H", 1 + i % 65535)
        b[26:28] = b"\0\0"   # UDP checksum 0: valid and stays 0
        fix_ip_checksum(b)
        pkts.append(bytes(b))
    filled = c.process_many(pkts, now_ms=1)
    assert c.process_batch(filled) == total and c.flow_count() == total
    sample = c.process_many(pkts[::50], now_ms=2)   # lookups spread over the table
    per_packet(benchmark, c, sample)
    benchmark.extra_info["conntrack_bytes"] = c.conntrack_memory()
    assert c.flow_count() == total


def test_later_fragment_follows_its_first(benchmark):
    """A fragment after the first: fragment-table lookup, address and IP
    checksum rewrite (copy mode).  Middle fragments, so no datagram ends;
    short ones, so the batch's bytes stay in cache as a just-received
    packet's would."""
    c = Core(CoreConfig(max_flows=1 << 16, workers=1, max_fragments=1 << 15))
    c.publish([make_service("rr", protocol="udp", port=53)])
    firsts, middles = [], []
    for i in range(N):
        src = struct.pack("!I", 0xC6336400 + (i >> 8))
        for off, l4 in ((0, bytes(UDP(sport=1024 + i, dport=53, len=3008)) + b"x" * 1472),
                        (185, b"y" * 16)):
            hdr = bytearray(bytes(IP(src="198.51.100.1", dst=VIP, id=i, proto=17,
                                     flags="MF", frag=off, len=20 + len(l4))))
            hdr[12:16] = src
            hdr[10:12] = b"\0\0"
            hdr[10:12] = struct.pack("!H", checksum(bytes(hdr)))
            (firsts if off == 0 else middles).append(bytes(hdr) + l4)
    assert c.process_batch(c.process_many(firsts, now_ms=1)) == N
    batch = c.process_many(middles, now_ms=2)
    per_packet(benchmark, c, batch)
    assert batch.verdict_list() == [Verdict.REWRITE] * N


# ---- IPv6 (the same measurements over IPv6 packets) -------------------------

VIP6 = "2001:db8::100"


def v6_service(scheduler="rr", protocol="tcp", n=3):
    entries = tuple(BackendEntry(f"2001:db8:113::{i + 1:x}", 8080, 1, i, True)
                    for i in range(n))
    cands = [Candidate(f"[{b.address}]:{b.port}", 1, True) for b in entries]
    return ServiceTable(VIP6, 80, protocol, scheduler, 0, entries,
                        tuple(build_table(scheduler, cands)))


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def v6_packets(n, flags=0x02, proto=6):
    """n TCP (flags) or UDP packets to VIP6 from distinct clients (2001:db8:1::/64,
    the low 32 bits varied) and ports, with right checksums."""
    dst = ipaddress.IPv6Address(VIP6).packed
    out = []
    for i in range(n):
        src = ipaddress.IPv6Address("2001:db8:1::").packed[:12] + struct.pack("!I", i >> 4)
        sport = 1024 + (i & 0xF)
        if proto == 6:
            l4 = struct.pack("!HHIIBBHHH", sport, 80, 1000, 0, 5 << 4, flags, 65535, 0, 0)
            off = 16
        else:
            l4 = struct.pack("!HHHH", sport, 80, 9, 0) + b"x"
            off = 6
        c = ~_sum16(src + dst + struct.pack("!IxxxB", len(l4), proto) + l4) & 0xFFFF
        l4 = l4[:off] + struct.pack("!H", c or 0xFFFF) + l4[off + 2:]
        hdr = struct.pack("!IHBB", 6 << 28, len(l4), proto, 64) + src + dst
        out.append(hdr + l4)
    return out


@pytest.fixture(scope="module")
def established6():
    c = Core(CoreConfig(max_flows=1 << 17, workers=1))
    c.publish([v6_service()])
    assert c.process_batch(c.process_many(v6_packets(N), now_ms=1)) == N
    return c, c.process_many(v6_packets(N, flags=0x10), now_ms=2)


def test_ipv6_rewrite_established_tcp(benchmark, established6):
    c, batch = established6
    per_packet(benchmark, c, batch)
    assert batch.verdict_list() == [Verdict.REWRITE] * N


def test_ipv6_rewrite_established_tcp_kernel_verified(benchmark, established6):
    c, batch = established6
    batch.flags = PKT_CSUM_VERIFIED
    per_packet(benchmark, c, batch)
    assert batch.verdict_list() == [Verdict.REWRITE] * N


@pytest.mark.parametrize("scheduler", ["rr", "sh", "maglev"])
def test_ipv6_new_flow_per_scheduler(benchmark, scheduler):
    pkts = v6_packets(N)
    state = {}

    def setup():
        c = Core(CoreConfig(max_flows=1 << 16, workers=1))
        c.publish([v6_service(scheduler, n=10)])
        state["c"], state["b"] = c, c.process_many(pkts, now_ms=1)
        return (), {}

    benchmark.pedantic(lambda: state["c"].process_batch(state["b"]), setup=setup, rounds=10)
    benchmark.extra_info["ns_per_packet"] = round(benchmark.stats.stats.median / N * 1e9, 1)
    assert state["b"].verdict_list() == [Verdict.REWRITE] * N


def test_ipv6_lookup_with_one_million_flows(benchmark):
    total = 1_000_000
    c = Core(CoreConfig(max_flows=total, workers=1))
    c.publish([v6_service(protocol="udp")])
    pkts = v6_packets(total, proto=17)
    filled = c.process_many(pkts, now_ms=1)
    assert c.process_batch(filled) == total and c.flow_count() == total
    sample = c.process_many(pkts[::50], now_ms=2)
    per_packet(benchmark, c, sample)
    benchmark.extra_info["conntrack_bytes"] = c.conntrack_memory()
