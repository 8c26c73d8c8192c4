"""The host's nftables as natlb reads it (nfnetlink dumps, no nft binary):
every table with its comment, every base chain with its hook."""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

from natlb.errors import HostError
from natlb.netlink import NLMSG_HDR, attrs, messages, string

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_GETCHAIN = 0, 1, 3, 4
NFTA_TABLE_NAME, NFTA_TABLE_USERDATA = 1, 6
NFTA_CHAIN_TABLE, NFTA_CHAIN_NAME, NFTA_CHAIN_HOOK = 1, 3, 4
NFTA_HOOK_HOOKNUM, NFTA_HOOK_PRIORITY = 1, 2
NLM_F_REQUEST, NLM_F_DUMP = 1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NFGENMSG = struct.Struct("=BBH")          # family, version, res_id (big-endian)
# libnftnl's user data: type (u8), length (u8), value; a table's comment is type 0.
NFTNL_UDATA_TABLE_COMMENT = 0
# nft's names of the families (NFPROTO_*).
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


class Table(NamedTuple):
    family: int
    name: str
    comment: str          # "" when it has none


class Chain(NamedTuple):
    family: int
    table: str
    name: str
    hook: int             # NF_INET_* (NF_NETDEV_* in netdev)
    priority: int

    def __str__(self) -> str:
        return f"{FAMILIES.get(self.family, self.family)} {self.table} {self.name}"


def comment_of(udata: bytes) -> str:
    """The comment in a table's user data ("" if it holds none)."""
    off = 0
    while off + 2 <= len(udata):
        kind, length = udata[off], udata[off + 1]
        if kind == NFTNL_UDATA_TABLE_COMMENT:
            return string(udata[off + 2:off + 2 + length])
        off += 2 + length
    return ""


def _dump(request: int, reply: int) -> list[tuple[int, dict[int, bytes]]]:
    """(family, attributes) of every object a GET dump of every family gives."""
    seq = int.from_bytes(os.urandom(3), "big")
    body = NFGENMSG.pack(0, 0, 0)    # NFPROTO_UNSPEC: every family
    msg = NLMSG_HDR.pack(NLMSG_HDR.size + len(body), NFNL_SUBSYS_NFTABLES << 8 | request,
                         NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
    out: list[tuple[int, dict[int, bytes]]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.settimeout(5.0)
        s.bind((0, 0))
        s.send(msg)
        while True:
            data = s.recv(1 << 16)
            for kind, rseq, at, end in messages(data):
                if rseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    err = -struct.unpack_from("=i", data, at)[0]
                    raise OSError(err, os.strerror(err))
                if kind == NFNL_SUBSYS_NFTABLES << 8 | reply:
                    out.append((data[at], attrs(data, at + NFGENMSG.size, end)))


def tables() -> list[Table]:
    """Every nftables table of this network namespace."""
    try:
        got = _dump(NFT_MSG_GETTABLE, NFT_MSG_NEWTABLE)
    except OSError as e:
        raise HostError(f"nftables: listing tables: {e.strerror or e}") from None
    return [Table(family, string(a.get(NFTA_TABLE_NAME, b"")),
                  comment_of(a.get(NFTA_TABLE_USERDATA, b""))) for family, a in got]


def base_chains() -> list[Chain]:
    """Every chain of this network namespace that sits on a hook."""
    try:
        got = _dump(NFT_MSG_GETCHAIN, NFT_MSG_NEWCHAIN)
    except OSError as e:
        raise HostError(f"nftables: listing chains: {e.strerror or e}") from None
    out = []
    for family, a in got:
        if NFTA_CHAIN_HOOK not in a:
            continue
        hook = attrs(a[NFTA_CHAIN_HOOK], 0, len(a[NFTA_CHAIN_HOOK]))
        num, prio = hook.get(NFTA_HOOK_HOOKNUM), hook.get(NFTA_HOOK_PRIORITY)
        if num is None or prio is None:
            continue
        out.append(Chain(family, string(a.get(NFTA_CHAIN_TABLE, b"")),
                         string(a.get(NFTA_CHAIN_NAME, b"")), struct.unpack("!I", num)[0],
                         struct.unpack("!i", prio)[0]))
    return out
