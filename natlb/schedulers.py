"""Scheduler tables: the policy half of backend choice.

The C data path picks a new flow's backend by indexing the table computed
here (see csrc/scheduler.c); only ``lc`` is decided in C, from live flow
counts.  Tables list indices into the service's backend list and contain
only backends that may take new flows.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A backend as the schedulers see it."""

    key: str          # stable identity, e.g. "203.0.113.10:80"
    weight: int
    eligible: bool


SH_BUCKETS = 256
# Primes: Maglev wants a table much larger than the backend count (M >> N).
MAGLEV_SIZES = (1021, 4093, 16381, 65521)


def rr_table(cands: Sequence[Candidate]) -> list[int]:
    return [i for i, c in enumerate(cands) if c.eligible and c.weight > 0]


def wrr_table(cands: Sequence[Candidate], max_len: int = 4096) -> list[int]:
    """Smooth weighted round robin (as nginx does): interleaves backends in
    proportion to weight instead of sending bursts to the heaviest one."""
    live = [(i, c.weight) for i, c in enumerate(cands) if c.eligible and c.weight > 0]
    if not live:
        return []
    g = 0
    for _, w in live:
        g = math.gcd(g, w)
    weights = [(i, w // g) for i, w in live]
    total = sum(w for _, w in weights)
    if total > max_len:  # keep ratios approximately, bound the table
        scale = max_len / total
        weights = [(i, max(1, round(w * scale))) for i, w in weights]
        total = sum(w for _, w in weights)
    current = {i: 0 for i, _ in weights}
    out: list[int] = []
    for _ in range(total):
        for i, w in weights:
            current[i] += w
        best = max(weights, key=lambda iw: current[iw[0]])[0]
        current[best] -= total
        out.append(best)
    return out


def sh_table(cands: Sequence[Candidate]) -> list[int]:
    """Source hashing buckets, filled in weighted round robin order."""
    seq = wrr_table(cands)
    if not seq:
        return []
    return [seq[i % len(seq)] for i in range(SH_BUCKETS)]


def _h(key: str, salt: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, salt=salt).digest(), "big")


def maglev_size(n: int) -> int:
    for m in MAGLEV_SIZES:
        if m >= 100 * n:
            return m
    return MAGLEV_SIZES[-1]


def maglev_table(cands: Sequence[Candidate], size: int | None = None) -> list[int]:
    """Maglev lookup table (Eisenbud et al., NSDI 2016, section 3.4) with
    weights as extra turns.  Each backend's permutation depends only on its
    key, so removing one of N backends remaps about 1/N of the slots.  Turns
    go in key order, not list order, so nodes whose configs list the same
    backends in another order still build the same table (by key)."""
    live = sorted(((i, c) for i, c in enumerate(cands) if c.eligible and c.weight > 0),
                  key=lambda ic: ic[1].key)
    if not live:
        return []
    m = size or maglev_size(len(cands))
    perms = []
    for i, c in live:
        offset = _h(c.key, b"offset") % m
        skip = _h(c.key, b"skip") % (m - 1) + 1
        perms.append([i, offset, skip, 0, c.weight])
    table = [-1] * m
    filled = 0
    max_w = max(p[4] for p in perms)
    credit = [0] * len(perms)
    while True:
        for k, p in enumerate(perms):
            credit[k] += p[4]
            if credit[k] < max_w:
                continue
            credit[k] -= max_w
            idx, offset, skip, nxt, _ = p
            slot = (offset + nxt * skip) % m
            while table[slot] >= 0:
                nxt += 1
                slot = (offset + nxt * skip) % m
            table[slot] = idx
            p[3] = nxt + 1
            filled += 1
            if filled == m:
                return table


BUILDERS = {
    "rr": rr_table,
    "wrr": wrr_table,
    "lc": lambda cands: [],
    "sh": sh_table,
    "maglev": maglev_table,
}


def build_table(scheduler: str, cands: Sequence[Candidate]) -> list[int]:
    return BUILDERS[scheduler](cands)
