"""Pool state: which backends may take new flows, and publishing that to C.

Theory of operation.  A backend's *health* comes from active checks
(debounced by rise/fall) and from passive failures the data path reports
(a SYN answered with RST, a SYN never answered).  Its *admin* state
(enabled/draining/disabled) comes from the operator.  It takes new flows
only when healthy, enabled and weighted; its existing flows stay on it while
it is healthy and not disabled (that is "alive" to the data path, which
moves the movable flows of a backend that is not).  On every change the
whole snapshot is rebuilt and published to C in one atomic swap.

Health transitions (TRANSITIONS below), one row per (state, event):

    state    event               -> next
    up       check ok               up
    up       check fail             down     after `fall` consecutive failures
    up       passive (down)         down
    up       passive (suspect)      suspect
    suspect  check ok               up       one success clears a suspicion
    suspect  check fail             down
    suspect  passive (down)         down
    down     check ok               up       after `rise` consecutive successes
    down     check fail / passive   down

When a backend goes down (or is disabled), a service with
on_backend_down = "reset" has natlb send RSTs for its established TCP
flows, so clients fail fast and reconnect to a live backend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from natlb.config import BackendConfig, Config, ServiceConfig
from natlb.core import MAX_BACKENDS, MAX_SERVICES, BackendEntry, Core, ServiceTable
from natlb.schedulers import Candidate, build_table

log = logging.getLogger("natlb.pool")

UP, SUSPECT, DOWN = "up", "suspect", "down"
ENABLED, DRAINING, DISABLED = "enabled", "draining", "disabled"
ADMIN_STATES = (ENABLED, DRAINING, DISABLED)

OK, FAIL, PASSIVE_DOWN, PASSIVE_SUSPECT = "ok", "fail", "passive-down", "passive-suspect"

# (state, event) -> (next state, counter that must reach its threshold or None)
TRANSITIONS: dict[tuple[str, str], tuple[str, str | None]] = {
    (UP, OK): (UP, None),
    (UP, FAIL): (DOWN, "fall"),
    (UP, PASSIVE_DOWN): (DOWN, None),
    (UP, PASSIVE_SUSPECT): (SUSPECT, None),
    (SUSPECT, OK): (UP, None),
    (SUSPECT, FAIL): (DOWN, None),
    (SUSPECT, PASSIVE_DOWN): (DOWN, None),
    (SUSPECT, PASSIVE_SUSPECT): (SUSPECT, None),
    (DOWN, OK): (UP, "rise"),
    (DOWN, FAIL): (DOWN, None),
    (DOWN, PASSIVE_DOWN): (DOWN, None),
    (DOWN, PASSIVE_SUSPECT): (DOWN, None),
}


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

    @property
    def alive(self) -> bool:
        return self.health == UP and self.admin != DISABLED


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
        self.by_backend_id: dict[int, tuple[Service, Backend]] = {}
        # Ids are counter slots in C; a removed backend's id is never reused,
        # so its lingering flows never count against a newcomer.
        self.next_service_id = 0
        self.next_backend_id = 0
        self.publishes = 0
        self._build(config)

    def _build(self, config: Config) -> None:
        old_services = {s.cfg.name: s for s in self.services}
        old_backends = {(s.cfg.name, b.cfg.key): b for s in self.services for b in s.backends}
        n_sid, n_bid = self.next_service_id, self.next_backend_id
        services = []
        for scfg in config.services:
            prev = old_services.get(scfg.name)
            same = prev and (prev.cfg.vip, prev.cfg.port, prev.cfg.protocol) == (
                scfg.vip, scfg.port, scfg.protocol)
            if prev and same:
                sid = prev.id
            else:
                sid, n_sid = n_sid, n_sid + 1
            backends = []
            for bcfg in scfg.backends:
                b = old_backends.get((scfg.name, bcfg.key)) if same else None
                if b is None:
                    b = Backend(bcfg, n_bid, bcfg.weight)
                    n_bid += 1
                else:  # keeps its health, admin state, id and counters
                    if bcfg.weight != b.cfg.weight:
                        b.weight = bcfg.weight
                    b.cfg = bcfg
                backends.append(b)
            services.append(Service(scfg, sid, backends))
        if n_sid > MAX_SERVICES or n_bid > MAX_BACKENDS:
            raise PoolError(f"ids exhausted ({n_sid} services, {n_bid} backends ever): "
                            f"restart natlb")
        self.services = services
        self.next_service_id, self.next_backend_id = n_sid, n_bid
        self.by_backend_id = {b.id: (s, b) for s in services for b in s.backends}

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config: unchanged backends keep their state; the
        flows of removed ones stay in conntrack until they end (as a drain)."""
        self._build(config)
        self.publish()

    def tables(self) -> list[ServiceTable]:
        out = []
        for s in self.services:
            entries = tuple(BackendEntry(b.cfg.address, b.cfg.port, b.weight, b.id, b.eligible,
                                         b.alive) for b in s.backends)
            cands = [Candidate(b.cfg.key, b.weight, b.eligible) for b in s.backends]
            out.append(ServiceTable(s.cfg.vip, s.cfg.port, s.cfg.protocol, s.cfg.scheduler,
                                    s.id, entries, tuple(build_table(s.cfg.scheduler, cands))))
        return out

    def publish(self) -> None:
        self.core.publish(self.tables())
        self.publishes += 1

    # -- health -------------------------------------------------------------
    def _apply(self, service: Service, backend: Backend, event: str, detail: str) -> bool:
        hc = service.cfg.health
        backend.last_detail = detail
        if event == OK:
            backend.successes += 1
            backend.failures = 0
        elif event == FAIL:
            backend.failures += 1
            backend.successes = 0
        nxt, counter = TRANSITIONS[(backend.health, event)]
        if counter == "fall" and backend.failures < hc.fall:
            nxt = backend.health
        if counter == "rise" and backend.successes < hc.rise:
            nxt = backend.health
        if nxt == backend.health:
            return False
        backend.health = nxt
        backend.last_change = time.time()
        if nxt != UP:
            backend.successes = 0
        self.publish()
        log.warning("service %s backend %s is %s%s", service.cfg.name, backend.cfg.key,
                    nxt.upper(), f" ({detail})" if detail else "")
        if nxt == DOWN:
            self._maybe_reset(service, backend)
        return True

    def report(self, service: Service, backend: Backend, ok: bool, detail: str = "") -> bool:
        """Apply one active check result; True if the backend changed state."""
        return self._apply(service, backend, OK if ok else FAIL, detail)

    def passive(self, backend_id: int, kind: str) -> bool:
        """A failure the data path saw in live traffic."""
        found = self.by_backend_id.get(backend_id)
        if not found:
            return False
        service, backend = found
        policy = service.cfg.failover.passive
        if policy == "ignore" or service.cfg.health.kind == "none":
            # Without active checks nothing could bring it back: only log.
            log.info("service %s backend %s: passive failure %s (ignored)", service.cfg.name,
                     backend.cfg.key, kind)
            return False
        event = PASSIVE_DOWN if policy == "down" else PASSIVE_SUSPECT
        return self._apply(service, backend, event, f"passive: {kind}")

    def _maybe_reset(self, service: Service, backend: Backend) -> None:
        if service.cfg.protocol == "tcp" and service.cfg.failover.on_backend_down == "reset":
            n = self.core.reset_backend(backend.id)
            if n:
                log.warning("service %s backend %s: reset %d established flows",
                            service.cfg.name, backend.cfg.key, n)

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
            if admin == DISABLED:
                self._maybe_reset(svc, b)
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
