"""Review of kernel decisions (lb.fastpath_decide): a SYN the kernel placed
must be believed only as far as natlb would believe it queued.

A SYN from the wire whose TCP checksum field holds only the pseudo-header's
sum (the CHECKSUM_PARTIAL form a local sender's packet has in tc) is a bad
checksum: queued, natlb drops it (packet.c: "forwarding it would let a
client make natlb see a backend 'not answering'").  Placed by the kernel,
the record does not say whether the skb really was CHECKSUM_PARTIAL, and
nl_observed_new believes the partial form: natlb then holds a flow whose
SYN its backend dropped, reports that backend silent (a passive failure a
client can forge at will) and re-sends the held SYN with a repaired sum to
another backend."""

import ipaddress

from scapy.layers.inet import ICMP, IP, TCP, UDP

from natlb.core import Core, CoreConfig, Verdict

from .services import Family

CPORT = 40000


def fold(s: int) -> int:
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def partial_form_syn(fam: Family) -> bytes:
    """A SYN whose checksum field is the pseudo-header's folded sum (what
    nl_csum_partial_form accepts), as a client can put on any wire."""
    pkt = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=CPORT, dport=80, flags="S",
                                                     seq=1000, options=[("MSS", 1400)])
    raw = bytes(pkt)
    v4 = fam.ip is IP
    l4 = raw[20:] if v4 else raw[40:]
    src = ipaddress.ip_address(fam.client).packed
    dst = ipaddress.ip_address(fam.vip).packed
    if v4:
        pseudo = src + dst + bytes([0, 6]) + len(l4).to_bytes(2, "big")
    else:
        pseudo = src + dst + len(l4).to_bytes(4, "big") + bytes([0, 0, 0, 6])
    s = sum(int.from_bytes(pseudo[i:i + 2], "big") for i in range(0, len(pseudo), 2))
    pkt = fam.ip(raw)
    pkt[TCP].chksum = fold(s)
    return bytes(pkt)


def fresh(fam: Family) -> Core:
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=True, syn_timeout_ms=50,
                        resteer_tries=3))
    c.publish([fam.service(scheduler="rr")])
    return c


def test_a_placed_syn_with_a_bad_partial_form_checksum_is_refused_as_queued(fam):
    queued, told = fresh(fam), fresh(fam)
    try:
        forged = partial_form_syn(fam)
        # Queued from the wire (no NL_PKT_CSUM_PARTIAL from the kernel): dropped.
        assert queued.decide(forged, 100)[0] == Verdict.DROP
        assert queued.flow_count() == 0
        # The kernel placed it (its rewrite leaves the sum wrong: the backend
        # drops it): natlb must not take it either.
        assert told.observe_new(forged, 0, 100) is False
        assert told.flow_count() == 0
    finally:
        queued.close()
        told.close()


def test_a_placed_forged_syn_makes_no_passive_failure_and_no_repaired_resend(fam):
    c = fresh(fam)
    try:
        c.observe_new(partial_form_syn(fam), 0, 100)
        c.failover_tick(200)           # the backend never answers what it dropped
        resent = c.outbox_take()
        events = [e.kind for e in c.read_events()]
        assert events == [] and resent is None, (events, resent and fam.ip(resent).summary())
    finally:
        c.close()


def test_an_icmp_error_about_traffic_natlb_never_carried_is_passed_on_while_observing():
    """nl_defer_packet keeps every ICMP error quoting a flow natlb does not
    hold while the fast path's observer runs (lb.fastpath, decide on or
    off), and drops it after the retry.  A client's UDP probe sent straight
    to a backend host's own address (no VIP, no service) gets its port
    unreachable passed on without the fast path; with it, never."""
    fam = Family(IP, "198.51.100.7", "192.0.2.100", ["203.0.113.10"])
    probe = bytes(IP(src=fam.client, dst=fam.backends[0], ttl=63) /
                  UDP(sport=33434, dport=33434) / b"x")
    error = bytes(IP(src=fam.backends[0], dst=fam.client) / ICMP(type=3, code=3) / probe[:28])
    verdicts = []
    for observing in (False, True):
        c = fresh(fam)
        try:
            c.fp_observing(observing)
            verdicts.append(c.decide(error, 100)[0])
        finally:
            c.close()
    assert verdicts == [Verdict.ACCEPT, Verdict.ACCEPT]
