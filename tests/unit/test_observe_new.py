"""nl_observe_new: a new flow's first packet the kernel placed itself
(lb.fastpath_decide) becomes natlb's flow exactly as if natlb had queued
that packet and chosen that backend: the same flow, counters, gauges and
held SYN (re-sent the same when its backend stays silent); and what natlb
cannot take is refused, so the kernel forgets it.  Both families."""

from dataclasses import replace

import pytest
from scapy.layers.inet import TCP, UDP

from natlb.core import MARK_FAST, Core, CoreConfig, ForgetKey, Verdict

from .services import Family, make_service

CPORT = 40000


def fast_core() -> Core:
    return Core(CoreConfig(max_flows=1024, workers=1, fastpath=True, syn_timeout_ms=50,
                           resteer_tries=3))


@pytest.fixture
def pair(fam):
    """A core that queues (decides) and one that is told (observes)."""
    cores = fast_core(), fast_core()
    # Two backends: a re-steered SYN goes to the other whatever each core's
    # own hash seed and rr cursor.
    for c in cores:
        c.publish([make_service("sh", addrs=fam.backends[:2], vip=fam.vip)])
    yield cores
    for c in cores:
        c.check_table()
        c.close()


def syn(fam: Family, sport: int = CPORT, seq: int = 1000) -> bytes:
    # TCP options: the held copy is the whole SYN.
    return bytes(fam.ip(src=fam.client, dst=fam.vip) /
                 TCP(sport=sport, dport=80, flags="S", seq=seq,
                     options=[("MSS", 1400), ("SAckOK", b""), ("WScale", 7)]))


def state(c: Core) -> tuple:
    return (c.flow_count(), c.service_counters(1), c.backend_counters(16), c.reasons())


def establish(c: Core, fam: Family) -> int:
    """A connection natlb placed and saw established (SYN, SYN-ACK, ACK at
    t=100, all queued); returns its backend's index."""
    old = c.decide(syn(fam), 100)[1] & 0xFFF
    c.decide(bytes(fam.ip(src=fam.backends[old], dst=fam.client) /
                   TCP(sport=8080, dport=CPORT, flags="SA", seq=5, ack=1001)), 100)
    c.decide(bytes(fam.ip(src=fam.client, dst=fam.vip) /
                   TCP(sport=CPORT, dport=80, flags="A", seq=1001, ack=6)), 100)
    return old


def test_a_placed_syn_is_the_flow_queueing_it_would_make(pair, fam):
    queued, told = pair
    v, mark = queued.decide(syn(fam), 100)
    assert v == Verdict.MARK and mark & MARK_FAST
    bid = mark & 0xFFF
    assert told.observe_new(syn(fam), bid, 100) is True
    assert state(told) == state(queued)
    # The same held SYN: unanswered, both re-send it (to the same next
    # backend) and ask the kernel to forget the same flow.
    for c in pair:
        c.failover_tick(200)
    resent = [c.outbox_take() for c in pair]
    assert resent[0] is not None and resent[0] == resent[1]
    assert fam.ip(resent[0])[TCP].options == fam.ip(syn(fam))[TCP].options
    keys = [c.fp_forget_take()[0] for c in pair]
    assert keys[0] == keys[1] == [ForgetKey(fam.client, CPORT, fam.vip, 80,
                                            fam.backends[bid], 8080, 6)]
    assert state(told) == state(queued)


def test_the_handshake_after_a_placed_syn_moves_the_flow_as_queued(pair, fam):
    queued, told = pair
    bid = queued.decide(syn(fam), 100)[1] & 0xFFF
    told.observe_new(syn(fam), bid, 100)
    b = fam.backends[bid]
    synack = bytes(fam.ip(src=b, dst=fam.client) /
                   TCP(sport=8080, dport=CPORT, flags="SA", seq=500, ack=1001))
    ack = bytes(fam.ip(src=fam.client, dst=fam.vip) /
                TCP(sport=CPORT, dport=80, flags="A", seq=1001, ack=501))
    for pkt in (synack, ack):
        assert queued.decide(pkt, 110)[0] == Verdict.MARK
        assert told.observe(pkt, 110) is True
    assert state(told) == state(queued)
    active = [sum(x.active_flows for x in c.backend_counters(16)) for c in pair]
    assert active == [1, 1]


def test_a_placed_udp_datagram_is_the_flow_queueing_it_would_make(fam):
    cores = fast_core(), fast_core()
    for c in cores:
        c.publish([fam.service(scheduler="maglev", protocol="udp", port=53)])
    queued, told = cores
    q = bytes(fam.ip(src=fam.client, dst=fam.vip) / UDP(sport=CPORT, dport=53) / b"query")
    v, mark = queued.decide(q, 100)
    assert v == Verdict.MARK and mark & MARK_FAST
    assert told.observe_new(q, mark & 0xFFF, 100) is True
    assert state(told) == state(queued)
    for c in cores:
        c.close()


def test_a_placed_syn_to_a_backend_natlb_no_longer_places_on_is_followed_not_carried(fam):
    """Drained (or dead) since the kernel read its table: the SYN went there
    all the same, so natlb holds the flow (its held SYN re-steers it), but
    the kernel must forget it (refused)."""
    c = fast_core()
    c.publish([fam.service(draining=(fam.backends[0],))])
    try:
        assert c.observe_new(syn(fam), 0, 100) is True       # drained: alive still
        c.publish([fam.service(down=(fam.backends[1],))])
        assert c.observe_new(syn(fam, CPORT + 1), 1, 100) is False
        assert c.flow_count() == 2
        c.failover_tick(200)
        resent = fam.ip(c.outbox_take())
        assert resent[TCP].dport == 8080 and resent.dst != fam.backends[1]
    finally:
        c.close()


def test_a_placed_syn_on_a_connection_natlb_holds_established_does_not_move_it(fam):
    """A port the client reuses before natlb saw the old connection close
    (established here), the kernel's entries emptied or evicted: queued,
    that SYN would have gone to the connection's backend, so natlb keeps
    its flow there and refuses the record (the kernel forgets what it
    installed; the client's SYN again is natlb's)."""
    c = fast_core()
    c.publish([fam.service()])
    try:
        old = establish(c, fam)
        b = fam.backends[old]
        new = (old + 1) % 3
        assert c.observe_new(syn(fam, seq=50_000), new, 101) is False
        assert c.flow_count() == 1
        assert c.backend_counters(16)[new].new_flows == 0
        # The connection's backend is still the flow's; the other one's SYN-ACK is not.
        assert c.decide(bytes(fam.ip(src=b, dst=fam.client) /
                              TCP(sport=8080, dport=CPORT, flags="A", seq=6, ack=1001)),
                        102)[0] == Verdict.MARK
        nb = fam.backends[new]
        assert c.decide(bytes(fam.ip(src=nb, dst=fam.client) /
                              TCP(sport=8080, dport=CPORT, flags="SA", seq=9, ack=50_001)),
                        102)[0] != Verdict.MARK
    finally:
        c.close()


def test_a_placed_syn_on_a_closed_connections_tuple_is_a_new_flow_where_the_kernel_sent_it(fam):
    """The client reusing a port after natlb saw the connection close (its
    RST): the kernel places the SYN and the flow is where it went."""
    c = fast_core()
    c.publish([fam.service()])
    try:
        old = establish(c, fam)
        c.decide(bytes(fam.ip(src=fam.client, dst=fam.vip) /
                       TCP(sport=CPORT, dport=80, flags="R", seq=1001)), 100)
        new = (old + 1) % 3
        assert c.observe_new(syn(fam, seq=50_000), new, 101) is True
        assert c.flow_count() == 1
        assert c.backend_counters(16)[new].new_flows == 1
        nb = fam.backends[new]
        assert c.decide(bytes(fam.ip(src=nb, dst=fam.client) /
                              TCP(sport=8080, dport=CPORT, flags="SA", seq=9, ack=50_001)),
                        102)[0] == Verdict.MARK
    finally:
        c.close()


@pytest.mark.parametrize("case", ["unknown-backend", "cluster", "not-a-syn",
                                  "bad-checksum", "table-full"])
def test_what_natlb_cannot_take_is_refused(fam, case):
    c = Core(CoreConfig(max_flows=16 if case == "table-full" else 1024, workers=1,
                        fastpath=True, syn_timeout_ms=50))
    try:
        c.publish([replace(fam.service(scheduler="maglev"), cluster=case == "cluster")])
        pkt, bid = syn(fam), 1
        if case == "unknown-backend":
            bid = 9
        elif case == "not-a-syn":
            pkt = bytes(fam.ip(src=fam.client, dst=fam.vip) /
                        TCP(sport=CPORT, dport=80, flags="A", seq=1000))
        elif case == "bad-checksum":
            ip = fam.ip(pkt)
            ip[TCP].chksum ^= 0x5555
            pkt = bytes(ip)
        elif case == "table-full":
            # Established flows natlb will not evict for a new one.
            for i in range(16):
                s = syn(fam, 1000 + i)
                b = c.decide(s, 100)[1] & 0xFFF
                c.decide(bytes(fam.ip(src=fam.backends[b], dst=fam.client) /
                               TCP(sport=8080, dport=1000 + i, flags="SA", seq=5, ack=1001)),
                         100)
                c.decide(bytes(fam.ip(src=fam.client, dst=fam.vip) /
                               TCP(sport=1000 + i, dport=80, flags="A", seq=1001, ack=6)), 100)
        before = c.flow_count()
        assert c.observe_new(pkt, bid, 101) is False
        assert c.flow_count() == before
    finally:
        c.close()


def test_a_repeated_syn_follows_the_kernel_only_if_it_placed_it_after_natlb_did(fam):
    """The same SYN (ISN) natlb holds in SYN_SENT: placed by the kernel
    before natlb noted its own copy (a duplicate within the observer's lag)
    natlb's flow stays; placed a second later (a retransmission natlb never
    saw queued, its own copy lost in a handover) the flow follows it."""
    for placed, kept in ((1000, True), (2000, False)):
        c = fast_core()
        c.publish([fam.service()])
        try:
            mine = c.decide(syn(fam), 1000)[1] & 0xFFF
            other = (mine + 1) % 3
            assert c.observe_new(syn(fam), other, 1001, placed_ms=placed) is not kept
            assert c.flow_count() == 1
            _, mark = c.decide(bytes(fam.ip(src=fam.backends[mine], dst=fam.client) /
                                     TCP(sport=8080, dport=CPORT, flags="SA", seq=5,
                                         ack=1001)), 2001)
            assert bool(mark) is kept
        finally:
            c.close()
