"""Interfaces that come and go while natlb runs, from the kernel's own
notifications (rtnetlink, the link group) read by a thread of natlb's.

The socket is bound before natlb lists the interfaces it sets up at start
(open(), then the listing, then start()): a link added between the listing
and the thread's first read waits in the socket, so none falls in between.
Handlers are idempotent (a link listed at start may also be announced).
If the kernel drops notifications (the socket's buffer overflowed) the
thread says so (on_lost) and the owner lists the links again.

Only the messages about links themselves count (family AF_UNSPEC): the
bridge's own (AF_BRIDGE) RTM_DELLINK for a port leaving its bridge is not
the port going away.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

from natlb import netlink

RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME = 3
ARPHRD_ETHER = 1
IFINFOMSG = struct.Struct("=BxHiII")       # family, type, index, flags, change


class Link(NamedTuple):
    index: int
    name: str
    ether: bool         # an Ethernet header on its frames (ARPHRD_ETHER)


def parse(data: bytes) -> list[tuple[bool, Link]]:
    """(added or changed: True, gone: False) per link message in one
    datagram; anything else is skipped."""
    out = []
    for kind, _, body, end in netlink.messages(data):
        if kind not in (RTM_NEWLINK, RTM_DELLINK) or end - body < IFINFOMSG.size:
            continue
        family, arphrd, index, _, _ = IFINFOMSG.unpack_from(data, body)
        if family == socket.AF_UNSPEC:
            name = netlink.string(netlink.attrs(data, body + IFINFOMSG.size, end)
                                  .get(IFLA_IFNAME, b""))
            out.append((kind == RTM_NEWLINK, Link(index, name, arphrd == ARPHRD_ETHER)))
    return out


class LinkWatch(netlink.NotificationWatch):
    what = "link notifications"
    thread_name = "natlb-links"
    log = logging.getLogger("natlb.links")

    def __init__(self, on_added: Callable[[Link], None], on_gone: Callable[[Link], None],
                 on_lost: Callable[[], None]) -> None:
        super().__init__(socket.NETLINK_ROUTE, groups=RTMGRP_LINK)
        self.on_added, self.on_gone, self.on_lost = on_added, on_gone, on_lost

    def overflowed(self) -> None:
        self.on_lost()

    def datagram(self, data: bytes) -> None:
        for added, link in parse(data):
            # One handler's failure (a link gone again before it was set
            # up) must not skip the other links of the datagram.
            try:
                (self.on_added if added else self.on_gone)(link)
            except Exception:
                self.log.exception("handling a link change %s", link)
