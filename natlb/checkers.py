"""Health checkers: one per check kind, behind one small interface.

A checker is made once per monitor for its kind (CHECKERS maps each kind's
config dataclass to a factory taking the event loop) and offers:

    start(address, port, hc, done)   begin one check; done(ok, detail, error)
                                      is called exactly once, by the timeout
                                      at the latest (the checker's own timer)
    close()                           drop every check still running

`error` is set only when the checker itself failed (an exception other than
OSError or TimeoutError): the check counts as failed and the monitor logs
it.  Most kinds are a coroutine run as a task under asyncio's timeout
(TaskChecker); TCP, the common case at thousands of checks a second, is a
non-blocking connect watched by the loop with no task per check (TcpProber).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from natlb.config import (
    DnsCheck,
    ExecCheck,
    HealthConfig,
    HttpCheck,
    TcpCheck,
    UdpCheck,
    family,
    host_port,
)

Result = tuple[bool, str]


class Done(Protocol):
    def __call__(self, ok: bool, detail: str, error: BaseException | None = None) -> None: ...


class Checker(Protocol):
    def start(self, address: str, port: int, hc: HealthConfig, done: Done) -> None: ...

    def close(self) -> None: ...


CheckerFactory = Callable[[asyncio.AbstractEventLoop], Checker]
CHECKERS: dict[type[HealthConfig], CheckerFactory] = {}

HC = TypeVar("HC", bound=HealthConfig)
Coroutine = Callable[[str, int, HC], Awaitable[Result]]


def register(kind: type[HealthConfig], factory: CheckerFactory) -> None:
    CHECKERS[kind] = factory


def oserror_detail(e: OSError) -> str:
    # asyncio puts "Connect call failed (...)" in strerror; the errno says why.
    return os.strerror(e.errno) if e.errno else str(e) or type(e).__name__


class TaskChecker:
    """Runs a coroutine check as a task, bounded by the check's timeout."""

    def __init__(self, loop: asyncio.AbstractEventLoop, check: Coroutine) -> None:
        self.loop = loop
        self.check = check
        self.tasks: set[asyncio.Task[Result]] = set()

    def start(self, address: str, port: int, hc: HealthConfig, done: Done) -> None:
        task = self.loop.create_task(
            asyncio.wait_for(self.check(address, port, hc), hc.timeout_ms / 1000))
        self.tasks.add(task)

        def finished(t: asyncio.Task[Result]) -> None:
            self.tasks.discard(t)
            if t.cancelled():  # close(): nobody waits for the verdict
                return
            e = t.exception()
            if e is None:
                done(*t.result())
            elif isinstance(e, TimeoutError):
                done(False, f"timeout after {hc.timeout_ms} ms")
            elif isinstance(e, OSError):
                done(False, oserror_detail(e))
            else:
                done(False, f"checker error: {type(e).__name__}: {e}", e)

        task.add_done_callback(finished)

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()


def task_checker(check: Coroutine) -> CheckerFactory:
    return lambda loop: TaskChecker(loop, check)


# -- tcp ------------------------------------------------------------------------

class TcpProber:
    """TCP connect checks without streams or a task per check: a non-blocking
    connect watched by the event loop, closed with RST (SO_LINGER 0) so that
    thousands of checks a second leave no TIME_WAIT behind."""

    LINGER_RST = struct.pack("ii", 1, 0)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[int, tuple[socket.socket, Done, asyncio.TimerHandle]] = {}

    def start(self, address: str, port: int, hc: HealthConfig, done: Done) -> None:
        af = socket.AF_INET6 if family(address) == 6 else socket.AF_INET
        s = socket.socket(af, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self.LINGER_RST)
            err = s.connect_ex((address, port))
        except OSError as e:
            s.close()
            done(False, oserror_detail(e))
            return
        if err not in (0, errno.EINPROGRESS):
            s.close()
            done(False, os.strerror(err))
            return
        fd = s.fileno()
        # A timer per check, not a sweep: the loop wakes for a timeout only
        # when one is reached.
        timer = self.loop.call_later(hc.timeout_ms / 1000, self._finish, fd, False,
                                     f"timeout after {hc.timeout_ms} ms")
        self.pending[fd] = (s, done, timer)
        self.loop.add_writer(fd, self._ready, fd)

    def _finish(self, fd: int, ok: bool, detail: str) -> None:
        s, done, timer = self.pending.pop(fd)
        timer.cancel()
        self.loop.remove_writer(fd)
        s.close()
        done(ok, detail)

    def _ready(self, fd: int) -> None:
        s = self.pending[fd][0]
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._finish(fd, err == 0, "connected" if err == 0 else os.strerror(err))

    def close(self) -> None:
        for fd in list(self.pending):
            s, _, timer = self.pending.pop(fd)
            timer.cancel()
            self.loop.remove_writer(fd)
            s.close()


# -- http -----------------------------------------------------------------------

async def check_http(address: str, port: int, hc: HttpCheck) -> Result:
    reader, writer = await asyncio.open_connection(address, port)
    try:
        host = f"[{address}]" if family(address) == 6 else address
        writer.write(f"GET {hc.path} HTTP/1.0\r\nHost: {host}\r\n"
                     f"User-Agent: natlb-health\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        body = b""
        if hc.expect_body is not None:
            # To the end (Connection: close) or 64 KiB: headers and body may
            # come in separate segments, and one read returns the first.
            head_and_body = b""
            while len(head_and_body) < 1 << 16:
                chunk = await reader.read((1 << 16) - len(head_and_body))
                if not chunk:
                    break
                head_and_body += chunk
            body = head_and_body.partition(b"\r\n\r\n")[2]
    finally:
        writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return False, "no HTTP status line"
    status = int(parts[1])
    if status != hc.expect_status:
        return False, f"HTTP {status}"
    if hc.expect_body is not None and hc.expect_body.encode() not in body:
        return False, f"HTTP {status}, body without {hc.expect_body!r}"
    return True, f"HTTP {status}"


# -- udp and dns ------------------------------------------------------------------

class _OneReply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable
        if not self.reply.done():
            self.reply.set_exception(exc)


async def _ask(address: str, port: int, query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _OneReply, remote_addr=(address, port))
    try:
        transport.sendto(query)
        return await proto.reply
    finally:
        transport.close()


async def check_udp(address: str, port: int, hc: UdpCheck) -> Result:
    data = await _ask(address, port, hc.payload.encode())
    if hc.expect is not None and hc.expect.encode() not in data:
        return False, f"reply without {hc.expect!r}"
    return True, f"{len(data)} byte reply"


def dns_query(name: str, qid: int) -> bytes:
    """A minimal RFC 1035 query: one question, type A, class IN, RD set."""
    labels = [label for label in name.strip(".").split(".") if label]
    qname = b"".join(bytes([len(x)]) + x.encode() for x in labels) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def dns_answered(reply: bytes, qid: int) -> Result:
    if len(reply) < 12:
        return False, "short DNS reply"
    rid, flags, _, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    if rid != qid or not flags & 0x8000:
        return False, "not a reply to our query"
    rcode = flags & 0xF
    if rcode != 0:
        return False, f"DNS rcode {rcode}"
    if ancount == 0:
        return False, "DNS reply without answer"
    return True, f"DNS {ancount} answers"


async def check_dns(address: str, port: int, hc: DnsCheck) -> Result:
    qid = int.from_bytes(os.urandom(2), "big")
    return dns_answered(await _ask(address, port, dns_query(hc.name, qid)), qid)


# -- exec -----------------------------------------------------------------------

async def check_exec(address: str, port: int, hc: ExecCheck) -> Result:
    env = dict(os.environ, NATLB_BACKEND=host_port(address, port), NATLB_BACKEND_ADDRESS=address,
               NATLB_BACKEND_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        *hc.command, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        code = await proc.wait()
    except asyncio.CancelledError:  # timed out: do not leave it running
        proc.kill()
        await proc.wait()
        raise
    return code == 0, f"exit {code}"


register(TcpCheck, TcpProber)
register(HttpCheck, task_checker(check_http))
register(UdpCheck, task_checker(check_udp))
register(DnsCheck, task_checker(check_dns))
register(ExecCheck, task_checker(check_exec))


async def check_once(address: str, port: int, hc: HealthConfig,
                     checkers: dict[type[HealthConfig], CheckerFactory] = CHECKERS) -> Result:
    """One check through the kind's registered checker, as the monitor runs it."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[Result] = loop.create_future()
    checker = checkers[type(hc)](loop)

    def done(ok: bool, detail: str, error: BaseException | None = None) -> None:
        if not result.done():
            result.set_result((ok, detail))

    checker.start(address, port, hc, done)
    try:
        return await result
    finally:
        checker.close()
