"""Pool state: which backends may take new flows, and publishing that to C.

Theory of operation.  A backend's *health* (up/down) comes from checkers
and is debounced by rise/fall; its *admin* state (enabled/draining/
disabled) comes from the operator.  It takes new flows only when both say
so.  Whenever that changes, or a weight changes, the whole snapshot is
rebuilt and published to the data path in one atomic swap; existing flows
are untouched (they live in the C conntrack).

Health transitions, one row per (state, check result):

    state   result  -> next state
    up      ok         up     (failures reset)
    up      fail       down   when `fall` consecutive failures
    down    fail       down   (successes reset)
    down    ok         up     when `rise` consecutive successes
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from natlb.config import BackendConfig, Config, ServiceConfig
from natlb.core import BackendEntry, Core, ServiceTable
from natlb.schedulers import Candidate, build_table

log = logging.getLogger("natlb.pool")

UP, DOWN = "up", "down"
ENABLED, DRAINING, DISABLED = "enabled", "draining", "disabled"
ADMIN_STATES = (ENABLED, DRAINING, DISABLED)


@dataclass
class Backend:
    cfg: BackendConfig
    id: int
    weight: int
    health: str = UP
    admin: str = ENABLED
    successes: int = 0
    failures: int = 0
    last_change: float = field(default_factory=time.time)
    last_detail: str = ""

    @property
    def eligible(self) -> bool:
        return self.health == UP and self.admin == ENABLED and self.weight > 0


@dataclass
class Service:
    cfg: ServiceConfig
    id: int
    backends: list[Backend]


class PoolError(ValueError):
    """An operator request named something that does not exist."""


class Pool:
    def __init__(self, config: Config, core: Core) -> None:
        self.core = core
        self.services: list[Service] = []
        next_id = 0
        for sid, s in enumerate(config.services):
            backends = []
            for b in s.backends:
                backends.append(Backend(b, next_id, b.weight))
                next_id += 1
            self.services.append(Service(s, sid, backends))
        self.publishes = 0

    def tables(self) -> list[ServiceTable]:
        out = []
        for s in self.services:
            entries = tuple(BackendEntry(b.cfg.address, b.cfg.port, b.weight, b.id, b.eligible)
                            for b in s.backends)
            cands = [Candidate(b.cfg.key, b.weight, b.eligible) for b in s.backends]
            out.append(ServiceTable(s.cfg.vip, s.cfg.port, s.cfg.protocol, s.cfg.scheduler,
                                    s.id, entries, tuple(build_table(s.cfg.scheduler, cands))))
        return out

    def publish(self) -> None:
        self.core.publish(self.tables())
        self.publishes += 1

    # -- health -------------------------------------------------------------
    def report(self, service: Service, backend: Backend, ok: bool, detail: str = "") -> bool:
        """Apply one check result; returns True if the backend changed state."""
        hc = service.cfg.health
        backend.last_detail = detail
        if ok:
            backend.successes += 1
            backend.failures = 0
            flip = backend.health == DOWN and backend.successes >= hc.rise
        else:
            backend.failures += 1
            backend.successes = 0
            flip = backend.health == UP and backend.failures >= hc.fall
        if not flip:
            return False
        backend.health = UP if ok else DOWN
        backend.last_change = time.time()
        self.publish()
        log.warning("service %s backend %s is %s%s", service.cfg.name, backend.cfg.key,
                    backend.health.upper(), f" ({detail})" if detail else "")
        return True

    # -- operator -----------------------------------------------------------
    def find(self, service: str, backend: str) -> tuple[Service, Backend]:
        svc = next((s for s in self.services if s.cfg.name == service), None)
        if svc is None:
            raise PoolError(f"no service named {service!r}")
        matches = [b for b in svc.backends
                   if backend in (b.cfg.key, b.cfg.address)]
        if not matches:
            raise PoolError(f"service {service!r} has no backend {backend!r}")
        if len(matches) > 1:
            raise PoolError(f"{backend!r} is ambiguous in {service!r}: give ADDRESS:PORT")
        return svc, matches[0]

    def set_admin(self, service: str, backend: str, admin: str) -> Backend:
        if admin not in ADMIN_STATES:
            raise PoolError(f"admin state must be one of {', '.join(ADMIN_STATES)}")
        svc, b = self.find(service, backend)
        if b.admin != admin:
            b.admin = admin
            b.last_change = time.time()
            self.publish()
            log.warning("service %s backend %s admin state %s", svc.cfg.name, b.cfg.key, admin)
        return b

    def set_weight(self, service: str, backend: str, weight: int) -> Backend:
        if not 0 <= weight <= 65535:
            raise PoolError("weight must be 0..65535")
        svc, b = self.find(service, backend)
        if b.weight != weight:
            b.weight = weight
            self.publish()
            log.warning("service %s backend %s weight %d", svc.cfg.name, b.cfg.key, weight)
        return b
