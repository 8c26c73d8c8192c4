"""Active health checks: one asyncio task per backend, no thread per check.

Checkers share one small interface: ``async check(address, port, hc) ->
(ok, detail)``; each kind is one function in CHECKERS.  The monitor applies
their verdicts to the pool, which owns the up/down state machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable

from natlb.config import HealthConfig
from natlb.pool import Backend, Pool, Service

log = logging.getLogger("natlb.health")

Result = tuple[bool, str]
Checker = Callable[[str, int, HealthConfig], Awaitable[Result]]


async def check_tcp(address: str, port: int, hc: HealthConfig) -> Result:
    _, writer = await asyncio.open_connection(address, port)
    writer.close()
    return True, "connected"


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


CHECKERS: dict[str, Checker] = {
    "tcp": check_tcp, "http": check_http, "udp": check_udp, "dns": check_dns,
    "exec": check_exec,
}


async def run_check(checker: Checker, address: str, port: int, hc: HealthConfig) -> Result:
    try:
        return await asyncio.wait_for(checker(address, port, hc), hc.timeout_ms / 1000)
    except TimeoutError:
        return False, f"timeout after {hc.timeout_ms} ms"
    except OSError as e:
        # asyncio puts "Connect call failed (...)" in strerror; the errno says why.
        return False, os.strerror(e.errno) if e.errno else str(e) or type(e).__name__


class Monitor:
    """Runs the checks of every backend and feeds results to the pool."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for svc in self.pool.services:
            if svc.cfg.health.kind == "none":
                continue
            for b in svc.backends:
                self.tasks.append(asyncio.create_task(self._loop(svc, b),
                                                      name=f"health {b.cfg.key}"))

    async def _loop(self, svc: Service, b: Backend) -> None:
        hc = svc.cfg.health
        checker = CHECKERS[hc.kind]
        port = hc.port or b.cfg.port
        interval = hc.interval_ms / 1000
        while True:
            started = time.monotonic()
            ok, detail = await run_check(checker, b.cfg.address, port, hc)
            self.pool.report(svc, b, ok, detail)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
