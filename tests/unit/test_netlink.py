"""Netlink read by hand (natlb/netlink.py), without root: the walk over a
datagram's messages and attributes believes no length, and the watch's
thread outlives a handler that fails."""

import errno
import socket
import struct
import threading

from natlb import netlink


def msg(kind: int, body: bytes, seq: int = 0) -> bytes:
    raw = struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def attr(kind: int, value: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def test_messages_are_walked_at_their_aligned_lengths():
    data = msg(16, b"abc", seq=5) + msg(17, b"", seq=6)
    assert list(netlink.messages(data)) == [(16, 5, 16, 19), (17, 6, 36, 36)]


def test_a_message_claiming_more_than_the_datagram_ends_the_walk():
    good = msg(16, b"abcd")
    lying = struct.pack("=IHHII", 400, 17, 0, 0, 0) + b"x" * 8
    assert [m[0] for m in netlink.messages(good + lying + good)] == [16]
    short = struct.pack("=IHHII", 8, 17, 0, 0, 0)            # shorter than its header
    assert list(netlink.messages(short + good)) == []
    assert list(netlink.messages(good[:10])) == []


def test_attributes_by_type_and_an_overrunning_one_ignored():
    body = attr(3, b"eth0\0") + attr(0x8004, b"\1\2\3\4") + struct.pack("=HH", 99, 6) + b"zz"
    got = netlink.attrs(body, 0, len(body))
    assert got == {3: b"eth0\0", 4: b"\1\2\3\4"}      # nested flag masked; 6 overruns
    assert netlink.string(got[3]) == "eth0"
    assert netlink.string(b"\xff\xfe\0junk") == "\ufffd\ufffd"


class Recorder(netlink.NotificationWatch):
    what = "test notifications"
    thread_name = "test-watch"

    def __init__(self) -> None:
        super().__init__(0)
        self.got: list[bytes] = []
        self.lost = 0
        self.seen = threading.Semaphore(0)

    def datagram(self, data: bytes) -> None:
        if data == b"boom":
            self.seen.release()
            raise ValueError("a handler's own failure")
        self.got.append(data)
        self.seen.release()

    def overflowed(self) -> None:
        self.lost += 1
        self.seen.release()


class Overflowing:
    """A socket whose first read says the kernel dropped notifications."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.first = sock, True

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv(self, n: int) -> bytes:
        if self.first:
            self.first = False
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return self.sock.recv(n)

    def close(self) -> None:
        self.sock.close()


def test_the_thread_survives_a_failing_handler_and_reports_overflow_then_stops():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    watch = Recorder()
    watch._sock = Overflowing(a)          # what open() would have made
    watch.start()
    try:
        for data in (b"one", b"boom", b"two"):
            b.send(data)
        for _ in range(4):
            assert watch.seen.acquire(timeout=5)
        assert watch.lost == 1 and watch.got == [b"one", b"two"]
    finally:
        watch.close()
    assert not any(t.name == "test-watch" for t in threading.enumerate())
    b.close()
