"""Active health checks: one asyncio task per backend, no thread per check.

Checkers share one small interface: ``async check(address, port, hc) ->
(ok, detail)``; each kind is one function in CHECKERS.  The monitor applies
their verdicts to the pool, which owns the up/down state machine.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from natlb.config import HealthConfig
from natlb.pool import Backend, Pool, Service

log = logging.getLogger("natlb.health")

Result = tuple[bool, str]
Checker = Callable[[str, int, HealthConfig], Awaitable[Result]]


async def check_http(address: str, port: int, hc: HealthConfig) -> Result:
    reader, writer = await asyncio.open_connection(address, port)
    try:
        writer.write(f"GET {hc.path} HTTP/1.0\r\nHost: {address}\r\n"
                     f"User-Agent: natlb-health\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        line = await reader.readline()
        body = b""
        if hc.expect_body is not None:
            head_and_body = await reader.read(1 << 16)
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


class _OneReply(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.reply.done():
            self.reply.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable
        if not self.reply.done():
            self.reply.set_exception(exc)


async def check_udp(address: str, port: int, hc: HealthConfig) -> Result:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _OneReply, remote_addr=(address, port))
    try:
        transport.sendto(hc.payload.encode())
        data = await proto.reply
    finally:
        transport.close()
    if hc.expect is not None and hc.expect.encode() not in data:
        return False, f"reply without {hc.expect!r}"
    return True, f"{len(data)} byte reply"


def dns_query(name: str, qid: int) -> bytes:
    """A minimal RFC 1035 query: one question, type A, class IN, RD set."""
    labels = [label for label in name.strip(".").split(".") if label]
    qname = b"".join(bytes([len(x)]) + x.encode() for x in labels) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", 1, 1)


def dns_answered(reply: bytes, qid: int) -> tuple[bool, str]:
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


async def check_dns(address: str, port: int, hc: HealthConfig) -> Result:
    loop = asyncio.get_running_loop()
    qid = int.from_bytes(os.urandom(2), "big")
    transport, proto = await loop.create_datagram_endpoint(
        _OneReply, remote_addr=(address, port))
    try:
        transport.sendto(dns_query(hc.name, qid))
        reply = await proto.reply
    finally:
        transport.close()
    return dns_answered(reply, qid)


async def check_exec(address: str, port: int, hc: HealthConfig) -> Result:
    env = dict(os.environ, NATLB_BACKEND=f"{address}:{port}", NATLB_BACKEND_ADDRESS=address,
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


async def run_check(checker: Checker, address: str, port: int, hc: HealthConfig) -> Result:
    try:
        return await asyncio.wait_for(checker(address, port, hc), hc.timeout_ms / 1000)
    except TimeoutError:
        return False, f"timeout after {hc.timeout_ms} ms"
    except OSError as e:
        # asyncio puts "Connect call failed (...)" in strerror; the errno says why.
        return False, os.strerror(e.errno) if e.errno else str(e) or type(e).__name__


class TcpProber:
    """TCP connect checks without streams or a task per check: a non-blocking
    connect watched by the event loop, closed with RST (SO_LINGER 0) so that
    thousands of checks a second leave no TIME_WAIT behind."""

    LINGER_RST = struct.pack("ii", 1, 0)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: dict[int, tuple[socket.socket, Callable[[bool, str], None], float]] = {}

    def start(self, address: str, port: int, timeout_s: float,
              done: Callable[[bool, str], None]) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self.LINGER_RST)
        err = s.connect_ex((address, port))
        if err not in (0, errno.EINPROGRESS):
            s.close()
            done(False, os.strerror(err))
            return
        fd = s.fileno()
        self.pending[fd] = (s, done, self.loop.time() + timeout_s)
        self.loop.add_writer(fd, self._ready, fd)

    def _finish(self, fd: int, ok: bool, detail: str) -> None:
        s, done, _ = self.pending.pop(fd)
        self.loop.remove_writer(fd)
        s.close()
        done(ok, detail)

    def _ready(self, fd: int) -> None:
        s = self.pending[fd][0]
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._finish(fd, err == 0, "connected" if err == 0 else os.strerror(err))

    def expire(self, now: float, timeout_ms: int) -> None:
        for fd in [fd for fd, (_, _, deadline) in self.pending.items() if deadline <= now]:
            self._finish(fd, False, f"timeout after {timeout_ms} ms")

    def close(self) -> None:
        for fd in list(self.pending):
            s, _, _ = self.pending.pop(fd)
            self.loop.remove_writer(fd)
            s.close()


async def check_tcp(address: str, port: int, hc: HealthConfig) -> Result:
    """One TCP check through the same prober the monitor uses."""
    loop = asyncio.get_running_loop()
    result: asyncio.Future[Result] = loop.create_future()
    prober = TcpProber(loop)

    def done(ok: bool, detail: str) -> None:
        if not result.done():
            result.set_result((ok, detail))

    prober.start(address, port, hc.timeout_ms / 1000, done)
    try:
        return await result
    finally:
        prober.close()


CHECKERS: dict[str, Checker] = {
    "tcp": check_tcp, "http": check_http, "udp": check_udp, "dns": check_dns,
    "exec": check_exec,
}


class Monitor:
    """Checks every backend on its service's interval and feeds results to
    the pool.  One scheduling task per service wakes a few times per interval
    and starts the checks that are due; backends are spread evenly over the
    interval so checks do not come in bursts."""

    TICKS_PER_INTERVAL = 10

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.tasks: list[asyncio.Task[None]] = []
        self.prober: TcpProber | None = None
        self.checks: set[asyncio.Task[Result]] = set()

    def start(self) -> None:
        self.prober = TcpProber(asyncio.get_running_loop())
        for svc in self.pool.services:
            if svc.cfg.health.kind != "none":
                self.tasks.append(asyncio.create_task(self._schedule(svc),
                                                      name=f"health {svc.cfg.name}"))

    def _start_check(self, svc: Service, b: Backend, in_flight: set[int]) -> None:
        hc = svc.cfg.health
        port = hc.port or b.cfg.port
        in_flight.add(b.id)

        def done(ok: bool, detail: str) -> None:
            in_flight.discard(b.id)
            self.pool.report(svc, b, ok, detail)

        if hc.kind == "tcp" and self.prober:
            self.prober.start(b.cfg.address, port, hc.timeout_ms / 1000, done)
            return
        task = asyncio.create_task(run_check(CHECKERS[hc.kind], b.cfg.address, port, hc))
        self.checks.add(task)

        def finished(t: asyncio.Task[Result]) -> None:
            self.checks.discard(t)
            if not t.cancelled():
                done(*t.result())

        task.add_done_callback(finished)

    async def _schedule(self, svc: Service) -> None:
        hc = svc.cfg.health
        loop = asyncio.get_running_loop()
        interval = hc.interval_ms / 1000
        n = len(svc.backends)
        now = loop.time()
        due = {b.id: now + interval * i / n for i, b in enumerate(svc.backends)}
        in_flight: set[int] = set()
        tick = interval / self.TICKS_PER_INTERVAL
        while True:
            now = loop.time()
            if self.prober:
                self.prober.expire(now, hc.timeout_ms)
            for b in svc.backends:
                # A check still running is not started twice; it is counted
                # when its timeout ends it.
                if due[b.id] <= now and b.id not in in_flight:
                    self._start_check(svc, b, in_flight)
                    due[b.id] += interval
                    if due[b.id] <= now:  # fell behind: do not burst to catch up
                        due[b.id] = now + interval
            await asyncio.sleep(tick)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for c in self.checks:
            c.cancel()
        await asyncio.gather(*self.tasks, *self.checks, return_exceptions=True)
        self.tasks.clear()
        self.checks.clear()
        if self.prober:
            self.prober.close()
