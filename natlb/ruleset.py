"""natlb's nftables ruleset as data: services, backends, queue numbers, the
rewrite mode and marks in; the list of nfnetlink messages that make up the
table out.  Pure: no socket, no root, no C core, so the exact messages are
golden-tested (tests/unit/test_ruleset.py).  ``natlb.steering`` sends them
as one batch.

The per-packet cost does not grow with the number of services: every match
is one hash lookup in a set, every mark-mode rewrite one lookup in a map.

    prerouting, priority raw (-300):
      ip daddr . meta l4proto . th dport @vips                     notrack, queue
      ip saddr . meta l4proto . th sport . meta iif @replies  fib daddr type local   accept
      ip saddr . meta l4proto . th sport . meta iif @replies       notrack, queue
      ip saddr . meta l4proto . th sport @backend_services         counter, drop
      icmp type 3  ip saddr . meta iif @backend_hosts  ip daddr != @vip_addrs
                   fib daddr type local                                      accept
      icmp type 3  ip saddr . meta iif @backend_hosts              notrack, queue
      icmp type 3  ip saddr @backend_addrs                         counter, drop
      icmp type 3  ip daddr @vip_addrs                             notrack, queue
      ip frag-off & 0x3fff != 0  ip daddr @vip_addrs                      notrack, queue
      ip frag-off & 0x3fff != 0  ip saddr . meta iif @backend_hosts       notrack, queue
    output, priority raw:      natlb's own packets untracked, local ICMP unreachables queued
    rewrite, priority raw + 1 (mark mode), later fragments first, then per L4 protocol:
      ip frag-off & 0x1fff != 0  ip daddr set meta mark map @backend_addr  (mark cleared)
      ip frag-off & 0x1fff != 0  ip saddr set meta mark map @service_addr  (mark cleared)
      ip daddr set meta mark map @backend_addr  th dport set meta mark map @backend_port
      ip saddr set meta mark map @service_addr  th sport set meta mark map @service_port

IPv6: a second table of the same name in the ip6 family, made only when a
service is IPv6 (an IPv4-only config gets exactly the ip table it always
had; one family per table keeps both free of `meta nfproto` tests).  The
same rules over IPv6 fields, the sets and maps named with a 6 (vips6,
replies6, backend_hosts6, backend_addr6...), keyed by the same marks: the C
core's marks name a backend or service whatever its family.  ICMPv6 types 1
(destination unreachable) and 2 (packet too big) are queued where IPv4's
ICMP type 3 is (`icmpv6 type 1-2`); neighbour discovery and every other
ICMPv6 type never is.  Fragments are those with a fragment header
(`exthdr frag exists`), later ones `frag frag-off != 0`.  The fast path's
rule too, over backend_addr6.

IP fragments (with fragment tracking on): only a datagram's first fragment
has ports, so the port rules never match the others.  Every TCP/UDP
fragment to a VIP or from a backend (on its ingress) is queued -- the first
too, so natlb also learns which datagrams are not its own and lets their
fragments pass.  A later fragment gets only its address written: `th dport
set` on a fragment would write into its payload on older kernels.

The fast path (mark mode, ``fastpath``).  natlb's C core or's NL_MARK_FAST
into the verdict mark of an established TCP flow's packet that changes no
state (or a UDP flow's once its backend answered).  The rewrite chain
rewrites such a packet as any other but keeps its mark and accepts it:

    rewrite:  meta mark & FAST  -> daddr, dport from mark & ~FAST (the maps
              above), mark kept, accept

A cluster service's reply natlb marked fast (a node may see only its
replies) names its backend, reply | fast | backend id: the service_addr and
service_port maps hold those marks too, and a rule of its own keeps the mark:

    rewrite:  meta mark & FAST  -> saddr, sport from mark (cluster services'
              backends only), mark kept, accept

The tc program natlb attaches to the router's interfaces (csrc/bpf/
fastpath.bpf.c) reads the mark as the packet leaves, installs the flow in
both directions and clears it; the flow's later packets are carried by tc
ingress and never reach this table.  nft keeps no per-flow state.

Replies, RSTs and ICMP errors are believed to come from a backend only when
they arrive on an interface the backend's address is routed through (the
``replies``/``backend_hosts`` sets hold address and ingress ifindex): the
equivalent of strict rp_filter for backend addresses, which natlb itself has
to switch off for the VIP.  The same source arriving anywhere else is
spoofed and dropped (and counted), before the kernel's forwarding sees it.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pyroute2.netlink import NLM_F_APPEND, NLM_F_CREATE
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELRULE,
    NFT_MSG_DELSET,
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFT_MSG_NEWSETELEM,
    NFT_MSG_NEWTABLE,
)

NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_OUT = 3
PRIORITY_RAW = -300
NFT_META_MARK = 3
NFT_META_IIF = 4
NFT_META_L4PROTO = 16
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
NF_DROP = 0
NFT_CMP_NEQ = 1
IP_MF_OFFSET = 0x3fff    # frag-off bits: more fragments, fragment offset
IP_OFFSET = 0x1fff
NF_ACCEPT = 1
# Registers: NFT_REG_1 holds 16 bytes and overlaps the 32-bit NFT_REG32_00..03,
# which is how concatenated keys are laid out (each part padded to 4 bytes).
REG_1, REG32_01, REG32_02, REG32_03 = 1, 9, 10, 11
REG32_04, REG32_05, REG32_06 = 12, 13, 14
# nft's datatype numbers (only `nft list` reads them: a readable listing).
TYPE_MARK, TYPE_IPADDR, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_IFINDEX = 19, 7, 12, 13, 20
TYPE_IP6ADDR = 8
BYTEORDER_HOST = 1       # nft's enum byteorder
ICMP_DEST_UNREACH = 3
# ICMPv6 errors natlb reads: destination unreachable (1) and packet too big
# (2), queued where IPv4's type 3 is.  Never neighbour discovery (133-137).
ICMPV6_DEST_UNREACH, ICMPV6_PKT_TOOBIG = 1, 2
IPPROTO_FRAGMENT = 44    # the IPv6 fragment header
IP6_FRAG_OFFSET = 0xfff8  # its 13-bit offset; the low bits are reserved and M
NFT_RANGE_EQ, NFT_EXTHDR_OP_IPV6 = 0, 0
L4_CSUM_OFFSET = {socket.IPPROTO_TCP: 16, socket.IPPROTO_UDP: 6}
PROTOCOL_NAMES = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp"}
# A netlink attribute's length is 16 bits: keep element lists well below it.
ELEMENTS_PER_MESSAGE = 256

# Message kinds, named for the pyroute2 class steering encodes each with.
TABLE, CHAIN, SET, SETELEM, RULE = "table", "chain", "set", "setelem", "rule"


@dataclass(frozen=True)
class Backend:
    id: int
    address: str
    port: int


@dataclass(frozen=True)
class Service:
    id: int
    vip: str
    port: int
    protocol: int                     # IPPROTO_*
    backends: tuple[Backend, ...]
    cluster: bool = False             # replies may be marked fast (fast path)


@dataclass(frozen=True)
class Marks:
    """The verdict marks the C core uses (natlb.core exports them)."""

    own: int          # packets natlb sends itself
    forward: int      # | backend id: destination is that backend
    reply: int        # | service id: source is that service's VIP
    fast: int = 0     # | a forward mark: install the flow in the fast path


@dataclass(frozen=True)
class Spec:
    table: str
    services: tuple[Service, ...]
    queues: tuple[int, ...]
    marks: Marks
    rewrite: str                                  # "mark" | "copy"
    # Backend address -> ifindexes it is routed through (see natlb.routes).
    ingress: Mapping[str, tuple[int, ...]]
    native_queue: bool = False                    # nft `queue` instead of xt NFQUEUE
    fragments: bool = True                        # queue fragments (fragment tracking on)
    fastpath: bool = False                        # mark mode: fast marks kept for tc
    # The tables' comment (NFTA_TABLE_USERDATA, as nft writes one): natlb
    # names its control socket there (natlb.tableowner); "" for none.
    comment: str = ""


@dataclass(frozen=True)
class Message:
    kind: str              # TABLE | CHAIN | SET | SETELEM | RULE
    mtype: int             # NFT_MSG_*
    attrs: list[Any]       # pyroute2 attribute list
    flags: int             # NLM_F_* beyond REQUEST | ACK
    what: str              # names it in an error message
    family: int = NFPROTO_IPV4   # the table's: ip or ip6


@dataclass(frozen=True)
class _Family:
    """Where one address family keeps what the rules read, and what its
    table's sets are called."""

    nfproto: int
    suffix: str           # set names: "vips" in the ip table, "vips6" in the ip6 one
    addr_len: int
    saddr: int            # offsets in the network header
    daddr: int
    addr_type: int        # nft's datatype, for `nft list`
    # Registers after the address in a concatenated key: l4proto, port, iif.
    # An IPv6 address fills REG_1 whole (REG32_00..03).
    after_addr: tuple[int, int, int]
    pack: Any             # address text -> bytes


V4 = _Family(NFPROTO_IPV4, "", 4, 12, 16, TYPE_IPADDR, (REG32_01, REG32_02, REG32_03),
             socket.inet_aton)
V6 = _Family(NFPROTO_IPV6, "6", 16, 8, 24, TYPE_IP6ADDR, (REG32_04, REG32_05, REG32_06),
             lambda a: socket.inet_pton(socket.AF_INET6, a))


def family_of(address: str) -> _Family:
    return V6 if ":" in address else V4


# -- what the pool knows, as ruleset input ----------------------------------

class _PoolBackend(Protocol):
    id: int
    cfg: Any


class _PoolService(Protocol):
    id: int
    cfg: Any
    backends: Any


def services_from_pool(services: Iterable[_PoolService],
                       retired: Iterable[_PoolService] = ()) -> tuple[Service, ...]:
    """The pool's services with their stable ids (the marks name them), and
    the backends a reload removed whose flows go on: still rewritten, under
    their service (kept as long as it has any)."""
    protocols = {v: k for k, v in PROTOCOL_NAMES.items()}
    merged: dict[int, tuple[Any, list[Backend]]] = {}
    for s in [*services, *retired]:
        cfg, backends = merged.setdefault(s.id, (s.cfg, []))
        backends += [Backend(b.id, b.cfg.address, b.cfg.port) for b in s.backends]
    return tuple(Service(sid, cfg.vip, cfg.port, protocols[cfg.protocol], tuple(backends),
                         cfg.cluster)
                 for sid, (cfg, backends) in merged.items())


# -- expressions ------------------------------------------------------------

def expr(kind: str, /, **attrs: Any) -> dict[str, Any]:
    data = [(f"NFTA_{kind.upper()}_{k.upper()}", v) for k, v in attrs.items()]
    out: list[tuple[str, Any]] = [("NFTA_EXPR_NAME", kind)]
    if data:
        out.append(("NFTA_EXPR_DATA", {"attrs": data}))
    return {"attrs": out}


def _value(value: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", value)]}


def _cmp_eq(value: bytes) -> dict[str, Any]:
    return expr("cmp", sreg=REG_1, op=0, data=_value(value))


def _imm(value: bytes) -> dict[str, Any]:
    return expr("immediate", dreg=REG_1, data=_value(value))


def _verdict(code: int) -> dict[str, Any]:
    return expr("immediate", dreg=0,
                data={"attrs": [("NFTA_DATA_VERDICT", {"attrs": [("NFTA_VERDICT_CODE", code)]})]})


def _lookup(name: str, dreg: int | None = None) -> dict[str, Any]:
    if dreg is None:
        return expr("lookup", set=name, sreg=REG_1)
    return expr("lookup", set=name, sreg=REG_1, dreg=dreg)


def _load(base: int, offset: int, length: int, reg: int = REG_1) -> dict[str, Any]:
    return expr("payload", dreg=reg, base=base, offset=offset, len=length)


def _meta(key: int, reg: int = REG_1) -> dict[str, Any]:
    return expr("meta", dreg=reg, key=key)


def queue_expr(first: int, total: int, native: bool) -> dict[str, Any]:
    if native:
        return expr("queue", num=first, total=total)
    # struct xt_NFQ_info_v3 { u16 queuenum, queues_total, flags; } in host order.
    # No bypass flag: natlb is fail-closed (see README).
    return expr("target", name="NFQUEUE", rev=3, info=struct.pack("=HHHxx", first, total, 0))


RTN_LOCAL = 2
NFTA_FIB_F_DADDR = 2
# pyroute2 encodes NFTA_FIB_RESULT as a bit set of these names: {UNSPEC, OIF}
# is bits 0 and 1, i.e. NFT_FIB_RESULT_ADDRTYPE (3).
FIB_RESULT_ADDRTYPE = frozenset({"NFT_FIB_RESULT_UNSPEC", "NFT_FIB_RESULT_OIF"})


def _to_this_host() -> list[dict[str, Any]]:
    """``fib daddr type local``"""
    return [expr("fib", dreg=REG_1, result=FIB_RESULT_ADDRTYPE, flags=NFTA_FIB_F_DADDR),
            _cmp_eq(struct.pack("=I", RTN_LOCAL))]


def _tuple_key(source: bool, with_iif: bool, f: _Family = V4) -> list[dict[str, Any]]:
    """address . l4proto . port [. iif] of the source or the destination."""
    proto_reg, port_reg, iif_reg = f.after_addr
    out = [_address(f, source),
           _meta(NFT_META_L4PROTO, proto_reg),
           _load(PAYLOAD_TRANSPORT, 0 if source else 2, 2, port_reg)]
    if with_iif:
        out.append(_meta(NFT_META_IIF, iif_reg))
    return out


def _address(f: _Family, source: bool) -> dict[str, Any]:
    return _load(PAYLOAD_NETWORK, f.saddr if source else f.daddr, f.addr_len)


def _icmp_unreach(f: _Family = V4) -> list[dict[str, Any]]:
    """``icmp type 3`` or ``icmpv6 type 1-2`` (a range: one comparison)."""
    if f is V4:
        return [_meta(NFT_META_L4PROTO), _cmp_eq(bytes([socket.IPPROTO_ICMP])),
                _load(PAYLOAD_TRANSPORT, 0, 1), _cmp_eq(bytes([ICMP_DEST_UNREACH]))]
    return [_meta(NFT_META_L4PROTO), _cmp_eq(bytes([socket.IPPROTO_ICMPV6])),
            _load(PAYLOAD_TRANSPORT, 0, 1),
            expr("range", sreg=REG_1, op=NFT_RANGE_EQ,
                 from_data=_value(bytes([ICMPV6_DEST_UNREACH])),
                 to_data=_value(bytes([ICMPV6_PKT_TOOBIG])))]


def _ip6_fragment(later: bool) -> list[dict[str, Any]]:
    """``exthdr frag exists``, or with ``later`` ``frag frag-off != 0`` (a
    fragment after the first; a packet without the header ends the rule)."""
    if not later:
        return [expr("exthdr", dreg=REG_1, type=IPPROTO_FRAGMENT, offset=0, len=1,
                     flags=("NFT_EXTHDR_F_PRESENT",), op=NFT_EXTHDR_OP_IPV6),
                _cmp_eq(b"\x01")]
    return [expr("exthdr", dreg=REG_1, type=IPPROTO_FRAGMENT, offset=2, len=2,
                 op=NFT_EXTHDR_OP_IPV6),
            expr("bitwise", sreg=REG_1, dreg=REG_1, len=2,
                 mask=_value(struct.pack("!H", IP6_FRAG_OFFSET)), xor=_value(b"\0\0")),
            expr("cmp", sreg=REG_1, op=NFT_CMP_NEQ, data=_value(b"\0\0"))]


def _is_fragment(f: _Family) -> list[dict[str, Any]]:
    return _frag_off_nonzero(IP_MF_OFFSET) if f is V4 else _ip6_fragment(later=False)


def _write_address(f: _Family, daddr: bool, pseudo_header: bool) -> dict[str, Any]:
    """Write REG_1 into the address.  IPv4: the kernel fixes the header
    checksum, and with pseudo_header the L4 checksum (complete and partial,
    offloaded or GSO, alike).  IPv6 has only the L4 one.  A later fragment
    has no L4 header: asking for that checksum there would end the rule."""
    extra: dict[str, Any] = {}
    if pseudo_header:
        extra["csum_flags"] = ("NFT_PAYLOAD_L4CSUM_PSEUDOHDR",)
    return expr("payload", sreg=REG_1, base=PAYLOAD_NETWORK, offset=f.daddr if daddr else f.saddr,
                len=f.addr_len, csum_type=1 if f is V4 else 0, csum_offset=10 if f is V4 else 0,
                **extra)


def _frag_off_nonzero(mask: int) -> list[dict[str, Any]]:
    """``ip frag-off & mask != 0``: a fragment (IP_MF_OFFSET), or a fragment
    after the first (IP_OFFSET)."""
    return [
        _load(PAYLOAD_NETWORK, 6, 2),
        expr("bitwise", sreg=REG_1, dreg=REG_1, len=2, mask=_value(struct.pack("!H", mask)),
             xor=_value(b"\0\0")),
        expr("cmp", sreg=REG_1, op=NFT_CMP_NEQ, data=_value(b"\0\0")),
    ]


def _fragment_rewrite_exprs(field: str, addr_map: str, f: _Family = V4) -> list[dict[str, Any]]:
    """Mark mode, a later fragment: only the address (and IPv4's header
    checksum; the L4 checksum is in the first fragment), and the mark
    cleared so the full rewrite does not match it too."""
    return [
        *(_frag_off_nonzero(IP_OFFSET) if f is V4 else _ip6_fragment(later=True)),
        _meta(NFT_META_MARK), _lookup(addr_map, dreg=REG_1),
        _write_address(f, field == "daddr", pseudo_header=False),
        _imm(struct.pack("=I", 0)),
        expr("meta", sreg=REG_1, key=NFT_META_MARK),
    ]


def _rewrite_exprs(field: str, protocol: int, addr_map: str, port_map: str,
                   f: _Family = V4) -> list[dict[str, Any]]:
    """Mark mode: natlb's verdict mark names the backend (daddr) or the
    service (saddr); two map lookups give the address and port to write.
    A mark missing from the map ends the rule: other traffic passes as is."""
    daddr = field == "daddr"
    return [
        _meta(NFT_META_L4PROTO), _cmp_eq(bytes([protocol])),
        _meta(NFT_META_MARK), _lookup(addr_map, dreg=REG_1),
        _write_address(f, daddr, pseudo_header=True),
        _meta(NFT_META_MARK), _lookup(port_map, dreg=REG_1),
        expr("payload", sreg=REG_1, base=PAYLOAD_TRANSPORT, offset=2 if daddr else 0, len=2,
             csum_type=1, csum_offset=L4_CSUM_OFFSET[protocol]),
        _imm(struct.pack("=I", 0)),
        expr("meta", sreg=REG_1, key=NFT_META_MARK),   # the mark was only a message
    ]


# -- keys -------------------------------------------------------------------

def _concat_type(*types: int) -> int:
    out = 0
    for t in types:
        out = out << 6 | t    # nft's TYPE_BITS
    return out


def _proto(p: int) -> bytes:
    return bytes([p, 0, 0, 0])


def _port(p: int) -> bytes:
    return struct.pack("!H", p) + b"\0\0"


def _iif(i: int) -> bytes:
    return struct.pack("=I", i)


def _mark(m: int) -> bytes:
    return struct.pack("=I", m)


@dataclass(frozen=True)
class _Set:
    name: str
    key_type: int
    key_len: int
    elements: list[tuple[bytes, bytes | None]]
    data_type: int | None = None
    data_len: int = 0


def _services(spec: Spec, f: _Family) -> tuple[Service, ...]:
    """The services of one family (a service's VIP and backends share it)."""
    return tuple(s for s in spec.services if family_of(s.vip) is f)


def _sets(spec: Spec, f: _Family = V4) -> list[_Set]:
    services = _services(spec, f)
    addr, n = f.pack, f.addr_len
    tuple3 = _concat_type(f.addr_type, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE)
    vips, replies, backend_services, hosts = [], [], [], []
    backend_addrs, vip_addrs = [], []
    for s in services:
        vips.append(addr(s.vip) + _proto(s.protocol) + _port(s.port))
        vip_addrs.append(addr(s.vip))
        for b in s.backends:
            key = addr(b.address) + _proto(s.protocol) + _port(b.port)
            backend_services.append(key)
            backend_addrs.append(addr(b.address))
            for ifindex in spec.ingress.get(b.address, ()):
                replies.append(key + _iif(ifindex))
                hosts.append(addr(b.address) + _iif(ifindex))

    def unique(keys: list[bytes]) -> list[tuple[bytes, bytes | None]]:
        return [(k, None) for k in dict.fromkeys(keys)]

    x = f.suffix
    out = [
        _Set(f"vips{x}", tuple3, n + 8, unique(vips)),
        _Set(f"replies{x}", _concat_type(f.addr_type, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE,
                                         TYPE_IFINDEX), n + 12, unique(replies)),
        _Set(f"backend_services{x}", tuple3, n + 8, unique(backend_services)),
        _Set(f"backend_hosts{x}", _concat_type(f.addr_type, TYPE_IFINDEX), n + 4, unique(hosts)),
        _Set(f"backend_addrs{x}", f.addr_type, n, unique(backend_addrs)),
        _Set(f"vip_addrs{x}", f.addr_type, n, unique(vip_addrs)),
    ]
    if spec.rewrite == "mark":
        # Keyed by the marks the C core gives either family (the contract:
        # marks are family-independent); each table maps only its own.
        m = spec.marks
        backends = {b.id: b for s in services for b in s.backends}
        # A cluster service's reply marked fast names its backend (the tc
        # program learns the flow from it): its VIP by that mark too.
        fast_replies = [(s, b) for s in _fast_reply_services(spec, services)
                        for b in s.backends]
        ids = sorted(backends)
        out += [
            _Set(f"backend_addr{x}", TYPE_MARK, 4,
                 [(_mark(m.forward | i), addr(backends[i].address)) for i in ids],
                 f.addr_type, n),
            _Set(f"backend_port{x}", TYPE_MARK, 4,
                 [(_mark(m.forward | i), struct.pack("!H", backends[i].port)) for i in ids],
                 TYPE_INET_SERVICE, 2),
            _Set(f"service_addr{x}", TYPE_MARK, 4,
                 [(_mark(m.reply | s.id), addr(s.vip)) for s in services] +
                 [(_mark(m.reply | m.fast | b.id), addr(s.vip)) for s, b in fast_replies],
                 f.addr_type, n),
            _Set(f"service_port{x}", TYPE_MARK, 4,
                 [(_mark(m.reply | s.id), struct.pack("!H", s.port)) for s in services] +
                 [(_mark(m.reply | m.fast | b.id), struct.pack("!H", s.port))
                  for s, b in fast_replies],
                 TYPE_INET_SERVICE, 2),
        ]
    return out


# -- the fast path ----------------------------------------------------------

def _fast_reply_services(spec: Spec, services: Iterable[Service]) -> list[Service]:
    """The services whose replies natlb may mark fast: cluster services, with
    the fast path on (a node may see only their replies)."""
    if spec.rewrite != "mark" or not spec.fastpath:
        return []
    return [s for s in services if s.cluster]


def _fast_reply_rewrite(protocol: int, fast_bit: int, f: _Family) -> list[dict[str, Any]]:
    """A cluster service's reply natlb marked fast (reply | fast | backend
    id): rewritten to the VIP as any reply, its mark kept for the tc
    program that learns the flow from it, and the rules after pass it by."""
    fast = _mark(fast_bit)
    return [
        _meta(NFT_META_MARK),
        expr("bitwise", sreg=REG_1, dreg=REG_1, len=4, mask=_value(fast), xor=_value(_mark(0))),
        _cmp_eq(fast),
        _meta(NFT_META_L4PROTO), _cmp_eq(bytes([protocol])),
        _meta(NFT_META_MARK), _lookup(f"service_addr{f.suffix}", dreg=REG_1),
        _write_address(f, False, pseudo_header=True),
        _meta(NFT_META_MARK), _lookup(f"service_port{f.suffix}", dreg=REG_1),
        expr("payload", sreg=REG_1, base=PAYLOAD_TRANSPORT, offset=0, len=2,
             csum_type=1, csum_offset=L4_CSUM_OFFSET[protocol]),
        _verdict(NF_ACCEPT),
    ]


def _fast_rewrite(protocol: int, fast_bit: int, f: _Family) -> list[dict[str, Any]]:
    """A packet natlb marked fast: rewritten as any other packet to a
    backend (the maps are keyed by the mark without the fast bit), but its
    mark is kept for the tc program that learns the flow as it leaves
    (csrc/bpf/fastpath.bpf.c), and the rules after this one pass it by."""
    fast = _mark(fast_bit)
    key = REG32_04
    return [
        _meta(NFT_META_MARK),
        expr("bitwise", sreg=REG_1, dreg=REG_1, len=4, mask=_value(fast), xor=_value(_mark(0))),
        _cmp_eq(fast),
        _meta(NFT_META_L4PROTO), _cmp_eq(bytes([protocol])),
        _meta(NFT_META_MARK, key),
        expr("bitwise", sreg=key, dreg=key, len=4, mask=_value(_mark(0xFFFFFFFF & ~fast_bit)),
             xor=_value(_mark(0))),
        expr("lookup", set=f"backend_addr{f.suffix}", sreg=key, dreg=REG_1),
        _write_address(f, True, pseudo_header=True),
        expr("lookup", set=f"backend_port{f.suffix}", sreg=key, dreg=REG_1),
        expr("payload", sreg=REG_1, base=PAYLOAD_TRANSPORT, offset=2, len=2,
             csum_type=1, csum_offset=L4_CSUM_OFFSET[protocol]),
        _verdict(NF_ACCEPT),
    ]


# -- the table --------------------------------------------------------------

def build(spec: Spec, in_place: bool = False, in_place6: bool | None = None) -> list[Message]:
    """The whole table, replacing any table of the same name atomically when
    sent as one batch.  in_place: replace the rules and sets of an existing
    table of this shape but keep its chains (a restart): deleting a base
    chain unregisters its hook, and the kernel then drops every packet
    waiting in every NFQUEUE.  Such a batch fails on a table of another
    shape, or none; then send the plain one.

    One table per family, both named spec.table: the ip table always (an
    IPv4-only config gets exactly the table it always had), the ip6 table
    when a service is IPv6.  Its sets and maps are the ip table's with a 6
    (vips6, replies6, backend_addr6...).  in_place6: the same for the ip6
    table when it differs (a reload that adds the first IPv6 service)."""
    out = _build_table(spec, V4, in_place, 1)
    if _services(spec, V6):
        v6 = _build_table(spec, V6, in_place if in_place6 is None else in_place6,
                          len(_sets(spec, V4)) + 1)
        out += [dataclasses.replace(m, family=V6.nfproto) for m in v6]
    return out


def _build_table(spec: Spec, f: _Family, in_place: bool, first_set_id: int) -> list[Message]:
    """One family's table (messages without their family)."""
    t = spec.table
    x = f.suffix
    services = _services(spec, f)
    first, total = spec.queues[0], len(spec.queues)
    queue = queue_expr(first, total, spec.native_queue)
    out: list[Message] = []
    name = [("NFTA_TABLE_NAME", t)]
    # The comment is written when the table is made; a table kept in place
    # keeps its own (the kernel updates only a table's flags).
    new = name + ([("NFTA_TABLE_USERDATA", comment_udata(spec.comment))] if spec.comment else [])
    if in_place:
        out += [Message(TABLE, NFT_MSG_NEWTABLE, new, NLM_F_CREATE, f"table {t}"),
                Message(RULE, NFT_MSG_DELRULE, [("NFTA_RULE_TABLE", t)], 0, f"rules of {t}")]
        out += [Message(SET, NFT_MSG_DELSET, [("NFTA_SET_TABLE", t), ("NFTA_SET_NAME", s.name)],
                        0, f"set {s.name}") for s in _sets(spec, f)]
    else:
        # add + delete + add replaces a stale table from a crashed run atomically.
        out += [Message(TABLE, NFT_MSG_NEWTABLE, name, NLM_F_CREATE, f"table {t}"),
                Message(TABLE, NFT_MSG_DELTABLE, name, 0, f"table {t}"),
                Message(TABLE, NFT_MSG_NEWTABLE, new, NLM_F_CREATE, f"table {t}")]

    for set_id, s in enumerate(_sets(spec, f), first_set_id):
        flags: tuple[str, ...] = ("NFT_SET_MAP",) if s.data_type else ()
        attrs: list[Any] = [("NFTA_SET_TABLE", t), ("NFTA_SET_NAME", s.name),
                            ("NFTA_SET_FLAGS", flags),
                            ("NFTA_SET_KEY_TYPE", s.key_type), ("NFTA_SET_KEY_LEN", s.key_len)]
        if s.data_type:
            attrs += [("NFTA_SET_DATA_TYPE", s.data_type), ("NFTA_SET_DATA_LEN", s.data_len)]
        attrs.append(("NFTA_SET_ID", set_id))
        if s.key_type == TYPE_MARK:
            # Marks are host-order numbers: tells `nft list` how to print them.
            attrs.append(("NFTA_SET_USERDATA",
                          [("NFTNL_UDATA_SET_KEYBYTEORDER", struct.pack("=I", BYTEORDER_HOST))]))
        out.append(Message(SET, NFT_MSG_NEWSET, attrs, NLM_F_CREATE, f"set {s.name}"))
        for i in range(0, len(s.elements), ELEMENTS_PER_MESSAGE):
            elements = []
            for key, data in s.elements[i:i + ELEMENTS_PER_MESSAGE]:
                e: list[Any] = [("NFTA_SET_ELEM_KEY", _value(key))]
                if data is not None:
                    e.append(("NFTA_SET_ELEM_DATA", _value(data)))
                elements.append({"attrs": e})
            out.append(Message(SETELEM, NFT_MSG_NEWSETELEM, [
                ("NFTA_SET_ELEM_LIST_TABLE", t), ("NFTA_SET_ELEM_LIST_SET", s.name),
                ("NFTA_SET_ELEM_LIST_ELEMENTS", elements),
            ], NLM_F_CREATE, f"elements of set {s.name}"))

    def chain(name: str, hook: int, priority: int) -> None:
        out.append(Message(CHAIN, NFT_MSG_NEWCHAIN, [
            ("NFTA_CHAIN_TABLE", t), ("NFTA_CHAIN_NAME", name),
            ("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", hook),
                                           ("NFTA_HOOK_PRIORITY", priority)]}),
            ("NFTA_CHAIN_TYPE", "filter"),
        ], NLM_F_CREATE, f"chain {name}"))

    def rule(chain: str, what: str, exprs: list[dict[str, Any]]) -> None:
        out.append(Message(RULE, NFT_MSG_NEWRULE, [
            ("NFTA_RULE_TABLE", t), ("NFTA_RULE_CHAIN", chain),
            ("NFTA_RULE_EXPRESSIONS", exprs),
        ], NLM_F_CREATE | NLM_F_APPEND, f"rule {chain} {what}"))

    drop = [expr("counter"), _verdict(NF_DROP)]
    chain("prerouting", NF_INET_PRE_ROUTING, PRIORITY_RAW)
    # notrack before the queue verdict: the verdict resumes at the next hook
    # and the kernel's conntrack (priority -200) must never see the flow.
    rule("prerouting", "to a service",
         [*_tuple_key(False, False, f), _lookup(f"vips{x}"), expr("notrack"), queue])
    # Answers to this host's own connections (health checks) are not natlb's
    # to decide: never queued, and cluster services would map them back to
    # the VIP (csrc/cluster.c).  The set lookup comes first, so only backend
    # replies pay for the route lookup.
    rule("prerouting", "reply to this host",
         [*_tuple_key(True, True, f), _lookup(f"replies{x}"), *_to_this_host(),
          _verdict(NF_ACCEPT)])
    rule("prerouting", "reply from a backend",
         [*_tuple_key(True, True, f), _lookup(f"replies{x}"), expr("notrack"), queue])
    rule("prerouting", "spoofed backend reply",
         [*_tuple_key(True, False, f), _lookup(f"backend_services{x}"), *drop])
    icmp = "icmp" if f is V4 else "icmpv6"
    iif_after_addr = f.after_addr[0]
    # ... and so are the errors about them; not those to a VIP, which may be
    # about a reply natlb rewrote (path MTU news, relayed below).
    rule("prerouting", f"{icmp} from a backend to this host",
         [*_icmp_unreach(f), _address(f, True), _meta(NFT_META_IIF, iif_after_addr),
          _lookup(f"backend_hosts{x}"), _address(f, False),
          expr("lookup", set=f"vip_addrs{x}", sreg=REG_1, flags=("NFT_LOOKUP_F_INV",)),
          *_to_this_host(), _verdict(NF_ACCEPT)])
    rule("prerouting", f"{icmp} from a backend",
         [*_icmp_unreach(f), _address(f, True), _meta(NFT_META_IIF, iif_after_addr),
          _lookup(f"backend_hosts{x}"), expr("notrack"), queue])
    rule("prerouting", f"spoofed backend {icmp}",
         [*_icmp_unreach(f), _address(f, True), _lookup(f"backend_addrs{x}"), *drop])
    # Path MTU news about a reply is addressed to the VIP: relayed to the backend.
    rule("prerouting", f"{icmp} to a service",
         [*_icmp_unreach(f), _address(f, False), _lookup(f"vip_addrs{x}"),
          expr("notrack"), queue])
    protocols = sorted({s.protocol for s in services})
    for proto in protocols if spec.fragments else []:
        pname = PROTOCOL_NAMES[proto]
        is_proto = [_meta(NFT_META_L4PROTO), _cmp_eq(bytes([proto]))]
        rule("prerouting", f"{pname} fragment to a service",
             [*_is_fragment(f), *is_proto, _address(f, False),
              _lookup(f"vip_addrs{x}"), expr("notrack"), queue])
        rule("prerouting", f"{pname} fragment from a backend",
             [*_is_fragment(f), *is_proto, _address(f, True),
              _meta(NFT_META_IIF, iif_after_addr), _lookup(f"backend_hosts{x}"),
              expr("notrack"), queue])

    # Packets natlb sends itself (re-sent SYNs, RSTs) carry the own mark: the
    # kernel's conntrack must not track those flows either.  ICMP unreachables
    # this host sends (no route or no ARP answer for a backend) report a dead
    # backend.
    chain("output", NF_INET_LOCAL_OUT, PRIORITY_RAW)
    rule("output", "natlb's own packets",
         [_meta(NFT_META_MARK), _cmp_eq(_mark(spec.marks.own)), expr("notrack")])
    rule("output", "local icmp unreachable" if f is V4 else "local icmpv6 error",
         [*_icmp_unreach(f), queue])

    if spec.rewrite == "mark":
        # Right after the queue chain: an accepted packet resumes here.
        chain("rewrite", NF_INET_PRE_ROUTING, PRIORITY_RAW + 1)
        if spec.fragments:
            rule("rewrite", "later fragment to a backend",
                 _fragment_rewrite_exprs("daddr", f"backend_addr{x}", f))
            rule("rewrite", "later fragment from a service",
                 _fragment_rewrite_exprs("saddr", f"service_addr{x}", f))
        for proto in protocols:
            pname = PROTOCOL_NAMES[proto]
            if spec.fastpath:
                rule("rewrite", f"fast path: {pname} to a backend, mark kept for tc",
                     _fast_rewrite(proto, spec.marks.fast, f))
            if any(s.protocol == proto for s in _fast_reply_services(spec, services)):
                rule("rewrite", f"fast path: {pname} reply from a cluster service, mark kept",
                     _fast_reply_rewrite(proto, spec.marks.fast, f))
            rule("rewrite", f"{pname} to a backend",
                 _rewrite_exprs("daddr", proto, f"backend_addr{x}", f"backend_port{x}", f))
            rule("rewrite", f"{pname} reply from a service",
                 _rewrite_exprs("saddr", proto, f"service_addr{x}", f"service_port{x}", f))
    return out


def comment_udata(text: str) -> bytes:
    """A table's comment as nft writes it: libnftnl's user data, type 0
    (NFTNL_UDATA_TABLE_COMMENT), one length byte, the text and its NUL."""
    value = text.encode() + b"\0"
    if len(value) > 255:
        raise ValueError(f"table comment too long: {text!r}")
    return bytes([0, len(value)]) + value


def delete(table: str, family: int = NFPROTO_IPV4) -> list[Message]:
    return [Message(TABLE, NFT_MSG_DELTABLE, [("NFTA_TABLE_NAME", table)], 0, f"table {table}",
                    family)]


def absent(table: str, family: int) -> list[Message]:
    """No table of that name and family after this, whether there was one
    or not (create, then delete: a batch fails on deleting what is not)."""
    name = [("NFTA_TABLE_NAME", table)]
    return [Message(TABLE, NFT_MSG_NEWTABLE, name, NLM_F_CREATE, f"table {table}", family),
            Message(TABLE, NFT_MSG_DELTABLE, name, 0, f"table {table}", family)]


def has_ipv6(spec: Spec) -> bool:
    """Does build(spec) make the ip6 table?"""
    return bool(_services(spec, V6))


# -- a readable form, for golden tests and debugging -------------------------

def _show(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict) and "attrs" in v:
        return "{" + ", ".join(f"{_short(k)}={_show(x)}" for k, x in v["attrs"]) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_show(x) for x in v) + "]"
    if isinstance(v, tuple):
        return "(" + ",".join(str(x) for x in v) + ")"
    if isinstance(v, frozenset):    # sorted: str() order follows the hash seed
        return "{" + ",".join(sorted(str(x) for x in v)) + "}"
    return str(v)


def _short(key: str) -> str:
    for p in ("NFTA_SET_ELEM_LIST_", "NFTA_SET_ELEM_", "NFTA_EXPR_", "NFTA_"):
        if key.startswith(p):
            return key[len(p):].lower()
    return key.lower()


def render(messages: list[Message]) -> str:
    """One line per message; every attribute and every byte shown."""
    lines = []
    for m in messages:
        attrs = ", ".join(f"{_short(k)}={_show(v)}" for k, v in m.attrs)
        family = "" if m.family == NFPROTO_IPV4 else f" family={m.family}"
        lines.append(f"{m.kind}{family} {m.mtype} flags={m.flags:#x} {attrs}")
    return "\n".join(lines) + "\n"
