"""Rate estimates for ``natlb status --rate``, the way IPVS makes them for
``ipvsadm -Ln --rate``: every 2 seconds the daemon reads the C counters,
takes the rate over those 2 seconds and moves a running average a quarter
of the way toward it (IPVS's estimator weight).  A step in traffic shows
three quarters of its size after about 10 s; bursts shorter than the
interval are smoothed away.  The estimates live in the daemon and are sent
with the status through the control socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natlb.config import host_port
from natlb.status import read_counters

if TYPE_CHECKING:  # `natlb status --rate` renders here: keep the CLI's start light
    from natlb.core import Counters
    from natlb.pool import Pool

INTERVAL_S = 2.0
WEIGHT = 0.25
# (rate name, Counters field): connections, packets and bytes per second.
RATES = (("cps", "new_flows"), ("inpps", "packets_in"), ("outpps", "packets_out"),
         ("inbps", "bytes_in"), ("outbps", "bytes_out"))

Key = tuple[str, int]  # ("service" | "backend", id)


class RateEstimator:
    def __init__(self, weight: float = WEIGHT) -> None:
        self.weight = weight
        self._last: dict[Key, tuple[float, Counters]] = {}
        self._avg: dict[Key, dict[str, float]] = {}

    def sample(self, now: float, counters: dict[Key, Counters]) -> None:
        """One tick: ``counters`` holds every live service and backend; the
        ones missing (removed by a reload) are forgotten."""
        for key in self._last.keys() - counters.keys():
            del self._last[key]
            self._avg.pop(key, None)
        for key, c in counters.items():
            prev = self._last.get(key)
            self._last[key] = (now, c)
            if prev is None or now <= prev[0]:
                continue
            dt = now - prev[0]
            avg = self._avg.setdefault(key, dict.fromkeys((r for r, _ in RATES), 0.0))
            for rate, field in RATES:
                # max(): counters only grow; guard against a reset slot anyway.
                current = max(0, getattr(c, field) - getattr(prev[1], field)) / dt
                avg[rate] += (current - avg[rate]) * self.weight

    def get(self, kind: str, ident: int) -> dict[str, float]:
        avg = self._avg.get((kind, ident))
        return {r: round(v, 1) for r, v in avg.items()} if avg else \
            dict.fromkeys((r for r, _ in RATES), 0.0)

    async def run(self, read: Callable[[], dict[Key, Counters]], clock: Callable[[], float],
                  interval: float = INTERVAL_S) -> None:
        """Sample forever (the daemon cancels the task on exit)."""
        while True:
            self.sample(clock(), read())
            await asyncio.sleep(interval)


def live_counters(pool: Pool) -> dict[Key, Counters]:
    services = pool.services
    svc, be = read_counters(pool, services)
    out: dict[Key, Counters] = {("service", s.id): svc[s.id] for s in services}
    out.update({("backend", b.id): be[b.id] for s in services for b in s.backends})
    return out


def render(st: dict[str, Any]) -> str:
    """Like ``ipvsadm -Ln --rate``: per service, then its backends."""
    head = (f"  {'Prot LocalAddress:Port':<38} {'CPS':>8} {'InPPS':>9} {'OutPPS':>9} "
            f"{'InBPS':>11} {'OutBPS':>11}")
    lines = [f"natlb up {st['uptime_s']:.0f}s; rates averaged IPVS-style, "
             f"sampled every {INTERVAL_S:.0f}s", head]

    def row(label: str, r: dict[str, float]) -> str:
        return (f"  {label:<38} {r['cps']:>8.0f} {r['inpps']:>9.0f} {r['outpps']:>9.0f} "
                f"{r['inbps']:>11.0f} {r['outbps']:>11.0f}")

    for s in st["services"]:
        lines.append(row(f"{s['protocol'].upper()} {host_port(s['vip'], s['port'])} ({s['name']})",
                         s["rate"]))
        lines += [row(f"  -> {host_port(b['address'], b['port'])}", b["rate"])
                  for b in s["backends"]]
    return "\n".join(lines)
