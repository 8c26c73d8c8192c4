"""Review of 04061a9: a backend's side of the kernel's flows map says
"placed" (tcfast.c placed_in) while alive or dead for less than a second
(PLACED_GRACE_NS), and "dead since" is its deadline_ns.  These tests are
ways that date, or what is counted from it, comes out wrong.  The carry
program runs by BPF_PROG_TEST_RUN as in
test_fastpath_decide_placed_entry_gaps_bpf.py.

Written as failing tests in the review of 04061a9; the "Defect:"
paragraphs say what each catches."""

import time

from scapy.layers.inet import TCP

from natlb.core import FastPath, Verdict

from . import test_fastpath_decide_bpf as base
from .test_fastpath_decide_bpf import (
    BPORT,
    ETH,
    TC_ACT_OK,
    TC_ACT_REDIRECT,
    chosen,
    client_of,
    ip_of,
    place,
    publish,
    service,
    syn,
)
from .test_fastpath_decide_observer_lag_bpf import from_backend, reply_frame

# Its namespace, programs and core, for these tests too.
ns, inside, fp, core, fam = base.ns, base.inside, base.fp, base.core, base.fam


def test_a_backends_synack_straight_to_a_client_does_not_make_a_long_dead_entry_say_placed(
        inside, core, ns, fam):
    """Defect: bury() now writes "dead since now" (bpf_ktime_get_ns() - 1)
    whatever the entry was, and carry's SYN branch buries both sides of any
    entry a SYN (not the expected SYN-ACK) finds, alive or long dead.  A
    client that once used the VIP from a port (a fixed one: SIP 5060, BGP,
    any port reused) connects to that backend's own address from it,
    through the router: the backend's SYN-ACK finds the VIP flow's dead
    backend side, is not the SYN-ACK it waited for, and re-buries it: dead
    "since now", so placed_in says "placed" and natlb holds the SYN-ACK,
    finds no flow after the round and drops it (answer_dropped).  Every
    retransmission does the same: the connection never opens, for as long
    as the dead entry stays (until the LRU needs its room).  A packet
    without SYN on the same dead entry passes (the grace has run out):
    the blackhole is the re-burial, not the grace."""
    short = inside(FastPath, max_backends=64, max_flows=2048, tcp_lifetime_ms=60_000,
                   udp_lifetime_ms=30_000, syn_lifetime_ms=20, synack_window_ms=20,
                   max_services=16, decide_slots=1 << 16)
    try:
        publish(core, short, [service(fam, "rr")])
        core.fp_observing(True)
        ip = ip_of(fam)
        client = client_of(fam, 50)
        first = place(inside, short, ns, syn(fam, client, 5060))
        assert first.retval == TC_ACT_REDIRECT
        backend = chosen(fam, first.packet)
        [(_, head, _, bid)] = short.read_records(8)
        assert core.observe_new(head, bid, 1_000) is True
        # The kernel's entries expire (20 ms), and stay dead longer than the
        # second a dead backend side says "placed".
        time.sleep(1.2)
        later = 1_000 + 3_600_000          # natlb's flow long gone too
        direct = bytes(ETH / ip(src=client, dst=backend) /
                       TCP(sport=5060, dport=BPORT, flags="S", seq=12345))
        assert place(inside, short, ns, direct).retval == TC_ACT_OK   # not a service
        assert core.decide(direct[14:], later)[0] == Verdict.ACCEPT   # the kernel's
        # The dead entry alone no longer holds anything (its grace is over).
        stray = reply_frame(fam, backend, client,
                            TCP(sport=BPORT, dport=5060, flags="A", seq=1, ack=1))
        assert from_backend(inside, short, ns, stray).retval == TC_ACT_OK
        assert core.decide(stray[14:], later)[0] == Verdict.ACCEPT
        synack = reply_frame(fam, backend, client,
                             TCP(sport=BPORT, dport=5060, flags="SA", seq=500, ack=12346))
        for attempt in range(3):           # the first and two retransmissions
            assert from_backend(inside, short, ns, synack).retval == TC_ACT_OK
            v, _ = core.decide(synack[14:], later + attempt * 1_000)
            core.deferred_retry(later + attempt * 1_000 + 1)
            assert v == Verdict.ACCEPT, (
                f"attempt {attempt}: the backend's SYN-ACK to a client connecting to it "
                f"directly is {v.name} (reasons {core.reasons()}): its SYN bit made a VIP "
                f"flow's entry, dead for over a second, dead 'since now' again")
    finally:
        short.close()


def test_emptying_the_kernels_flows_counts_no_entry_a_duplicate_syn_buried(
        inside, fp, core, ns, fam):
    """Defect (counts): 04061a9 makes flush count only the backend sides it
    finds alive, but the client sides it counts are any with a nonzero
    deadline, and bury() no longer writes 0: a client side the programs
    buried (a SYN again, the backend refusing the SYN) is counted as a flow
    entry forgotten ("fast path: forgot %d flow entries"; the returned
    count) though nothing was alive: nl_fp_flow_count says none."""
    publish(core, fp, [service(fam, "rr")])
    core.fp_observing(True)
    client = client_of(fam, 51)
    frame = syn(fam, client, 5061)
    assert place(inside, fp, ns, frame).retval == TC_ACT_REDIRECT
    assert place(inside, fp, ns, frame).retval == TC_ACT_OK      # again: both buried
    fp.read_records(8)
    alive = fp.flow_count()
    assert alive == 0
    n = fp.flush()
    assert n == alive, f"flush forgot {n} flow entries of {alive} alive"


def test_a_backends_rst_queued_for_a_full_ring_before_its_flows_record_is_not_passed_unnatted(
        inside, fp, core, ns, fam):
    """Defect: carry deletes both entries on an RST before it reserves the
    RST's record; with the ring full (the observer behind, which is also
    when the flow's own NEW record is still unapplied) the RST then goes to
    natlb, which holds no flow yet, and asks the kernel's map whether it
    placed the flow: the entry that said so was just deleted by that RST,
    and no refusal was noted, so it is passed on at once with the
    backend's address (the client sees an RST from an address it never
    spoke to).  04061a9 keeps the backend's side dead instead of deleting
    it for a duplicate SYN, forget and flush, not for an RST.  (A FIN in the
    same place is held: cut_deadline leaves the entry.)"""
    publish(core, fp, [service(fam, "rr")])
    core.fp_observing(True)
    ip = ip_of(fam)
    client = client_of(fam, 52)
    first = place(inside, fp, ns, syn(fam, client, 5062))
    assert first.retval == TC_ACT_REDIRECT
    backend = chosen(fam, first.packet)
    synack = reply_frame(fam, backend, client,
                         TCP(sport=BPORT, dport=5062, flags="SA", seq=100, ack=7001))
    assert from_backend(inside, fp, ns, synack).retval == TC_ACT_REDIRECT     # carried
    ack = bytes(ETH / ip(src=client, dst=fam.vip) /
                TCP(sport=5062, dport=base.VPORT, flags="A", seq=7001, ack=101))
    assert place(inside, fp, ns, ack).retval == TC_ACT_REDIRECT              # carried
    for i in range(4096):                    # other clients' SYNs fill the ring
        if place(inside, fp, ns, syn(fam, client_of(fam, 20 + i % 500),
                                     1024 + i)).retval == TC_ACT_OK:
            break
    rst = reply_frame(fam, backend, client,
                      TCP(sport=BPORT, dport=5062, flags="R", seq=101))
    assert from_backend(inside, fp, ns, rst).retval == TC_ACT_OK            # no room
    v, _ = core.decide(rst[14:], 5)
    core.deferred_retry(6)
    assert v != Verdict.ACCEPT, (
        f"the backend's RST leaves with the backend's address (reasons {core.reasons()})")
