"""Review of kernel decisions (lb.fastpath_decide), with the carry program
run by BPF_PROG_TEST_RUN as tests/netns/test_fastpath_decide_bpf.py runs it.

natlb's flow of a first packet the kernel placed exists only once the
observer applies its record: busy, up to about 1 ms after the packet
(tcfast.c POLL_MS), and later while the ring is full.  A backend's answer
that the kernel does not carry in that time is queued to natlb, whose
worker finds no flow: queued first packets never had that window.  Such
a published backend's answer is held (nl_defer_packet) until the
observer's round has applied the records, never passed on un-NATed, and
what then still finds no flow (traffic straight to a backend's address)
is sent on as the kernel would forward it.  Each test replays one such
order of events."""

import socket
from dataclasses import replace

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from natlb.core import MARK_FAST, Verdict

from . import test_fastpath_decide_bpf as base
from .test_fastpath_decide_bpf import (
    BPORT,
    ETH,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    VPORT,
    chosen,
    client_of,
    place,
    publish,
    service,
)

# Its namespace, programs and core, for these tests too.
ns, inside, fp, core, fam = base.ns, base.inside, base.fp, base.core, base.fam


def reply_frame(fam, src: str, dst: str, l4) -> bytes:
    ip = IPv6(src=src, dst=dst) if fam.v6 else IP(src=src, dst=dst)
    return bytes(Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01") / ip / l4)


def from_backend(inside, fp, ns, frame: bytes):
    _, idx = ns
    return inside(fp.test_run, False, frame, ifindex=idx["be0"], ingress_ifindex=idx["be0"])


def test_a_udp_answer_queued_before_its_flows_record_is_applied_is_not_passed_unnatted(
        inside, fp, core, ns, fam):
    """A loaded observer: the ring fills behind the first datagram's record,
    so the backend's answer is queued (no room for its own record)."""
    publish(core, fp, [service(fam, "rr", protocol="udp")])
    ip = IPv6 if fam.v6 else IP
    client = client_of(fam, 1)
    first = place(inside, fp, ns, bytes(ETH / ip(src=client, dst=fam.vip) /
                                        UDP(sport=30000, dport=53) / b"q"))
    assert first.retval == TC_ACT_REDIRECT
    backend = chosen(fam, first.packet)
    for i in range(4096):                    # other clients' first datagrams
        r = place(inside, fp, ns, bytes(ETH / ip(src=client_of(fam, 2 + i % 500), dst=fam.vip)
                                        / UDP(sport=1024 + i, dport=53) / b"q"))
        if r.retval == TC_ACT_OK:
            break
    answer = reply_frame(fam, backend, client, UDP(sport=BPORT, dport=30000) / b"a")
    assert from_backend(inside, fp, ns, answer).retval == TC_ACT_OK      # queued
    # natlb's worker takes it before the observer reached the record.
    v, mark = core.decide(answer[14:], 5)
    assert v != Verdict.ACCEPT, "the backend's answer leaves with the backend's address"


def test_a_synack_acking_the_syns_data_before_its_record_is_applied_is_not_passed_unnatted(
        inside, fp, core, ns, fam):
    """A SYN with data (TCP Fast Open): the backend acks it whole, so its
    SYN-ACK is not the one the kernel carries (seq + 1) and is queued."""
    publish(core, fp, [service(fam, "rr")])
    ip = IPv6 if fam.v6 else IP
    client = client_of(fam, 3)
    syn = bytes(ETH / ip(src=client, dst=fam.vip) /
                TCP(sport=31000, dport=VPORT, flags="S", seq=7000) / b"GET / HTTP")
    r = place(inside, fp, ns, syn)
    assert r.retval == TC_ACT_REDIRECT
    backend = chosen(fam, r.packet)
    synack = reply_frame(fam, backend, client,
                         TCP(sport=BPORT, dport=31000, flags="SA", seq=1, ack=7000 + 1 + 10))
    assert from_backend(inside, fp, ns, synack).retval == TC_ACT_OK     # queued
    v, _ = core.decide(synack[14:], 5)
    assert v != Verdict.ACCEPT, "the backend's SYN-ACK leaves with the backend's address"
    # Once natlb holds the flow, the same SYN-ACK is its to rewrite.
    [(_, head, _, bid)] = fp.read_records(8)
    assert core.observe_new(head, bid, 5) is True
    assert core.decide(synack[14:], 6)[0] == Verdict.MARK
    assert not fp.has_flow(backend, client, BPORT, 31000, socket.IPPROTO_TCP)


def place_twice(inside, fp, core, ns, fam, t, client: str, sport: int) -> tuple[str, str]:
    """The client's SYN (seq 7000) twice within the observer's lag: the
    kernel places the first; the second finds its entries and is queued,
    and natlb (no flow yet) places it itself, rr on its own cursor, one
    ahead (a queued first packet before it: as in any mixed run), and learn
    installs that.  Returns the kernel's backend and natlb's (they differ);
    the first's record is still in the ring."""
    ip = IPv6 if fam.v6 else IP
    assert core.decide(bytes(ip(src=client_of(fam, 9), dst=fam.vip) /
                             TCP(sport=1, dport=VPORT, flags="S")), 1)[0] == Verdict.MARK
    syn = bytes(ETH / ip(src=client, dst=fam.vip) / TCP(sport=sport, dport=VPORT, flags="S",
                                                        seq=7000))
    first = place(inside, fp, ns, syn)
    assert first.retval == TC_ACT_REDIRECT
    kernels = chosen(fam, first.packet)
    assert place(inside, fp, ns, syn).retval == TC_ACT_OK               # queued
    v, mark = core.decide(syn[14:], 2)
    assert v == Verdict.MARK and mark & MARK_FAST
    natlbs = {b.id: b.address for b in t.backends}[mark & 0xFFFF]
    assert natlbs != kernels
    _, idx = ns
    inside(fp.test_run, True, bytes(ETH / ip(src=client, dst=natlbs) /
                                    TCP(sport=sport, dport=BPORT, flags="S", seq=7000)),
           mark=mark, ifindex=idx["be0"], ingress_ifindex=idx["cl0"])
    return kernels, natlbs


def test_a_syn_sent_twice_before_its_record_is_applied_gets_one_backend(inside, fp, core, ns,
                                                                         fam):
    """The client's SYN twice within the observer's lag (a duplicate on the
    way): the second finds the kernel's entries and is queued, natlb (no
    flow yet) places it itself, rr on its own cursor, and learn installs
    that; then the observer applies the first's record and moves natlb's
    flow to the kernel's backend.  Both backends got the SYN; the kernel
    carries one's SYN-ACK to the client, at most one reaches it, and the
    other backend is reset rather than left half-open."""
    t = service(fam, "rr")
    publish(core, fp, [t])
    ip = IPv6 if fam.v6 else IP
    client = client_of(fam, 4)
    kernels, natlbs = place_twice(inside, fp, core, ns, fam, t, client, 32000)
    [(_, head, _, bid)] = fp.read_records(8)
    core.observe_new(head, bid, 3)
    core.fp_observing(True)     # as natlb's observer does: it keeps held answers
    # Each backend answers the SYN it got.
    carried = from_backend(inside, fp, ns, reply_frame(
        fam, natlbs, client, TCP(sport=BPORT, dport=32000, flags="SA", seq=100, ack=7001)))
    v_k, _ = core.decide(reply_frame(fam, kernels, client, TCP(
        sport=BPORT, dport=32000, flags="SA", seq=900, ack=7001))[14:], 4)
    to_client = [natlbs] * (carried.retval == TC_ACT_REDIRECT) + [kernels] * (v_k == Verdict.MARK)
    assert len(to_client) <= 1, f"the client gets SYN-ACKs from {to_client}"
    # The observer's next round: the held SYN-ACK still finds no flow, and
    # its backend gets the RST the client would have sent, not a half-open
    # connection until its SYN-ACK retries run out.
    assert core.deferred_retry(5) == 0
    rst = core.outbox_take()
    assert rst is not None, "the backend whose SYN-ACK was dropped is left half-open"
    r = ip(rst)
    assert (r.src, r.dst, r[TCP].sport, r[TCP].dport, str(r[TCP].flags), r[TCP].seq) == (
        client, kernels, 32000, BPORT, "R", 7001)
    assert core.failover_counters()["late_synacks"] == 1
    assert core.outbox_take() is None


def test_a_udp_session_stays_on_its_backend_when_the_kernels_entries_are_emptied(
        inside, fp, core, ns, fam):
    """The kernel's entries are all emptied (nl_fp_flush: the observer lost
    keys it had to forget; once also the publisher's, when another UDP
    backend stopped being alive).  A live session's next datagram then finds no entry and the
    kernel places it anew (rr: the next backend), and nl_observed_new moves
    natlb's flow there.  Queued, natlb kept the session on its backend."""
    t = service(fam, "rr", protocol="udp")
    publish(core, fp, [t])
    ip = IPv6 if fam.v6 else IP
    client = client_of(fam, 5)
    datagram = bytes(ETH / ip(src=client, dst=fam.vip) / UDP(sport=33000, dport=53) / b"q")
    first = place(inside, fp, ns, datagram)
    assert first.retval == TC_ACT_REDIRECT
    backend = chosen(fam, first.packet)
    answer = reply_frame(fam, backend, client, UDP(sport=BPORT, dport=33000) / b"a")
    assert from_backend(inside, fp, ns, answer).retval == TC_ACT_REDIRECT
    (_, new, _, bid), (_, replied, _, none) = fp.read_records(8)
    assert none is None and core.observe_new(new, bid, 1) and core.observe(replied, 1)
    # The last backend goes down (it had no session): tables again, entries emptied.
    gone = t.backends[3]
    down = replace(t, backends=tuple(replace(b, eligible=False, alive=False) if b is gone else b
                                     for b in t.backends),
                   table=tuple(i for i in t.table if t.backends[i] is not gone))
    publish(core, fp, [down])
    fp.flush()
    again = place(inside, fp, ns, datagram)
    to = chosen(fam, again.packet) if again.retval == TC_ACT_REDIRECT else None
    if again.retval == TC_ACT_OK:       # queued: natlb's flow decides
        v, mark = core.decide(datagram[14:], 2)
        to = {b.id: b.address for b in t.backends}[mark & 0xFFFF]
    assert to == backend, f"the session moved from {backend} to {to}"


def test_a_backends_answers_on_a_connection_straight_to_it_pass_at_once(inside, fp, core, ns,
                                                                        fam):
    """A client reaching a backend's own address and service port through
    the router (a monitoring probe, an operator): no VIP, no flow, and no
    entry of the kernel's for the backend's side.  Its answers are not a
    placed flow's: each goes back to the kernel at once (its forwarding and
    its filters), nothing held, nothing sent by natlb itself."""
    t, u = service(fam, "rr"), service(fam, "rr", protocol="udp", sid=1)
    publish(core, fp, [t, u])
    core.fp_observing(True)
    ip = IPv6 if fam.v6 else IP
    client, backend = client_of(fam, 5), t.backends[0].address
    answers = [
        TCP(sport=BPORT, dport=33000, flags="SA", seq=500, ack=9001),
        TCP(sport=BPORT, dport=33000, flags="PA", seq=501, ack=9001) / (b"x" * 400),
        TCP(sport=BPORT, dport=33000, flags="R", seq=901),
        UDP(sport=BPORT, dport=33002) / b"z",
        UDP(sport=BPORT, dport=33003) / (b"y" * 300),
    ]
    for l4 in answers:
        frame = reply_frame(fam, backend, client, l4)
        assert from_backend(inside, fp, ns, frame).retval == TC_ACT_OK     # no entry: queued
        assert core.decide(frame[14:], 5)[0] == Verdict.ACCEPT, ip(frame[14:]).summary()
    assert core.deferred_retry(6) == 0 and core.outbox_take() is None
    reasons = core.reasons()
    assert (reasons["not_ours"], reasons["answer_dropped"]) == (len(answers), 0)
    assert core.failover_counters()["answers_held"] == 0


def test_a_synack_to_a_placed_syn_natlb_refused_is_dropped_and_its_backend_reset(
        inside, fp, core, ns, fam):
    """natlb refuses a SYN the kernel placed (its table full, the backend
    gone since the publish: here an id it does not know), and the kernel
    forgets its entries; but the SYN reached the backend.  Its SYN-ACK,
    held and still finding no flow, is not traffic straight to the backend:
    it is dropped, and the backend gets the RST the client would send."""
    t = service(fam, "rr")
    publish(core, fp, [t])
    core.fp_observing(True)
    ip = IPv6 if fam.v6 else IP
    client = client_of(fam, 7)
    syn = bytes(ip(src=client, dst=fam.vip) / TCP(sport=34000, dport=VPORT, flags="S",
                                                   seq=7000))
    assert core.observe_new(syn, 999, 5) is False
    backend = t.backends[1].address
    synack = bytes(ip(src=backend, dst=client) / TCP(sport=BPORT, dport=34000, flags="SA",
                                                      seq=300, ack=7001))
    assert core.decide(synack, 6)[0] == Verdict.DROP
    assert core.deferred_retry(7) == 0, "the backend's address shown to the client"
    r = ip(core.outbox_take())
    assert (r.src, r.dst, r[TCP].sport, r[TCP].dport, str(r[TCP].flags), r[TCP].seq) == (
        client, backend, 34000, BPORT, "R", 7001)
    assert core.failover_counters()["late_synacks"] == 1
    # Its retransmission (the RST lost on the way) gets one too.  A SYN-ACK
    # to that client port acking something else is not believed enough for
    # an RST, nor passed on: dropped.
    assert core.decide(synack, 1006)[0] == Verdict.DROP
    assert core.deferred_retry(1007) == 0 and core.outbox_take() is not None
    other = bytes(ip(src=backend, dst=client) / TCP(sport=BPORT, dport=34000, flags="SA",
                                                     seq=300, ack=8001))
    assert core.decide(other, 1008)[0] == Verdict.DROP
    assert core.deferred_retry(1009) == 0 and core.outbox_take() is None
    assert core.failover_counters()["late_synacks"] == 2
    reasons = core.reasons()
    assert (reasons["answer_dropped"], reasons["not_ours"]) == (1, 0), reasons
    assert core.failover_counters()["answers_held"] == 3
