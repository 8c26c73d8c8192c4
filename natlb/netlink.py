"""Netlink read by hand, for the few places natlb needs it without a
library between it and the kernel: walking a datagram's messages and their
attributes, and a thread reading a socket's notifications (the link watch,
natlb/linkwatch.py; the table watch, natlb/tablewatch.py).

The thread exists because notifications must be read as they come: the
kernel drops them when the socket's buffer is full, and says so (ENOBUFS)
on the next read, which the watch passes on (the owner then looks for
itself instead of trusting what it was told).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator

NLMSG_HDR = struct.Struct("=IHHII")       # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")             # len, type
NLA_TYPE_MASK = 0x3FFF
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
RCVBUF = 1 << 20


def messages(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(type, seq, start of the body, end) of each whole message in one
    datagram; a truncated or malformed one ends the walk."""
    off = 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _, seq, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size or off + length > len(data):
            return
        yield kind, seq, off + NLMSG_HDR.size, off + length
        off += (length + 3) & ~3


def attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """Netlink attributes from off to end, by type (the last of a type)."""
    out = {}
    while off + NLATTR.size <= end:
        length, kind = NLATTR.unpack_from(data, off)
        if length < NLATTR.size or off + length > end:
            break
        out[kind & NLA_TYPE_MASK] = data[off + NLATTR.size:off + length]
        off += (length + 3) & ~3
    return out


def string(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode(errors="replace")


def printable(text: str) -> str:
    """A name another program chose (a process, a table), safe in a log line."""
    return "".join(c if c.isprintable() else "?" for c in text)


class NotificationWatch:
    """A netlink socket subscribed to notifications, read by a thread of its
    own that calls datagram(data) for what it reads and overflowed() when
    the kernel dropped some.  Subclasses define both; they run on the
    watch's thread, and an exception in one is logged, not fatal.

    open() subscribes, start() starts reading: between the two, what comes
    waits in the socket (an owner lists the current state in between and
    misses no change)."""

    what = "netlink notifications"
    thread_name = "natlb-netlink"
    log = logging.getLogger("natlb")

    def __init__(self, protocol: int, groups: int = 0, membership: int = 0) -> None:
        self._protocol, self._groups, self._membership = protocol, groups, membership
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1

    def datagram(self, data: bytes) -> None:
        raise NotImplementedError

    def overflowed(self) -> None:
        raise NotImplementedError

    def open(self) -> None:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, self._protocol)
        try:
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except PermissionError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            s.bind((0, self._groups))
            if self._membership:
                s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, self._membership)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        self._sock = s

    def start(self) -> None:
        if self._sock is None:
            self.open()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Returns once datagram and overflowed run no more."""
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
                    self.log.error("%s: %s; no longer watching", self.what, e)
                    return
                self._safely(self.overflowed)
                continue
            self._safely(self.datagram, data)

    def _safely(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.exception("handling %s", self.what)
