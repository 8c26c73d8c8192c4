"""The systemd notification protocol (sd_notify(3)) without libsystemd: one
datagram of ``KEY=VALUE`` lines to the socket named by ``NOTIFY_SOCKET``.

natlb runs as ``Type=notify``: it says READY=1 only once the queues are
bound, the nftables table is loaded and the VIPs are up, so units ordered
after natlb start against a balancer that already forwards.  Outside
systemd (no NOTIFY_SOCKET) every call is a no-op.

READY=1 carries MAINPID: after `natlb restart` the successor, which systemd
did not start, becomes the unit's main process (the unit needs
NotifyAccess=all), so the predecessor's exit does not stop the unit.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("natlb.sdnotify")


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # Linux abstract namespace: a leading NUL instead of the '@'.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other transports natlb does not need


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1", "STATUS=...") to the service manager.
    True if a datagram went out; False outside systemd or if it could not be
    sent (logged: a lost notification must not stop the balancer)."""
    value = os.environ.get("NOTIFY_SOCKET", "")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.warning("NOTIFY_SOCKET=%s: unsupported address, not notifying", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(fields).encode(), address)
    except OSError as e:
        log.warning("NOTIFY_SOCKET=%s: %s", value, e.strerror or e)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd >= 253 match this reload to the READY=1
    # that ends it; older versions ignore the field.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}",
                  "STATUS=reloading")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping: removing what natlb added")
