"""The nftables table natlb owns: it diverts VIP traffic and backend replies
to NFQUEUE, untracked by the kernel's conntrack.

The table is written as one nfnetlink batch (atomic: all of it or nothing)
with pyroute2's message classes, and deleted whole on exit.  Per rule:
``notrack`` before the queue verdict, because the verdict resumes at the
next hook and conntrack (priority -200) must never see the flow; the chain
sits at priority raw (-300) in prerouting.

The queue verdict uses nftables' own ``queue`` expression where the kernel
has it (CONFIG_NFT_QUEUE), otherwise the xtables NFQUEUE target through
nft_compat.  No bypass flag: natlb is fail-closed (see README).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    nft_chain_msg,
    nft_rule_msg,
    nft_table_msg,
)

NFPROTO_IPV4 = 2
NF_INET_PRE_ROUTING = 0
PRIORITY_RAW = -300
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NETLINK_NETFILTER = 12
NFT_META_L4PROTO = 16
NFT_META_MARK = 3
NF_INET_LOCAL_OUT = 3
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
CHAIN = "prerouting"


class SteeringError(RuntimeError):
    """The kernel refused the nftables table."""


@dataclass(frozen=True)
class Match:
    """Packets to divert: to (vip, port) or from (backend, port)."""

    address: str
    port: int
    protocol: int       # IPPROTO_*
    source: bool        # match the source side (backend replies)


def _expr(kind: str, /, **attrs: Any) -> dict[str, Any]:
    data = [(f"NFTA_{kind.upper()}_{k.upper()}", v) for k, v in attrs.items()]
    out: list[tuple[str, Any]] = [("NFTA_EXPR_NAME", kind)]
    if data:
        out.append(("NFTA_EXPR_DATA", {"attrs": data}))
    return {"attrs": out}


def _cmp_eq(value: bytes) -> dict[str, Any]:
    return _expr("cmp", sreg=1, op=0, data={"attrs": [("NFTA_DATA_VALUE", value)]})


def _queue_expr(first: int, total: int, native: bool) -> dict[str, Any]:
    if native:
        return _expr("queue", num=first, total=total)
    # struct xt_NFQ_info_v3 { u16 queuenum, queues_total, flags; } in host order.
    return _expr("target", name="NFQUEUE", rev=3, info=struct.pack("=HHHxx", first, total, 0))


def _icmp_unreach_exprs(address: str | None, first: int, total: int, native: bool,
                        to: bool = False) -> list[dict[str, Any]]:
    """ICMP destination-unreachable from `address` (to it, with `to`; any when
    None).  From backends they report failures; to a VIP they carry path MTU
    news that natlb passes on to the backend concerned."""
    exprs = []
    if address:
        exprs += [_expr("payload", dreg=1, base=PAYLOAD_NETWORK, offset=16 if to else 12, len=4),
                  _cmp_eq(socket.inet_aton(address))]
    exprs += [
        _expr("meta", dreg=1, key=NFT_META_L4PROTO),
        _cmp_eq(bytes([socket.IPPROTO_ICMP])),
        _expr("payload", dreg=1, base=PAYLOAD_TRANSPORT, offset=0, len=1),
        _cmp_eq(bytes([3])),
    ]
    if address:
        exprs.append(_expr("notrack"))
    exprs.append(_queue_expr(first, total, native))
    return exprs


def _rule_exprs(m: Match, first: int, total: int, native: bool) -> list[dict[str, Any]]:
    return [
        _expr("payload", dreg=1, base=PAYLOAD_NETWORK, offset=12 if m.source else 16, len=4),
        _cmp_eq(socket.inet_aton(m.address)),
        _expr("meta", dreg=1, key=NFT_META_L4PROTO),
        _cmp_eq(bytes([m.protocol])),
        _expr("payload", dreg=1, base=PAYLOAD_TRANSPORT, offset=0 if m.source else 2, len=2),
        _cmp_eq(struct.pack("!H", m.port)),
        _expr("notrack"),
        _queue_expr(first, total, native),
    ]


@dataclass(frozen=True)
class Rewrite:
    """Mark mode: packets natlb accepted with `mark` get `field` (daddr for
    client->backend, saddr for backend->client) and the matching port set
    to (address, port), statelessly, by nftables."""

    mark: int
    field: str          # "daddr" | "saddr"
    address: str
    port: int
    protocol: int       # IPPROTO_*: where the L4 checksum sits


def _rewrite_exprs(r: Rewrite) -> list[dict[str, Any]]:
    l4_csum = 16 if r.protocol == socket.IPPROTO_TCP else 6
    return [
        _expr("meta", dreg=1, key=NFT_META_MARK),
        _cmp_eq(struct.pack("=I", r.mark)),
        _imm(socket.inet_aton(r.address)),
        # The kernel fixes the IP checksum and the L4 pseudo-header part, for
        # complete and partial (offloaded, GSO) checksums alike.
        _expr("payload", sreg=1, base=PAYLOAD_NETWORK, offset=16 if r.field == "daddr" else 12,
              len=4, csum_type=1, csum_offset=10, csum_flags=("NFT_PAYLOAD_L4CSUM_PSEUDOHDR",)),
        _imm(struct.pack("!H", r.port)),
        _expr("payload", sreg=1, base=PAYLOAD_TRANSPORT, offset=2 if r.field == "daddr" else 0,
              len=2, csum_type=1, csum_offset=l4_csum),
        _imm(struct.pack("=I", 0)),
        _expr("meta", sreg=1, key=NFT_META_MARK),   # the mark was only a message
    ]


def _imm(value: bytes) -> dict[str, Any]:
    return _expr("immediate", dreg=1, data={"attrs": [("NFTA_DATA_VALUE", value)]})


class _Batch:
    def __init__(self) -> None:
        self.seq = int.from_bytes(os.urandom(3), "big")
        self.parts: list[bytes] = []
        self.what: dict[int, str] = {}

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def control(self, mtype: int) -> None:
        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = mtype
        m["header"]["flags"] = NLM_F_REQUEST
        m["header"]["sequence_number"] = self._next()
        m.encode()
        self.parts.append(m.data)

    def add(self, cls: type, mtype: int, attrs: list, flags: int, what: str) -> None:
        m = cls()
        m["nfgen_family"] = NFPROTO_IPV4
        m["attrs"] = attrs
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | mtype
        m["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | flags
        seq = self._next()
        m["header"]["sequence_number"] = seq
        m.encode()
        self.parts.append(m.data)
        self.what[seq] = what

    def send(self) -> None:
        """Send the batch; raise SteeringError with the first refusal."""
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
            s.bind((0, 0))
            s.settimeout(2.0)
            s.send(b"".join(self.parts))
            pending = set(self.what)
            first_error: tuple[int, str] | None = None
            while pending:
                try:
                    data = s.recv(1 << 16)
                except TimeoutError:
                    break
                off = 0
                while off + 16 <= len(data):
                    length, mtype, _, seq, _ = struct.unpack_from("=IHHII", data, off)
                    if mtype == 2 and seq in pending:  # NLMSG_ERROR (an ack if 0)
                        pending.discard(seq)
                        err = -struct.unpack_from("=i", data, off + 16)[0]
                        if err and first_error is None:
                            first_error = (err, self.what[seq])
                    off += (length + 3) & ~3 if length else len(data)
            if first_error:
                err, what = first_error
                raise SteeringError(f"nftables refused {what}: {os.strerror(err)}",
                                    err)


class Steering:
    """Installs and removes natlb's nftables table in the current netns."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.installed = False
        self.native_queue: bool | None = None

    def _batch(self, matches: list[Match], queues: list[int], native: bool,
               mark: int | None = None, rewrites: list[Rewrite] | None = None) -> _Batch:
        b = _Batch()
        b.control(NFNL_MSG_BATCH_BEGIN)
        t = [("NFTA_TABLE_NAME", self.table)]
        # add + delete + add replaces a stale table from a crashed run atomically.
        b.add(nft_table_msg, NFT_MSG_NEWTABLE, t, NLM_F_CREATE, f"table {self.table}")
        b.add(nft_table_msg, NFT_MSG_DELTABLE, t, 0, f"table {self.table}")
        b.add(nft_table_msg, NFT_MSG_NEWTABLE, t, NLM_F_CREATE, f"table {self.table}")
        b.add(nft_chain_msg, NFT_MSG_NEWCHAIN, [
            ("NFTA_CHAIN_TABLE", self.table), ("NFTA_CHAIN_NAME", CHAIN),
            ("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", NF_INET_PRE_ROUTING),
                                           ("NFTA_HOOK_PRIORITY", PRIORITY_RAW)]}),
            ("NFTA_CHAIN_TYPE", "filter"),
        ], NLM_F_CREATE, f"chain {CHAIN}")
        for m in matches:
            side = "from" if m.source else "to"
            b.add(nft_rule_msg, NFT_MSG_NEWRULE, [
                ("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", CHAIN),
                ("NFTA_RULE_EXPRESSIONS", _rule_exprs(m, queues[0], len(queues), native)),
            ], NLM_F_CREATE | NLM_F_APPEND, f"rule {side} {m.address}:{m.port}")
        # ICMP rules last: every packet is matched against the rules above it.
        backends = sorted({m.address for m in matches if m.source})
        for addr in backends:
            b.add(nft_rule_msg, NFT_MSG_NEWRULE, [
                ("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", CHAIN),
                ("NFTA_RULE_EXPRESSIONS", _icmp_unreach_exprs(addr, queues[0], len(queues),
                                                              native)),
            ], NLM_F_CREATE | NLM_F_APPEND, f"rule icmp from {addr}")
        for vip in sorted({m.address for m in matches if not m.source}):
            b.add(nft_rule_msg, NFT_MSG_NEWRULE, [
                ("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", CHAIN),
                ("NFTA_RULE_EXPRESSIONS", _icmp_unreach_exprs(vip, queues[0], len(queues),
                                                              native, to=True)),
            ], NLM_F_CREATE | NLM_F_APPEND, f"rule icmp to {vip}")
        if mark is not None:
            self._own_packets_chain(b, mark, queues, native)
        if rewrites:
            # Right after the queue chain: an accepted packet resumes here.
            b.add(nft_chain_msg, NFT_MSG_NEWCHAIN, [
                ("NFTA_CHAIN_TABLE", self.table), ("NFTA_CHAIN_NAME", "rewrite"),
                ("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", NF_INET_PRE_ROUTING),
                                               ("NFTA_HOOK_PRIORITY", PRIORITY_RAW + 1)]}),
                ("NFTA_CHAIN_TYPE", "filter"),
            ], NLM_F_CREATE, "chain rewrite")
            for r in rewrites:
                b.add(nft_rule_msg, NFT_MSG_NEWRULE, [
                    ("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", "rewrite"),
                    ("NFTA_RULE_EXPRESSIONS", _rewrite_exprs(r)),
                ], NLM_F_CREATE | NLM_F_APPEND, f"rule rewrite {r.field} {r.address}:{r.port}")
        b.control(NFNL_MSG_BATCH_END)
        return b

    def _own_packets_chain(self, b: _Batch, mark: int, queues: list[int], native: bool) -> None:
        """Packets natlb sends itself (re-sent SYNs, RSTs) carry `mark`; the
        kernel's conntrack must not start tracking those flows either.  ICMP
        unreachables this host sends itself (no route or no ARP answer for a
        backend) are queued too: they report a dead backend."""
        b.add(nft_chain_msg, NFT_MSG_NEWCHAIN, [
            ("NFTA_CHAIN_TABLE", self.table), ("NFTA_CHAIN_NAME", "output"),
            ("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", NF_INET_LOCAL_OUT),
                                           ("NFTA_HOOK_PRIORITY", PRIORITY_RAW)]}),
            ("NFTA_CHAIN_TYPE", "filter"),
        ], NLM_F_CREATE, "chain output")
        b.add(nft_rule_msg, NFT_MSG_NEWRULE, [
            ("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", "output"),
            ("NFTA_RULE_EXPRESSIONS", [
                _expr("meta", dreg=1, key=NFT_META_MARK),
                _cmp_eq(struct.pack("=I", mark)),
                _expr("notrack"),
            ]),
        ], NLM_F_CREATE | NLM_F_APPEND, "rule output mark")
        b.add(nft_rule_msg, NFT_MSG_NEWRULE, [
            ("NFTA_RULE_TABLE", self.table), ("NFTA_RULE_CHAIN", "output"),
            ("NFTA_RULE_EXPRESSIONS", _icmp_unreach_exprs(None, queues[0], len(queues), native)),
        ], NLM_F_CREATE | NLM_F_APPEND, "rule output icmp")

    def install(self, matches: list[Match], queues: list[int], mark: int | None = None,
                rewrites: list[Rewrite] | None = None) -> None:
        order = [self.native_queue] if self.native_queue is not None else [True, False]
        last: SteeringError | None = None
        for native in order:
            try:
                self._batch(matches, queues, native, mark, rewrites).send()
            except SteeringError as e:
                last = e
                if e.args[1] in (errno.ENOENT, errno.EOPNOTSUPP) and native:
                    continue  # no nft_queue in this kernel: use xt NFQUEUE
                raise
            self.native_queue = native
            self.installed = True
            return
        assert last is not None
        raise last

    def remove(self) -> None:
        if not self.installed:
            return
        b = _Batch()
        b.control(NFNL_MSG_BATCH_BEGIN)
        b.add(nft_table_msg, NFT_MSG_DELTABLE, [("NFTA_TABLE_NAME", self.table)], 0,
              f"table {self.table}")
        b.control(NFNL_MSG_BATCH_END)
        try:
            b.send()
        except SteeringError as e:
            if e.args[1] != errno.ENOENT:
                raise
        self.installed = False
