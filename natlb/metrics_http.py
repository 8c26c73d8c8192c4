"""The metrics endpoint: an HTTP server thread in natlb's process serving
the collector's scrape (natlb/metrics.py) through prometheus-client's WSGI
app, on a listening socket natlb makes, or inherits at `natlb restart`.

Across a restart the predecessor hands its listening socket to the
successor (natlb/handover.py): it stops accepting, and connections wait in
the one backlog until the successor accepts, so a scrape never finds the
port closed nor refused, and once the restart returned the successor
answers.  The socket is non-blocking all the same: should two processes
ever accept on it at once, the loser of a race for a connection goes back
to waiting rather than blocking in accept() (and a stop behind it).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from natlb.config import ConfigError, LBConfig
from natlb.metrics import NatlbCollector
from natlb.pool import Pool

log = logging.getLogger("natlb.metrics")

# How long serve_forever waits between looks at a stop request: the
# predecessor of a restart stops accepting within this.
POLL_S = 0.05


class _Handler(WSGIRequestHandler):
    # A client that stalls cannot hold natlb's exit for long (stop() waits
    # for the requests being answered).
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass


class _Server(ThreadingMixIn, WSGIServer):
    # Requests being answered finish before natlb exits (server_close joins
    # them): a scrape caught by a restart gets its whole answer.
    daemon_threads = False
    block_on_close = True


def _resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """The family and socket address a server binds for host:port."""
    family, _, _, _, where = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                flags=socket.AI_PASSIVE)[0]
    return family, where


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (the family the address has)."""
    family, where = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _same_address(bound: tuple[Any, ...], host: str, port: int) -> bool:
    try:
        _, wanted = _resolve(host, port)
        return (ipaddress.ip_address(bound[0]) == ipaddress.ip_address(wanted[0])
                and bound[1] == wanted[1])
    except (OSError, ValueError):
        return False


class MetricsServer:
    """The HTTP endpoint; bound in start() so that a taken address is found
    before natlb changes anything on the host."""

    def __init__(self, pool: Pool, lb: LBConfig,
                 queues: Callable[[], list[int]] | None = None) -> None:
        self.lb = lb
        self.collector = NatlbCollector(pool, lb, queues)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def wanted(self) -> list[Any]:
        """The address to serve on, as `address` reports it (JSON-able)."""
        return list(self.lb.metrics_address)

    @property
    def address(self) -> list[Any] | None:
        """The address served on, or None (not started, or not bound)."""
        return self.wanted if self.server is not None else None

    @property
    def serving(self) -> bool:
        return self.server is not None

    def shares_port_with(self, other: list[Any] | None) -> bool:
        """Whether binding `wanted` could clash with a server on `other` (a
        predecessor's): the same port, and the same host or a wildcard on
        either side (the kernel refuses 127.0.0.1:P while 0.0.0.0:P
        listens, SO_REUSEADDR or not)."""
        if not other:
            return False
        (host, port), (other_host, other_port) = self.wanted, other
        wildcard = ("", "0.0.0.0", "::")
        return port == other_port and (host == other_host or host in wildcard
                                       or other_host in wildcard)

    def fileno(self) -> int:
        """The listening socket's descriptor, for `natlb restart` to pass on."""
        assert self.server is not None
        return self.server.socket.fileno()

    def start(self) -> None:
        host, port = self.lb.metrics_address
        try:
            sock = listen(host, port)
        except OSError as e:
            raise ConfigError(f'lb.metrics = "{self.lb.metrics}": '
                              f"{(e.strerror or str(e)).lower()}") from None
        self._serve(sock)

    def can_adopt(self, sock: socket.socket) -> bool:
        """Whether a predecessor's socket listens on our address (the
        config may have moved it)."""
        try:
            return bool(sock.type == socket.SOCK_STREAM
                        and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                        and _same_address(sock.getsockname(), *self.lb.metrics_address))
        except OSError:
            return False

    def adopt(self, sock: socket.socket) -> None:
        """Serve a predecessor's listening socket (can_adopt said it is
        ours)."""
        self._serve(sock)

    def _serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        server = _Server(sock.getsockname()[:2], _Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = sock
        # What HTTPServer.server_bind would have set, but for the bind (and
        # for getfqdn, a DNS lookup for every start).
        host, port = sock.getsockname()[:2]
        server.server_name, server.server_port = str(host), port
        server.setup_environ()
        server.set_app(make_wsgi_app(self.registry))
        self.server = server
        self.resume()

    def give_away(self) -> None:
        """`natlb restart`: the successor will accept on our listening
        socket.  Returns once we accept no more; requests being answered
        finish, and the socket closes at stop() (or serves again at
        resume(), if the successor failed)."""
        if self._thread is not None and self.server is not None:
            self.server.shutdown()
            self._thread = None

    def resume(self) -> None:
        if self._thread is None and self.server is not None:
            self._thread = threading.Thread(target=self.server.serve_forever, args=(POLL_S,),
                                            name="natlb-metrics", daemon=True)
            self._thread.start()

    def start_when_free(self, wait_s: float) -> None:
        """A successor (natlb restart) of a predecessor that could not pass
        its socket on binds the address its predecessor gives up as it
        exits; until then scrapes reach the predecessor."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.start()
                return
            except ConfigError as e:
                if time.monotonic() > deadline:
                    log.warning("metrics not served: %s", e)
                    return
                time.sleep(0.1)

    def stop(self) -> None:
        if self.server is not None:
            self.give_away()
            self.server.server_close()
            self.server = None
        self.collector.close()
