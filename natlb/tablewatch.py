"""Another program deleting natlb's nftables table, from the kernel's own
notifications (nfnetlink, the nftables group) read by a thread of natlb's.

A host firewall reload commonly starts with `flush ruleset` (Debian's
/etc/nftables.conf does, and `systemctl reload nftables` or `restart`
loads it), which deletes every table, natlb's included.  Without its table
no packet reaches natlb's queues and the VIP is just a local address: the
host answers clients with RSTs.  natlb is told of the deletion within the
transaction that made it and installs its table again (natlb.daemon).

Only the deletion of a table of the watched name counts (either family);
the transaction's generation message that follows names the process that
made it, for the log.  If the kernel drops notifications (the socket's
buffer overflowed: a large table installed, natlb's own or another's) the
owner is told too, and looks for itself.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable

from natlb import nftlist

log = logging.getLogger("natlb.tables")

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_DELTABLE, NFT_MSG_NEWGEN = 2, 15
NFTA_TABLE_NAME = 1
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
WANTED = {NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELTABLE, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN}
NLMSG_HDR = struct.Struct("=IHHII")        # len, type, flags, seq, pid
NFGENMSG_SIZE = 4
SO_RCVBUFFORCE = 33
RCVBUF = 1 << 20


def parse(data: bytes, table: str) -> list[tuple[str, int, str]]:
    """The events in one datagram: ("deleted", family, "") for a table
    named `table`, ("generation", pid, process name) for a transaction's
    end (pid 0: the kernel did not say)."""
    out: list[tuple[str, int, str]] = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        body = off + NLMSG_HDR.size
        # Only two kinds are read: a large table's install sends tens of
        # thousands of others (its set elements), skipped by their header.
        if kind in WANTED and length >= NLMSG_HDR.size + NFGENMSG_SIZE:
            attrs = nftlist.attrs(data, body + NFGENMSG_SIZE, off + length)
            msg = kind & 0xFF
            if msg == NFT_MSG_DELTABLE:
                if nftlist.string(attrs.get(NFTA_TABLE_NAME, b"")) == table:
                    out.append(("deleted", data[body], ""))
            elif msg == NFT_MSG_NEWGEN:
                raw_pid = attrs.get(NFTA_GEN_PROC_PID, b"")
                pid = struct.unpack("!I", raw_pid)[0] if len(raw_pid) == 4 else 0
                # A process names itself: nothing in it may break a log line.
                shown = "".join(c if c.isprintable() else "?"
                                for c in nftlist.string(attrs.get(NFTA_GEN_PROC_NAME, b"")))
                out.append(("generation", pid, shown))
        off += (length + 3) & ~3
    return out


class TableWatch:
    """Calls on_deleted(who) from its thread when a table named `table` was
    deleted by another process ("nft (pid 1234)"), or on_deleted("") when
    notifications were lost (it may have been)."""

    def __init__(self, table: str, on_deleted: Callable[[str], None]) -> None:
        self.table = table
        self.on_deleted = on_deleted
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def start(self) -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.bind((0, 0))
            s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._sock = s
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="natlb-tables", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Returns once on_deleted runs no more."""
        if self._thread:
            os.write(self._wake_w, b"x")
            self._thread.join()
            self._thread = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        if self._sock:
            self._sock.close()
            self._sock = None

    def _run(self) -> None:
        assert self._sock is not None
        deleted = False    # in the transaction being read
        while True:
            ready, _, _ = select.select([self._sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    log.error("nftables notifications: %s; no longer watching table %s",
                              e, self.table)
                    return
                deleted = False
                self._tell("")
                continue
            for event, pid, name in parse(data, self.table):
                if event == "deleted":
                    deleted = True
                elif deleted:
                    deleted = False
                    if pid != os.getpid():
                        self._tell(f"{name} (pid {pid})" if pid else "another program")

    def _tell(self, who: str) -> None:
        try:
            self.on_deleted(who)
        except Exception:
            log.exception("handling the deletion of table %s", self.table)
