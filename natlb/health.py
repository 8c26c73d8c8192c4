"""Active health checks: when each backend is checked, and where the
verdicts go.  How a kind checks lives in natlb.checkers; what a verdict
means for the backend lives in natlb.pool_state.

One scheduling task per service wakes a few times per interval and starts
the checks that are due; backends are spread evenly over the interval so
checks do not come in bursts.  The pool may ask for a check at once
(check_now: a passive failure made the backend suspect).  A backend has at
most one check in flight.  Whatever a checker does (raise, hang, answer
twice), the check ends by its timeout plus a grace period at the latest, is
counted once, and the backend is checked again on its next interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from natlb.checkers import CHECKERS, Checker, CheckerFactory
from natlb.config import HealthConfig
from natlb.pool import Backend, Pool, Service

log = logging.getLogger("natlb.health")

# A check the checker never ends is written off this long after its timeout.
GRACE_S = 1.0


@dataclass
class _InFlight:
    token: int
    deadline: float          # loop time: timeout + grace
    started: float           # time.monotonic(), as the pool's clock


class Monitor:
    TICKS_PER_INTERVAL = 10

    def __init__(self, pool: Pool,
                 checkers: dict[type[HealthConfig], CheckerFactory] = CHECKERS) -> None:
        self.pool = pool
        self.factories = checkers
        self.checkers: dict[type[HealthConfig], Checker] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.in_flight: dict[int, _InFlight] = {}
        self.due: dict[int, float] = {}
        self.completed = 0               # checks whose verdict reached the pool
        self._tokens = 0
        self._next_write_off = 0.0
        self._logged: set[tuple[int, type[BaseException]]] = set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for svc in self.pool.services:
            hc = svc.cfg.health
            if hc.kind == "none":
                continue
            if type(hc) not in self.checkers:
                self.checkers[type(hc)] = self.factories[type(hc)](loop)
            self.tasks.append(asyncio.create_task(self._schedule(svc),
                                                  name=f"health {svc.cfg.name}"))
        self.pool.check_now = self.check_now

    def check_now(self, backend_id: int) -> None:
        found = self.pool.by_backend_id.get(backend_id)
        if found is None or found[0].cfg.health.kind == "none" or backend_id in self.in_flight:
            return  # a check already running decides (a stale pass asks again)
        svc, b = found
        loop = asyncio.get_running_loop()
        self._start_check(svc, b, loop.time())
        self.due[b.id] = loop.time() + svc.cfg.health.interval_ms / 1000

    def _start_check(self, svc: Service, b: Backend, now: float) -> None:
        hc = svc.cfg.health
        checker = self.checkers[type(hc)]
        self._tokens += 1
        token = self._tokens
        flight = _InFlight(token, now + hc.timeout_ms / 1000 + GRACE_S, time.monotonic())
        self.in_flight[b.id] = flight

        def done(ok: bool, detail: str, error: BaseException | None = None) -> None:
            current = self.in_flight.get(b.id)
            if current is None or current.token != token:
                return  # written off already, or a second answer
            del self.in_flight[b.id]
            self._verdict(svc, b, ok, detail, error, flight.started)

        try:
            checker.start(b.cfg.address, hc.port or b.cfg.port, hc, done)
        except Exception as e:  # a checker bug must not stop the schedule
            done(False, f"checker error: {type(e).__name__}: {e}", e)

    def _verdict(self, svc: Service, b: Backend, ok: bool, detail: str,
                 error: BaseException | None, started: float) -> None:
        if error is not None:
            key = (b.id, type(error))
            if key not in self._logged:  # once per backend and kind of error
                self._logged.add(key)
                log.error("service %s backend %s: %s check raised; counted as a failure",
                          svc.cfg.name, b.cfg.key, svc.cfg.health.kind, exc_info=error)
        elif ok:
            self._logged = {k for k in self._logged if k[0] != b.id}
        self.completed += 1
        self.pool.report(svc, b, ok, detail, started)

    def _write_off(self, now: float) -> None:
        if now < self._next_write_off:
            return
        self._next_write_off = now + GRACE_S / 4
        for bid, flight in list(self.in_flight.items()):
            if flight.deadline <= now:
                svc, b = self.pool.by_backend_id[bid]
                del self.in_flight[bid]
                self._verdict(svc, b, False, "check did not finish", None, flight.started)

    async def _schedule(self, svc: Service) -> None:
        hc = svc.cfg.health
        loop = asyncio.get_running_loop()
        checker = self.checkers[type(hc)]
        interval = hc.interval_ms / 1000
        n = len(svc.backends)
        now = loop.time()
        for i, b in enumerate(svc.backends):
            self.due[b.id] = now + interval * i / n
        tick = interval / self.TICKS_PER_INTERVAL
        while True:
            now = loop.time()
            checker.expire(now)
            self._write_off(now)
            for b in svc.backends:
                # A check still running is not started twice; it is counted
                # when its timeout ends it.
                if self.due[b.id] <= now and b.id not in self.in_flight:
                    self._start_check(svc, b, now)
                    self.due[b.id] += interval
                    if self.due[b.id] <= now:  # fell behind: do not burst to catch up
                        self.due[b.id] = now + interval
            await asyncio.sleep(tick)

    async def stop(self) -> None:
        if self.pool.check_now == self.check_now:
            self.pool.check_now = None
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        for c in self.checkers.values():
            c.close()
        self.checkers.clear()
        self.in_flight.clear()
