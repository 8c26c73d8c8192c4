"""The control socket: a root-only Unix stream socket, one JSON request and
one JSON reply per connection.

Requests: {"cmd": "status"}
          {"cmd": "backend", "action": "drain|enable|disable|weight",
           "service": NAME, "backend": "ADDR[:PORT]", "weight": N}
          {"cmd": "restart", "config": PATH}   (hand over to a new natlb)
          {"cmd": "reload"}                    (as SIGHUP, and says how it went)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from natlb.errors import HostError
from natlb.gcpause import gc_paused
from natlb.ownfile import Identity, identity, unlink_if_mine
from natlb.pool_state import DISABLED, DRAINING, ENABLED, PoolError

if TYPE_CHECKING:  # the CLI imports this module too: keep its start light
    from natlb.pool import Pool

ACTIONS = {"drain": DRAINING, "enable": ENABLED, "disable": DISABLED}


class ControlError(HostError):
    """The control socket is unusable (no natlb running, in use, refused)."""


class ControlServer:
    def __init__(self, path: str, pool: Pool, status: Callable[[], dict[str, Any]],
                 restart: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
                 reload: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
                 ) -> None:
        self.path = path
        self.pool = pool
        self.status = status
        self.restart = restart
        self.reload = reload
        self.server: asyncio.AbstractServer | None = None
        self._mine: Identity | None = None

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

    async def _listen(self, **where: Any) -> asyncio.AbstractServer:
        # Python 3.13 removes the path when the server closes, unless told
        # not to: the path is removed here (stop) only while it is ours, and
        # never by a predecessor that passed its socket on.
        if sys.version_info >= (3, 13):
            where["cleanup_socket"] = False
        return await asyncio.start_unix_server(self._serve, **where)

    def fileno(self) -> int:
        """The listening socket's descriptor, for `natlb restart` to pass on."""
        assert self.server is not None
        return self.server.sockets[0].fileno()

    @staticmethod
    def inherited(fd: int, path: str) -> socket.socket | None:
        """The predecessor's listening socket, passed at `natlb restart`, if
        `fd` is one: a Unix stream socket bound to `path` (the config cannot
        change it across a restart, so another path means another socket)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            return None
        try:
            if (sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM
                    and sock.getsockname() in (path, os.path.abspath(path))
                    and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
                sock.set_inheritable(False)   # our own children get none of it
                return sock
        except OSError:
            pass
        sock.detach()    # not ours to close: whatever it is, leave it be
        return None

    async def adopt(self, sock: socket.socket) -> None:
        """Serve the predecessor's listening socket: the path never stops
        answering across `natlb restart` (connections made meanwhile wait
        in its backlog until this loop accepts them)."""
        self.server = await self._listen(sock=sock)
        self._mine = identity(self.path)

    def give_away(self) -> None:
        """After `natlb restart`: the successor accepts on our listening
        socket from now on, and we stop accepting on it.  Not by closing our
        server: a connection accepted in this loop's last round would then
        be dropped unanswered (asyncio attaches it to the server later, and
        a closed one refuses it).  The server closes at stop(), without
        removing the path, which is the successor's now."""
        self._mine = None
        if self.server:
            loop = asyncio.get_running_loop()
            for sock in self.server.sockets:
                loop.remove_reader(sock.fileno())

    async def start(self, wait_s: float = 0.0) -> None:
        """Bind; with wait_s, wait that long for a running natlb to let go
        of the path (a predecessor that could not pass its socket on lets
        it go as it exits after handing over to us)."""
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
            self.server = await self._listen(path=self.path)
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
                elif req.get("cmd") == "reload" and self.reload:
                    reply = await self.reload(req)
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
