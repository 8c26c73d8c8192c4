"""What an operator set at run time (a backend's admin state, its weight),
kept where the next natlb finds it: sent to the successor at `natlb
restart` (natlb/handover.py), and in a file beside the control socket for
a natlb that starts after a crash.

A crash restart keeps the flows (the flow table file) and the host (the
guardian's journal); without this file it would bring a backend the
operator had disabled for maintenance back into service.  The file is
written at every change, replaced whole (a crash mid-write leaves the old
one), and removed with the other host changes when natlb stops or its
guardian gives up waiting for a successor: a stop and start begins from the
config, as documented.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from natlb.pool_state import ADMIN_STATES
from natlb.undo import reverter

if TYPE_CHECKING:      # the guardian imports this module: not the C core
    from natlb.pool import Pool

log = logging.getLogger("natlb")


def pool_state(pool: Pool) -> list[dict[str, Any]]:
    """What the next natlb keeps of each backend, by service name and key."""
    return [{"service": s.cfg.name, "backend": b.cfg.key, "health": b.health,
             "admin": b.admin, "weight": b.weight, "cfg_weight": b.cfg.weight}
            for s in pool.services for b in s.backends]


def restore_pool(pool: Pool, state: list[dict[str, Any]], health: bool = True) -> int:
    """Give our backends a predecessor's state (health too, from a live
    one); a weight changed in the config wins over one set at run time (as
    on reload).  Returns how many backends had one."""
    by_key = {(st["service"], st["backend"]): st for st in state}
    n = 0
    for s in pool.services:
        for b in s.backends:
            st = by_key.get((s.cfg.name, b.cfg.key))
            if st is None:
                continue
            # type(...)(): the states may be str enums.
            if health:
                b.health = type(b.health)(st["health"])
            b.admin = type(b.admin)(st["admin"])
            if b.cfg.weight == st["cfg_weight"]:
                b.weight = st["weight"]
            n += 1
    return n


def save(path: str, pool: Pool) -> None:
    # Our own temporary name: at `natlb restart` both processes may write.
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(pool_state(pool)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str) -> list[dict[str, Any]] | None:
    """The state a crashed natlb left, or None (none, or unreadable: the
    config's then, and said)."""
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state, list) or not all(map(_valid, state)):
            raise ValueError("not a list of backend states")
        return state
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("run-time state %s not used (%s): backends start from the config",
                    path, e)
        return None


def _valid(st: object) -> bool:
    # What restore_pool would take: a file from another version of natlb
    # (a downgrade) must not fail the start that keeps the flows.
    return (isinstance(st, dict)
            and isinstance(st.get("service"), str) and isinstance(st.get("backend"), str)
            and st.get("admin") in ADMIN_STATES
            and all(type(st.get(k)) is int and st[k] >= 0 for k in ("weight", "cfg_weight")))


@reverter("run_state")
def _remove(entry: dict[str, Any]) -> None:
    path = entry["path"]
    for p in [path, *glob.glob(glob.escape(path) + ".tmp*")]:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
