"""Review of f65f80a: natlb holds a published backend's answer that finds
no flow while the kernel decides if and only if the kernel's flows map has
an entry for the flow's backend side (alive or dead), or natlb refused the
flow's first packet in the last 3 s (csrc/lb.c hold_back, tcfast.c
placed_in).  The entry is the witness; these tests are ways it says the
wrong thing: absent for a flow the kernel placed (the answer leaves with
the backend's address), or present, dead, for a flow long gone (traffic
straight to a backend is dropped for good).  The carry and learn programs
run by BPF_PROG_TEST_RUN as in test_fastpath_decide_observer_lag_bpf.py.

Written as failing tests in the review of f65f80a; the "Defect:"
paragraphs say what each catches."""

import time

from scapy.layers.inet import TCP, UDP

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
)
from .test_fastpath_decide_observer_lag_bpf import from_backend, place_twice, reply_frame

# Its namespace, programs and core, for these tests too.
ns, inside, fp, core, fam = base.ns, base.inside, base.fp, base.core, base.fam


def test_a_long_gone_vip_flows_dead_entry_does_not_blackhole_traffic_straight_to_its_backend(
        inside, core, ns, fam):
    """Defect: carry now keeps every expired entry, the backend's side
    included, until the LRU needs its room (a map sized for twice
    lb.max_flows: on a router not near that, for ever), and nothing else
    removes it when natlb's own flow ends.  placed_in counts a dead entry
    as "placed".  A client with a fixed source port (NTP 123, IKE 500, SIP
    5060, any port reused) that once used the VIP, and now talks to that
    backend's own address through the router (README: "goes back to the
    kernel at once"), gets none of the backend's answers: each is held,
    still finds no flow after the round, and is dropped (held_lost), for as
    long as the dead entry stays.  Before f65f80a carry deleted the expired
    backend side on its first packet, and the answer was passed on."""
    short = inside(FastPath, max_backends=64, max_flows=2048, tcp_lifetime_ms=60_000,
                   udp_lifetime_ms=20, syn_lifetime_ms=30_000, synack_window_ms=60_000,
                   max_services=16, decide_slots=1 << 16)
    try:
        publish(core, short, [service(fam, "rr", protocol="udp")])
        core.fp_observing(True)
        ip = ip_of(fam)
        client = client_of(fam, 40)
        query = bytes(ETH / ip(src=client, dst=fam.vip) / UDP(sport=123, dport=53) / b"q")
        first = place(inside, short, ns, query)
        assert first.retval == TC_ACT_REDIRECT
        backend = chosen(fam, first.packet)
        [(_, head, _, bid)] = short.read_records(8)
        assert core.observe_new(head, bid, 1_000) is True
        answer = reply_frame(fam, backend, client, UDP(sport=BPORT, dport=123) / b"a")
        assert from_backend(inside, short, ns, answer).retval == TC_ACT_REDIRECT  # carried
        short.read_records(8)
        # The kernel's entries expire, and then stay dead longer than the
        # second a dead backend side says "placed" (tcfast.c PLACED_GRACE_NS).
        time.sleep(1.2)
        # An hour later natlb's flow is long gone; the client asks the
        # backend itself, from the same port, through the router.
        later = 1_000 + 3_600_000
        direct = bytes(ETH / ip(src=client, dst=backend) / UDP(sport=123, dport=BPORT) / b"d")
        assert place(inside, short, ns, direct).retval == TC_ACT_OK   # not a service
        assert core.decide(direct[14:], later)[0] == Verdict.ACCEPT    # the kernel's
        assert from_backend(inside, short, ns, answer).retval == TC_ACT_OK  # dead: natlb's
        v, _ = core.decide(answer[14:], later)
        core.deferred_retry(later + 1)
        assert v == Verdict.ACCEPT, (
            f"the backend's answer to a client talking to it directly is {v.name} "
            f"(reasons {core.reasons()}): a VIP flow's dead entry from an hour ago")
    finally:
        short.close()


def test_a_synack_from_the_kernels_backend_after_a_duplicate_syn_is_not_passed_unnatted(
        inside, fp, core, ns, fam):
    """Defect: f65f80a makes the backend's entry the proof that the kernel
    placed a flow, and keeps it (buried) where carry used to delete it on
    the backend's side; but carry's client-side SYN branch ("a SYN again")
    still deletes the backend's side.  The client's SYN twice within the
    observer's lag (README "A tuple natlb still holds": a duplicate whose
    copy natlb places itself): the second deletes the kernel's backend's
    entry and is queued; natlb, holding no flow yet, places it on its own
    pick (rr).  The kernel's backend answers the first SYN before the
    observer applies its record: its SYN-ACK finds no entry, so the kernel
    leaves it to natlb, where it finds no flow of that backend, no entry and
    no refusal noted yet (the record is not applied): passed on at once,
    with the backend's address (faeb8a9 held it, and late_synack reset the
    backend on the retry: test_a_syn_sent_twice_before_its_record_is_applied
    only decides the SYN-ACK after the record is applied)."""
    t = service(fam, "rr")
    publish(core, fp, [t])
    core.fp_observing(True)
    client = client_of(fam, 41)
    kernels, _ = place_twice(inside, fp, core, ns, fam, t, client, 32100)
    # The kernel's backend answers before the observer's round.
    synack = reply_frame(fam, kernels, client,
                         TCP(sport=BPORT, dport=32100, flags="SA", seq=900, ack=7001))
    assert from_backend(inside, fp, ns, synack).retval == TC_ACT_OK     # natlb's
    v, _ = core.decide(synack[14:], 3)
    assert v != Verdict.ACCEPT, (
        "the kernel's backend's SYN-ACK leaves with its own address: its entry was deleted "
        "by the duplicate SYN")


def test_an_answer_to_a_placed_flow_is_not_passed_unnatted_when_natlb_empties_the_kernels_flows(
        inside, fp, core, ns, fam):
    """Defect: natlb empties the kernel's flows (nl_fp_flush: observe_round
    when more than 1,024 keys are to be forgotten, just before it consumes
    the ring; the publisher's forget_fast, when a UDP backend stops being
    alive or on a `reset`, walks the same way over that backend's flows):
    flush_where deleted every backend's side.  A flow
    the kernel placed whose record is still in the ring loses the entry that
    says so, and its backend's answer, which the kernel then no longer
    carries, finds in natlb no flow, no entry and no refusal: passed on at
    once with the backend's address.  (faeb8a9 held it until the round.)"""
    publish(core, fp, [service(fam, "rr", protocol="udp")])
    core.fp_observing(True)
    ip = ip_of(fam)
    client = client_of(fam, 42)
    first = place(inside, fp, ns, bytes(ETH / ip(src=client, dst=fam.vip) /
                                        UDP(sport=32200, dport=53) / b"q"))
    assert first.retval == TC_ACT_REDIRECT
    backend = chosen(fam, first.packet)
    fp.flush()                     # another UDP backend went down, meanwhile
    answer = reply_frame(fam, backend, client, UDP(sport=BPORT, dport=32200) / b"a")
    assert from_backend(inside, fp, ns, answer).retval == TC_ACT_OK      # natlb's
    v, _ = core.decide(answer[14:], 2)
    assert v != Verdict.ACCEPT, "the backend's answer leaves with the backend's address"


def test_a_held_answer_dropped_after_the_round_counts_once(inside, fp, core, ns, fam):
    """Defect (counters): `dropped_packets_total{reason}` / `natlb status`
    "dropped/passed" count packets by reason, one each.  A held answer
    that still finds no flow after the observer's round (here: the kernel's
    backend's answer to a UDP session natlb keeps elsewhere, README "A
    tuple natlb still holds") is counted `held` when it is kept and again
    `held_lost` when the retry drops it: one packet, two reasons."""
    t = service(fam, "rr", protocol="udp")
    publish(core, fp, [t])
    core.fp_observing(True)
    ip = ip_of(fam)
    assert core.decide(bytes(ip(src=client_of(fam, 30), dst=fam.vip) /
                             UDP(sport=1, dport=53) / b"q"), 1)[0] == Verdict.MARK
    client = client_of(fam, 43)
    datagram = bytes(ETH / ip(src=client, dst=fam.vip) / UDP(sport=32300, dport=53) / b"q")
    assert core.decide(datagram[14:], 2)[0] == Verdict.MARK          # natlb's session
    again = place(inside, fp, ns, datagram)                          # placed anew
    assert again.retval == TC_ACT_REDIRECT
    kernels = chosen(fam, again.packet)
    [(_, head, _, bid)] = fp.read_records(8)
    assert core.observe_new(head, bid, 3) is False                   # refused
    before = core.reasons()
    answer = reply_frame(fam, kernels, client, UDP(sport=BPORT, dport=32300) / b"a")
    assert core.decide(answer[14:], 4)[0] == Verdict.DROP            # held
    core.deferred_retry(5)                                           # dropped
    after = core.reasons()
    counted = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    assert sum(counted.values()) == 1, f"one packet counted as {counted}"
