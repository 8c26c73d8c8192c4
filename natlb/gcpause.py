"""Pausing Python's cyclic garbage collector around work that allocates
many short-lived, cycle-free objects (a status of thousands of backends, a
table of millions of set elements): the collector would walk the young
objects and, every so often, the whole heap, over and over, for nothing."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
