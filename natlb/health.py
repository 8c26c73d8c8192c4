"""Active health checks: when each backend is checked, and where the
verdicts go.  How a kind checks lives in natlb.checkers; what a verdict
means for the backend lives in natlb.pool_state.

One scheduling task per service sleeps until the next thing it has to do
(a backend's check due, a check to write off), brought forward when a
check ends or the pool asks for one; backends are spread evenly over the
interval so checks do not come in bursts.  It does not poll: on a router
every wakeup of natlb's event loop is CPU taken from the traffic, and the
former tick of a tenth of the interval cost 10 wakeups a second for a
service checked every second, whatever was due.  A round starts at least
a tenth of the interval after the last one ended, so a service of many
backends still starts its checks in batches.  The pool may ask for a
check at once (check_now: a passive failure made the backend suspect).  A backend has at
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
# Rounds of one service at most this many times per interval.
TICKS_PER_INTERVAL = 10


@dataclass
class _InFlight:
    token: int
    deadline: float          # loop time: timeout + grace
    started: float           # time.monotonic(), as the pool's clock


class _Alarm:
    """A sleep until a loop time, which callbacks may bring forward.  A round
    starts at least `tick` after the last one ended: with many backends
    sharing an interval, one round starts every check due by then, where
    waking for each check (and scanning the service each time) would cost
    more than the checks."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float) -> None:
        self.loop = loop
        self.tick = tick
        self.floor = 0.0                     # the next round not before this
        self.when = float("inf")             # the planned round, while asleep
        self._waiting: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def round_ended(self, now: float) -> None:
        # From the round's end, not its start: a round longer than a tick
        # (thousands of backends) still leaves the loop a tick for the rest.
        self.floor = now + self.tick

    async def sleep_until(self, when: float) -> None:
        self._waiting = self.loop.create_future()
        self._set(when)
        try:
            await self._waiting
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self._waiting = self._timer = None
            self.when = float("inf")

    def advance(self, when: float) -> None:
        """Something needs the service's attention at `when`."""
        if self._waiting is not None and max(when, self.floor) < self.when:
            assert self._timer is not None
            self._timer.cancel()
            self._set(when)

    def _set(self, when: float) -> None:
        assert self._waiting is not None
        self.when = max(when, self.floor)
        self._timer = self.loop.call_at(self.when, _wake, self._waiting)


def _wake(waiting: asyncio.Future[None]) -> None:
    if not waiting.done():
        waiting.set_result(None)


class Monitor:
    def __init__(self, pool: Pool,
                 checkers: dict[type[HealthConfig], CheckerFactory] = CHECKERS) -> None:
        self.pool = pool
        self.factories = checkers
        self.checkers: dict[type[HealthConfig], Checker] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.in_flight: dict[int, _InFlight] = {}
        self.due: dict[int, float] = {}
        self.completed = 0               # checks whose verdict reached the pool
        self.wakeups = 0                 # scheduling rounds, all services
        self.alarms: dict[str, _Alarm] = {}
        self._tokens = 0
        self._logged: set[tuple[int, type[BaseException]]] = set()

    def start(self) -> None:
        if self.tasks:
            return  # running: a second schedule per service would check twice
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
        self._needs(svc, self._next_for(b))

    def _needs(self, svc: Service, when: float) -> None:
        alarm = self.alarms.get(svc.cfg.name)
        if alarm is not None:
            alarm.advance(when)

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
            # Asleep until this check's write-off, the service may owe the
            # backend its next check sooner.
            self._needs(svc, self.due[b.id])

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

    def _run_due(self, svc: Service, now: float) -> float:
        """Start what is due and write off what never ended; the loop time
        of the next thing to do."""
        interval = svc.cfg.health.interval_ms / 1000
        next_at = now + interval
        for b in svc.backends:
            flight = self.in_flight.get(b.id)
            if flight is not None and flight.deadline <= now:
                del self.in_flight[b.id]
                self._verdict(svc, b, False, "check did not finish", None, flight.started)
                flight = None
            # A check still running is not started twice; its end wakes us,
            # or its write-off does.
            if flight is None and self.due[b.id] <= now:
                self._start_check(svc, b, now)
                self.due[b.id] += interval
                if self.due[b.id] <= now:  # fell behind: do not burst to catch up
                    self.due[b.id] = now + interval
            next_at = min(next_at, self._next_for(b))
        return next_at

    def _next_for(self, b: Backend) -> float:
        """When the backend next needs its service's task: its check's
        write-off while one runs, else its next check."""
        flight = self.in_flight.get(b.id)
        return flight.deadline if flight is not None else self.due[b.id]

    async def _schedule(self, svc: Service) -> None:
        loop = asyncio.get_running_loop()
        interval = svc.cfg.health.interval_ms / 1000
        n = len(svc.backends)
        now = loop.time()
        for i, b in enumerate(svc.backends):
            self.due[b.id] = now + interval * i / n
        alarm = self.alarms[svc.cfg.name] = _Alarm(loop, interval / TICKS_PER_INTERVAL)
        while True:
            self.wakeups += 1
            next_at = self._run_due(svc, loop.time())
            alarm.round_ended(loop.time())
            await alarm.sleep_until(next_at)

    async def stop(self) -> None:
        if self.pool.check_now == self.check_now:
            self.pool.check_now = None
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
        self.alarms.clear()
        for c in self.checkers.values():
            c.close()
        self.checkers.clear()
        self.in_flight.clear()
