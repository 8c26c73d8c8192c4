"""The tc fast path's two programs (csrc/bpf/fastpath.bpf.c) run on
scapy-built frames with BPF_PROG_TEST_RUN: what learn installs from a
packet natlb marked, and what carry does with each kind of packet, over
IPv4 and IPv6 alike (the `fam` fixture; IPv6's own cases at the end).  The
programs run in a namespace of this test's own (bpf_check_mtu and the test
run need real interface indexes), from one thread that entered it."""

import ctypes
import os
import select
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Ether

from natlb.core import MARK_FAST, MARK_FORWARD, Core, CoreConfig, FastPath

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
CPORT, VPORT, BPORT = 40000, 80, 8080
BID = 3
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Fam:
    """One family's addresses and IP header."""

    v6: bool
    client: str
    vip: str
    backend: str
    moved: str                     # another backend address (a stale slot)

    def ip(self, src: str, dst: str, ttl: int = 64, **kw: Any):
        return (IPv6(src=src, dst=dst, hlim=ttl, **kw) if self.v6
                else IP(src=src, dst=dst, ttl=ttl, **kw))

    @property
    def layer(self):
        return IPv6 if self.v6 else IP

    def ttl(self, ip) -> int:
        return ip.hlim if self.v6 else ip.ttl


V4 = Fam(False, "198.51.100.2", "192.0.2.100", "203.0.113.6", "203.0.113.7")
V6 = Fam(True, "2001:db8:1::2", "2001:db8::100", "2001:db8:113::6", "2001:db8:113::7")


@pytest.fixture(params=[V4, V6], ids=["ipv4", "ipv6"])
def fam(request) -> Fam:
    return request.param


@pytest.fixture(scope="module")
def ns():
    """A namespace with two interfaces (a veth pair): the client's and the
    backend's, with a smaller MTU."""
    name = f"nlbpf{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "cl0", "type", "veth", "peer", "name",
                        "be0"], check=True)
        for dev, mtu in (("cl0", "1500"), ("be0", "1400")):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "mtu", mtu, "up"], check=True)
        yield name, ifindexes(name, ("cl0", "be0"))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ifindexes(name: str, devs: tuple[str, ...]) -> dict[str, int]:
    """The interface indexes of `devs` in namespace `name`."""
    idx = {}
    for dev in devs:
        out = subprocess.run(["ip", "-n", name, "-o", "link", "show", dev], check=True,
                             capture_output=True, text=True).stdout
        idx[dev] = int(out.split(":")[0])
    return idx


@contextmanager
def runner_in(name: str):
    """A function that runs functions in a thread living in namespace
    `name`, where the programs attach to and redirect among its interfaces."""

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    with ThreadPoolExecutor(1, initializer=enter) as ex:
        yield lambda fn, *a, **kw: ex.submit(fn, *a, **kw).result()


@pytest.fixture(scope="module")
def inside(ns):
    """Runs functions in a thread that lives in the test namespace."""
    with runner_in(ns[0]) as run:
        yield run


def open_fastpath(inside, fam: Fam, tcp_ms: int = 60_000, closing_ms: int = 60_000,
                  synack_window_ms: int = 60_000) -> FastPath:
    fp = inside(FastPath, max_backends=16, max_flows=64, tcp_lifetime_ms=tcp_ms,
                udp_lifetime_ms=30_000, tcp_closing_ms=closing_ms, syn_lifetime_ms=30_000,
                synack_window_ms=synack_window_ms)
    fp.set_backend(BID, fam.vip, VPORT, fam.backend, BPORT, socket.IPPROTO_TCP)
    fp.set_backend(BID + 1, fam.vip, 53, fam.backend, 5353, socket.IPPROTO_UDP)
    return fp


@pytest.fixture
def fp(inside, fam):
    f = open_fastpath(inside, fam)
    yield f
    f.close()


def frame(ip) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)


def tcp(fam, src, dst, sport, dport, flags="A", ttl=64, payload=b"x" * 20, **ip_kw):
    return frame(fam.ip(src, dst, ttl=ttl, **ip_kw) /
                 TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000) / payload)


def learn(inside, fp, ns, fam, packet=None, bid=BID):
    """natlb's marked client packet, rewritten by nft, leaving via be0."""
    _, idx = ns
    packet = packet or tcp(fam, fam.client, fam.backend, CPORT, BPORT)
    return inside(fp.test_run, True, packet, mark=MARK_FORWARD | MARK_FAST | bid,
                  ifindex=idx["be0"], ingress_ifindex=idx["cl0"])


def carry(inside, fp, packet, ifindex):
    return inside(fp.test_run, False, packet, ifindex=ifindex, ingress_ifindex=ifindex)


def checksums_ok(ip) -> bool:
    """scapy recomputes what it is told to forget; equal means right (IPv6
    has no header checksum, its L4 one sums the pseudo-header)."""
    fresh = ip.copy()
    if not isinstance(ip, IPv6):
        del fresh.chksum
    del fresh.payload.chksum
    return bytes(type(ip)(bytes(fresh))) == bytes(ip)


def test_learn_installs_both_directions_and_clears_the_mark(inside, fp, ns, fam):
    r = learn(inside, fp, ns, fam)
    assert (r.retval, r.mark) == (TC_ACT_OK, 0)
    assert fp.has_flow(fam.client, fam.vip, CPORT, VPORT, socket.IPPROTO_TCP)
    assert fp.has_flow(fam.backend, fam.client, BPORT, CPORT, socket.IPPROTO_TCP)
    assert fp.flow_count() == 2


def test_learn_ignores_other_marks_and_stale_ones(inside, fp, ns, fam):
    _, idx = ns
    for mark in (MARK_FORWARD | BID, 0x6E617461, MARK_FORWARD | MARK_FAST | 9):
        r = inside(fp.test_run, True, tcp(fam, fam.client, fam.backend, CPORT, BPORT),
                   mark=mark, ifindex=idx["be0"], ingress_ifindex=idx["cl0"])
        assert r.retval == TC_ACT_OK
    # The slot names another address: a publish moved the backend.
    learn(inside, fp, ns, fam, tcp(fam, fam.client, fam.moved, CPORT, BPORT))
    # Or the other family's (a slot reused by a service of that family).
    other = V4 if fam.v6 else V6
    learn(inside, fp, ns, fam, tcp(other, other.client, other.backend, CPORT, BPORT))
    assert fp.flow_count() == 0


def test_carry_rewrites_both_ways_with_right_checksums_ttl_and_counters(inside, fp, ns, fam):
    _, idx = ns
    learn(inside, fp, ns, fam)
    fwd = tcp(fam, fam.client, fam.vip, CPORT, VPORT, ttl=64)
    r = carry(inside, fp, fwd, idx["cl0"])
    assert r.retval == TC_ACT_REDIRECT
    ip = Ether(r.packet)[fam.layer]
    assert (ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport, fam.ttl(ip)) == (
        fam.client, fam.backend, CPORT, BPORT, 63)
    assert checksums_ok(ip) and bytes(ip[TCP].payload) == b"x" * 20
    rev = tcp(fam, fam.backend, fam.client, BPORT, CPORT, ttl=2, payload=b"y" * 100)
    r = carry(inside, fp, rev, idx["be0"])
    ip = Ether(r.packet)[fam.layer]
    assert r.retval == TC_ACT_REDIRECT
    assert (ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport, fam.ttl(ip)) == (
        fam.vip, fam.client, VPORT, CPORT, 1)
    assert checksums_ok(ip)
    # Bytes as natlb counts them: the IP packet, without the Ethernet header.
    assert fp.counters()[BID] == (1, len(fwd) - 14, 1, len(rev) - 14)


def test_checksums_are_right_whatever_the_addresses_ports_and_ttl(inside, fp, ns, fam):
    """The IPv4 header checksum is updated by the program itself (RFC 1624)
    and the L4 one by the kernel's helpers: many addresses, ports and TTLs,
    both directions, checked against scapy's own sums."""
    import random

    _, idx = ns
    rnd = random.Random(6)
    for i in range(40):
        if fam.v6:
            client = f"2001:db8:1::{rnd.randrange(1, 0xFFFF):x}"
            backend = f"2001:db8:113:{rnd.randrange(0x10000):x}::{rnd.randrange(1, 0xFFFF):x}"
        else:
            client = f"198.51.100.{rnd.randrange(1, 255)}"
            backend = f"203.0.113.{rnd.randrange(1, 255)}"
        cport, bport = rnd.randrange(1024, 65536), rnd.randrange(1, 65536)
        ttl = rnd.randrange(2, 256)
        fp.set_backend(BID, fam.vip, VPORT, backend, bport, socket.IPPROTO_TCP)
        learn(inside, fp, ns, fam, tcp(fam, client, backend, cport, bport))
        for packet, dev, want in (
                (tcp(fam, client, fam.vip, cport, VPORT, ttl=ttl, payload=bytes([i]) * i), "cl0",
                 (client, backend, cport, bport)),
                (tcp(fam, backend, client, bport, cport, ttl=ttl, payload=bytes([i]) * i), "be0",
                 (fam.vip, client, VPORT, cport))):
            r = carry(inside, fp, packet, idx[dev])
            ip = Ether(r.packet)[fam.layer]
            assert r.retval == TC_ACT_REDIRECT, (i, dev)
            assert (ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport) == want
            assert fam.ttl(ip) == ttl - 1 and checksums_ok(ip), (i, dev, ttl)


def test_udp_is_carried_with_right_checksums(inside, fp, ns, fam):
    _, idx = ns
    learn(inside, fp, ns, fam,
          frame(fam.ip(fam.client, fam.backend) / UDP(sport=5000, dport=5353) / b"q"),
          bid=BID + 1)
    r = carry(inside, fp, frame(fam.ip(fam.client, fam.vip) / UDP(sport=5000, dport=53) / b"q"),
              idx["cl0"])
    ip = Ether(r.packet)[fam.layer]
    assert r.retval == TC_ACT_REDIRECT and (ip.dst, ip[UDP].dport) == (fam.backend, 5353)
    assert checksums_ok(ip)
    r = carry(inside, fp, frame(fam.ip(fam.backend, fam.client) / UDP(sport=5353, dport=5000)
                                / b"a"), idx["be0"])
    ip = Ether(r.packet)[fam.layer]
    assert r.retval == TC_ACT_REDIRECT and (ip.src, ip[UDP].sport) == (fam.vip, 53)
    assert checksums_ok(ip)


def test_a_zero_udp_checksum_stays_zero_over_ipv4_and_is_natlbs_over_ipv6(inside, fp, ns, fam):
    """IPv4: no checksum, carried so.  IPv6 (RFC 8200 8.1): a bad one,
    which natlb drops and counts; the kernel leaves it to natlb."""
    _, idx = ns
    learn(inside, fp, ns, fam,
          frame(fam.ip(fam.client, fam.backend) / UDP(sport=5000, dport=5353) / b"q"),
          bid=BID + 1)
    zero = frame(fam.ip(fam.backend, fam.client) / UDP(sport=5353, dport=5000, chksum=0) / b"a")
    r = carry(inside, fp, zero, idx["be0"])
    if fam.v6:
        assert (r.retval, r.packet) == (TC_ACT_OK, zero) and fp.read_events() == []
    else:
        ip = Ether(r.packet)[IP]
        assert r.retval == TC_ACT_REDIRECT and (ip.src, ip[UDP].sport) == (fam.vip, 53)
        assert ip[UDP].chksum == 0


def both_sides(fp, fam) -> tuple[bool, bool]:
    return (fp.has_flow(fam.client, fam.vip, CPORT, VPORT, socket.IPPROTO_TCP),
            fp.has_flow(fam.backend, fam.client, BPORT, CPORT, socket.IPPROTO_TCP))


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_syn_passes_and_deletes_both_sides(inside, fp, ns, fam, side):
    _, idx = ns
    learn(inside, fp, ns, fam)
    packet, dev = ((tcp(fam, fam.client, fam.vip, CPORT, VPORT, flags="S"), "cl0")
                   if side == "client"
                   else (tcp(fam, fam.backend, fam.client, BPORT, CPORT, flags="SA"), "be0"))
    r = carry(inside, fp, packet, idx[dev])
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert both_sides(fp, fam) == (False, False)
    assert fp.read_events() == [] and fp.counters() == {}


def sides(fam: Fam) -> dict[str, tuple]:
    return {"client": (fam.client, fam.vip, CPORT, VPORT, "cl0", fam.backend, BPORT),
            "server": (fam.backend, fam.client, BPORT, CPORT, "be0", fam.vip, VPORT)}


def carried_and_told(inside, fp, ns, fam, side, flags, payload=b""):
    """Sends one packet with flags from side: it must be carried, rewritten,
    uncounted, and its head as it arrived be in the ring."""
    _, idx = ns
    src, dst, sport, dport, dev, new_addr, new_port = sides(fam)[side]
    packet = tcp(fam, src, dst, sport, dport, flags=flags, payload=payload)
    r = carry(inside, fp, packet, idx[dev])
    assert r.retval == TC_ACT_REDIRECT
    ip = Ether(r.packet)[fam.layer]
    got = (ip.dst, ip[TCP].dport) if side == "client" else (ip.src, ip[TCP].sport)
    assert got == (new_addr, new_port) and checksums_ok(ip)
    assert fp.counters() == {}            # natlb counts it when it applies it
    [(ifindex, head, tot_len)] = fp.read_events()
    assert ifindex == idx[dev] and tot_len == len(packet) - 14
    assert head == packet[14:14 + 128]
    return packet


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_fin_is_carried_told_and_keeps_both_entries(inside, fp, ns, fam, side):
    learn(inside, fp, ns, fam)
    carried_and_told(inside, fp, ns, fam, side, "FA")
    assert both_sides(fp, fam) == (True, True)
    # The final ACKs are carried too, and counted as any.
    _, idx = ns
    assert carry(inside, fp, tcp(fam, fam.client, fam.vip, CPORT, VPORT), idx["cl0"]).retval == \
        TC_ACT_REDIRECT
    assert fp.counters()[BID][0] == 1


def test_a_fin_with_data_is_told_by_its_head(inside, fp, ns, fam):
    learn(inside, fp, ns, fam)
    carried_and_told(inside, fp, ns, fam, "server", "FPA", payload=b"d" * 600)


def test_a_fin_cuts_both_deadlines_to_the_closing_timeout(inside, ns, fam):
    """Closing timeout 0: the entries die at the FIN, so neither side's
    next packet is carried (a 60 s lifetime would have carried it)."""
    _, idx = ns
    fp = open_fastpath(inside, fam, tcp_ms=60_000, closing_ms=0)
    try:
        learn(inside, fp, ns, fam)
        assert both_sides(fp, fam) == (True, True)
        carried_and_told(inside, fp, ns, fam, "client", "FA")
        for packet, dev in ((tcp(fam, fam.client, fam.vip, CPORT, VPORT), "cl0"),
                            (tcp(fam, fam.backend, fam.client, BPORT, CPORT), "be0")):
            assert carry(inside, fp, packet, idx[dev]).retval == TC_ACT_OK
        assert both_sides(fp, fam) == (False, False)
    finally:
        fp.close()


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("flags", ["R", "RA"])
def test_an_rst_is_carried_told_and_deletes_both_sides(inside, fp, ns, fam, side, flags):
    learn(inside, fp, ns, fam)
    carried_and_told(inside, fp, ns, fam, side, flags)
    assert both_sides(fp, fam) == (False, False)


@pytest.mark.parametrize("flags", ["FA", "R", "S"])
def test_a_spoofed_fin_rst_or_syn_changes_nothing(inside, fp, ns, fam, flags):
    _, idx = ns
    learn(inside, fp, ns, fam)
    packet = tcp(fam, fam.client, fam.vip, CPORT, VPORT, flags=flags)
    r = carry(inside, fp, packet, idx["be0"])           # the client is not there
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert both_sides(fp, fam) == (True, True) and fp.read_events() == []


def test_a_record_natlb_does_not_take_makes_the_kernel_forget_the_flow(inside, fp, ns, fam):
    """The observer applies a carried FIN to a core that holds no such flow
    (expired or evicted there): the kernel must not go on carrying what
    natlb does not follow, so both entries go (csrc/tcfast.c parses the
    record's addresses and ports, in either family)."""
    _, idx = ns
    core = Core(CoreConfig(max_flows=64, workers=1, fastpath=True))
    try:
        fp.observe(core)
        learn(inside, fp, ns, fam)
        fin = tcp(fam, fam.client, fam.vip, CPORT, VPORT, flags="FA")
        assert carry(inside, fp, fin, idx["cl0"]).retval == TC_ACT_REDIRECT
        deadline = time.monotonic() + 10
        while both_sides(fp, fam) != (False, False):
            assert time.monotonic() < deadline, both_sides(fp, fam)
            time.sleep(0.01)
        assert fp.observe_counts() == (0, 1)             # applied to nothing, not believed
    finally:
        fp.stop_observing()
        core.close()


def test_no_room_in_the_ring_means_the_queued_path(inside, fp, ns, fam):
    """Nobody reads the ring: once it is full a FIN is not carried (natlb
    sees it queued) and nothing is lost; read, it has room again."""
    _, idx = ns
    learn(inside, fp, ns, fam)
    fin = tcp(fam, fam.client, fam.vip, CPORT, VPORT, flags="FA")
    carried = 0
    for _ in range(4096):                   # the ring holds about 1800
        r = carry(inside, fp, fin, idx["cl0"])
        if r.retval == TC_ACT_OK:
            break
        assert r.retval == TC_ACT_REDIRECT
        carried += 1
    assert (r.retval, r.packet) == (TC_ACT_OK, fin) and carried > 100
    assert len(fp.read_events(8192)) == carried     # one record per carried FIN
    assert fp.ring_full() == 1                      # counted, for status and metrics
    assert carry(inside, fp, fin, idx["cl0"]).retval == TC_ACT_REDIRECT


def test_a_busy_observer_is_woken_only_when_the_ring_is_a_quarter_full(inside, fp, ns, fam):
    """While the observer polls (busy: it reads the ring every millisecond)
    a record wakes nobody, so a FIN costs natlb no context switch, until
    the ring is a quarter full: then the kernel wakes it early, before the
    ring fills and FINs are queued.  Idle, the first record wakes it.  The
    wakeups are seen as a reader sees them: epoll on the ring, which reports
    it readable only when the kernel woke its waiters."""
    _, idx = ns
    learn(inside, fp, ns, fam)
    fin = tcp(fam, fam.client, fam.vip, CPORT, VPORT, flags="FA")
    ep = select.epoll()
    try:
        ep.register(fp.test_ring_fd(), select.EPOLLIN)
        fp.test_polling(True)
        carried = 0
        while carried < 1500 and not ep.poll(0):
            assert carry(inside, fp, fin, idx["cl0"]).retval == TC_ACT_REDIRECT
            carried += 1
        records = fp.read_events(8192)
        assert len(records) == carried
        # The ring holds about 1,800: a quarter is about 450, and the wakeup
        # came with the record that passed it, not before, not never.
        assert 300 < carried < 600, carried
        fp.test_polling(False)
        ep.unregister(fp.test_ring_fd())
        ep.register(fp.test_ring_fd(), select.EPOLLIN)      # empty, nothing pending
        assert not ep.poll(0)
        assert carry(inside, fp, fin, idx["cl0"]).retval == TC_ACT_REDIRECT
        assert ep.poll(0), "an idle observer was not woken by the first record"
        assert len(fp.read_events(8192)) == 1
    finally:
        fp.test_polling(False)
        ep.close()


def not_carried(fam: Fam, kind: str) -> tuple[bytes, str]:
    """A packet of the learned flow's (or like it) that carry must pass
    untouched, and where it arrives."""
    c, v, b = fam.client, fam.vip, fam.backend
    seg = TCP(sport=CPORT, dport=VPORT, flags="A") / (b"x" * 16)
    if kind == "first-fragment":
        ip = (fam.ip(c, v) / IPv6ExtHdrFragment(m=1, id=7) if fam.v6
              else fam.ip(c, v, flags="MF"))
        return frame(ip / seg), "cl0"
    if kind == "later-fragment":
        ip = (fam.ip(c, v) / IPv6ExtHdrFragment(offset=3, id=7, nh=6) if fam.v6
              else fam.ip(c, v, frag=3, proto=6))
        return frame(ip / (b"x" * 16)), "cl0"
    if kind == "options":                    # IPv6: an extension header
        ip = (fam.ip(c, v) / IPv6ExtHdrDestOpt() if fam.v6
              else fam.ip(c, v, options=[IPOption_NOP()] * 4))
        return frame(ip / seg), "cl0"
    if kind == "icmp":
        return frame(fam.ip(c, v) / (ICMPv6EchoRequest() if fam.v6 else ICMP())), "cl0"
    return {
        "ttl": (tcp(fam, c, v, CPORT, VPORT, ttl=1), "cl0"),
        "wrong-ingress": (tcp(fam, c, v, CPORT, VPORT), "be0"),
        "spoofed": (tcp(fam, b, c, BPORT, CPORT), "cl0"),                   # a reply
        "unknown": (tcp(fam, c, v, CPORT + 1, VPORT), "cl0"),
        "too-big": (tcp(fam, c, v, CPORT, VPORT, payload=b"z" * 1420), "cl0"),  # > be0's MTU
    }[kind]


@pytest.mark.parametrize("kind", ["first-fragment", "later-fragment", "options", "ttl",
                                  "wrong-ingress", "spoofed", "unknown", "icmp", "too-big"])
def test_what_is_not_carried_passes_untouched(inside, fp, ns, fam, kind):
    _, idx = ns
    learn(inside, fp, ns, fam)
    packet, where = not_carried(fam, kind)
    r = carry(inside, fp, packet, idx[where])
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert fp.counters() == {}


def test_a_gso_packet_whose_segments_exceed_the_mtu_passes_untouched(inside, fp, ns, fam):
    """Two 1448-byte segments as one GSO packet (as TSO or GRO make them):
    under be0's MTU as a whole packet would be checked by its segments'
    size, each 1488 bytes of IP, too big.  (A test run's skb has no GSO type
    nor transport header, so the kernel finds every GSO packet too big here;
    test_fastpath_tc checks on real traffic that ones that fit are carried.)"""
    _, idx = ns
    learn(inside, fp, ns, fam)
    packet = tcp(fam, fam.client, fam.vip, CPORT, VPORT, payload=b"z" * 2 * 1448)
    r = inside(fp.test_run, False, packet, ifindex=idx["cl0"], ingress_ifindex=idx["cl0"],
               gso_size=1448)
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert fp.counters() == {}


def test_an_expired_entry_passes_and_goes(inside, ns, fam):
    _, idx = ns
    fp = open_fastpath(inside, fam, tcp_ms=0)
    try:
        learn(inside, fp, ns, fam)
        packet = tcp(fam, fam.client, fam.vip, CPORT, VPORT)
        assert carry(inside, fp, packet, idx["cl0"]).retval == TC_ACT_OK
        assert not fp.has_flow(fam.client, fam.vip, CPORT, VPORT, socket.IPPROTO_TCP)
    finally:
        fp.close()


def test_flush_forgets_every_flow(inside, fp, ns, fam):
    learn(inside, fp, ns, fam)
    learn(inside, fp, ns, fam, tcp(fam, fam.client, fam.backend, CPORT + 1, BPORT))
    assert fp.flow_count() == 4
    assert fp.flush() == 4 and fp.flow_count() == 0
    # Many: the walk must reach every bucket, not only the first ones.
    for port in range(2000, 2030):
        learn(inside, fp, ns, fam, tcp(fam, fam.client, fam.backend, port, BPORT))
    assert fp.flow_count() == 60
    assert fp.flush() == 60 and fp.flow_count() == 0


def test_flush_backends_forgets_their_flows_only(inside, ns, fam):
    """A reset backend (or a UDP one no longer alive): the kernel forgets
    its flows, both sides, and carries every other backend's on; a later
    flush of another backend leaves the first one's new flows alone."""
    other = BID + 99           # another word of the kernel's bitmap of backends
    fp = inside(FastPath, max_backends=128, max_flows=8192, tcp_lifetime_ms=60_000,
                udp_lifetime_ms=30_000)
    try:
        fp.set_backend(BID, fam.vip, VPORT, fam.backend, BPORT, socket.IPPROTO_TCP)
        fp.set_backend(other, fam.vip, VPORT, fam.moved, BPORT, socket.IPPROTO_TCP)
        ports = range(10000, 13000)
        for port in ports:
            bid = BID if port % 2 else other
            dst = fam.backend if bid == BID else fam.moved
            assert learn(inside, fp, ns, fam, tcp(fam, fam.client, dst, port, BPORT),
                         bid=bid).retval == TC_ACT_OK
        assert fp.flow_count() == 2 * len(ports)

        def carried(port: int) -> tuple[bool, bool]:
            dst = fam.backend if port % 2 else fam.moved
            return (fp.has_flow(fam.client, fam.vip, port, VPORT, socket.IPPROTO_TCP),
                    fp.has_flow(dst, fam.client, BPORT, port, socket.IPPROTO_TCP))

        assert fp.flush_backends([BID]) == len(ports)       # both sides of half the flows
        assert fp.flow_count() == len(ports)
        assert {carried(p) for p in ports if p % 2} == {(False, False)}
        assert {carried(p) for p in ports if not p % 2} == {(True, True)}
        assert fp.flush_backends([BID, 127]) == 0            # dead already; 127 has none
        assert fp.flush_backends([]) == 0
        again = [p for p in ports if p % 2][:10]             # BID's clients come back
        for port in again:
            assert learn(inside, fp, ns, fam, tcp(fam, fam.client, fam.backend, port, BPORT),
                         bid=BID).retval == TC_ACT_OK
        assert fp.flush_backends([other]) == len(ports)     # BID no longer named
        assert {carried(p) for p in again} == {(True, True)}
        assert fp.flush() == 2 * len(again) and fp.flow_count() == 0
    finally:
        fp.close()


def test_flush_interface_forgets_both_entries_of_the_flows_through_it_only(inside, fp, ns, fam):
    """A device that is gone (natlb/fastpath.py on RTM_DELLINK): the flows
    in from it or out to it are forgotten, the others kept."""
    _, idx = ns
    gone = 9999          # no device: the test run takes an ingress_ifindex as given

    def learned(cport: int, ingress: int) -> None:
        inside(fp.test_run, True, tcp(fam, fam.client, fam.backend, cport, BPORT),
               mark=MARK_FORWARD | MARK_FAST | BID, ifindex=idx["be0"], ingress_ifindex=ingress)

    def entries(cport: int) -> tuple[bool, bool]:
        return (fp.has_flow(fam.client, fam.vip, cport, VPORT, socket.IPPROTO_TCP),
                fp.has_flow(fam.backend, fam.client, BPORT, cport, socket.IPPROTO_TCP))

    learned(CPORT, idx["cl0"])
    learned(CPORT + 1, gone)
    assert fp.flow_count() == 4
    assert fp.flush_interface(0) == 0 and fp.flow_count() == 4
    # gone: the second flow's forward entry comes in from it, its reply
    # entry goes out to it.
    assert fp.flush_interface(gone) == 2
    assert entries(CPORT) == (True, True) and entries(CPORT + 1) == (False, False)
    assert fp.flush_interface(gone) == 0
    learned(CPORT + 1, gone)
    # be0 is on one side of each flow.
    assert fp.flush_interface(idx["be0"]) == 4 and fp.flow_count() == 0


# ---- a new connection's handshake, learned from natlb's fast SYN ----------

def learn_syn(inside, fp, ns, fam):
    """natlb marked the client's first SYN (seq 1000) fast."""
    learn(inside, fp, ns, fam,
          tcp(fam, fam.client, fam.backend, CPORT, BPORT, flags="S", payload=b""))
    assert both_sides(fp, fam) == (True, True)


def hs(fam: Fam, side: str, flags: str, ack: int = 2000) -> bytes:
    src, dst, sport, dport, *_ = sides(fam)[side]
    return frame(fam.ip(src, dst) / TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                                        ack=ack))


def test_the_handshake_is_carried_each_step_told_then_only_counted(inside, fp, ns, fam):
    _, idx = ns
    learn_syn(inside, fp, ns, fam)
    # The client's ACK before any SYN-ACK was carried: natlb's to see.
    early = hs(fam, "client", "A", ack=5001)
    assert carry(inside, fp, early, idx["cl0"]).retval == TC_ACT_OK
    # The SYN-ACK answering the SYN: carried, told (natlb: SYN_RECV).
    synack = hs(fam, "server", "SA", ack=1001)
    r = carry(inside, fp, synack, idx["be0"])
    assert r.retval == TC_ACT_REDIRECT and Ether(r.packet)[fam.layer].src == fam.vip
    [(_, head, _)] = fp.read_events()
    assert head == synack[14:]
    # The client's last ACK: carried, told (natlb: ESTABLISHED).
    ack = hs(fam, "client", "A", ack=5001)
    assert carry(inside, fp, ack, idx["cl0"]).retval == TC_ACT_REDIRECT
    [(_, head, _)] = fp.read_events()
    assert head == ack[14:]
    # From then on both ways are carried and counted, untold.
    for packet, dev in ((tcp(fam, fam.client, fam.vip, CPORT, VPORT), "cl0"),
                        (tcp(fam, fam.backend, fam.client, BPORT, CPORT), "be0")):
        assert carry(inside, fp, packet, idx[dev]).retval == TC_ACT_REDIRECT
    assert fp.read_events() == []
    assert fp.counters()[BID][0] == 1 and fp.counters()[BID][2] == 1


@pytest.mark.parametrize("flags", ["R", "RA"])
def test_a_backends_rst_to_the_syn_is_never_carried_and_deletes_both(inside, fp, ns, fam,
                                                                      flags):
    """natlb re-steers the held SYN on it: the client must never see it."""
    _, idx = ns
    learn_syn(inside, fp, ns, fam)
    rst = hs(fam, "server", flags, ack=1001)
    r = carry(inside, fp, rst, idx["be0"])
    assert (r.retval, r.packet) == (TC_ACT_OK, rst)
    assert both_sides(fp, fam) == (False, False) and fp.read_events() == []


@pytest.mark.parametrize("flags,ack", [("SA", 77), ("S", 2000), ("SAF", 1001)],
                         ids=["wrong-ack", "syn", "syn-fin"])
def test_anything_but_the_synack_the_syn_asks_for_is_natlbs(inside, fp, ns, fam, flags, ack):
    _, idx = ns
    learn_syn(inside, fp, ns, fam)
    packet = hs(fam, "server", flags, ack=ack)
    r = carry(inside, fp, packet, idx["be0"])
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert both_sides(fp, fam) == (False, False) and fp.read_events() == []


def test_the_backend_before_its_synack_is_natlbs(inside, fp, ns, fam):
    _, idx = ns
    learn_syn(inside, fp, ns, fam)
    data = hs(fam, "server", "PA", ack=1001)
    assert carry(inside, fp, data, idx["be0"]).retval == TC_ACT_OK
    assert both_sides(fp, fam) == (True, True) and fp.read_events() == []


def test_a_late_synack_is_natlbs(inside, ns, fam):
    """After the window (before natlb's held-SYN deadline) the SYN-ACK goes
    to natlb, which may have moved the flow and then drops it."""
    _, idx = ns
    fp = open_fastpath(inside, fam, synack_window_ms=0)
    try:
        learn_syn(inside, fp, ns, fam)
        synack = hs(fam, "server", "SA", ack=1001)
        assert carry(inside, fp, synack, idx["be0"]).retval == TC_ACT_OK
        assert fp.read_events() == []
    finally:
        fp.close()


def test_the_client_repeating_its_syn_is_natlbs(inside, fp, ns, fam):
    _, idx = ns
    learn_syn(inside, fp, ns, fam)
    syn = hs(fam, "client", "S")
    assert carry(inside, fp, syn, idx["cl0"]).retval == TC_ACT_OK
    assert both_sides(fp, fam) == (False, False)


def test_a_udp_flows_first_answer_is_told_the_next_only_counted(inside, fp, ns, fam):
    _, idx = ns
    learn(inside, fp, ns, fam,
          frame(fam.ip(fam.client, fam.backend) / UDP(sport=5000, dport=5353) / b"q"),
          bid=BID + 1)
    answer = frame(fam.ip(fam.backend, fam.client) / UDP(sport=5353, dport=5000) / b"a")
    assert carry(inside, fp, answer, idx["be0"]).retval == TC_ACT_REDIRECT
    [(_, head, tot_len)] = fp.read_events()
    assert head == answer[14:] and tot_len == len(answer) - 14
    assert carry(inside, fp, answer, idx["be0"]).retval == TC_ACT_REDIRECT
    assert fp.read_events() == [] and fp.counters()[BID + 1][2] == 1


# ---- IPv6's own cases -------------------------------------------------------

@pytest.mark.parametrize("ext", [IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(),
                                 IPv6ExtHdrRouting(addresses=[]),
                                 IPv6ExtHdrFragment(offset=0, m=0, id=9)],
                         ids=["hop-by-hop", "destination-options", "routing", "atomic-fragment"])
@pytest.mark.parametrize("flags", ["A", "FA", "R"])
def test_an_ipv6_packet_with_an_extension_header_is_natlbs_and_changes_nothing(
        inside, ns, ext, flags):
    """Whatever comes between the IPv6 header and TCP, the packet goes to
    natlb (which walks extension headers) untouched, unrecorded, and a FIN
    or an RST behind one moves neither entry."""
    _, idx = ns
    fp = open_fastpath(inside, V6)
    try:
        learn(inside, fp, ns, V6)
        for packet, dev in (
                (frame(V6.ip(V6.client, V6.vip) / ext / TCP(sport=CPORT, dport=VPORT,
                                                            flags=flags)), "cl0"),
                (frame(V6.ip(V6.backend, V6.client) / ext / TCP(sport=BPORT, dport=CPORT,
                                                                flags=flags)), "be0")):
            r = carry(inside, fp, packet, idx[dev])
            assert (r.retval, r.packet) == (TC_ACT_OK, packet)
        assert both_sides(fp, V6) == (True, True)
        assert fp.read_events() == [] and fp.counters() == {}
        # Learned from one neither: natlb marked it, the kernel skips it.
        fp.flush()
        learn(inside, fp, ns, V6, frame(V6.ip(V6.client, V6.backend) / ext /
                                        TCP(sport=CPORT, dport=BPORT, flags="A")))
        assert fp.flow_count() == 0
    finally:
        fp.close()


def test_an_ipv6_packet_quoting_an_ipv4_flows_mapped_addresses_is_not_carried(inside, ns):
    """natlb holds IPv4 addresses IPv4-mapped, as the kernel's entries do;
    an IPv6 packet from ::ffff:client to ::ffff:VIP (never on a real wire)
    must not find the IPv4 flow."""
    _, idx = ns
    fp = open_fastpath(inside, V4)
    try:
        learn(inside, fp, ns, V4)
        mapped = Fam(True, f"::ffff:{V4.client}", f"::ffff:{V4.vip}", "", "")
        packet = tcp(mapped, mapped.client, mapped.vip, CPORT, VPORT)
        r = carry(inside, fp, packet, idx["cl0"])
        assert (r.retval, r.packet) == (TC_ACT_OK, packet) and fp.counters() == {}
    finally:
        fp.close()


def test_both_families_share_the_maps(inside, ns):
    """One map holds both families' flows and one flush empties it."""
    _, idx = ns
    fp = open_fastpath(inside, V4)
    try:
        fp.set_backend(BID + 2, V6.vip, VPORT, V6.backend, BPORT, socket.IPPROTO_TCP)
        learn(inside, fp, ns, V4)
        learn(inside, fp, ns, V6, bid=BID + 2)
        assert both_sides(fp, V4) == (True, True) and both_sides(fp, V6) == (True, True)
        for f, dev in ((V4, "cl0"), (V6, "cl0")):
            assert carry(inside, fp, tcp(f, f.client, f.vip, CPORT, VPORT),
                         idx[dev]).retval == TC_ACT_REDIRECT
        assert fp.counters() == {BID: (1, 60, 0, 0), BID + 2: (1, 80, 0, 0)}
        assert fp.flush() == 4
    finally:
        fp.close()
