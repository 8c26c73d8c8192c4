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

import logging
import os
import struct
from collections.abc import Callable

from natlb import netlink

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_DELTABLE, NFT_MSG_NEWGEN = 2, 15
NFTA_TABLE_NAME = 1
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
WANTED = {NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_DELTABLE, NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN}
NFGENMSG_SIZE = 4


def parse(data: bytes, table: str) -> list[tuple[str, int, str]]:
    """The events in one datagram: ("deleted", family, "") for a table
    named `table`, ("generation", pid, process name) for a transaction's
    end (pid 0: the kernel did not say)."""
    out: list[tuple[str, int, str]] = []
    for kind, _, body, end in netlink.messages(data):
        # Only two kinds are read: a large table's install sends tens of
        # thousands of others (its set elements), skipped by their header.
        if kind not in WANTED or end - body < NFGENMSG_SIZE:
            continue
        attrs = netlink.attrs(data, body + NFGENMSG_SIZE, end)
        if kind & 0xFF == NFT_MSG_DELTABLE:
            if netlink.string(attrs.get(NFTA_TABLE_NAME, b"")) == table:
                out.append(("deleted", data[body], ""))
        else:
            raw_pid = attrs.get(NFTA_GEN_PROC_PID, b"")
            pid = struct.unpack("!I", raw_pid)[0] if len(raw_pid) == 4 else 0
            # A process names itself: nothing in it may break a log line.
            out.append(("generation", pid,
                        netlink.printable(netlink.string(attrs.get(NFTA_GEN_PROC_NAME, b"")))))
    return out


class TableWatch(netlink.NotificationWatch):
    """Calls on_deleted(who) from its thread when a table named `table` was
    deleted by another process ("nft (pid 1234)"), or on_deleted("") when
    notifications were lost (it may have been)."""

    thread_name = "natlb-tables"
    log = logging.getLogger("natlb.tables")

    def __init__(self, table: str, on_deleted: Callable[[str], None]) -> None:
        super().__init__(NETLINK_NETFILTER, membership=NFNLGRP_NFTABLES)
        self.table = table
        self.what = f"the nftables notifications for table {table}"
        self.on_deleted = on_deleted
        self._deleted = False     # in the transaction being read

    def overflowed(self) -> None:
        self._deleted = False
        self._tell("")

    def datagram(self, data: bytes) -> None:
        for event, pid, name in parse(data, self.table):
            if event == "deleted":
                self._deleted = True
            elif self._deleted:
                self._deleted = False
                if pid != os.getpid():
                    self._tell(f"{name} (pid {pid})" if pid else "another program")

    def _tell(self, who: str) -> None:
        # A failure to reinstall must not skip the datagram's other events.
        try:
            self.on_deleted(who)
        except Exception:
            self.log.exception("handling the deletion of table %s", self.table)
