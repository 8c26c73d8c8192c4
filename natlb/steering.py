"""Sends natlb's nftables table (built as data by ``natlb.ruleset``) to the
kernel as one nfnetlink batch, atomic: all of it or nothing; deletes it
whole on exit.

The queue verdict uses nftables' own ``queue`` expression where the kernel
has it (CONFIG_NFT_QUEUE), otherwise the xtables NFQUEUE target through
nft_compat: the first refusal of the native form selects the other.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    nft_chain_msg,
    nft_rule_msg,
    nft_set_elem_list_msg,
    nft_set_msg,
    nft_table_msg,
)

from natlb import nftlist, nftwire, ruleset
from natlb.errors import HostError
from natlb.gcpause import gc_paused
from natlb.undo import reverter

NFPROTO_IPV4 = 2
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2


MESSAGE_CLASSES: dict[str, type] = {
    ruleset.TABLE: nft_table_msg, ruleset.CHAIN: nft_chain_msg, ruleset.SET: nft_set_msg,
    ruleset.SETELEM: nft_set_elem_list_msg, ruleset.RULE: nft_rule_msg,
}


class SteeringError(HostError):
    """The kernel refused the nftables table."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def encode(messages: list[ruleset.Message], seq: int) -> tuple[bytes, dict[int, str]]:
    """The batch as bytes (BATCH_BEGIN, messages, BATCH_END) and what each
    acknowledged sequence number stands for."""
    parts: list[bytes] = []
    what: dict[int, str] = {}

    def control(mtype: int) -> None:
        nonlocal seq
        seq += 1
        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = mtype
        m["header"]["flags"] = NLM_F_REQUEST
        m["header"]["sequence_number"] = seq
        m.encode()
        parts.append(m.data)

    control(NFNL_MSG_BATCH_BEGIN)
    for msg in messages:
        seq += 1
        what[seq] = msg.what
        fast = nftwire.encode(msg, msg.family, NLM_F_REQUEST | NLM_F_ACK | msg.flags, seq)
        if fast is not None:
            parts.append(fast)
            continue
        m = MESSAGE_CLASSES[msg.kind]()
        m["nfgen_family"] = msg.family
        m["attrs"] = msg.attrs
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | msg.mtype
        m["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | msg.flags
        m["header"]["sequence_number"] = seq
        m.encode()
        parts.append(m.data)
    control(NFNL_MSG_BATCH_END)
    return b"".join(parts), what


def send(messages: list[ruleset.Message]) -> None:
    """Send one batch; raise SteeringError with the first refusal."""
    data, what = encode(messages, int.from_bytes(os.urandom(3), "big"))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        # The kernel takes a batch in one sendmsg no larger than the send
        # buffer; a table for hundreds of services outgrows the default.
        # Every message is acknowledged, and the acks of a large batch queue
        # up before we read them: room for each (as nft does), or ENOBUFS.
        acks = len(what) * 1024 + 65536
        try:
            s.setsockopt(socket.SOL_SOCKET, 32, len(data) + 65536)  # SO_SNDBUFFORCE
            s.setsockopt(socket.SOL_SOCKET, 33, acks)               # SO_RCVBUFFORCE
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(data) + 65536)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, acks)
        s.bind((0, 0))
        s.settimeout(5.0)
        try:
            s.send(data)
        except OSError as e:
            raise SteeringError(f"nftables table of {len(data)} bytes: {e.strerror}",
                                e.errno or 0) from None
        pending = set(what)
        first_error: tuple[int, str] | None = None
        while pending:
            try:
                reply = s.recv(1 << 16)
            except TimeoutError:
                break
            off = 0
            while off + 16 <= len(reply):
                length, mtype, _, seq, _ = struct.unpack_from("=IHHII", reply, off)
                if mtype == NLMSG_ERROR and seq in pending:  # an ack if 0
                    pending.discard(seq)
                    err = -struct.unpack_from("=i", reply, off + 16)[0]
                    if err and first_error is None:
                        first_error = (err, what[seq])
                off += (length + 3) & ~3 if length else len(reply)
        if first_error:
            err, name = first_error
            raise SteeringError(f"nftables refused {name}: {os.strerror(err)}", err)


class Steering:
    """Installs and removes natlb's nftables table in the current netns."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.installed = False
        self.native_queue: bool | None = None
        self.ipv6 = False             # the ip6 table is ours and in place

    def install(self, spec: ruleset.Spec) -> None:
        # A table of 65,536 backends is millions of small objects, all alive
        # until sent and free of cycles (the collector took most of the time).
        with gc_paused():
            self._install(spec)

    def _install(self, spec: ruleset.Spec) -> None:
        order = [self.native_queue] if self.native_queue is not None else [True, False]
        ipv6 = ruleset.has_ipv6(spec)
        # A reload that adds the first IPv6 service makes the ip6 table anew
        # while the ip table keeps its chains; one that removes the last
        # deletes it in the same batch.
        in_place6 = self.ipv6 if self.installed else None
        gone6: list[ruleset.Message] = []
        if not ipv6 and (self.ipv6 or not self.installed):
            # Also at start: a predecessor's (natlb restart) may be there.
            gone6 = ruleset.absent(self.table, ruleset.NFPROTO_IPV6)
        for i, native in enumerate(order):
            full = dataclasses.replace(spec, native_queue=native)
            try:
                try:
                    # Chains kept: packets waiting in the queues survive.
                    send(ruleset.build(full, in_place=True, in_place6=in_place6) + gone6)
                except SteeringError:
                    send(ruleset.build(full) + gone6)
            except SteeringError as e:
                if native and i + 1 < len(order) and e.code in (errno.ENOENT, errno.EOPNOTSUPP):
                    continue  # no nft_queue in this kernel: use xt NFQUEUE
                raise
            self.native_queue = native
            self.installed = True
            self.ipv6 = ipv6
            return

    def missing(self) -> list[str]:
        """The tables natlb installed that the host no longer has (another
        program deleted them), as nft names them: ["ip natlb"]."""
        if not self.installed:
            return []
        families = [(ruleset.NFPROTO_IPV4, "ip")]
        if self.ipv6:
            families.append((ruleset.NFPROTO_IPV6, "ip6"))
        there = {(t.family, t.name) for t in nftlist.tables()}
        return [f"{fname} {self.table}" for family, fname in families
                if (family, self.table) not in there]

    def remove(self) -> None:
        if not self.installed:
            return
        remove_table(self.table)
        self.installed = False
        self.ipv6 = False


def remove_table(table: str) -> None:
    """Delete the table of both families; gone already is fine (undo steps
    are idempotent, and an IPv4-only natlb has no ip6 table)."""
    for family in (ruleset.NFPROTO_IPV4, ruleset.NFPROTO_IPV6):
        try:
            send(ruleset.delete(table, family))
        except SteeringError as e:
            if e.code != errno.ENOENT:
                raise


@reverter("nft_table")
def _undo_table(entry: dict[str, Any]) -> None:
    remove_table(entry["table"])
