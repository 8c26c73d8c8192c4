"""IPv6 fragments (fragment header: 32-bit id, offset, M flag) through the C
core: later fragments follow their first's verdict, early ones are held and
released, in both directions and both modes; copy mode rewrites the first
fragment's L4 checksum only, and the reassembled datagram checks out."""

import random

import pytest
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, fragment6, in6_chksum

from natlb.core import MARK_FORWARD, MARK_REPLY, Core, CoreConfig, Verdict

from .test_fragments import ORDERS, assert_query_and_answer_passed, forward_all
from .test_ipv6 import BACKENDS6, CLIENT6, VIP6, v6_service

BACKEND_PORT = 5353
CLIENT_PORT = 40000


@pytest.fixture
def fcore():
    c = Core(CoreConfig(max_flows=4096, workers=1, max_fragments=4096,
                        fragment_timeout_ms=1000))
    c.publish([v6_service(protocol="udp", port=53, backend_port=BACKEND_PORT, sid=1)])
    yield c
    c.check_table()
    c.close()


def datagram6(src, dst, sport, dport, size, frag_id, seed=0, hbh=False):
    payload = random.Random(seed).randbytes(size)
    ip = IPv6(src=src, dst=dst)
    if hbh:
        ip = ip / IPv6ExtHdrHopByHop()
    pkt = ip / IPv6ExtHdrFragment(id=frag_id) / UDP(sport=sport, dport=dport) / payload
    return payload, [bytes(f) for f in fragment6(pkt, 1280)]


def frag_data(p: IPv6) -> tuple[int, bytes]:
    fh = p[IPv6ExtHdrFragment]
    return fh.offset * 8, bytes(fh.payload)


def reassemble6(raws):
    """As a receiver: one datagram (addresses, id, next header agree), its
    pieces cover it exactly, and the UDP checksum over the pseudo-header is
    right."""
    frags = [IPv6(r) for r in raws]
    for p, r in zip(frags, raws, strict=True):
        assert p.plen == len(r) - 40
    keys = {(p.src, p.dst, p[IPv6ExtHdrFragment].id, p[IPv6ExtHdrFragment].nh) for p in frags}
    assert len(keys) == 1, "fragments diverged"
    pieces = sorted(frag_data(p) for p in frags)
    l4, at = b"", 0
    for off, data in pieces:
        assert off == at
        l4 += data
        at += len(data)
    assert sum(p[IPv6ExtHdrFragment].m == 0 for p in frags) == 1
    head = frags[0]
    assert in6_chksum(17, IPv6(src=head.src, dst=head.dst), l4) == 0, "UDP checksum"
    return head.src, head.dst, UDP(l4)


@pytest.mark.parametrize("hbh", [False, True], ids=["plain", "hop-by-hop"])
@pytest.mark.parametrize("order", ORDERS, ids=list(ORDERS))
@pytest.mark.parametrize("size", [4000, 30000])
def test_both_directions_copy_mode_rewritten_consistently(fcore, order, size, hbh):
    payload, frags = datagram6(CLIENT6, VIP6, CLIENT_PORT, 53, size, 0x12345678, hbh=hbh)
    out = forward_all(fcore, frags, ORDERS[order](len(frags)), mark_mode=False)
    src, dst, udp = reassemble6(out)
    assert src == CLIENT6 and dst in BACKENDS6
    assert (udp.sport, udp.dport, bytes(udp.payload)) == (CLIENT_PORT, BACKEND_PORT, payload)
    # Later fragments: only the destination address changed.
    for before, after in zip(frags[1:], out[1:], strict=True):
        assert before[:24] == after[:24] and before[40:] == after[40:]

    answer, rfrags = datagram6(dst, CLIENT6, BACKEND_PORT, CLIENT_PORT, size + 3, 0x9abcdef0,
                               seed=1, hbh=hbh)
    back = forward_all(fcore, rfrags, ORDERS[order](len(rfrags)), mark_mode=False,
                       first_id=500)
    src, dst, udp = reassemble6(back)
    assert (src, dst, udp.sport, udp.dport) == (VIP6, CLIENT6, 53, CLIENT_PORT)
    assert bytes(udp.payload) == answer
    assert_query_and_answer_passed(fcore, order, frags, rfrags)


@pytest.mark.parametrize("order", ORDERS, ids=list(ORDERS))
def test_mark_mode_gives_every_fragment_its_first_fragments_mark(fcore, order):
    _, frags = datagram6(CLIENT6, VIP6, CLIENT_PORT, 53, 8000, 7)
    marks = forward_all(fcore, frags, ORDERS[order](len(frags)), mark_mode=True)
    assert len(set(marks)) == 1 and marks[0] & ~0xfff == MARK_FORWARD
    backend = BACKENDS6[(marks[0] & 0xfff) - 16]
    _, rfrags = datagram6(backend, CLIENT6, BACKEND_PORT, CLIENT_PORT, 8000, 9)
    back = forward_all(fcore, rfrags, ORDERS[order](len(rfrags)), mark_mode=True, first_id=500)
    assert set(back) == {MARK_REPLY | 1}


def test_one_id_from_two_clients_and_ids_beyond_16_bits_stay_apart(fcore):
    a = datagram6(CLIENT6, VIP6, CLIENT_PORT, 53, 3000, 0x10005)[1]
    b = datagram6("2001:db8:1::8", VIP6, CLIENT_PORT, 53, 3000, 0x10005)[1]
    c = datagram6(CLIENT6, VIP6, CLIENT_PORT + 1, 53, 3000, 0x20005)[1]  # same low 16 bits
    outs = [{}, {}, {}]
    for i in range(len(a)):
        for k, frags in enumerate((a, b, c)):
            outs[k][i] = fcore.process(frags[i], 1000)[1]
    dsts = [IPv6(o[0]).dst for o in outs]
    assert len(set(dsts)) == 3                 # rr: three flows, three backends
    for k in range(3):
        assert {IPv6(o).dst for o in outs[k].values()} == {dsts[k]}


def test_held_fragments_time_out_and_are_counted(fcore):
    _, frags = datagram6(CLIENT6, VIP6, CLIENT_PORT, 53, 4000, 3)
    for i in (2, 1):
        assert fcore.process(frags[i], 1000, packet_id=i)[0] == Verdict.HOLD
    fcore.fragment_tick(1999)
    assert fcore.take_released() == []
    fcore.fragment_tick(2000)
    assert sorted((r.packet_id, r.verdict) for r in fcore.take_released()) == [
        (1, Verdict.DROP), (2, Verdict.DROP)]
    assert fcore.fragment_counters()["timeouts"] == 2


def test_an_atomic_fragment_is_a_whole_datagram(fcore):
    raw = bytes(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment(id=5, m=0, offset=0) /
                UDP(sport=CLIENT_PORT, dport=53) / b"q")
    v, out = fcore.process(raw, 1)
    assert v == Verdict.REWRITE and IPv6(out).dst in BACKENDS6
    u = IPv6(out)[UDP]
    chk = u.chksum
    del u.chksum
    assert IPv6(bytes(IPv6(out)))[UDP].chksum == chk
    assert fcore.fragment_counters()["datagrams"] == 0


def test_later_fragment_without_tracking_is_dropped():
    c = Core(CoreConfig(max_flows=64, workers=1, max_fragments=0))
    c.publish([v6_service(protocol="udp", port=53, backend_port=BACKEND_PORT, sid=1)])
    _, frags = datagram6(CLIENT6, VIP6, CLIENT_PORT, 53, 3000, 4)
    assert c.process(frags[1], 1, packet_id=1)[0] == Verdict.DROP
    assert c.fragment_counters()["untracked"] == 1 and c.reasons()["fragment"] == 1
    c.close()
