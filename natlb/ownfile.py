"""Knowing a file as ours: a socket path natlb bound may be removed and
bound again by a successor (`natlb restart`) at any moment, and an inode
number alone can be reused at once.  Device, inode and change time together
tell our file from its replacement."""

from __future__ import annotations

import contextlib
import os
import socket

Identity = tuple[int, int, int]


def identity(path: str) -> Identity:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_ctime_ns


def unlink_if_mine(path: str, mine: Identity | None) -> None:
    """Removes `path` only if it is still the file known as `mine`."""
    if mine is None:
        return
    with contextlib.suppress(FileNotFoundError):
        if identity(path) == mine:
            os.unlink(path)


def answers(path: str) -> bool:
    """Whether a process accepts connections on the Unix socket at `path`."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True
