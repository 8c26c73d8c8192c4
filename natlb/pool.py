"""The pool as the rest of natlb uses it: feeds events to the pure state
machine (natlb.pool_state) and dispatches the effects it returns: table
publishes and flow resets to the publisher (natlb.publisher), immediate
checks to the health monitor, transitions to the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from natlb.config import Config
from natlb.core import Core
from natlb.pool_state import (
    ADMIN_STATES,
    DISABLED,
    DRAINING,
    ENABLED,
    Admin,
    Backend,
    CheckNow,
    CheckResult,
    Effect,
    Event,
    Ignored,
    PassiveFailure,
    PoolError,
    PoolState,
    Publish,
    ResetFlows,
    Service,
    SetAdmin,
    SetWeight,
    Snapshot,
    Transition,
)
from natlb.publisher import Publisher

__all__ = ["ADMIN_STATES", "DISABLED", "DRAINING", "ENABLED", "Backend", "Pool", "PoolError",
           "Service"]

log = logging.getLogger("natlb.pool")


class Pool:
    def __init__(self, config: Config, core: Core) -> None:
        self.core = core
        self.state = PoolState(config)
        self.publisher = Publisher(core, self.state)
        # Set by the health monitor while it runs: start a check right now.
        self.check_now: Callable[[int], None] | None = None
        self.health_checks = {"ok": 0, "fail": 0}  # active check results, for metrics
        # Called after effects that publish, e.g. to announce or withdraw VIPs.
        self.listeners: list[Callable[[], None]] = []
        # Backend id -> (packets in, bytes in, packets out, bytes out) the
        # kernel carried without natlb (the fast path), read when counters
        # are (status, metrics, rates); the daemon sets it.
        self.kernel_counts: Callable[[], dict[int, tuple[int, int, int, int]]] = dict
        # The fast path's observer: records applied, records that changed
        # nothing, packets queued for want of room in its ring (None: no
        # fast path); the daemon sets it.
        self.observer_counts: Callable[[], dict[str, int] | None] = lambda: None
        # The fast path's kernel decisions (TcFastPath.decisions), if any.
        self.decision_counts: Callable[[], dict[str, int] | None] = lambda: None
        # Called after an operator set a backend's admin state or weight
        # (the daemon keeps them for a crash restart: natlb/runstate.py).
        self.operator_changed: Callable[[], None] = lambda: None

    @property
    def services(self) -> list[Service]:
        return self.state.services

    @property
    def by_backend_id(self) -> dict[int, tuple[Service, Backend]]:
        return self.state.by_backend_id

    @property
    def publishes(self) -> int:
        return self.publisher.publishes

    def publish(self) -> None:
        """Publish every service (at startup; changes publish themselves)."""
        self.publisher.request(s.id for s in self.services)

    def reconfigure(self, config: Config) -> Snapshot:
        """Apply a reloaded config: unchanged backends keep their state; the
        flows of removed ones stay in conntrack until they end (as a drain).
        Returns what restore() needs to undo it."""
        before = self.state.snapshot()
        # Read before the publish that clears the removed backends' slots:
        # what the kernel carried for them stays in their service's counters.
        self._carry_out(self.state.reconfigure(config, self.kernel_counts()))
        return before

    def restore(self, before: Snapshot) -> None:
        """Back to the pool reconfigure() changed (its tables published again)."""
        self._carry_out(self.state.restore(before, self.kernel_counts()))

    def apply(self, event: Event) -> list[Effect]:
        effects = self.state.apply(event)
        self._carry_out(effects)
        return effects

    def _carry_out(self, effects: list[Effect]) -> None:
        publish: set[int] = set()
        resets: list[ResetFlows] = []
        checks: list[int] = []
        for e in effects:
            if isinstance(e, Publish):
                publish |= e.services
            elif isinstance(e, ResetFlows):
                resets.append(e)
            elif isinstance(e, CheckNow):
                checks.append(e.backend_id)
            elif isinstance(e, Transition):
                self._log(e)
            elif isinstance(e, Ignored):
                log.info("service %s backend %s: %s (ignored)", e.service, e.backend, e.detail)
        if publish or resets:
            self.publisher.request(publish, resets)
        if publish:
            for listener in self.listeners:
                listener()
        # Last: a check may answer at once and feed the next event.
        for backend_id in checks:
            if self.check_now is not None:
                self.check_now(backend_id)

    @staticmethod
    def _log(t: Transition) -> None:
        if t.what == "health":
            # "is DOWN (passive: syn_rst), confirmed by check: ..." -- tests,
            # the demo and the failover benchmark read these lines.
            log.warning("service %s backend %s is %s%s%s", t.service, t.backend, t.new.upper(),
                        f" ({t.detail})" if t.detail else "",
                        f", confirmed by check: {t.confirmed}" if t.confirmed else "")
        elif t.what == "admin":
            log.warning("service %s backend %s admin state %s", t.service, t.backend, t.new)
        else:
            log.warning("service %s backend %s %s %s", t.service, t.backend, t.what, t.new)

    # -- the event sources ----------------------------------------------------
    def report(self, service: Service, backend: Backend, ok: bool, detail: str = "",
               started: float | None = None) -> bool:
        """Apply one active check result; True if the backend changed state."""
        self.health_checks["ok" if ok else "fail"] += 1
        started = time.monotonic() if started is None else started
        return _changed(self.apply(CheckResult(backend.id, ok, detail, started)))

    def passive(self, backend_id: int, kind: str, client: str | None = None) -> bool:
        """A failure the data path saw in live traffic."""
        return _changed(self.apply(PassiveFailure(backend_id, kind, client, time.monotonic())))

    def set_admin(self, service: str, backend: str, admin: str) -> Backend:
        if admin not in ADMIN_STATES:
            raise PoolError(f"admin state must be one of {', '.join(ADMIN_STATES)}")
        _, b = self.state.find(service, backend)
        self.apply(SetAdmin(b.id, Admin(admin)))
        self.operator_changed()
        return b

    def set_weight(self, service: str, backend: str, weight: int) -> Backend:
        _, b = self.state.find(service, backend)
        self.apply(SetWeight(b.id, weight))
        self.operator_changed()
        return b

    def find(self, service: str, backend: str) -> tuple[Service, Backend]:
        return self.state.find(service, backend)


def _changed(effects: list[Effect]) -> bool:
    return any(isinstance(e, Transition) for e in effects)
