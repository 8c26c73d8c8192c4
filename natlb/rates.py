"""Rate estimates for ``natlb status --rate``, the way IPVS makes them for
``ipvsadm -Ln --rate``: every 2 seconds the daemon reads the C counters,
takes the rate over those 2 seconds and moves a running average a quarter
of the way toward it (IPVS's estimator weight).  A step in traffic shows
three quarters of its size after about 10 s; bursts shorter than the
interval are smoothed away.  The estimates live in the daemon and are sent
with the status through the control socket.

Sampling takes at most BUDGET of a core: where reading every counter costs
more (tens of thousands of backends), the samples come further apart and
each moves the average by as much as the 2 s ticks it spans would have.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natlb.config import host_port
from natlb.gcpause import gc_paused
from natlb.status import read_counters

if TYPE_CHECKING:  # `natlb status --rate` renders here: keep the CLI's start light
    from natlb.core import Counters
    from natlb.pool import Pool

INTERVAL_S = 2.0
WEIGHT = 0.25
# The share of one core the sampling may take: past it (65,536 backends cost
# about 70 ms a sample, seconds with the fast path's kernel counters), samples
# come further apart, each moving the average as far as the missed ticks would.
BUDGET = 0.02
# (rate name, Counters field): connections, packets and bytes per second.
RATES = (("cps", "new_flows"), ("inpps", "packets_in"), ("outpps", "packets_out"),
         ("inbps", "bytes_in"), ("outbps", "bytes_out"))
_ZERO = dict.fromkeys((r for r, _ in RATES), 0.0)
# Below this an average shows as 0.0 (get() rounds to one decimal).
_SHOWN = 0.05

Key = tuple[str, int]  # ("service" | "backend", id)


class RateEstimator:
    def __init__(self, weight: float = WEIGHT) -> None:
        self.weight = weight
        self.interval_s = INTERVAL_S     # the wait after the last sample
        self._last: dict[Key, tuple[float, tuple[int, ...]]] = {}
        # Only counters that moved: an idle one's average decays to nothing
        # shown and is dropped, so that idle backends cost one comparison.
        self._avg: dict[Key, list[float]] = {}

    def sample(self, now: float, counters: dict[Key, Counters]) -> None:
        """One tick: ``counters`` holds every live service and backend; the
        ones missing (removed by a reload) are forgotten."""
        for key in self._last.keys() - counters.keys():
            del self._last[key]
            self._avg.pop(key, None)
        for key, c in counters.items():
            cur = (c.new_flows, c.packets_in, c.packets_out, c.bytes_in, c.bytes_out)
            prev = self._last.get(key)
            self._last[key] = (now, cur)
            if prev is None or now <= prev[0]:
                continue
            avg = self._avg.get(key)
            idle = cur == prev[1]
            if idle and avg is None:
                continue
            if avg is None:
                avg = self._avg[key] = [0.0] * len(RATES)
            dt = now - prev[0]
            # IPVS's weight per 2 s tick; a longer gap moves as far as the
            # ticks it spans would have.
            w = 1 - (1 - self.weight) ** (dt / INTERVAL_S)
            for i in range(len(RATES)):
                # max(): counters only grow; guard against a reset slot anyway.
                avg[i] += (max(0, cur[i] - prev[1][i]) / dt - avg[i]) * w
            if idle and max(avg) < _SHOWN:
                del self._avg[key]

    def get(self, kind: str, ident: int) -> dict[str, float]:
        avg = self._avg.get((kind, ident))
        if avg is None:
            return dict(_ZERO)
        return {r: round(v, 1) for (r, _), v in zip(RATES, avg, strict=True)}

    async def run(self, read: Callable[[], dict[Key, Counters]], clock: Callable[[], float],
                  interval: float = INTERVAL_S, budget: float = BUDGET) -> None:
        """Sample forever (the daemon cancels the task on exit), taking at
        most ``budget`` of a core."""
        while True:
            cpu = time.thread_time()
            with gc_paused():    # tens of thousands of short-lived objects
                self.sample(clock(), read())
            self.interval_s = max(interval, (time.thread_time() - cpu) / budget)
            await asyncio.sleep(self.interval_s)


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
             f"sampled every {st.get('rate_interval_s', INTERVAL_S):.0f}s", head]

    def row(label: str, r: dict[str, float]) -> str:
        return (f"  {label:<38} {r['cps']:>8.0f} {r['inpps']:>9.0f} {r['outpps']:>9.0f} "
                f"{r['inbps']:>11.0f} {r['outbps']:>11.0f}")

    for s in st["services"]:
        lines.append(row(f"{s['protocol'].upper()} {host_port(s['vip'], s['port'])} ({s['name']})",
                         s["rate"]))
        lines += [row(f"  -> {host_port(b['address'], b['port'])}", b["rate"])
                  for b in s["backends"]]
    return "\n".join(lines)
