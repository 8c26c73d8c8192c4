"""Carries the pool's table effects out against the C core: builds each
service's scheduler table, publishes snapshots, resets a dead backend's flows.

Theory of operation.  A table depends only on the service's scheduler and
its backends' keys, weights and eligibility, so each service's last table is
cached under exactly that key and rebuilt only when it changes; a flap
rebuilds one service's table, not every service's.  C still takes a whole
snapshot per publish (nl_publish swaps all services at once).

Builds can be slow (a maglev table over hundreds of backends is 100+ ms of
Python), so once the event loop runs (start()) every publish and reset runs
on one worker thread, one job at a time, in order.  A job reads the state of
the services that changed when it starts, on the loop thread; requests that
arrive while a job runs are merged into the next one.  So the published
state only ever moves forward: a newer state is never overwritten by an
older one, and a burst of changes costs one build per service.  A job's
resets run after its publish, so a backend has left the tables before its
flows are cut.  nl_reset_backend walks the whole flow table; cffi releases
the GIL around C calls, so the walk stalls neither the loop nor the data
path.  Before start() (at startup, in tests) everything runs inline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from natlb.core import BackendEntry, Core, CoreError, ServiceTable
from natlb.pool_state import PoolState, ResetFlows
from natlb.schedulers import Candidate, build_table

log = logging.getLogger("natlb.pool")

# One backend as a table needs it: captured on the loop thread as a plain
# tuple (cheap), turned into core and scheduler types on the worker.
Row = tuple[str, int, str, int, int, bool, bool]  # address, port, key, weight, id, eligible, alive


@dataclass
class Job:
    order: list[int]                                  # every service id, in config order
    changed: dict[int, tuple[ServiceTable, tuple[Row, ...]]]
    resets: list[ResetFlows] = field(default_factory=list)


class Publisher:
    def __init__(self, core: Core, state: PoolState) -> None:
        self.core = core
        self.state = state
        self.publishes = 0
        self.builds = 0                                # tables actually computed
        self._tables: dict[int, tuple[tuple[object, ...], tuple[int, ...]]] = {}
        self._current: dict[int, ServiceTable] = {}
        self._dirty: set[int] = set()
        self._resets: list[ResetFlows] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: asyncio.Future[None] | None = None
        # The kernel's fast path forgets these backends' flows.  Runs after
        # the publish that took a backend out and before its flows are
        # reset, so the packets natlb's reset provokes come to natlb (see
        # nl_reset_backend); and after one that took a UDP backend's "alive"
        # away, so its flows' next packets come to natlb, which moves them.
        # Only theirs: the other backends' flows stay in the kernel, where
        # forgetting all of them sent every carried flow's next packet
        # through the queue at once.
        self.forget_fast: Callable[[set[int]], None] | None = None
        # The kernel's fast path learns the published backends (their slots).
        self.on_publish: Callable[[list[ServiceTable]], None] | None = None
        self._udp_alive: set[int] = set()

    # -- requests (loop thread) ---------------------------------------------
    def request(self, services: Iterable[int], resets: Iterable[ResetFlows] = ()) -> None:
        self._dirty.update(services)
        self._resets.extend(resets)
        if self._loop is None:
            self._run(self._take())
        elif self._running is None:
            self._launch()

    def _take(self) -> Job:
        by_id = {s.id: s for s in self.state.services}
        changed = {}
        for sid in self._dirty:
            s = by_id.get(sid)
            if s is None:  # removed by a reload
                continue
            spec = ServiceTable(s.cfg.vip, s.cfg.port, s.cfg.protocol, s.cfg.scheduler, s.id, (),
                                cluster=s.cfg.cluster)
            changed[sid] = (spec, tuple((b.cfg.address, b.cfg.port, b.cfg.key, b.weight, b.id,
                                         b.eligible, b.alive) for b in s.backends))
        job = Job([s.id for s in self.state.services], changed, self._resets)
        self._dirty, self._resets = set(), []
        return job

    def _launch(self) -> None:
        assert self._loop is not None and self._executor is not None
        self._running = self._loop.run_in_executor(self._executor, self._run, self._take())
        self._running.add_done_callback(self._finished)

    def _finished(self, fut: asyncio.Future[None]) -> None:
        self._running = None
        if not fut.cancelled() and fut.exception() is not None:
            log.error("publishing tables failed: %s", fut.exception())
        if self._loop is not None and (self._dirty or self._resets):
            self._launch()

    # -- the work (worker thread, or inline before start) ---------------------
    def _table(self, spec: ServiceTable, rows: tuple[Row, ...]) -> tuple[int, ...]:
        cands = tuple(Candidate(key, weight, eligible)
                      for _, _, key, weight, _, eligible, _ in rows)
        key = (spec.scheduler, cands)
        cached = self._tables.get(spec.id)
        if cached is None or cached[0] != key:
            cached = (key, tuple(build_table(spec.scheduler, cands)))
            self._tables[spec.id] = cached
            self.builds += 1
        return cached[1]

    def _run(self, job: Job) -> None:
        for sid, (spec, rows) in job.changed.items():
            entries = tuple(BackendEntry(addr, port, weight, bid, eligible, alive)
                            for addr, port, _, weight, bid, eligible, alive in rows)
            self._current[sid] = ServiceTable(spec.vip, spec.port, spec.protocol,
                                              spec.scheduler, sid, entries,
                                              self._table(spec, rows), spec.cluster)
        for sid in set(self._current) - set(job.order):
            del self._current[sid]
            self._tables.pop(sid, None)
        tables = [self._current[sid] for sid in job.order]
        self.core.publish(tables)
        self.publishes += 1
        if self.on_publish is not None:
            self.on_publish(tables)
        udp_alive = {b.id for t in self._current.values() if t.protocol == "udp"
                     for b in t.backends if b.alive}
        lost, self._udp_alive = self._udp_alive - udp_alive, udp_alive
        if (job.resets or lost) and self.forget_fast is not None:
            try:
                self.forget_fast({r.backend_id for r in job.resets} | lost)
            except CoreError as e:
                # The resets still go out: natlb's RSTs reach the flows the
                # kernel forgot, and the others' next packets are queued
                # once their entries die.
                log.error("%s", e)
        for r in job.resets:
            n = self.core.reset_backend(r.backend_id)
            if n:
                log.warning("service %s backend %s: reset %d established flows", r.service,
                            r.backend, n)

    # -- lifetime -----------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """From now on, publish and reset off the event loop."""
        self._loop = loop
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="natlb-publish")

    async def idle(self) -> None:
        """Wait until everything requested so far is published."""
        while self._running is not None:
            await asyncio.wait([self._running])
            await asyncio.sleep(0)  # let _finished launch what came meanwhile

    async def close(self) -> None:
        """Finish what was requested, then run inline again."""
        await self.idle()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._loop = self._executor = None
