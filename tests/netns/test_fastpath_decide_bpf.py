"""The carry program placing a new flow's first packet itself (lb.fastpath_decide),
run with BPF_PROG_TEST_RUN on scapy-built frames in a namespace of this
test's own (the program looks up the route to the backend): it picks what
natlb's own scheduler would (sh and maglev by the same hash, rr in table
order), installs both entries as learn would, tells natlb with a record
that natlb applies as if it had queued the packet, and leaves to natlb
(the packet untouched, no entry) whatever it cannot place; over IPv4 and
IPv6 alike."""

import contextlib
import ipaddress
import random
import socket
import subprocess
import uuid

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from natlb.core import (
    MARK_FAST,
    MARK_FORWARD,
    BackendEntry,
    Core,
    CoreConfig,
    FastPath,
    ServiceTable,
    Verdict,
)
from natlb.schedulers import Candidate, build_table

from .test_fastpath_bpf import V4, V6, Fam, ifindexes, runner_in

TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
VPORT, BPORT = 80, 8080
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def backends_of(fam: Fam) -> list[str]:
    base = ipaddress.ip_address(fam.backend)
    return [str(base + i) for i in range(4)]


def service(fam: Fam, scheduler: str, protocol: str = "tcp", sid: int = 0,
            weights: tuple[int, ...] = (1, 1, 1, 1), eligible: tuple[bool, ...] = (True,) * 4
            ) -> ServiceTable:
    entries = tuple(BackendEntry(a, BPORT, w, sid * 8 + i, e, True)
                    for i, (a, w, e) in enumerate(zip(backends_of(fam), weights, eligible,
                                                      strict=True)))
    cands = [Candidate(f"{b.address}:{b.port}", b.weight, b.eligible) for b in entries]
    port = VPORT if protocol == "tcp" else 53
    return ServiceTable(fam.vip, port, protocol, scheduler, sid, entries,
                        tuple(build_table(scheduler, cands)))


@pytest.fixture(params=[V4, V6], ids=["ipv4", "ipv6"])
def fam(request) -> Fam:
    return request.param


@contextlib.contextmanager
def routed_namespace(prefix: str, mtu: dict[str, int] | None = None):
    """A router namespace: the clients' interface cl0 and the backends' be0
    (with the MTUs given), addressed (the backends' subnet routed out of
    be0) and forwarding; (name, ifindexes), deleted on leaving."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        def ip(*a: str) -> None:
            subprocess.run(["ip", "-n", name, *a], check=True)
        ip("link", "add", "cl0", "type", "veth", "peer", "name", "be0")
        for dev in ("cl0", "be0"):
            ip("link", "set", dev, *(("mtu", str(mtu[dev])) if mtu else ()), "up")
        ip("addr", "add", "198.51.100.1/24", "dev", "cl0")
        ip("addr", "add", "203.0.113.1/24", "dev", "be0")
        ip("-6", "addr", "add", "2001:db8:1::1/64", "dev", "cl0", "nodad")
        ip("-6", "addr", "add", "2001:db8:113::1/64", "dev", "be0", "nodad")
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", key], check=True)
        yield name, ifindexes(name, ("cl0", "be0"))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def ns():
    with routed_namespace("nlbdec") as made:
        yield made


@pytest.fixture(scope="module")
def inside(ns):
    with runner_in(ns[0]) as run:
        yield run


@pytest.fixture
def core():
    c = Core(CoreConfig(max_flows=4096, workers=1, fastpath=True, syn_timeout_ms=1000))
    yield c
    c.check_table()
    c.close()


@pytest.fixture
def fp(inside):
    f = inside(FastPath, max_backends=64, max_flows=2048, tcp_lifetime_ms=60_000,
               udp_lifetime_ms=30_000, syn_lifetime_ms=30_000, synack_window_ms=60_000,
               max_services=16, decide_slots=1 << 16)
    yield f
    f.close()


def publish(core: Core, fp: FastPath, tables: list[ServiceTable], decide: bool = True) -> None:
    core.publish(tables)
    for t in tables:
        for b in t.backends:
            fp.set_backend(b.id, t.vip, t.port, b.address, b.port,
                           socket.IPPROTO_TCP if t.protocol == "tcp" else socket.IPPROTO_UDP)
    fp.publish(core)
    fp.set_decide(decide)


def syn(fam: Fam, client: str, sport: int, dport: int = VPORT) -> bytes:
    ip = IPv6(src=client, dst=fam.vip) if fam.v6 else IP(src=client, dst=fam.vip)
    return bytes(ETH / ip /
                 TCP(sport=sport, dport=dport, flags="S", seq=7000,
                     options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]))


def place(inside, fp: FastPath, ns, frame: bytes):
    _, idx = ns
    return inside(fp.test_run, False, frame, ifindex=idx["cl0"], ingress_ifindex=idx["cl0"])


def chosen(fam: Fam, out: bytes) -> str:
    return Ether(out)[IPv6 if fam.v6 else IP].dst


def ip_of(fam: Fam):
    """The scapy IP layer of the family."""
    return IPv6 if fam.v6 else IP


def client_of(fam: Fam, i: int) -> str:
    return str(ipaddress.ip_address(fam.client) + i * 7919)


@pytest.mark.parametrize("scheduler", ["sh", "maglev"])
def test_the_kernel_hashes_as_natlb_schedules(inside, fp, core, ns, fam, scheduler):
    """Source affinity holds whoever places the SYN: for many clients and
    ports the kernel's backend is nl_schedule's for the same packet."""
    t = service(fam, scheduler, weights=(1, 2, 3, 1))
    publish(core, fp, [t])
    by_id = {b.id: b.address for b in t.backends}
    rng = random.Random(5)
    picked = set()
    for i in range(150):
        client, sport = client_of(fam, i), rng.randrange(1024, 65535)
        frame = syn(fam, client, sport)
        r = place(inside, fp, ns, frame)
        assert r.retval == TC_ACT_REDIRECT
        v, mark = core.decide(frame[14:], 1)
        assert v == Verdict.MARK
        assert chosen(fam, r.packet) == by_id[mark & 0xFFFFF], (client, sport)
        picked.add(by_id[mark & 0xFFFFF])
        fp.read_records(8)
    assert len(picked) > 1
    assert fp.stats()["decided"] == 150


def test_rr_and_wrr_follow_the_table_in_order(inside, fp, core, ns, fam):
    rr, wrr = service(fam, "rr"), service(fam, "wrr", protocol="udp", sid=1, weights=(3, 1, 1, 1))
    publish(core, fp, [rr, wrr])
    got = [chosen(fam, place(inside, fp, ns, syn(fam, client_of(fam, i), 1000 + i)).packet)
           for i in range(8)]
    assert got == [rr.backends[i].address for i in rr.table] * 2
    ip = IPv6 if fam.v6 else IP
    got = [chosen(fam, place(inside, fp, ns, bytes(
        ETH / ip(src=client_of(fam, i), dst=fam.vip) / UDP(sport=2000 + i, dport=53) /
        b"q")).packet) for i in range(len(wrr.table))]
    assert got == [wrr.backends[i].address for i in wrr.table]


def test_a_placed_syn_installs_both_entries_and_tells_natlb_the_whole_syn(inside, fp, core, ns,
                                                                          fam):
    t = service(fam, "maglev")
    publish(core, fp, [t])
    client, frame = client_of(fam, 1), syn(fam, client_of(fam, 1), 40000)
    r = place(inside, fp, ns, frame)
    assert r.retval == TC_ACT_REDIRECT
    backend = chosen(fam, r.packet)
    out = Ether(r.packet)[IPv6 if fam.v6 else IP]
    assert out[TCP].dport == BPORT and out[TCP].options == Ether(frame)[TCP].options
    assert fp.has_flow(client, fam.vip, 40000, VPORT, socket.IPPROTO_TCP)
    assert fp.has_flow(backend, client, BPORT, 40000, socket.IPPROTO_TCP)
    [(ifindex, head, tot_len, bid)] = fp.read_records(8)
    assert (ifindex, head, tot_len) == (ns[1]["cl0"], frame[14:], len(frame) - 14)
    assert {b.id: b.address for b in t.backends}[bid] == backend
    # natlb takes it as it would have queued it.
    assert core.observe_new(head, bid, 1) is True
    assert core.service_counters(1)[0].new_flows == 1


def test_what_the_kernel_does_not_place_goes_to_natlb_untouched(inside, fp, core, ns, fam):
    """lc (natlb's live counts), a port with no service, decisions off, an
    ACK with no flow: the packet passes as it came, no entry, no record."""
    publish(core, fp, [service(fam, "lc"), service(fam, "rr", sid=1, protocol="udp")],
            decide=True)
    frames = [syn(fam, client_of(fam, 2), 41000), syn(fam, client_of(fam, 2), 41001, dport=81)]
    ip = IPv6 if fam.v6 else IP
    frames.append(bytes(ETH / ip(src=client_of(fam, 2), dst=fam.vip) /
                        TCP(sport=41002, dport=VPORT, flags="A")))
    for f in frames:
        r = place(inside, fp, ns, f)
        assert (r.retval, r.packet) == (TC_ACT_OK, f)
    fp.set_decide(False)
    u = bytes(ETH / ip(src=client_of(fam, 2), dst=fam.vip) / UDP(sport=41003, dport=53))
    assert place(inside, fp, ns, u).retval == TC_ACT_OK
    assert fp.flow_count() == 0 and fp.read_records(8) == []
    fp.set_decide(True)
    assert place(inside, fp, ns, u).retval == TC_ACT_REDIRECT


def test_no_room_in_the_ring_leaves_the_first_packet_to_natlb(inside, fp, core, ns, fam):
    publish(core, fp, [service(fam, "rr")])
    placed = 0
    for i in range(4096):                    # the ring holds about 1,700 records
        f = syn(fam, client_of(fam, i % 500), 1024 + i)
        r = place(inside, fp, ns, f)
        if r.retval == TC_ACT_OK:
            break
        placed += 1
    assert (r.retval, r.packet) == (TC_ACT_OK, f) and placed > 100
    assert fp.stats()["fallback_ring"] == 1
    # No entry for it: natlb places it (queued), the kernel will carry it then.
    assert not fp.has_flow(client_of(fam, i % 500), fam.vip, 1024 + i, VPORT,
                           socket.IPPROTO_TCP)
    assert len(fp.read_records(8192)) == placed


def test_no_route_to_the_backend_leaves_it_to_natlb(inside, fp, core, ns, fam):
    t = service(fam, "rr")
    core.publish([t])
    for b in t.backends:     # addresses nothing routes to in this namespace
        addr = "192.0.2.9" if not fam.v6 else "2001:db8:ffff::9"
        fp.set_backend(b.id, t.vip, t.port, addr, b.port, socket.IPPROTO_TCP)
    fp.publish(core)
    fp.set_decide(True)
    f = syn(fam, client_of(fam, 3), 42000)
    assert place(inside, fp, ns, f).retval == TC_ACT_OK
    assert fp.stats()["fallback_route"] == 1 and fp.flow_count() == 0


def test_a_syn_again_leaves_the_tuple_to_natlb(inside, fp, core, ns, fam):
    """The client repeating its SYN: natlb's (it may move the flow); the
    client's side is kept dead, so a third SYN is not placed anew either."""
    publish(core, fp, [service(fam, "rr")])
    f = syn(fam, client_of(fam, 4), 43000)
    assert place(inside, fp, ns, f).retval == TC_ACT_REDIRECT
    for _ in range(2):
        assert place(inside, fp, ns, f).retval == TC_ACT_OK
    assert fp.flow_count() == 0 and len(fp.read_records(8)) == 1


def test_a_refused_record_makes_the_kernel_forget_the_flow(inside, fp, core, ns, fam):
    """natlb refusing a placed flow (here: its service is gone from natlb
    since the kernel read its table) leaves no live entry: its observer
    forgets it; the record before it is applied."""
    t = service(fam, "rr")
    publish(core, fp, [t])
    assert place(inside, fp, ns, syn(fam, client_of(fam, 6), 44001)).retval == TC_ACT_REDIRECT
    fp.observe(core)
    fp.stop_observing()          # its last round reads every record waiting
    core.publish([])
    client = client_of(fam, 5)
    r = place(inside, fp, ns, syn(fam, client, 44000))
    assert r.retval == TC_ACT_REDIRECT
    backend = chosen(fam, r.packet)
    assert fp.has_flow(client, fam.vip, 44000, VPORT, socket.IPPROTO_TCP)
    fp.observe(core)
    fp.stop_observing()
    assert fp.placed_counts() == (1, 1)
    assert not fp.has_flow(client, fam.vip, 44000, VPORT, socket.IPPROTO_TCP)
    assert not fp.has_flow(backend, client, BPORT, 44000, socket.IPPROTO_TCP)
    assert fp.has_flow(client_of(fam, 6), fam.vip, 44001, VPORT, socket.IPPROTO_TCP)
    # Kept dead: the client's SYN again is natlb's (queued), not placed anew.
    assert place(inside, fp, ns, syn(fam, client, 44000)).retval == TC_ACT_OK


def test_a_syn_on_a_closed_connections_port_is_placed_anew(inside, fp, core, ns, fam):
    """A client reusing the port of a connection that carried its FIN: the
    old entries go and the SYN is placed as any first packet (natlb makes a
    new flow of it too)."""
    publish(core, fp, [service(fam, "rr")])
    client = client_of(fam, 8)
    f = syn(fam, client, 45000)
    first = place(inside, fp, ns, f)
    assert first.retval == TC_ACT_REDIRECT
    ip = IPv6 if fam.v6 else IP
    fin = bytes(ETH / ip(src=client, dst=fam.vip) / TCP(sport=45000, dport=VPORT, flags="FA"))
    # Established (natlb's fast mark on a later packet: learn), so the FIN
    # is carried and told.
    _, idx = ns
    backend = chosen(fam, first.packet)
    bid = next(b.id for b in service(fam, "rr").backends if b.address == backend)
    inside(fp.test_run, True, bytes(ETH / ip(src=client, dst=backend) /
                                    TCP(sport=45000, dport=BPORT, flags="A")),
           mark=MARK_FORWARD | MARK_FAST | bid, ifindex=idx["be0"], ingress_ifindex=idx["cl0"])
    assert place(inside, fp, ns, fin).retval == TC_ACT_REDIRECT
    second = place(inside, fp, ns, syn(fam, client, 45000))
    assert second.retval == TC_ACT_REDIRECT
    assert chosen(fam, second.packet) != chosen(fam, first.packet)      # rr: the next one
    assert [r[3] is not None for r in fp.read_records(8)] == [True, False, True]



def test_a_publish_takes_effect_in_the_kernels_next_decision(inside, fp, core, ns, fam):
    """A drained backend gets no new flow from the next packet on, a weight
    change reorders the table at once, and rr goes on from its cursor."""
    publish(core, fp, [service(fam, "rr")])
    first = [chosen(fam, place(inside, fp, ns, syn(fam, client_of(fam, 20), 46000 + i)).packet)
             for i in range(2)]
    drained = service(fam, "rr", eligible=(True, False, True, True))
    publish(core, fp, [drained])
    after = [chosen(fam, place(inside, fp, ns, syn(fam, client_of(fam, 21), 46100 + i)).packet)
             for i in range(6)]
    assert backends_of(fam)[1] not in after
    # The cursor was at 2 of the old table: it goes on from there in the new one.
    table = [drained.backends[i].address for i in drained.table]
    assert after == [table[(2 + i) % 3] for i in range(6)] and first == backends_of(fam)[:2]
    heavy = service(fam, "wrr", weights=(1, 1, 1, 5))
    publish(core, fp, [heavy])
    got = [chosen(fam, place(inside, fp, ns, syn(fam, client_of(fam, 22), 46200 + i)).packet)
           for i in range(len(heavy.table))]
    assert sorted(got) == sorted(heavy.backends[i].address for i in heavy.table)
    assert got.count(backends_of(fam)[3]) == 5
    fp.read_records(64)
