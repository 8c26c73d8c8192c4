"""IP fragments through the C core: later fragments follow their first
fragment's verdict (same backend, same client), early ones are held and
released, and the tracking table stays bounded under a flood.  Checksums are
checked on every fragment (IP) and on the reassembled datagram (UDP)."""

import random
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP, fragment, in4_chksum
from scapy.utils import checksum

from natlb.core import MARK_FORWARD, MARK_REPLY, Core, CoreConfig, Verdict

from .services import BACKENDS, CLIENT, VIP, make_service

TIMEOUT_MS = 1000
BACKEND_PORT = 5353
CLIENT_PORT = 40000


def udp_service():
    return make_service(protocol="udp", port=53, backend_port=BACKEND_PORT, sid=1)


def make_core(max_fragments=4096):
    c = Core(CoreConfig(max_flows=4096, workers=1, max_fragments=max_fragments,
                        fragment_timeout_ms=TIMEOUT_MS))
    c.publish([udp_service()])
    return c


@pytest.fixture
def fcore():
    c = make_core()
    yield c
    c.close()


def datagram(src, dst, sport, dport, size, ip_id, seed=0):
    payload = random.Random(seed).randbytes(size)
    pkt = IP(src=src, dst=dst, id=ip_id) / UDP(sport=sport, dport=dport) / payload
    return payload, [bytes(f) for f in fragment(pkt, fragsize=1480)]


def reassemble(raws):
    """Every fragment's IP checksum, then the datagram's UDP checksum and
    payload, as a receiver would check them."""
    frags = sorted((IP(r) for r in raws), key=lambda p: p.frag)
    for r in raws:
        assert checksum(r[:20]) == 0, "IP checksum"
    head = frags[0]
    assert head.frag == 0 and frags[-1].flags.MF == 0
    assert len({(f.src, f.dst, f.id, f.proto) for f in frags}) == 1, "fragments diverged"
    l4 = b"".join(bytes(r[20:IP(r).len]) for r in sorted(raws, key=lambda r: IP(r).frag))
    assert in4_chksum(17, IP(src=head.src, dst=head.dst), l4) == 0, "UDP checksum"
    return head.src, head.dst, UDP(l4)


def forward_all(core, frags, order, mark_mode, first_id=100):
    """Feed fragments in `order`; returns what a worker would send for each
    (rewritten bytes in copy mode, marks in mark mode), by fragment index."""
    sent, held = {}, {}
    for n, i in enumerate(order):
        if mark_mode:
            v, mark = core.decide(frags[i], 1000 + n, packet_id=first_id + i)
            out = mark
        else:
            v, out = core.process(frags[i], 1000 + n, packet_id=first_id + i)
        if v == Verdict.HOLD:
            held[first_id + i] = i
            continue
        assert v in (Verdict.MARK, Verdict.REWRITE), (i, v)
        sent[i] = out
    for rel in core.take_released():
        i = held.pop(rel.packet_id)
        assert rel.verdict == (Verdict.MARK if mark_mode else Verdict.REWRITE)
        sent[i] = rel.mark if mark_mode else rel.packet
    assert not held, "held fragments never released"
    return [sent[i] for i in range(len(frags))]


ORDERS = {
    "in order": lambda n: list(range(n)),
    "later fragments first": lambda n: list(range(n - 1, -1, -1)),
    "first in the middle": lambda n: [1, 2, 0] + list(range(3, n)),
}


@pytest.mark.parametrize("order", ORDERS, ids=list(ORDERS))
@pytest.mark.parametrize("size", [4000, 30000])
def test_both_directions_copy_mode_rewritten_consistently(fcore, order, size):
    payload, frags = datagram(CLIENT, VIP, CLIENT_PORT, 53, size, ip_id=7)
    out = forward_all(fcore, frags, ORDERS[order](len(frags)), mark_mode=False)
    src, dst, udp = reassemble(out)
    assert src == CLIENT and dst in BACKENDS
    assert (udp.sport, udp.dport, bytes(udp.payload)) == (CLIENT_PORT, BACKEND_PORT, payload)

    answer, rfrags = datagram(dst, CLIENT, BACKEND_PORT, CLIENT_PORT, size + 3, ip_id=9, seed=1)
    back = forward_all(fcore, rfrags, ORDERS[order](len(rfrags)), mark_mode=False, first_id=500)
    src, dst, udp = reassemble(back)
    assert (src, dst, udp.sport, udp.dport) == (VIP, CLIENT, 53, CLIENT_PORT)
    assert bytes(udp.payload) == answer
    assert_query_and_answer_passed(fcore, order, frags, rfrags)


def assert_query_and_answer_passed(fcore, order, frags, rfrags) -> None:
    """One fragmented query and its fragmented answer (either family) went
    through whole: counted, and nothing left tracked or held."""
    c = fcore.fragment_counters()
    assert c["datagrams"] == 2 and c["timeouts"] == 0 and c["overflow"] == 0
    if order == "in order":
        assert c["held"] == 0 and c["followed"] == len(frags) + len(rfrags) - 2
    else:
        assert c["held"] == c["released"] > 0
    assert fcore.fragments_tracked() == 0 and fcore.fragments_held() == 0
    s = fcore.service_counters(2)[1]
    assert s.packets_in == len(frags) and s.packets_out == len(rfrags)
    assert s.bytes_in == sum(len(f) for f in frags)


@pytest.mark.parametrize("order", ORDERS, ids=list(ORDERS))
def test_mark_mode_gives_every_fragment_its_first_fragments_mark(fcore, order):
    _, frags = datagram(CLIENT, VIP, CLIENT_PORT, 53, 8000, ip_id=7)
    marks = forward_all(fcore, frags, ORDERS[order](len(frags)), mark_mode=True)
    assert len(set(marks)) == 1 and marks[0] & ~0xfff == MARK_FORWARD
    backend = BACKENDS[(marks[0] & 0xfff) - 16]
    _, rfrags = datagram(backend, CLIENT, BACKEND_PORT, CLIENT_PORT, 8000, ip_id=9)
    back = forward_all(fcore, rfrags, ORDERS[order](len(rfrags)), mark_mode=True, first_id=500)
    assert set(back) == {MARK_REPLY | 1}


def test_fragments_of_datagrams_with_one_id_from_two_clients_stay_apart(fcore):
    a = datagram(CLIENT, VIP, CLIENT_PORT, 53, 3000, ip_id=5)[1]
    b = datagram("198.51.100.8", VIP, CLIENT_PORT, 53, 3000, ip_id=5)[1]
    out_a, out_b = {}, {}
    for i in range(len(a)):   # interleaved: a0 b0 a1 b1 ...
        out_a[i] = fcore.process(a[i], 1000)[1]
        out_b[i] = fcore.process(b[i], 1000)[1]
    da, db = IP(out_a[0]).dst, IP(out_b[0]).dst
    assert da != db    # rr: two flows, two backends
    assert {IP(o).dst for o in out_a.values()} == {da}
    assert {IP(o).dst for o in out_b.values()} == {db}


def test_later_fragments_of_a_pass_or_drop_follow_it(fcore):
    # Not ours (no service, no flow): the first passes, so do the rest.
    _, frags = datagram(CLIENT, "192.0.2.200", CLIENT_PORT, 53, 3000, ip_id=1)
    assert [fcore.process(f, 1000, packet_id=i)[0] for i, f in enumerate(frags)] == \
        [Verdict.ACCEPT] * len(frags)
    assert [fcore.process(f, 1000)[1] for f in frags] == frags   # untouched
    # No backend: the first is dropped, and its held fragments with it.
    fcore.publish([make_service(protocol="udp", port=53, sid=1, down=BACKENDS)])
    _, frags = datagram(CLIENT, VIP, CLIENT_PORT + 1, 53, 3000, ip_id=2)
    assert fcore.process(frags[1], 1000, packet_id=11)[0] == Verdict.HOLD
    assert fcore.process(frags[0], 1000, packet_id=10)[0] == Verdict.DROP
    assert fcore.process(frags[2], 1000, packet_id=12)[0] == Verdict.DROP
    assert [(r.packet_id, r.verdict) for r in fcore.take_released()] == [(11, Verdict.DROP)]


def test_held_fragments_time_out_and_are_counted(fcore):
    _, frags = datagram(CLIENT, VIP, CLIENT_PORT, 53, 4000, ip_id=3)
    assert fcore.process(frags[2], 1000, packet_id=1)[0] == Verdict.HOLD
    assert fcore.process(frags[1], 1010, packet_id=2)[0] == Verdict.HOLD
    fcore.fragment_tick(1000 + TIMEOUT_MS - 1)
    assert fcore.take_released() == [] and fcore.fragments_held() == 2
    fcore.fragment_tick(1000 + TIMEOUT_MS)
    rel = fcore.take_released()
    assert [(r.packet_id, r.verdict) for r in rel] == [(1, Verdict.DROP), (2, Verdict.DROP)]
    c = fcore.fragment_counters()
    assert c["timeouts"] == 2 and c["released"] == 0
    assert fcore.fragments_tracked() == 0 and fcore.fragments_held() == 0
    # The first fragment, too late: a datagram of its own, never completed.
    assert fcore.process(frags[0], 2500)[0] == Verdict.REWRITE
    fcore.fragment_tick(2500 + TIMEOUT_MS)
    assert fcore.fragment_counters()["incomplete"] == 1 and fcore.fragments_tracked() == 0


def test_without_a_packet_id_nothing_is_held(fcore):
    _, frags = datagram(CLIENT, VIP, CLIENT_PORT, 53, 4000, ip_id=3)
    assert fcore.process(frags[1], 1000)[0] == Verdict.DROP
    c = fcore.fragment_counters()
    assert c["hold_full"] == 1 and c["datagrams"] == 0 and fcore.fragments_tracked() == 0
    assert fcore.reasons()["fragment"] == 1


def test_tracking_off_drops_later_fragments():
    c = make_core(max_fragments=0)
    _, frags = datagram(CLIENT, VIP, CLIENT_PORT, 53, 4000, ip_id=3)
    assert c.process(frags[0], 1000)[0] == Verdict.REWRITE
    assert c.process(frags[1], 1000, packet_id=1)[0] == Verdict.DROP
    assert c.fragment_counters()["untracked"] == 1 and c.fragment_memory() < 1 << 16
    c.close()


def first_fragments(n, ip_base=0, client_base=0):
    """n datagrams from n clients: their fragment lists."""
    out = []
    for k in range(n):
        client = f"198.51.100.{10 + (client_base + k) % 200}"
        port = 20000 + client_base + k
        out.append(datagram(client, VIP, port, 53, 3000, ip_id=ip_base + k)[1])
    return out


def test_full_table_evicts_the_oldest_datagram_and_counts_it():
    c = make_core(max_fragments=64)
    dgrams = first_fragments(65)
    for k, frags in enumerate(dgrams):
        assert c.process(frags[0], 1000 + k)[0] == Verdict.REWRITE
    assert c.fragments_tracked() == 64
    assert c.fragment_counters()["overflow"] == 1
    # The newest still follow; the evicted oldest's fragments cannot.
    assert c.process(dgrams[64][1], 1100)[0] == Verdict.REWRITE
    assert c.process(dgrams[0][1], 1100, packet_id=1)[0] == Verdict.DROP
    c.close()


def bogus_fragments(n, rng, one_source=None):
    """Later fragments of datagrams that never had a first (their ids are
    above those of first_fragments), built without scapy: floods are big."""
    out = []
    for _ in range(n):
        src = socket.inet_aton(one_source or f"198.51.100.{rng.randrange(1, 255)}")
        flags_off = rng.choice([0, 0x2000]) | rng.randrange(1, 8000)
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 64, rng.randrange(1000, 65536),
                          flags_off, 64, 17, 0, src, socket.inet_aton(VIP))
        hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
        out.append(hdr + rng.randbytes(64))
    return out


def test_a_flood_of_bogus_fragments_stays_bounded_and_spares_real_datagrams():
    c = make_core(max_fragments=1024)
    rng = random.Random(5)
    real = first_fragments(200)
    for frags in real:
        assert c.process(frags[0], 1000)[0] == Verdict.REWRITE
    flood = bogus_fragments(20000, rng)
    verdicts = []
    for i, f in enumerate(flood):
        verdicts.append(c.process(f, 1001, packet_id=100000 + i)[0])
        if i % 64 == 63:         # a worker answers released ones after each batch
            c.take_released()
    assert set(verdicts) == {Verdict.HOLD}   # the oldest waiting one is evicted
    assert c.fragments_tracked() <= 1024 and c.fragments_held() <= 2 * 256
    assert c.fragment_counters()["overflow"] >= 20000 - 256
    # Real datagrams whose first fragment came were never evicted by the flood.
    for frags in real:
        assert [c.process(f, 1002)[0] for f in frags[1:]] == [Verdict.REWRITE] * (len(frags) - 1)
    # An out-of-order datagram arriving during the flood is held and released.
    late = first_fragments(1, ip_base=9000, client_base=250)[0]
    assert c.process(late[1], 1003, packet_id=1)[0] == Verdict.HOLD
    assert c.process(late[0], 1003, packet_id=2)[0] == Verdict.REWRITE
    rel = [r for r in c.take_released() if r.packet_id == 1]
    assert len(rel) == 1 and rel[0].verdict == Verdict.REWRITE
    c.close()


def test_one_flooding_source_gets_only_its_share_of_the_hold_buffer():
    c = make_core(max_fragments=4096)          # 1024 hold slots, 128 per source
    rng = random.Random(6)
    for i, f in enumerate(bogus_fragments(5000, rng, one_source="198.51.100.66")):
        c.process(f, 1000, packet_id=i)
    assert c.fragments_held() == 128
    assert c.fragment_counters()["hold_full"] == 5000 - 128
    # Everyone else still has room.
    other = first_fragments(1, client_base=5)[0]
    assert c.process(other[1], 1001, packet_id=99999)[0] == Verdict.HOLD
    c.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 4),
                          st.booleans(), st.integers(0, 2000)), max_size=60))
def test_every_held_fragment_gets_exactly_one_verdict(ops):
    """Random fragments (a few ids and sources, any offsets, first or not,
    any times): whatever happens, each HOLD is answered exactly once."""
    c = make_core(max_fragments=16)     # a small table: eviction paths too
    held, answered = set(), []
    now = 1000
    for pid, (src, ip_id, off, mf, dt) in enumerate(ops):
        now += dt
        pkt = IP(src=f"198.51.100.{10 + src}", dst=VIP, id=ip_id, frag=off * 100,
                 flags="MF" if mf else 0) / UDP(sport=30000 + src, dport=53) / (b"z" * 40)
        if off:
            pkt = IP(bytes(pkt))   # a later fragment: the UDP header is just payload
        v, _ = c.process(bytes(pkt), now, packet_id=pid)
        if v == Verdict.HOLD:
            held.add(pid)
        c.fragment_tick(now)
        answered += [r.packet_id for r in c.take_released()]
    c.fragment_tick(now + TIMEOUT_MS)
    answered += [r.packet_id for r in c.take_released()]
    assert sorted(answered) == sorted(held)
    assert c.fragments_held() == 0 and c.fragments_tracked() == 0
    c.close()
