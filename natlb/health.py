"""Active health checks: one asyncio task per backend, no thread per check.

Checkers share one small interface: ``async check(address, port, hc) ->
(ok, detail)``; each kind is one function in CHECKERS.  The monitor applies
their verdicts to the pool, which owns the up/down state machine.
"""

from __future__ import annotations

import asyncio
import logging
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
    finally:
        writer.close()
    parts = line.split()
    if len(parts) < 2 or not parts[1].isdigit():
        return False, "no HTTP status line"
    status = int(parts[1])
    return status == hc.expect_status, f"HTTP {status}"


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


CHECKERS: dict[str, Checker] = {"tcp": check_tcp, "http": check_http, "udp": check_udp}


async def run_check(checker: Checker, address: str, port: int, hc: HealthConfig) -> Result:
    try:
        return await asyncio.wait_for(checker(address, port, hc), hc.timeout_ms / 1000)
    except TimeoutError:
        return False, f"timeout after {hc.timeout_ms} ms"
    except OSError as e:
        return False, e.strerror or type(e).__name__


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
