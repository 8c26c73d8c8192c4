"""Hostile packets against the tc fast path's carry program, as a
differential test: learned flows of both families (TCP and UDP; one TCP
flow each learned from its SYN, in handshake until its SYN-ACK), then
thousands of seeded variants of their packets (bit flips, truncation at
every length, IP options and lengths, fragments, extension headers, TTL,
TCP data offset and flags, UDP length, checksums, VLAN tags, other
EtherTypes, the wrong interface, unknown flows), and the same for the
first packets the program places itself (lb.fastpath_decide).  Every
outcome is held to what fastpath_rules.py computes from the program's
documented rules, and to a model of the flows: a frame not carried comes
back unchanged, one carried is a flow's, arrived where it should, meets
every rule and is rewritten exactly; records and counters only for those.
Deterministic (fixed seeds) and bounded in count."""

import ipaddress
import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from natlb.core import MARK_FAST, MARK_FORWARD, Core, CoreConfig, FastPath

from .fastpath_rules import (
    ETH_HLEN,
    IPPROTO_TCP,
    IPPROTO_UDP,
    RECORD_HEAD,
    TCP_ACK,
    TCP_FIN,
    TCP_RST,
    TCP_SYN,
    Taken,
    check_rewrite,
    taken,
)
from .packet_mutations import fix_ip4, fix_l4, mutate
from .test_fastpath_bpf import V4, V6, Fam, runner_in
from .test_fastpath_decide_bpf import BPORT, publish, routed_namespace, service

TC_ACT_OK, TC_ACT_REDIRECT = 0, 7
MTU = {"cl0": 1500, "be0": 1400}
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


@pytest.fixture(scope="module")
def ns():
    """A router: the clients' interface and the backends' (a smaller MTU),
    addressed and routed, so a first packet the program places has a route."""
    with routed_namespace("nlbhos", MTU) as made:
        yield made


@pytest.fixture(scope="module")
def inside(ns):
    with runner_in(ns[0]) as run:
        yield run


def runnable(frame: bytes) -> bool:
    """Whether the kernel test-runs the frame: it refuses an IPv4 (IPv6)
    one shorter than an Ethernet and an IPv4 (IPv6) header."""
    need = {b"\x08\x00": 34, b"\x86\xdd": 54}.get(frame[12:14], ETH_HLEN + 1)
    return len(frame) >= need


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def ip_of(fam: Fam, src: str, dst: str, ttl: int = 64):
    return IPv6(src=src, dst=dst, hlim=ttl) if fam.v6 else IP(src=src, dst=dst, ttl=ttl)


# ---- the carried flows' model ----

@dataclass
class Flow:
    """A flow learn installed, as the documented rules move it."""

    fam: Fam
    proto: int
    bid: int
    cport: int
    vport: int
    bport: int
    from_syn: bool = False     # learned from the client's SYN: in handshake then
    alive: bool = False
    unreplied: bool = False    # UDP: the backend's first answer goes with a record
    hs_in: bool = False        # handshake: the client's side waits for the SYN-ACK
    hs_out: bool = False       # handshake: the backend's side carries only the SYN-ACK


@dataclass
class Side:
    """One direction of a flow: where its packets arrive, what they become."""

    flow: Flow
    inbound: bool              # client -> VIP
    dev: str                   # the interface they must arrive by
    out: str                   # the one they leave by (its MTU)
    addr: bytes                # the new destination (inbound) or source
    port: int
    bases: list[bytes] = field(default_factory=list)   # well-formed packets of it

    @property
    def key(self) -> tuple:
        f, fam = self.flow, self.flow.fam
        if self.inbound:
            return (fam.v6, packed(fam.client), packed(fam.vip), f.cport, f.vport, f.proto)
        return (fam.v6, packed(fam.backend), packed(fam.client), f.bport, f.cport, f.proto)


SYN_SEQ = 1000                 # what every SYN here sends: its SYN-ACK acks 1001


def l4(proto: int, sport: int, dport: int, flags: str = "A", tcp_options=(), payload=b"",
       ack: int = 2000):
    if proto == IPPROTO_TCP:
        return TCP(sport=sport, dport=dport, flags=flags, seq=SYN_SEQ, ack=ack,
                   options=list(tcp_options)) / payload
    return UDP(sport=sport, dport=dport) / payload


def make_sides(fam: Fam, proto: int, bid: int, cport: int, from_syn: bool) -> list[Side]:
    vport, bport = (80, 8080) if proto == IPPROTO_TCP else (53, 5353)
    flow = Flow(fam, proto, bid, cport, vport, bport, from_syn)
    sides = [Side(flow, True, "cl0", "be0", packed(fam.backend), bport),
             Side(flow, False, "be0", "cl0", packed(fam.vip), vport)]
    ends = {True: (fam.client, fam.vip, cport, vport), False: (fam.backend, fam.client, bport,
                                                              cport)}
    for s in sides:
        src, dst, sport, dport = ends[s.inbound]
        hdr = 40 if fam.v6 else 20
        edge = MTU[s.out] - hdr - (20 if proto == IPPROTO_TCP else 8)   # just fits
        s.bases = [bytes(ETH / ip_of(fam, src, dst) / l4(proto, sport, dport, payload=b"x" * 20)),
                   bytes(ETH / ip_of(fam, src, dst, ttl=2) /
                         l4(proto, sport, dport, "PA", [("Timestamp", (1, 2))], b"odd-len")),
                   bytes(ETH / ip_of(fam, src, dst) / l4(proto, sport, dport, payload=b"e" * edge)),
                   bytes(ETH / ip_of(fam, src, dst) /
                         l4(proto, sport, dport, payload=b"e" * (edge + 1)))]
        if proto == IPPROTO_TCP:
            s.bases += [bytes(ETH / ip_of(fam, src, dst) / l4(proto, sport, dport, "FA")),
                        bytes(ETH / ip_of(fam, src, dst) / l4(proto, sport, dport, "R"))]
        if from_syn and not s.inbound:
            s.bases += [bytes(ETH / ip_of(fam, src, dst) /
                              l4(proto, sport, dport, "SA", [("MSS", 1400)], ack=SYN_SEQ + 1))] * 3
    return sides


class CarryModel:
    """The learned flows, the counters and records the rules predict, and
    one FastPath whose carry program runs each frame (in the namespace's
    thread: everything here runs there)."""

    def __init__(self, fp: FastPath, idx: dict[str, int]) -> None:
        self.fp, self.idx = fp, idx
        self.sides: dict[tuple, Side] = {}
        self.history: deque[str] = deque(maxlen=6)     # for a failure's message
        self.counters: dict[int, list[int]] = {}
        self.seen = {"carried": 0, "records": 0, "passed": 0, "dead": 0, "unrunnable": 0}
        for fam, first in ((V4, 3), (V6, 5)):
            for proto, bid, cports in ((IPPROTO_TCP, first, (40000, 40001, 41000)),
                                       (IPPROTO_UDP, first + 1, (5000,))):
                vport, bport = (80, 8080) if proto == IPPROTO_TCP else (53, 5353)
                fp.set_backend(bid, fam.vip, vport, fam.backend, bport, proto)
                for cport in cports:
                    for s in make_sides(fam, proto, bid, cport, from_syn=cport == 41000):
                        self.sides[s.key] = s
        self.flows = [s.flow for s in self.sides.values() if s.inbound]
        for f in self.flows:
            self.learn(f)

    def learn(self, flow: Flow) -> None:
        fam = flow.fam
        r = self.fp.test_run(True, bytes(ETH / ip_of(fam, fam.client, fam.backend) /
                                         l4(flow.proto, flow.cport, flow.bport,
                                            "S" if flow.from_syn else "A")),
                             mark=MARK_FORWARD | MARK_FAST | flow.bid, ifindex=self.idx["be0"],
                             ingress_ifindex=self.idx["cl0"])
        assert r.retval == TC_ACT_OK
        flow.alive, flow.unreplied = True, flow.proto == IPPROTO_UDP
        flow.hs_in = flow.hs_out = flow.from_syn

    def expect(self, frame: bytes, t: Taken | None, dev: str) -> tuple[Side | None, bool]:
        """The side that must carry frame (None: it must pass), and whether
        it goes with a record; moves the model as the rules say."""
        side = self.sides.get(t.key) if t else None
        if side is None or side.dev != dev:
            return None, False     # unknown, or spoofed: changes nothing
        flow, syn, rst = side.flow, t.flag(TCP_SYN), t.flag(TCP_RST)
        if not flow.alive:
            return None, False     # natlb's until it marks the flow again
        handshake = flow.hs_in if side.inbound else flow.hs_out
        synack = (handshake and not side.inbound and syn and t.flag(TCP_ACK) and not rst and
                  not t.flag(TCP_FIN) and t.ack_seq == SYN_SEQ + 1)
        if (syn and not synack) or (handshake and not side.inbound and rst):
            flow.alive = False     # a new connection, a SYN again, the backend refusing: natlb's
            return None, False
        record = t.flag(TCP_FIN) or rst or synack or (not side.inbound and flow.unreplied)
        if handshake and not synack:
            if not side.inbound or flow.hs_out:
                return None, False  # before the SYN-ACK was carried: natlb's
            record = True          # the handshake's last ACK (or what stands for it)
        if rst:
            flow.alive = False     # natlb closes its flow on it, carried or not
        if t.ttl <= 1 or len(frame) - ETH_HLEN > MTU[side.out]:
            return None, False
        if not side.inbound:
            flow.unreplied = flow.hs_out = False
        elif not rst:
            flow.hs_in = False
        return side, record

    def run(self, frame: bytes, dev: str, what: str) -> None:
        if not runnable(frame):
            self.seen["unrunnable"] += 1
            return
        t = taken(frame)
        side, record = self.expect(frame, t, dev)
        r = self.fp.test_run(False, frame, ifindex=self.idx[dev], ingress_ifindex=self.idx[dev])
        events = self.fp.read_events(8)
        why = f"{what} on {dev}: {frame.hex()}, after {list(self.history)}"
        self.history.append(f"{what} on {dev}: {frame[:80].hex()}")
        if side is None:
            assert (r.retval, r.packet) == (TC_ACT_OK, frame), f"not to carry, {why}"
            assert events == [], f"a record of a packet not carried, {why}"
            self.seen["passed"] += 1
        else:
            assert r.retval == TC_ACT_REDIRECT, f"not carried, {why}"
            check_rewrite(frame, r.packet, t, side.addr, side.port, side.inbound)
            self.seen["carried"] += 1
            if record:
                ip = frame[ETH_HLEN:]
                assert events == [(self.idx[dev], ip[:min(t.tot, RECORD_HEAD)], t.tot)], why
                self.seen["records"] += 1
            else:
                assert events == [], f"a record of an uneventful packet, {why}"
                slot = self.counters.setdefault(side.flow.bid, [0, 0, 0, 0])
                at = 0 if side.inbound else 2
                slot[at] += 1
                slot[at + 1] += t.tot           # the IP length, as natlb counts
        assert self.fp.counters() == {b: tuple(c) for b, c in self.counters.items()}, why
        for f in self.flows:
            fam = f.fam
            alive = (self.fp.has_flow(fam.client, fam.vip, f.cport, f.vport, f.proto),
                     self.fp.has_flow(fam.backend, fam.client, f.bport, f.cport, f.proto))
            assert alive == (f.alive, f.alive), f"entries {alive} of {f}, {why}"
        self.revive()

    def revive(self) -> None:
        """A flow the rules say is dead: its next packet must pass; then
        natlb marks it again (learn)."""
        for s in self.sides.values():
            if s.inbound and not s.flow.alive:
                probe = s.bases[0]
                r = self.fp.test_run(False, probe, ifindex=self.idx["cl0"],
                                     ingress_ifindex=self.idx["cl0"])
                assert (r.retval, r.packet) == (TC_ACT_OK, probe), "a dead flow was carried"
                self.seen["dead"] += 1
                self.learn(s.flow)


@pytest.fixture
def carry_model(inside, ns):
    fp = inside(FastPath, max_backends=16, max_flows=4096, tcp_lifetime_ms=600_000,
                udp_lifetime_ms=600_000, tcp_closing_ms=600_000, syn_lifetime_ms=600_000,
                synack_window_ms=600_000)
    try:
        yield inside(CarryModel, fp, ns[1])
    finally:
        fp.close()


def hostile(model: CarryModel, seed: int, n: int) -> None:
    rng = random.Random(seed)
    sides = sorted(model.sides.values(), key=lambda s: s.key)
    for i in range(n):
        side = rng.choice(sides)
        frame, what = mutate(rng.choice(side.bases), rng)
        if rng.random() < 0.1:
            frame, what = rng.choice(side.bases), "as sent"
        dev = side.dev if rng.random() < 0.9 else ("be0" if side.dev == "cl0" else "cl0")
        model.run(frame, dev, f"#{i} (seed {seed}) {what}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hostile_packets_on_learned_flows(inside, carry_model, seed):
    """Both families' flows in one map (established ones, and one in its
    handshake each), 3,000 variants of their packets."""
    inside(hostile, carry_model, seed, 3000)
    seen = carry_model.seen
    # What the run went through (else it proved little): many of each.
    assert seen["carried"] > 300 and seen["passed"] > 1000, seen
    assert seen["records"] > 50 and seen["dead"] > 20, seen
    assert not any(carry_model.fp.stats().values())


def every_truncation(model: CarryModel) -> None:
    for side in sorted(model.sides.values(), key=lambda s: s.key):
        tcp = side.flow.proto == IPPROTO_TCP
        bases = [side.bases[1], side.bases[4] if tcp else side.bases[0]]
        if side.flow.from_syn and not side.inbound:
            bases.append(side.bases[-1])                  # the SYN-ACK
        for base in bases:
            for n in range(ETH_HLEN + 1, len(base) + 1):   # a test run needs more
                model.run(base[:n], side.dev, f"truncated to {n}")


def test_every_truncation_of_a_flows_packets(inside, carry_model):
    inside(every_truncation, carry_model)
    established = [s for s in carry_model.sides.values() if not s.flow.from_syn]
    assert carry_model.seen["carried"] >= 2 * len(established) + 2     # + SYN-ACKs


# ---- first packets the program places (lb.fastpath_decide) ----

class DecideModel:
    """Services published for the kernel to place (TCP rr, UDP maglev, both
    families); the tuples placed so far, so a variant never lands on one."""

    def __init__(self, fp: FastPath, core: Core, idx: dict[str, int]) -> None:
        self.fp, self.idx = fp, idx
        tables = [service(V4, "rr"), service(V4, "maglev", "udp", sid=1),
                  service(V6, "rr", sid=2), service(V6, "maglev", "udp", sid=3)]
        publish(core, fp, tables)
        self.services = {}
        for t in tables:
            proto = IPPROTO_TCP if t.protocol == "tcp" else IPPROTO_UDP
            key = (":" in t.vip, packed(t.vip), t.port, proto)
            self.services[key] = {b.id: packed(b.address) for b in t.backends}
        self.installed: set[tuple] = set()
        self.stats = fp.stats()
        self.seen = {"placed": 0, "passed": 0, "skipped": 0}

    def placeable(self, frame: bytes, t: Taken | None) -> tuple[dict | None, str | None]:
        """The service that must place frame (None: it must pass), and the
        stat its passing must count, if any."""
        if t is None:
            return None, None
        backends = self.services.get((t.v6, t.dst, t.dport, t.proto))
        if backends is None:
            return None, None
        if t.proto == IPPROTO_TCP and t.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) \
                != TCP_SYN:
            return None, None      # not a client's first packet
        if t.ttl <= 1 or (t.proto == IPPROTO_TCP and t.tot > RECORD_HEAD):
            return None, "fallback_packet"
        if t.v6 and (t.src[0] == 0xFF or t.src[0] == 0xFE and t.src[1] & 0xC0 == 0x80
                     or t.src == bytes(15) + b"\x01"):
            return None, "fallback_route"  # a source never forwarded from (fib: RFC 4291)
        if not t.v6 and (t.src[0] in (0, 127) or t.src[0] & 0xF0 == 0xE0
                         or t.src == b"\xff" * 4):
            return None, "fallback_route"  # martian: the kernel's routing drops it
        if len(frame) - ETH_HLEN > MTU["be0"]:
            return None, "fallback_route"
        return backends, None

    def run(self, frame: bytes, what: str) -> None:
        if not runnable(frame):
            self.seen["skipped"] += 1
            return
        t = taken(frame)
        if t and t.key in self.installed:
            self.seen["skipped"] += 1  # a placed flow's: the carry tests' business
            return
        backends, stat = self.placeable(frame, t)
        cl0 = self.idx["cl0"]
        r = self.fp.test_run(False, frame, ifindex=cl0, ingress_ifindex=cl0)
        records = self.fp.read_records(8)
        stats = self.fp.stats()
        why = f"{what}: {frame.hex()}"
        if backends is None:
            assert (r.retval, r.packet) == (TC_ACT_OK, frame), f"not to place, {why}"
            assert records == [], why
            if stat:
                self.stats[stat] += 1
            self.seen["passed"] += 1
        else:
            assert r.retval == TC_ACT_REDIRECT, f"not placed ({stats}), {why}"
            ip = frame[ETH_HLEN:]
            [(ifindex, head, tot, bid)] = records
            assert (ifindex, head, tot) == (cl0, ip[:min(t.tot, RECORD_HEAD)], t.tot), why
            assert bid in backends, f"a backend not the service's, {why}"
            check_rewrite(frame, r.packet, t, backends[bid], BPORT, True)
            backend = ipaddress.ip_address(backends[bid])
            client = ipaddress.ip_address(t.src)
            assert self.fp.has_flow(str(client), str(ipaddress.ip_address(t.dst)), t.sport,
                                    t.dport, t.proto), why
            assert self.fp.has_flow(str(backend), str(client), BPORT, t.sport, t.proto), why
            self.installed.add(t.key)
            self.installed.add((t.v6, backends[bid], t.src, BPORT, t.sport, t.proto))
            self.stats["decided"] += 1
            self.seen["placed"] += 1
        assert stats == self.stats, why


def first_packets(fam: Fam) -> list[bytes]:
    """A client's SYN (with options, as a stack sends it) and UDP datagrams
    (one that just fits be0's MTU, one a byte too long), each made some
    client's and source port's by `as_client`."""
    syn = bytes(ETH / ip_of(fam, fam.client, fam.vip) /
                TCP(sport=1, dport=80, flags="S", seq=7000,
                    options=[("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]))
    fits = MTU["be0"] - (48 if fam.v6 else 28)
    udp = [bytes(ETH / ip_of(fam, fam.client, fam.vip) / UDP(sport=1, dport=53) / (b"q" * n))
           for n in (1, 200, fits, fits + 1)]
    return [syn, syn, syn, *udp]


def as_client(frame: bytes, fam: Fam, host: int, sport: int) -> bytes:
    f = bytearray(frame)
    at = ETH_HLEN + (8 if fam.v6 else 12)
    src = ipaddress.ip_address(fam.client) + host
    f[at:at + len(src.packed)] = src.packed
    at = ETH_HLEN + (40 if fam.v6 else 20)
    f[at:at + 2] = sport.to_bytes(2, "big")
    fix_ip4(f)
    fix_l4(f)
    return bytes(f)


def hostile_first_packets(model: DecideModel, seed: int, n: int) -> None:
    rng = random.Random(seed)
    bases = {fam: first_packets(fam) for fam in (V4, V6)}
    for i in range(n):
        fam = rng.choice((V4, V6))
        frame = as_client(rng.choice(bases[fam]), fam, rng.randrange(1, 200), 1024 + i)
        what = "as sent"
        if rng.random() < 0.85:
            frame, what = mutate(frame, rng)
        model.run(frame, f"#{i} (seed {seed}) {what}")


@pytest.mark.parametrize("seed", [1, 2])
def test_hostile_first_packets_are_placed_right_or_passed(inside, ns, seed):
    core = Core(CoreConfig(max_flows=4096, workers=1, fastpath=True, syn_timeout_ms=1000))
    fp = inside(FastPath, max_backends=64, max_flows=8192, tcp_lifetime_ms=600_000,
                udp_lifetime_ms=600_000, syn_lifetime_ms=600_000, synack_window_ms=600_000,
                max_services=16, decide_slots=1 << 16)
    try:
        model = inside(DecideModel, fp, core, ns[1])
        inside(hostile_first_packets, model, 100 + seed, 2000)
        seen = model.seen
        assert seen["placed"] > 150 and seen["passed"] > 500, seen
        assert model.stats["fallback_packet"] > 5 and model.stats["fallback_route"] > 0, \
            model.stats
    finally:
        fp.close()
        core.close()


# ---- what the runs above found, each on its own ----

@pytest.fixture(params=[V4, V6], ids=["ipv4", "ipv6"])
def fam(request) -> Fam:
    return request.param


def tcp_side(model: CarryModel, fam: Fam, inbound: bool = True, proto: int = IPPROTO_TCP) -> Side:
    return next(s for s in model.sides.values() if s.flow.fam == fam and s.inbound == inbound
                and s.flow.proto == proto and s.flow.cport in (40000, 5000))


def damaged(frame: bytes, fam: Fam, what: str) -> bytes:
    """frame with one lie in its headers, every checksum made right again."""
    f = bytearray(frame)
    ip, l3 = ETH_HLEN, 40 if fam.v6 else 20
    tot = len(frame) - ETH_HLEN

    def set_tot(n: int) -> None:
        if fam.v6:
            f[ip + 4:ip + 6] = (n - 40).to_bytes(2, "big")
        else:
            f[ip + 2:ip + 4] = n.to_bytes(2, "big")

    if what == "ip length beyond the frame":
        set_tot(tot + 1)
    elif what == "ip length short of the l4 header":
        set_tot(l3 + (8 if f[ip + (6 if fam.v6 else 9)] == IPPROTO_TCP else 4))
    elif what == "tcp data offset 4":
        f[ip + l3 + 12] = 0x40
    elif what == "tcp data offset past the packet":
        f[ip + l3 + 12] = 0xF0
    elif what == "udp length 7":
        f[ip + l3 + 4:ip + l3 + 6] = (7).to_bytes(2, "big")
    elif what == "udp length past the packet":
        f[ip + l3 + 4:ip + l3 + 6] = (tot - l3 + 1).to_bytes(2, "big")
    fix_ip4(f)
    fix_l4(f)
    return bytes(f)


@pytest.mark.parametrize("what", ["ip length beyond the frame", "ip length short of the l4 header",
                                  "tcp data offset 4", "tcp data offset past the packet",
                                  "udp length 7", "udp length past the packet"])
def test_a_packet_whose_lengths_lie_is_not_carried(inside, carry_model, fam, what):
    """The kernel drops an IP packet longer than its frame (ip_rcv,
    ipv6_rcv), natlb one whose L4 header its IP length does not hold, or
    whose TCP data offset or UDP length is not within it (malformed):
    carried, a rewrite would write past the packet or hand a backend a
    packet that lies about its length."""
    side = tcp_side(carry_model, fam, proto=IPPROTO_UDP if what.startswith("udp") else
                    IPPROTO_TCP)
    frame = damaged(side.bases[0], fam, what)
    r = inside(carry_model.fp.test_run, False, frame, ifindex=carry_model.idx["cl0"],
               ingress_ifindex=carry_model.idx["cl0"])
    assert (r.retval, r.packet) == (TC_ACT_OK, frame)
    assert carry_model.fp.counters() == {}


def test_an_ipv4_header_with_a_wrong_checksum_is_not_carried(inside, carry_model):
    """The kernel drops it on receive (ip_rcv); carried, its checksum
    updated for the rewrite stays wrong, and the backend drops it."""
    frame = bytearray(tcp_side(carry_model, V4).bases[0])
    frame[ETH_HLEN + 10] ^= 0x10
    r = inside(carry_model.fp.test_run, False, bytes(frame), ifindex=carry_model.idx["cl0"],
               ingress_ifindex=carry_model.idx["cl0"])
    assert (r.retval, r.packet) == (TC_ACT_OK, bytes(frame))


def test_the_bytes_counted_are_the_ip_packets_not_the_frames_padding(inside, carry_model, fam):
    """A short packet arrives padded to Ethernet's 60 bytes from a NIC:
    natlb counts the IP length, and so must the kernel."""
    base = tcp_side(carry_model, fam).bases[0]
    frame = base + bytes(6)
    r = inside(carry_model.fp.test_run, False, frame, ifindex=carry_model.idx["cl0"],
               ingress_ifindex=carry_model.idx["cl0"])
    assert r.retval == TC_ACT_REDIRECT
    bid = tcp_side(carry_model, fam).flow.bid
    assert carry_model.fp.counters() == {bid: (1, len(base) - ETH_HLEN, 0, 0)}


def test_a_spoofed_syn_leaves_a_closing_flow_alone(inside, carry_model, fam):
    """After a FIN, the client's SYN on the tuple makes it a new
    connection (both entries go); the same SYN arriving by the backends'
    interface is spoofed and must change nothing."""
    m, side = carry_model, tcp_side(carry_model, fam)
    f = side.flow
    fin = bytes(ETH / ip_of(fam, fam.client, fam.vip) / l4(IPPROTO_TCP, f.cport, f.vport, "FA"))
    syn = bytes(ETH / ip_of(fam, fam.client, fam.vip) / l4(IPPROTO_TCP, f.cport, f.vport, "S"))
    cl0, be0 = m.idx["cl0"], m.idx["be0"]
    assert inside(m.fp.test_run, False, fin, ifindex=cl0, ingress_ifindex=cl0).retval == \
        TC_ACT_REDIRECT
    r = inside(m.fp.test_run, False, syn, ifindex=be0, ingress_ifindex=be0)
    assert (r.retval, r.packet) == (TC_ACT_OK, syn)
    assert m.fp.has_flow(fam.client, fam.vip, f.cport, f.vport, IPPROTO_TCP)
    assert inside(m.fp.test_run, False, side.bases[0], ifindex=cl0,
                  ingress_ifindex=cl0).retval == TC_ACT_REDIRECT


@pytest.mark.parametrize("source", ["0.0.0.1", "127.0.0.1", "224.0.0.5", "239.1.2.3",
                                    "255.255.255.255"])
def test_a_first_packet_from_a_martian_ipv4_source_is_not_placed(inside, ns, source):
    """The kernel's routing never forwards from these sources (ip_route_input:
    martian); placed, the SYN would reach the backend's host.  Passed, it goes
    the normal way, where the router drops it."""
    core = Core(CoreConfig(max_flows=64, workers=1, fastpath=True, syn_timeout_ms=1000))
    fp = inside(FastPath, max_backends=64, max_flows=256, tcp_lifetime_ms=600_000,
                udp_lifetime_ms=600_000, syn_lifetime_ms=600_000, synack_window_ms=600_000,
                max_services=16, decide_slots=1 << 16)
    try:
        model = inside(DecideModel, fp, core, ns[1])
        syn = first_packets(V4)[0]
        inside(model.run, as_client(syn, V4, 7, 2000), "an ordinary client")
        f = bytearray(as_client(syn, V4, 8, 2001))
        f[ETH_HLEN + 12:ETH_HLEN + 16] = ipaddress.ip_address(source).packed
        fix_ip4(f)
        fix_l4(f)
        inside(model.run, bytes(f), f"from {source}")
        assert model.seen == {"placed": 1, "passed": 1, "skipped": 0}
        assert model.stats["fallback_route"] == 1, model.stats
    finally:
        fp.close()
        core.close()
