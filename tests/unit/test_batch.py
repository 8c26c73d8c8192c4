"""A batch (nl_process_many, which parses and fetches a few packets ahead)
decides exactly as the same packets one call each: verdicts, bytes, counters
and flows, over a mix where later packets depend on earlier ones of the same
batch (a SYN and its ACK side by side, a first fragment and the rest),
both families, and packets natlb refuses or passes."""

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from natlb.core import PKT_CSUM_VERIFIED, Core, CoreConfig, Verdict

from .services import BACKENDS, CLIENT, VIP, make_service
from .test_ipv6 import BACKENDS6, CLIENT6, VIP6, v6_service


def core() -> Core:
    c = Core(CoreConfig(max_flows=4096, workers=1, max_fragments=64))
    c.publish([make_service("rr"), make_service("rr", protocol="udp", sid=1),
               v6_service("rr", sid=2)])
    return c


def tcp4(src, dst, sport, dport, flags, seq=1000, ack=0):
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                            ack=ack))


def tcp6(src, dst, sport, dport, flags, seq=1000, ack=0):
    return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=seq,
                                              ack=ack))


def mixed() -> list[bytes]:
    out: list[bytes] = []
    for i in range(40):                       # > one chunk of the batch
        sport = 2000 + i
        out.append(tcp4(CLIENT, VIP, sport, 80, "S"))
        # Every backend answers: the one the flow went to matches, the others are not ours.
        out += [tcp4(b, CLIENT, 8080, sport, "SA", seq=5000, ack=1001) for b in BACKENDS]
        out.append(tcp4(CLIENT, VIP, sport, 80, "A", seq=1001, ack=5001))
        out.append(tcp6(CLIENT6, VIP6, sport, 80, "S"))
        out += [tcp6(b, CLIENT6, 8080, sport, "SA", seq=5000, ack=1001) for b in BACKENDS6]
        if i % 5 == 0:
            out.append(tcp4(CLIENT, VIP, sport, 80, "FA", seq=1001, ack=5001))
            out.append(tcp4(CLIENT, VIP, 9000 + i, 80, "A"))          # no flow
    bad = bytearray(tcp4(CLIENT, VIP, 3000, 80, "S"))
    bad[-3] ^= 0xFF                                                    # wrong checksum
    out.append(bytes(bad))
    out.append(tcp4(CLIENT, VIP, 3001, 80, "S")[:30])                  # truncated
    out.append(bytes(IP(src=CLIENT, dst=VIP) / ICMP()))                 # not an error
    out.append(bytes(IP(src=BACKENDS[0], dst=VIP) / ICMP(type=3, code=1) /
                     IP(src=VIP, dst=BACKENDS[0]) / TCP(sport=2000, dport=8080)))
    dgram = IP(src=CLIENT, dst=VIP, id=77) / UDP(sport=4000, dport=80) / Raw(b"x" * 1200)
    out += [bytes(f) for f in fragment(dgram, fragsize=400)]
    out.append(bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=4001, dport=80) / b"y"))
    out.append(tcp4(CLIENT, "192.0.2.99", 3002, 80, "S"))              # no service: passed
    return out


@pytest.mark.parametrize("flags", [0, PKT_CSUM_VERIFIED])
def test_a_batch_decides_as_one_packet_at_a_time(flags):
    pkts = mixed()
    one, many = core(), core()
    try:
        singles = [one.process(p, now_ms=10, flags=flags) for p in pkts]
        batch = many.process_many(pkts, now_ms=10, flags=flags)
        rewritten = many.process_batch(batch)
        got = [bytes(batch.bufs[i * batch.stride:i * batch.stride + len(p)])
               for i, p in enumerate(pkts)]
        assert batch.verdict_list() == [v for v, _ in singles]
        assert got == [b for _, b in singles]
        assert rewritten == sum(v == Verdict.REWRITE for v, _ in singles)
        assert many.reasons() == one.reasons()
        assert many.flow_count() == one.flow_count() > 0
        # The mix did exercise each kind of answer.
        assert {v for v, _ in singles} >= {Verdict.REWRITE, Verdict.ACCEPT, Verdict.DROP}
        assert sum(one.reasons().values()) > 0
        one.check_table()
        many.check_table()
    finally:
        one.close()
        many.close()
