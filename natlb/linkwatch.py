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

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger("natlb.links")

RTMGRP_LINK = 1
RTM_NEWLINK, RTM_DELLINK = 16, 17
IFLA_IFNAME = 3
ARPHRD_ETHER = 1
NLMSG_HDR = struct.Struct("=IHHII")        # len, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")       # family, type, index, flags, change
RTATTR = struct.Struct("=HH")              # len, type
SO_RCVBUFFORCE = 33
RCVBUF = 1 << 20


class Link(NamedTuple):
    index: int
    name: str
    ether: bool         # an Ethernet header on its frames (ARPHRD_ETHER)


def parse(data: bytes) -> list[tuple[bool, Link]]:
    """(added or changed: True, gone: False) per link message in one
    datagram; anything else is skipped."""
    out = []
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            break
        body = off + NLMSG_HDR.size
        if kind in (RTM_NEWLINK, RTM_DELLINK) and length >= NLMSG_HDR.size + IFINFOMSG.size:
            family, arphrd, index, _, _ = IFINFOMSG.unpack_from(data, body)
            name = ""
            a = body + IFINFOMSG.size
            while a + RTATTR.size <= off + length:
                alen, atype = RTATTR.unpack_from(data, a)
                if alen < RTATTR.size:
                    break
                if atype == IFLA_IFNAME:
                    name = data[a + RTATTR.size:a + alen].split(b"\0", 1)[0].decode(
                        errors="replace")
                a += (alen + 3) & ~3
            if family == socket.AF_UNSPEC:
                out.append((kind == RTM_NEWLINK, Link(index, name, arphrd == ARPHRD_ETHER)))
        off += (length + 3) & ~3
    return out


class LinkWatch:
    def __init__(self, on_added: Callable[[Link], None], on_gone: Callable[[Link], None],
                 on_lost: Callable[[], None]) -> None:
        self.on_added, self.on_gone, self.on_lost = on_added, on_gone, on_lost
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def open(self) -> None:
        """From now on no link change is missed (see the module's doc)."""
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        s.bind((0, RTMGRP_LINK))
        s.setblocking(False)
        self._sock = s

    def start(self) -> None:
        assert self._sock is not None
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="natlb-links", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Returns once no handler runs or will run."""
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
                    log.error("link notifications: %s; no longer watching links", e)
                    return
                self._handle(self.on_lost)
                continue
            for added, link in parse(data):
                self._handle(self.on_added if added else self.on_gone, link)

    @staticmethod
    def _handle(fn: Callable[..., None], *args: Link) -> None:
        # One handler's failure (a link gone again before it was set up)
        # must not end the watch.
        try:
            fn(*args)
        except Exception:
            log.exception("handling a link change %s", args)
