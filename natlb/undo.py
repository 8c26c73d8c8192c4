"""Undo journal: every change natlb makes to the system is recorded here
before it is made, so that exactly those changes are reverted on exit.

A guardian process (``python -m natlb.undo``) gets a copy of each entry
through a pipe.  If natlb exits cleanly it undoes its own changes and tells
the guardian so; if natlb dies without that (SIGKILL, a crash), the pipe
closes and the guardian undoes them.  Undo steps are idempotent: each
tolerates the thing already being gone.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TextIO

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
    def __init__(self, guardian: bool = True) -> None:
        self.entries: list[dict[str, Any]] = []
        self._guardian: subprocess.Popen[str] | None = None
        if guardian:
            # New session: a terminal's Ctrl-C must reach natlb, not its guardian.
            self._guardian = subprocess.Popen(
                [sys.executable, "-m", "natlb.undo"], stdin=subprocess.PIPE, text=True,
                start_new_session=True,
            )

    def record(self, kind: str, **fields: Any) -> None:
        if kind not in _REVERTERS:
            raise ValueError(f"no reverter registered for {kind!r}")
        entry = {"kind": kind, "module": _REVERTERS[kind].__module__, **fields}
        self.entries.append(entry)
        if self._guardian and self._guardian.stdin:
            self._guardian.stdin.write(json.dumps(entry) + "\n")
            self._guardian.stdin.flush()

    def undo(self) -> list[str]:
        errors = undo_all(self.entries)
        self.entries.clear()
        if self._guardian and self._guardian.stdin:
            self._guardian.stdin.write(json.dumps({"kind": "done"}) + "\n")
            self._guardian.stdin.close()
            self._guardian.wait(timeout=5)
            self._guardian = None
        return errors


def guardian(stream: TextIO) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    entries: list[dict[str, Any]] = []
    for line in stream:
        entry = json.loads(line)
        if entry["kind"] == "done":
            return 0
        entries.append(entry)
    # natlb is gone without undoing its changes.
    for err in undo_all(entries):
        print(f"natlb guardian: undo failed: {err}", file=sys.stderr)
    if entries:
        print(f"natlb guardian: natlb exited uncleanly; reverted {len(entries)} changes",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir("/")
    # Run as natlb.undo, not __main__: the modules that register reverters
    # import natlb.undo, and their registrations must land where we look.
    from natlb.undo import guardian as _guardian

    sys.exit(_guardian(sys.stdin))
