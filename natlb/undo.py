"""Undo journal: every change natlb makes to the system is recorded here
before it is made, so that exactly those changes are reverted on exit.

A guardian process (``python -m natlb.undo``) gets a copy of each entry
through a pipe.  If natlb exits cleanly it undoes its own changes and tells
the guardian so ("done"); after `natlb restart` it leaves them to its
successor and says so ("handover").  If natlb dies without either (SIGKILL,
a crash), the pipe closes and the guardian waits `restart_grace_ms` for a
successor before it undoes them: a natlb started in that time claims the
journal through the guardian's Unix socket (``claim``), adopts the host as
it is (nftables table, VIPs, the flow table file) and becomes its owner.
Undo steps are idempotent: each tolerates the thing already being gone.
A change that went away by itself (its interface was deleted) is forgotten:
taken out of the journal and the guardian's copy, never undone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from natlb.ownfile import Identity, answers, identity, unlink_if_mine

log = logging.getLogger("natlb.undo")

Revert = Callable[[dict[str, Any]], None]
# kind -> how to revert it.  Each module that changes the host registers its
# own kinds, so the journal knows nobody's internals; an entry names the
# module that registered its kind, which the guardian imports to find it.
_REVERTERS: dict[str, Revert] = {}


def reverter(kind: str) -> Callable[[Revert], Revert]:
    """Register the revert function for one kind of host change."""
    def register(fn: Revert) -> Revert:
        _REVERTERS[kind] = fn
        return fn
    return register


def _undo_one(entry: dict[str, Any]) -> None:
    kind = entry["kind"]
    if kind not in _REVERTERS and entry.get("module"):
        importlib.import_module(entry["module"])
    if kind not in _REVERTERS:
        raise ValueError(f"unknown undo entry {kind!r}")
    _REVERTERS[kind](entry)


@reverter("flow_table")
def _remove_flow_table(entry: dict[str, Any]) -> None:
    """The flow table file (csrc/ctstore.c) outlives natlb on purpose; it
    goes when natlb stops or its guardian gives up waiting for a successor."""
    try:
        os.unlink(entry["path"])
    except FileNotFoundError:
        pass


def _matches(entry: dict[str, Any], match: dict[str, Any]) -> bool:
    return all(entry.get(k) == v for k, v in match.items())


def undo_all(entries: list[dict[str, Any]]) -> list[str]:
    """Revert entries newest first; return the errors (never raises)."""
    errors = []
    for e in reversed(entries):
        try:
            _undo_one(e)
        except Exception as exc:  # keep going: undo as much as possible
            errors.append(f"{e['kind']}: {exc}")
    return errors


class Journal:
    def __init__(self, guardian: bool = True, grace_ms: int = 0,
                 socket_path: str | None = None, inherited: Iterable[dict[str, Any]] = ()) -> None:
        self.entries: list[dict[str, Any]] = []
        # Changes are recorded from several threads (the event loop, the
        # executor, natlb/linkwatch.py's): one line at a time to the guardian.
        self._lock = threading.Lock()
        self._guardian: subprocess.Popen[str] | None = None
        if guardian:
            argv = [sys.executable, "-m", "natlb.undo", "--grace-ms", str(grace_ms)]
            if socket_path:
                argv += ["--socket", socket_path]
            # New session: a terminal's Ctrl-C must reach natlb, not its guardian.
            self._guardian = subprocess.Popen(argv, stdin=subprocess.PIPE, text=True,
                                              start_new_session=True)
        for entry in inherited:   # a predecessor's changes are ours to undo now
            self._append(dict(entry))

    def _append(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.entries.append(entry)
            self._tell(entry)

    def _tell(self, line: dict[str, Any]) -> None:
        if self._guardian and self._guardian.stdin:
            self._guardian.stdin.write(json.dumps(line) + "\n")
            self._guardian.stdin.flush()

    def record(self, kind: str, **fields: Any) -> None:
        if kind not in _REVERTERS:
            raise ValueError(f"no reverter registered for {kind!r}")
        self._append({"kind": kind, "module": _REVERTERS[kind].__module__, **fields})

    def has(self, kind: str, **fields: Any) -> bool:
        match = {"kind": kind, **fields}
        return any(_matches(e, match) for e in list(self.entries))

    def forget(self, kind: str, **fields: Any) -> int:
        """Changes that undid themselves (a deleted interface's filters and
        sysctls): out of the journal and the guardian's copy, never undone.
        How many matched."""
        match = {"kind": kind, **fields}
        with self._lock:
            keep = [e for e in self.entries if not _matches(e, match)]
            n = len(self.entries) - len(keep)
            if n:
                self.entries[:] = keep
                self._tell({"kind": "forget", "match": match})
        return n

    def _finish(self, word: str) -> None:
        with self._lock:
            self._finish_locked(word)

    def _finish_locked(self, word: str) -> None:
        if self._guardian and self._guardian.stdin:
            self._guardian.stdin.write(json.dumps({"kind": word}) + "\n")
            self._guardian.stdin.close()
            self._guardian.wait(timeout=5)
            self._guardian = None

    def undo(self) -> list[str]:
        errors = undo_all(self.entries)
        self.entries.clear()
        self._finish("done")
        return errors

    def hand_over(self) -> None:
        """`natlb restart`: the successor holds a copy and undoes it later."""
        self.entries.clear()
        self._finish("handover")


def claim(socket_path: str, wait_s: float = 2.0) -> list[dict[str, Any]] | None:
    """A starting natlb takes over a crashed predecessor's journal from its
    guardian (which then exits without undoing); None if none is waiting.
    The guardian listens only once its natlb is gone, which it notices
    within milliseconds: wait_s covers that."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2.0)
                s.connect(socket_path)
                msg = json.loads(s.makefile("r").readline() or "{}")
                if "entries" in msg:
                    s.sendall(b"ok\n")
                    return list(msg["entries"])
        except (OSError, ValueError) as e:
            log.debug("guardian claim: %s", e)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _give(conn: socket.socket, entries: list[dict[str, Any]]) -> bool:
    """Answers one claim; True if the claimer took the journal."""
    try:
        conn.settimeout(2.0)
        conn.sendall(json.dumps({"entries": entries}).encode() + b"\n")
        return conn.makefile("r").readline().strip() == "ok"
    except (OSError, ValueError):
        return False
    finally:
        conn.close()


def guardian(fd: int, grace_ms: int, socket_path: str | None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    listener: socket.socket | None = None
    mine: Identity | None = None

    def listen() -> None:
        """natlb is gone: wait for a successor at socket_path."""
        nonlocal listener, mine
        if not socket_path or not grace_ms:
            return
        listener = socket.socket(socket.AF_UNIX)
        try:
            os.unlink(socket_path)   # a previous guardian's, gone with it
        except FileNotFoundError:
            pass
        old = os.umask(0o077)
        try:
            listener.bind(socket_path)
        except OSError as e:
            # systemd removes the RuntimeDirectory when the unit stops: no
            # successor can find us, so the host is cleaned now.
            print(f"natlb guardian: cannot wait for a successor at {socket_path} ({e.strerror});"
                  " cleaning up now", file=sys.stderr)
            listener.close()
            listener = None
            return
        finally:
            os.umask(old)
        mine = identity(socket_path)
        listener.listen(4)
        sel.register(listener, selectors.EVENT_READ)

    entries: list[dict[str, Any]] = []
    buf = b""
    deadline: float | None = None      # set when natlb is gone

    def close_listener() -> None:
        if listener and socket_path:
            # The path goes first, while we still listen, and only if it is
            # still ours: after `natlb restart` it may be the successor's
            # guardian's (see natlb/ownfile.py and ControlServer.stop).
            unlink_if_mine(socket_path, mine)
            listener.close()

    while deadline is None or (listener and time.monotonic() < deadline):
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        for key, _ in sel.select(timeout):
            if key.fileobj is listener and listener:
                conn, _ = listener.accept()
                if _give(conn, entries):
                    close_listener()
                    print(f"natlb guardian: a successor took over {len(entries)} changes",
                          file=sys.stderr)
                    return 0
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                sel.unregister(fd)
                deadline = time.monotonic() + grace_ms / 1000
                listen()
                continue
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                entry = json.loads(line)
                if entry["kind"] in ("done", "handover"):
                    close_listener()
                    return 0
                if entry["kind"] == "forget":
                    entries = [e for e in entries if not _matches(e, entry["match"])]
                    continue
                entries.append(entry)
    close_listener()
    if socket_path and answers(socket_path.removesuffix(".guardian")):
        # A natlb started without claiming the journal: never tear the host
        # down under it.
        print("natlb guardian: another natlb is running; leaving the host to it",
              file=sys.stderr)
        return 0
    # natlb is gone without undoing its changes, and no successor came.
    for err in undo_all(entries):
        print(f"natlb guardian: undo failed: {err}", file=sys.stderr)
    if entries:
        print(f"natlb guardian: natlb exited uncleanly; reverted {len(entries)} changes",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir("/")
    ap = argparse.ArgumentParser()
    ap.add_argument("--grace-ms", type=int, default=0)
    ap.add_argument("--socket")
    a = ap.parse_args()
    # Run as natlb.undo, not __main__: the modules that register reverters
    # import natlb.undo, and their registrations must land where we look.
    from natlb.undo import guardian as _guardian

    sys.exit(_guardian(sys.stdin.fileno(), a.grace_ms, a.socket))
