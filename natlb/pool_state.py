"""The backend pool as a pure state machine: events in, effects out.

Theory of operation.  Each backend has two independent states:

* *health* (UP, SUSPECT, DOWN), moved by active check results and by the
  passive failures the data path sees in live traffic;
* *admin* (ENABLED, DRAINING, DISABLED), moved by the operator.

What a state means for traffic is data (HEALTH_TRAITS, ADMIN_TRAITS): a
backend takes new flows only when both states allow it and its weight is
above 0; its flows stay on it ("alive" to the data path, which moves the
movable flows of a backend that is not) only when both allow that; and its
established TCP flows are reset, if the service asks for it, when either
state condemns it.

Health moves by HEALTH_RULES, one row per (state, input): the next state,
the threshold a streak of identical check results must reach first (rise or
fall, resolved per service to a number), and whether to check again at
once.  The inputs:

    CHECK_OK / CHECK_FAIL   an active check's verdict
    CHECK_OK_STALE          a pass from a check that started before the
                            current suspicion: it cannot clear it
    SUSPECTED / CONDEMNED   a passive failure, as the service's policy reads it

One passive signal (an RST or silence answering a SYN, an ICMP
unreachable) is weak evidence: a client can forge all three.  So by
default (passive = "check") it makes the backend SUSPECT, which takes it
out of new-flow selection but resets nothing, and asks for an active check
at once; the check decides (PASSIVE_POLICIES).  Optionally, failures from
`passive_threshold` distinct clients within `passive_window_ms` condemn
the backend without waiting for the check.

PoolState.apply(event) changes the state and returns the effects: publish
these services' tables, reset this backend's flows, check this backend
now, and the transitions to log.  It never touches the core, a socket or a
clock of its own; callers stamp events with time.monotonic() and
natlb.pool carries the effects out.  Reloads (reconfigure) keep each
surviving backend's state and allocate ids that are never reused.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

from natlb.config import BackendConfig, Config, ServiceConfig, host_port


class Health(enum.StrEnum):
    UP = "up"
    SUSPECT = "suspect"
    DOWN = "down"


class Admin(enum.StrEnum):
    ENABLED = "enabled"
    DRAINING = "draining"
    DISABLED = "disabled"


UP, SUSPECT, DOWN = Health.UP, Health.SUSPECT, Health.DOWN
ENABLED, DRAINING, DISABLED = Admin.ENABLED, Admin.DRAINING, Admin.DISABLED
ADMIN_STATES = tuple(a.value for a in Admin)


@dataclass(frozen=True)
class Traits:
    new_flows: bool      # may be chosen for new flows
    keeps_flows: bool    # its flows stay on it ("alive" in the data path)
    condemned: bool      # its established TCP flows are reset (per policy)


HEALTH_TRAITS = {
    UP: Traits(new_flows=True, keeps_flows=True, condemned=False),
    # Out of selection, but a suspicion alone never cuts a connection.
    SUSPECT: Traits(new_flows=False, keeps_flows=False, condemned=False),
    DOWN: Traits(new_flows=False, keeps_flows=False, condemned=True),
}
ADMIN_TRAITS = {
    ENABLED: Traits(new_flows=True, keeps_flows=True, condemned=False),
    DRAINING: Traits(new_flows=False, keeps_flows=True, condemned=False),
    DISABLED: Traits(new_flows=False, keeps_flows=False, condemned=True),
}


class Input(enum.Enum):
    CHECK_OK = "check ok"
    CHECK_OK_STALE = "check ok, started before the suspicion"
    CHECK_FAIL = "check fail"
    SUSPECTED = "passive: suspect"
    CONDEMNED = "passive: down"


class Threshold(enum.Enum):
    """Which of the service's thresholds a streak must reach."""

    ONE = "one"
    RISE = "rise"
    FALL = "fall"


@dataclass(frozen=True)
class Rule:
    next: Health
    after: Threshold = Threshold.ONE
    recheck: bool = False


HEALTH_RULES: dict[tuple[Health, Input], Rule] = {
    (UP, Input.CHECK_OK): Rule(UP),
    (UP, Input.CHECK_OK_STALE): Rule(UP),
    (UP, Input.CHECK_FAIL): Rule(DOWN, Threshold.FALL),
    (UP, Input.SUSPECTED): Rule(SUSPECT),
    (UP, Input.CONDEMNED): Rule(DOWN),
    # One pass from a check started after the suspicion clears it; one
    # failure confirms it (the suspicion was the first strike).
    (SUSPECT, Input.CHECK_OK): Rule(UP),
    (SUSPECT, Input.CHECK_OK_STALE): Rule(SUSPECT, recheck=True),
    (SUSPECT, Input.CHECK_FAIL): Rule(DOWN),
    (SUSPECT, Input.SUSPECTED): Rule(SUSPECT),
    (SUSPECT, Input.CONDEMNED): Rule(DOWN),
    (DOWN, Input.CHECK_OK): Rule(UP, Threshold.RISE),
    (DOWN, Input.CHECK_OK_STALE): Rule(DOWN),
    (DOWN, Input.CHECK_FAIL): Rule(DOWN),
    (DOWN, Input.SUSPECTED): Rule(DOWN),
    (DOWN, Input.CONDEMNED): Rule(DOWN),
}


@dataclass(frozen=True)
class PassivePolicy:
    input: Input | None  # what one passive failure feeds the machine (None: nothing)
    check_now: bool      # ask for an active check at once


PASSIVE_POLICIES = {
    "check": PassivePolicy(Input.SUSPECTED, check_now=True),
    "suspect": PassivePolicy(Input.SUSPECTED, check_now=False),
    "down": PassivePolicy(Input.CONDEMNED, check_now=False),
    "ignore": PassivePolicy(None, check_now=False),
}


@cache
def service_rules(rise: int, fall: int) -> dict[tuple[Health, Input], tuple[Rule, int]]:
    """HEALTH_RULES with the thresholds resolved to the streak each needs."""
    need = {Threshold.ONE: 1, Threshold.RISE: rise, Threshold.FALL: fall}
    return {k: (r, need[r.after]) for k, r in HEALTH_RULES.items()}


# -- events -------------------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    backend_id: int
    ok: bool
    detail: str = ""
    started: float = 0.0     # monotonic time the check began


@dataclass(frozen=True)
class PassiveFailure:
    backend_id: int
    kind: str                # syn_rst | syn_timeout | icmp_unreachable
    client: str | None = None
    at: float = 0.0          # monotonic time it was read


@dataclass(frozen=True)
class SetAdmin:
    backend_id: int
    admin: Admin


@dataclass(frozen=True)
class SetWeight:
    backend_id: int
    weight: int


Event = CheckResult | PassiveFailure | SetAdmin | SetWeight


# -- effects ------------------------------------------------------------------

@dataclass(frozen=True)
class Publish:
    """Rebuild these services' tables and publish the whole snapshot."""

    services: frozenset[int]


@dataclass(frozen=True)
class ResetFlows:
    """RST the established TCP flows of a backend (after the publish)."""

    service: str
    backend: str
    backend_id: int


@dataclass(frozen=True)
class CheckNow:
    backend_id: int


@dataclass(frozen=True)
class Transition:
    """For the log: `what` (health, admin or weight) went from old to new,
    because of `detail`, confirmed by the check that said `confirmed`."""

    service: str
    backend: str
    what: str
    old: str
    new: str
    detail: str = ""
    confirmed: str = ""


@dataclass(frozen=True)
class Ignored:
    service: str
    backend: str
    detail: str


Effect = Publish | ResetFlows | CheckNow | Transition | Ignored


# -- state --------------------------------------------------------------------

@dataclass
class Backend:
    cfg: BackendConfig
    id: int
    weight: int
    health: Health = UP
    admin: Admin = ENABLED
    streak: int = 0                  # identical check results in a row
    streak_ok: bool = True           # ... and which result
    suspected_at: float = float("-inf")
    cause: str = ""                  # the passive failure behind a suspicion
    passive_clients: dict[str, float] = field(default_factory=dict)
    passive_failures: int = 0
    last_change: float = field(default_factory=time.time)
    last_detail: str = ""

    @property
    def eligible(self) -> bool:
        return (HEALTH_TRAITS[self.health].new_flows and ADMIN_TRAITS[self.admin].new_flows
                and self.weight > 0)

    @property
    def alive(self) -> bool:
        return HEALTH_TRAITS[self.health].keeps_flows and ADMIN_TRAITS[self.admin].keeps_flows

    @property
    def condemned(self) -> bool:
        return HEALTH_TRAITS[self.health].condemned or ADMIN_TRAITS[self.admin].condemned


@dataclass
class Service:
    cfg: ServiceConfig
    id: int
    backends: list[Backend]
    # What the kernel's fast path carried for backends a reload took out of
    # this service (packets in, bytes in, packets out, bytes out): its
    # counters add it, so that they never go back.  On the Service, not
    # beside it, so a reader sees the backends and it swapped together.
    departed: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class Snapshot:
    """What a reload changes in a PoolState, to put back if the host refuses
    the new config's rules (PoolState.restore)."""

    services: list[Service]
    retired: list[tuple[Service, list[Backend]]]
    by_backend_id: dict[int, tuple[Service, Backend]]
    backends: list[tuple[Backend, int, BackendConfig]]   # weight and cfg a reload rewrites


class PoolError(ValueError):
    """An operator request named something that does not exist, or a reload
    cannot be applied."""


class PoolState:
    def __init__(self, config: Config, wall_clock: Callable[[], float] = time.time) -> None:
        self.services: list[Service] = []
        self.by_backend_id: dict[int, tuple[Service, Backend]] = {}
        # Ids are counter slots in C; a removed backend's id is never reused,
        # so its lingering flows never count against a newcomer.
        self.next_service_id = 0
        self.next_backend_id = 0
        # The C core's bounds, fixed when it was made ([lb] changes need a restart).
        self.max_ids = (config.lb.max_services, config.lb.max_backends)
        # Removed by a reload, grouped under the service they belonged to:
        # their flows go on (as with a drain), so the ruleset keeps rewriting
        # for them until prune_retired sees none left.
        self.retired: list[Service] = []
        self.wall_clock = wall_clock
        self.reconfigure(config)

    # -- reloads --------------------------------------------------------------
    def reconfigure(self, config: Config,
                    kernel: Mapping[int, tuple[int, int, int, int]] | None = None,
                    ) -> list[Effect]:
        """Adopt a (re)loaded config: a backend that stays (same service
        name, VIP, port, protocol and backend address:port) keeps its state
        and id.  Nothing changes if ids would run out.  kernel: what the
        fast path carried per backend id, kept in Service.departed for the
        backends that leave a service that stays."""
        old_services = {s.cfg.name: s for s in self.services}
        old_backends = {(s.cfg.name, b.cfg.key): b for s in self.services for b in s.backends}
        n_sid, n_bid = self.next_service_id, self.next_backend_id
        services = []
        for scfg in config.services:
            prev = old_services.get(scfg.name)
            same = prev is not None and (prev.cfg.vip, prev.cfg.port, prev.cfg.protocol) == (
                scfg.vip, scfg.port, scfg.protocol)
            if prev is not None and same:
                sid = prev.id
            else:
                sid, n_sid = n_sid, n_sid + 1
            backends = []
            for bcfg in scfg.backends:
                b = old_backends.get((scfg.name, bcfg.key)) if same else None
                if b is None:
                    b = Backend(bcfg, n_bid, bcfg.weight, last_change=self.wall_clock())
                    n_bid += 1
                backends.append(b)
            services.append((scfg, sid, backends, prev if same else None))
        if n_sid > self.max_ids[0] or n_bid > self.max_ids[1]:
            raise PoolError(f"ids exhausted ({n_sid} services, {n_bid} backends ever): "
                            f"restart natlb")
        kept = {b.id for _, _, backends, _ in services for b in backends}
        retired = [Service(s.cfg, s.id, [b for b in s.backends if b.id not in kept])
                   for s in self.services + self.retired]
        self.retired = [s for s in retired if s.backends]
        # Built whole, then swapped in: scrapes read self.services from
        # their own thread.
        swapped = []
        for scfg, sid, backends, prev in services:
            for b, bcfg in zip(backends, scfg.backends, strict=True):
                if b.cfg.weight != bcfg.weight:  # a config change overrides `natlb backend weight`
                    b.weight = bcfg.weight
                b.cfg = bcfg
            departed = prev.departed if prev else (0, 0, 0, 0)
            for b in prev.backends if prev and kernel else ():
                k = kernel.get(b.id) if kernel and b.id not in kept else None
                if k:
                    departed = (departed[0] + k[0], departed[1] + k[1], departed[2] + k[2],
                                departed[3] + k[3])
            swapped.append(Service(scfg, sid, backends, departed))
        self.services = swapped
        self.next_service_id, self.next_backend_id = n_sid, n_bid
        self.by_backend_id = {b.id: (s, b) for s in self.services for b in s.backends}
        return [Publish(frozenset(s.id for s in self.services))]

    def snapshot(self) -> Snapshot:
        return Snapshot(list(self.services), [(s, list(s.backends)) for s in self.retired],
                        self.by_backend_id,
                        [(b, b.weight, b.cfg) for s in self.services for b in s.backends])

    def restore(self, snap: Snapshot,
                kernel: Mapping[int, tuple[int, int, int, int]] | None = None,
                ) -> list[Effect]:
        """Undo the reloads since `snap` was taken.  The id counters stay
        where they are: the refused config's tables may have placed a flow
        on an id of its own, which must never count against a newcomer.
        kernel: what the fast path carried per backend id, as reconfigure."""
        for b, weight, cfg in snap.backends:
            b.weight, b.cfg = weight, cfg
        for s, backends in snap.retired:
            s.backends = backends
        # The kernel's counters are per backend id, never cleared: a backend
        # the refused config removed is back and counts its own again, so
        # each service keeps its departed as it was, plus the share of the
        # backends only the refused config had (its counters never go back).
        refused = {s.id: s for s in self.services}
        for s in snap.services:
            r = refused.get(s.id)
            if r is None or not kernel:
                continue
            back = {b.id for b in s.backends}
            for b in r.backends:
                k = kernel.get(b.id) if b.id not in back else None
                if k:
                    s.departed = (s.departed[0] + k[0], s.departed[1] + k[1],
                                  s.departed[2] + k[2], s.departed[3] + k[3])
        self.retired = [s for s, _ in snap.retired]
        self.services = snap.services
        self.by_backend_id = snap.by_backend_id
        return [Publish(frozenset(s.id for s in self.services))]

    def prune_retired(self, flows: Callable[[int], int]) -> bool:
        """Forget retired backends without flows (flows(id): active and
        inactive ones in C); whether any went, i.e. the ruleset changes."""
        before = sum(len(s.backends) for s in self.retired)
        for s in self.retired:
            s.backends = [b for b in s.backends if flows(b.id) > 0]
        self.retired = [s for s in self.retired if s.backends]
        return sum(len(s.backends) for s in self.retired) != before

    # -- lookups --------------------------------------------------------------
    def find(self, service: str, backend: str) -> tuple[Service, Backend]:
        svc = next((s for s in self.services if s.cfg.name == service), None)
        if svc is None:
            raise PoolError(f"no service named {service!r}")
        wanted = _canonical_backend(backend)
        matches = [b for b in svc.backends if wanted in (b.cfg.key, b.cfg.address)]
        if not matches:
            raise PoolError(f"service {service!r} has no backend {backend!r}")
        if len(matches) > 1:
            raise PoolError(f"{backend!r} is ambiguous in {service!r}: give ADDRESS:PORT "
                            "([ADDRESS]:PORT for IPv6)")
        return svc, matches[0]

    # -- events ---------------------------------------------------------------
    def apply(self, event: Event) -> list[Effect]:
        found = self.by_backend_id.get(event.backend_id)
        if found is None:  # removed by a reload while the event was on its way
            return []
        svc, b = found
        if isinstance(event, CheckResult):
            return self._check(svc, b, event)
        if isinstance(event, PassiveFailure):
            return self._passive(svc, b, event)
        if isinstance(event, SetAdmin):
            return self._admin(svc, b, Admin(event.admin))
        return self._weight(svc, b, event.weight)

    def _check(self, svc: Service, b: Backend, ev: CheckResult) -> list[Effect]:
        b.last_detail = ev.detail
        if ev.ok and ev.started < b.suspected_at:
            inp = Input.CHECK_OK_STALE
        else:
            inp = Input.CHECK_OK if ev.ok else Input.CHECK_FAIL
            b.streak = b.streak + 1 if b.streak_ok == ev.ok else 1
            b.streak_ok = ev.ok
        if b.health == SUSPECT and inp == Input.CHECK_FAIL:
            return self._feed(svc, b, inp, b.cause, ev.started, confirmed=ev.detail)
        return self._feed(svc, b, inp, ev.detail, ev.started)

    def _passive(self, svc: Service, b: Backend, ev: PassiveFailure) -> list[Effect]:
        b.passive_failures += 1
        fo = svc.cfg.failover
        policy = PASSIVE_POLICIES[fo.passive]
        detail = f"passive: {ev.kind}"
        if policy.input is None or svc.cfg.health.kind == "none":
            # Without active checks nothing could bring it back: only note it.
            return [Ignored(svc.cfg.name, b.cfg.key, detail)]
        inp = policy.input
        if fo.passive_threshold:
            window = fo.passive_window_ms / 1000
            seen = b.passive_clients
            for client, at in list(seen.items()):
                if at <= ev.at - window:
                    del seen[client]
            seen[ev.client or "unknown"] = ev.at
            if len(seen) >= fo.passive_threshold:
                inp = Input.CONDEMNED
                detail += f" from {len(seen)} clients within {fo.passive_window_ms} ms"
                seen.clear()
        effects = self._feed(svc, b, inp, detail, ev.at)
        if policy.check_now and b.health == SUSPECT:
            effects.append(CheckNow(b.id))
        return effects

    def _feed(self, svc: Service, b: Backend, inp: Input, detail: str, at: float,
              confirmed: str = "") -> list[Effect]:
        hc = svc.cfg.health
        rule, need = service_rules(hc.rise, hc.fall)[(b.health, inp)]
        effects: list[Effect] = [CheckNow(b.id)] if rule.recheck else []
        if rule.next == b.health or (need > 1 and b.streak < need):
            return effects
        if rule.next == SUSPECT:
            b.suspected_at = at
            b.cause = detail
        return effects + self._move(svc, b, "health", rule.next, detail, confirmed)

    def _admin(self, svc: Service, b: Backend, admin: Admin) -> list[Effect]:
        return [] if admin == b.admin else self._move(svc, b, "admin", admin, "")

    def _weight(self, svc: Service, b: Backend, weight: int) -> list[Effect]:
        if not 0 <= weight <= 65535:
            raise PoolError("weight must be 0..65535")
        if weight == b.weight:
            return []
        old, b.weight = b.weight, weight
        return [Publish(frozenset({svc.id})),
                Transition(svc.cfg.name, b.cfg.key, "weight", str(old), str(weight))]

    def _move(self, svc: Service, b: Backend, what: str, new: Health | Admin,
              detail: str, confirmed: str = "") -> list[Effect]:
        was_condemned = b.condemned
        old = getattr(b, what)
        setattr(b, what, new)
        b.last_change = self.wall_clock()
        if what == "health":
            b.streak = 0  # a new state counts its own streak
        effects: list[Effect] = [
            Publish(frozenset({svc.id})),
            Transition(svc.cfg.name, b.cfg.key, what, str(old), str(new), detail, confirmed)]
        if (b.condemned and not was_condemned and svc.cfg.protocol == "tcp"
                and svc.cfg.failover.on_backend_down == "reset"):
            effects.append(ResetFlows(svc.cfg.name, b.cfg.key, b.id))
        return effects


def _canonical_backend(text: str) -> str:
    """ADDRESS, ADDRESS:PORT or [IPV6]:PORT as the config writes it
    (2001:DB8::0:2 is 2001:db8::2); anything else as it is (no match)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    host, sep, port = text.rpartition(":")
    try:
        return host_port(str(ipaddress.ip_address(host.strip("[]"))), int(port)) if sep else text
    except ValueError:
        return text
