"""The control socket: a root-only Unix stream socket, one JSON request and
one JSON reply per connection.

Requests: {"cmd": "status"}
          {"cmd": "backend", "action": "drain|enable|disable|weight",
           "service": NAME, "backend": "ADDR[:PORT]", "weight": N}
          {"cmd": "restart", "config": PATH}   (hand over to a new natlb)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from natlb.errors import HostError
from natlb.gcpause import gc_paused
from natlb.ownfile import identity, unlink_if_mine
from natlb.pool_state import DISABLED, DRAINING, ENABLED, PoolError

if TYPE_CHECKING:  # the CLI imports this module too: keep its start light
    from natlb.pool import Pool

ACTIONS = {"drain": DRAINING, "enable": ENABLED, "disable": DISABLED}


class ControlError(HostError):
    """The control socket is unusable (no natlb running, in use, refused)."""


class ControlServer:
    def __init__(self, path: str, pool: Pool, status: Callable[[], dict[str, Any]],
                 restart: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
                 ) -> None:
        self.path = path
        self.pool = pool
        self.status = status
        self.restart = restart
        self.server: asyncio.AbstractServer | None = None
        self._mine = (-1, -1, -1)

    @staticmethod
    def check_free(path: str) -> bool:
        """Refuse to start beside a running natlb; clear a dead one's socket
        (and say so: True means a natlb died without cleaning up)."""
        if not os.path.exists(path):
            return False
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(path)
        except OSError:
            # After `natlb restart` the predecessor may remove it first.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
        else:
            raise ControlError(f"control socket {path} is in use by a running natlb")
        finally:
            probe.close()

    async def start(self, wait_s: float = 0.0) -> None:
        """Bind; with wait_s, wait that long for a running natlb to let go
        of the path (it does as it exits after handing over to us)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.check_free(self.path)
                break
            except ControlError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.02)
        old = os.umask(0o077)
        try:
            self.server = await asyncio.start_unix_server(self._serve, self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._mine = identity(self.path)

    async def stop(self) -> None:
        # The path goes first, while we still listen: a successor waiting for
        # it (start(wait_s)) then sees our live socket or no file, never a
        # dead socket of ours that it would remove and re-create itself just
        # as we remove "ours" (an inode number can be reused at once).  Only
        # our own file: after `natlb restart` the path may be the successor's.
        unlink_if_mine(self.path, self._mine)
        if self.server:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        if cmd == "backend":
            action = req.get("action")
            service, backend = str(req.get("service")), str(req.get("backend"))
            if action in ACTIONS:
                b = self.pool.set_admin(service, backend, ACTIONS[action])
            elif action == "weight":
                b = self.pool.set_weight(service, backend, int(req.get("weight", -1)))
            else:
                return {"ok": False, "error": f"unknown backend action {action!r}"}
            return {"ok": True, "backend": b.cfg.key, "admin": b.admin, "weight": b.weight}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            try:
                req = json.loads(line)
                if req.get("cmd") == "restart" and self.restart:
                    reply = await self.restart(req)
                else:
                    # A status of 4,096 services is 100,000s of small dicts.
                    with gc_paused():
                        reply = self.handle(req)
            except (PoolError, ValueError, TypeError) as e:
                reply = {"ok": False, "error": str(e)}
            # Compact: that status is megabytes of JSON.
            with gc_paused():
                data = json.dumps(reply, separators=(",", ":")).encode() + b"\n"
            writer.write(data)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


def request(path: str, req: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no natlb running (no control socket at {path})") from None
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror}") from None
        s.sendall(json.dumps(req).encode() + b"\n")
        # Joined once at the end: appending each chunk copied a large
        # status over and over.
        chunks = []
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))
