"""The C side of the fast path (lb.fastpath): which packets natlb hands to
the kernel (NL_MARK_FAST), and how it resets flows whose later packets it
never saw; over both families (the `fam` fixture) where they promise alike."""

from __future__ import annotations

from dataclasses import replace

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6DestUnreach

from natlb.core import MARK_FAST, MARK_FORWARD, MARK_REPLY, Core, CoreConfig, ForgetKey, Verdict

from .services import BACKENDS, CLIENT, FAMILIES, VIP, Family, make_service


@pytest.fixture
def fast_core():
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=True))
    yield c
    c.close()


def handshake(core: Core, fam: Family, sport: int = 40000) -> tuple[str, int]:
    """SYN, SYN-ACK, ACK; returns the backend and the ACK's mark."""
    _, mark = core.decide(bytes(fam.ip(src=fam.client, dst=fam.vip) /
                                TCP(sport=sport, dport=80, flags="S", seq=1000)), 1)
    backend = fam.backends[(mark & 0xFFF) - 5 * 16]
    v, reply = core.decide(bytes(fam.ip(src=backend, dst=fam.client) /
                                 TCP(sport=8080, dport=sport, flags="SA", seq=5000, ack=1001)), 2)
    assert v == Verdict.MARK and not reply & MARK_FAST
    _, mark = core.decide(bytes(fam.ip(src=fam.client, dst=fam.vip) /
                                TCP(sport=sport, dport=80, flags="A", seq=1001, ack=5001)), 3)
    return backend, mark


def test_a_new_flows_syn_and_established_packets_that_change_no_state_are_fast(fast_core, fam):
    fast_core.publish([fam.service(sid=5)])
    syn = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=40000, dport=80, flags="S", seq=1000)
    _, mark = fast_core.decide(bytes(syn), 1)
    assert mark & MARK_FAST                                  # the first SYN: the kernel
    _, mark = fast_core.decide(bytes(syn), 2)                # carries its handshake
    assert not mark & MARK_FAST                              # the SYN again: natlb's
    _, mark = handshake(fast_core, fam, 40001)
    assert mark & MARK_FAST and mark & ~(0xFFF | MARK_FAST) == MARK_FORWARD
    fin = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=40001, dport=80, flags="FA", seq=1001,
                                                    ack=5001)
    _, mark = fast_core.decide(bytes(fin), 4)
    assert not mark & MARK_FAST                              # a FIN: no, nor after it
    ack = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=40001, dport=80, flags="A", seq=1002,
                                                    ack=5001)
    assert not fast_core.decide(bytes(ack), 5)[1] & MARK_FAST


def test_a_cluster_services_first_packet_is_not_fast():
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=True))
    try:
        c.publish([replace(make_service("maglev", sid=5), cluster=True)])
        syn = IP(src=CLIENT, dst=VIP) / TCP(sport=40001, dport=80, flags="S", seq=1000)
        assert not c.decide(bytes(syn), 2)[1] & MARK_FAST    # replies may take another node
    finally:
        c.close()


@pytest.mark.parametrize("cluster", [True, False], ids=["cluster", "ordinary"])
def test_a_cluster_services_established_reply_is_fast_naming_its_backend(fam, cluster):
    """A node may see only a cluster connection's replies (the routers hash
    each direction apart): its established replies that change no state are
    marked fast, and name the backend (the tc program learns the flow from
    it; nft maps that mark to the VIP).  An ordinary service's replies never
    are: its client's packets install both directions."""
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=True))
    try:
        c.publish([replace(fam.service(scheduler="maglev", sid=5), cluster=cluster)])
        backend = fam.backends[1]
        bid = 5 * 16 + 1

        def reply(flags: str, seq: int, now: int, sport: int = 40000) -> int:
            pkt = fam.ip(src=backend, dst=fam.client) / TCP(sport=8080, dport=sport, flags=flags,
                                                           seq=seq, ack=1001)
            v, mark = c.decide(bytes(pkt), now)
            assert v == Verdict.MARK
            return mark

        if cluster:   # the SYN-ACK, adopted: a handshake is natlb's
            assert reply("SA", 5000, 2) == MARK_REPLY | 5
        else:
            backend = fam.backends[(handshake(c, fam, 40000)[1] & 0xFFF) - 5 * 16]
            bid = fam.backends.index(backend) + 5 * 16
        fast = MARK_REPLY | MARK_FAST | bid
        assert reply("PA", 5001, 3) == (fast if cluster else MARK_REPLY | 5)
        assert reply("FA", 5101, 4) == MARK_REPLY | 5        # a FIN: natlb's
        assert reply("A", 5102, 5) == MARK_REPLY | 5         # and after it
    finally:
        c.close()


def test_a_cluster_reply_is_not_fast_without_the_fast_path():
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=False))
    try:
        c.publish([replace(make_service("maglev", sid=5), cluster=True)])
        pkt = IP(src=BACKENDS[0], dst=CLIENT) / TCP(sport=8080, dport=40000, flags="PA",
                                                    seq=5000, ack=1001)
        assert c.decide(bytes(pkt), 1) == (Verdict.MARK, MARK_REPLY | 5)
    finally:
        c.close()


def test_without_fastpath_no_mark_is_fast(core):
    core.publish([make_service(sid=5)])
    _, mark = handshake(core, FAMILIES["ipv4"])
    assert mark & ~0xFFF == MARK_FORWARD and not mark & MARK_FAST


def test_reset_probes_both_ends_then_resets_with_their_exact_numbers(fast_core, fam):
    fast_core.publish([fam.service(sid=5)])
    backend, _ = handshake(fast_core, fam)
    bid = fam.backends.index(backend) + 5 * 16
    assert fast_core.reset_backend(bid) == 1
    sent = []
    while (p := fast_core.outbox_take()) is not None:
        sent.append(fam.ip(p))
    rsts = [p for p in sent if p[TCP].flags == "R"]
    probes = [p for p in sent if p[TCP].flags == "A"]
    assert len(rsts) == 2 and len(probes) == 2       # stale RSTs, then the probes
    to_client = next(p for p in probes if p.dst == fam.client)
    assert to_client.src == fam.vip and to_client[TCP].seq == 5000   # just behind the window
    # The kernel carried 1 MB each way meanwhile: the client's answer says
    # where both ends are now.
    answer = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=40000, dport=80, flags="A",
                                                       seq=1001 + 10**6, ack=5001 + 10**6)
    assert fast_core.decide(bytes(answer), 10)[0] == Verdict.DROP
    exact = [fam.ip(fast_core.outbox_take()) for _ in range(2)]
    assert {(p.dst, p[TCP].seq) for p in exact} == {(fam.client, 5001 + 10**6),
                                                   (backend, 1001 + 10**6)}
    assert all(p[TCP].flags == "R" for p in exact)
    # The backend's answer: its own exact RST only (the client's is sent).
    answer = fam.ip(src=backend, dst=fam.client) / TCP(sport=8080, dport=40000, flags="A",
                                                       seq=5001 + 10**6, ack=1001 + 2 * 10**6)
    assert fast_core.decide(bytes(answer), 11)[0] == Verdict.DROP
    last = fam.ip(fast_core.outbox_take())
    assert (last.dst, last[TCP].seq, last[TCP].flags) == (backend, 1001 + 2 * 10**6, "R")
    assert fast_core.outbox_take() is None


def test_a_udp_flows_first_datagram_is_fast_then_only_once_its_backend_answered(fast_core, fam):
    def udp(src: str, dst: str, sport: int, dport: int) -> bytes:
        return bytes(fam.ip(src=src, dst=dst) / UDP(sport=sport, dport=dport) / b"q")

    client, vip = fam.client, fam.vip
    fast_core.publish([fam.service(sid=5, protocol="udp", port=53, backend_port=53)])
    _, mark = fast_core.decide(udp(client, vip, 5000, 53), 1)
    assert mark & MARK_FAST                                  # the first: the kernel
    backend = fam.backends[(mark & 0xFFF) - 5 * 16]          # carries its answer, told
    assert not fast_core.decide(udp(client, vip, 5000, 53), 2)[1] & MARK_FAST  # none yet
    v, reply = fast_core.decide(udp(backend, client, 53, 5000), 3)
    assert v == Verdict.MARK and not reply & MARK_FAST
    _, mark = fast_core.decide(udp(client, vip, 5000, 53), 4)
    assert mark & MARK_FAST and fam.backends[(mark & 0xFFF) - 5 * 16] == backend
    # Its backend no longer alive: the flow's next packet moves, is not fast,
    # and the kernel is told to forget the old backend's entries.
    assert fast_core.fp_forget_take() == ([], False)
    fast_core.publish([fam.service(sid=5, protocol="udp", port=53, backend_port=53,
                                   down=(backend,))])
    _, mark = fast_core.decide(udp(client, vip, 5000, 53), 5)
    assert not mark & MARK_FAST and fam.backends[(mark & 0xFFF) - 5 * 16] != backend
    keys, lost = fast_core.fp_forget_take()
    assert not lost and keys == [ForgetKey(client, 5000, vip, 53, backend, 53, 17)]


# ---- a handshake the kernel carries: re-steering forgets, the timer syncs ----

def fast_syn(core: Core, fam: Family = FAMILIES["ipv4"], sport: int = 40000) -> str:
    """The first SYN of a connection, marked fast; its backend."""
    syn = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=sport, dport=80, flags="S", seq=1000,
                                                    options=[("MSS", 1460)])
    v, mark = core.decide(bytes(syn), 100)
    assert v == Verdict.MARK and mark & MARK_FAST
    return fam.backends[mark & 0xFFF]


@pytest.fixture
def held_core(fam):
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=True, syn_timeout_ms=50,
                        resteer_tries=3))
    c.publish([fam.service()])
    yield c
    c.close()


def test_an_rst_to_a_fast_syn_resteers_it_and_the_kernel_forgets_the_old_backend(held_core,
                                                                                  fam):
    b1 = fast_syn(held_core, fam)
    rst = fam.ip(src=b1, dst=fam.client) / TCP(sport=8080, dport=40000, flags="RA", ack=1001)
    assert held_core.decide(bytes(rst), 101)[0] == Verdict.DROP   # never to the client
    resent = fam.ip(held_core.outbox_take())
    assert resent[TCP].flags == "S" and resent.dst != b1
    keys, _ = held_core.fp_forget_take()
    assert keys == [ForgetKey(fam.client, 40000, fam.vip, 80, b1, 8080, 6)]
    # Once: the flow is not the kernel's any more (its handshake is queued).
    rst2 = fam.ip(src=resent.dst, dst=fam.client) / TCP(sport=8080, dport=40000, flags="RA",
                                                        ack=1001)
    held_core.decide(bytes(rst2), 102)
    assert held_core.fp_forget_take() == ([], False)


def test_an_icmp_error_to_a_fast_syn_resteers_it_and_the_kernel_forgets(held_core, fam):
    b1 = fast_syn(held_core, fam)
    quoted = bytes(fam.ip(src=fam.client, dst=b1) / TCP(sport=40000, dport=8080, flags="S",
                                                        seq=1000))
    error = (ICMP(type=3, code=1) / quoted[:28] if fam.ip is IP
             else ICMPv6DestUnreach(code=3) / quoted)
    assert held_core.decide(bytes(fam.ip(src=b1, dst=fam.client) / error), 101)[0] == \
        Verdict.DROP
    assert fam.ip(held_core.outbox_take()).dst != b1
    assert held_core.fp_forget_take()[0] == [ForgetKey(fam.client, 40000, fam.vip, 80, b1,
                                                       8080, 6)]


def test_without_an_observer_the_timer_resteers_a_fast_syn_at_once(held_core, fam):
    b1 = fast_syn(held_core, fam)
    held_core.failover_tick(150)
    assert fam.ip(held_core.outbox_take()).dst != b1
    assert held_core.fp_forget_take()[0] == [ForgetKey(fam.client, 40000, fam.vip, 80, b1,
                                                       8080, 6)]


def test_the_timer_waits_for_the_observer_before_resteering_a_fast_syn(held_core, fam):
    """The kernel may have carried the SYN-ACK just before the deadline and
    the observer not applied it yet: the kernel forgets the flow first (no
    SYN-ACK carried after that), and the flow moves only if it is still
    unanswered once the observer applied everything written before."""
    held_core.fp_observing(True)
    b1 = fast_syn(held_core, fam)
    held_core.failover_tick(150)
    assert held_core.outbox_take() is None and held_core.read_events() == []
    assert held_core.fp_forget_take()[0] == [ForgetKey(fam.client, 40000, fam.vip, 80, b1,
                                                       8080, 6)]
    want = held_core.fp_sync_wanted()
    assert want > 0
    held_core.failover_tick(151)
    assert held_core.outbox_take() is None            # not answered yet
    held_core.fp_sync_done(want)
    held_core.failover_tick(152)
    assert fam.ip(held_core.outbox_take()).dst != b1
    assert [e.kind for e in held_core.read_events()] == ["syn_timeout"]


def test_a_synack_the_observer_applies_meanwhile_keeps_the_flow(held_core, fam):
    held_core.fp_observing(True)
    b1 = fast_syn(held_core, fam)
    held_core.failover_tick(150)
    synack = fam.ip(src=b1, dst=fam.client) / TCP(sport=8080, dport=40000, flags="SA",
                                                   seq=5000, ack=1001)
    assert held_core.observe(bytes(synack), 150)
    held_core.fp_sync_done(held_core.fp_sync_wanted())
    held_core.failover_tick(151)
    assert held_core.outbox_take() is None and held_core.read_events() == []
    ack = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=40000, dport=80, flags="A", seq=1001,
                                                    ack=5001)
    assert held_core.observe(bytes(ack), 152)
    # ESTABLISHED: the client's next packet is marked fast again.
    data = fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=40000, dport=80, flags="PA",
                                                     seq=1001, ack=5001) / b"x"
    _, mark = held_core.decide(bytes(data), 153)
    assert mark & MARK_FAST and fam.backends[mark & 0xFFF] == b1


def test_an_observer_that_stops_answers_every_wait(held_core, fam):
    held_core.fp_observing(True)
    b1 = fast_syn(held_core, fam)
    held_core.failover_tick(150)
    held_core.fp_observing(False)
    held_core.failover_tick(151)
    assert fam.ip(held_core.outbox_take()).dst != b1


def test_fast_marks_are_kept_for_tc_per_protocol_in_use():
    """The rewrite chain rewrites a fast-marked packet, keeps its mark for
    the tc program (csrc/bpf/fastpath.bpf.c) and accepts it; nft holds no
    per-flow state any more."""
    from natlb import ruleset

    from .test_ruleset import spec

    both = ruleset.build(spec("mark", fastpath=True))
    whats = [m.what for m in both]
    assert [w for w in whats if "fast" in w] == [
        "rule rewrite fast path: tcp to a backend, mark kept for tc",
        "rule rewrite fast path: udp to a backend, mark kept for tc"]
    rule = next(m for m in both if m.what.endswith("tcp to a backend, mark kept for tc"))
    exprs = dict(rule.attrs)["NFTA_RULE_EXPRESSIONS"]
    names = [dict(e["attrs"])["NFTA_EXPR_NAME"] for e in exprs]
    assert names[-1] == "immediate" and "meta" not in names[names.index("lookup"):]
    tcp_only = ruleset.Spec(**{**vars(spec("mark", fastpath=True)),
                               "services": spec().services[:1]})
    whats = [m.what for m in ruleset.build(tcp_only)]
    assert [w for w in whats if "fast" in w] == [
        "rule rewrite fast path: tcp to a backend, mark kept for tc"]
    assert not [w for w in whats if w.startswith("set fast") or w.startswith("counter")]


def test_the_kernel_forgets_fast_flows_when_a_udp_backend_stops_being_alive(fast_core):
    from natlb.config import parse
    from natlb.pool import Pool

    def svc(name: str, port: int, protocol: str) -> dict:
        return {"name": name, "vip": VIP, "port": port, "protocol": protocol,
                "health": {"kind": "tcp", "fall": 1, "rise": 1},
                "failover": {"on_backend_down": "keep"},
                "backend": [{"address": a, "port": port} for a in BACKENDS]}

    pool = Pool(parse({"service": [svc("web", 80, "tcp"), svc("dns", 53, "udp")]}), fast_core)
    forgot = []
    pool.publisher.forget_fast = forgot.append
    pool.publish()
    web, dns = pool.services
    pool.report(web, web.backends[0], False, "refused")       # TCP kept: no
    assert forgot == []
    pool.report(dns, dns.backends[0], False, "refused")
    assert forgot == [{dns.backends[0].id}]                   # its flows only
    pool.report(dns, dns.backends[0], True, "ok")             # back: nothing to forget
    assert forgot == [{dns.backends[0].id}]


def test_a_failed_forgetting_of_kernel_flows_still_resets_the_backend(fast_core, caplog):
    """The kernel's entries could not all be walked: the error is logged and
    natlb's resets still go out (they used to be skipped with it)."""
    from natlb.config import parse
    from natlb.core import CoreError
    from natlb.pool import Pool

    pool = Pool(parse({"service": [{
        "name": "web", "vip": VIP, "port": 80,
        "health": {"kind": "tcp", "fall": 1, "rise": 1},
        "failover": {"on_backend_down": "reset"},
        "backend": [{"address": a, "port": 80} for a in BACKENDS]}]}), fast_core)

    def broken(ids: set[int]) -> None:
        raise CoreError("fast path: forgetting backends: Cannot allocate memory")

    pool.publisher.forget_fast = broken
    pool.publish()
    reset = []
    real = fast_core.reset_backend
    fast_core.reset_backend = lambda bid: reset.append(bid) or real(bid)
    web = pool.services[0]
    pool.report(web, web.backends[0], False, "refused")
    assert reset == [web.backends[0].id]
    assert "Cannot allocate memory" in caplog.text


def test_a_fast_path_that_cannot_load_is_one_clear_error(tmp_path):
    """No root needed: the object is refused before any BPF system call."""
    from natlb.core import CoreError, FastPath

    missing = tmp_path / "missing.bpf.o"
    with pytest.raises(CoreError) as e:
        FastPath(16, 64, 1000, 1000, path=missing)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(b"not an ELF object")
    with pytest.raises(CoreError, match="junk.bpf.o"):
        FastPath(16, 64, 1000, 1000, path=junk)
