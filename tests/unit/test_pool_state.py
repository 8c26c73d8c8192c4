"""The pool's state machine, table-driven: every (health, input) pair, the
admin states, thresholds, passive policies and reloads.  Pure Python: no
core, no loop, no clock."""

from dataclasses import replace

import pytest

from natlb.config import parse
from natlb.pool_state import (
    ADMIN_TRAITS,
    DISABLED,
    DOWN,
    DRAINING,
    ENABLED,
    HEALTH_RULES,
    SUSPECT,
    UP,
    Admin,
    CheckNow,
    CheckResult,
    Health,
    Ignored,
    Input,
    PassiveFailure,
    PoolError,
    PoolState,
    Publish,
    ResetFlows,
    SetAdmin,
    SetWeight,
    Transition,
)

SUSPECTED_AT = 100.0


def config(rise=2, fall=1, passive="check", protocol="tcp", check="tcp", backends=3,
           on_down="reset", threshold=0, window_ms=1000, name="web", vip="192.0.2.100"):
    failover = {"passive": passive, "on_backend_down": on_down}
    if threshold:
        failover |= {"passive_threshold": threshold, "passive_window_ms": window_ms}
    return parse({"service": [{
        "name": name, "vip": vip, "port": 80, "protocol": protocol,
        "health": {"kind": check, "rise": rise, "fall": fall} if check != "none"
        else {"kind": "none"},
        "failover": failover,
        "backend": [{"address": f"203.0.113.{10 + i}"} for i in range(backends)],
    }]})


def pool_in(health, **kw):
    """A pool whose first backend is in `health`, suspected at SUSPECTED_AT."""
    pool = PoolState(config(**kw), wall_clock=lambda: 0.0)
    b = pool.services[0].backends[0]
    b.health = Health(health)
    b.suspected_at = SUSPECTED_AT
    b.cause = "passive: syn_rst"
    return pool, b


OK = CheckResult(0, True, "connected", started=SUSPECTED_AT + 1)
STALE_OK = CheckResult(0, True, "connected", started=SUSPECTED_AT - 1)
FAIL = CheckResult(0, False, "refused", started=SUSPECTED_AT + 1)
PASSIVE = PassiveFailure(0, "syn_rst", "198.51.100.2", at=SUSPECTED_AT + 2)


def kinds(effects):
    return {type(e).__name__ for e in effects}


def test_every_health_state_has_a_rule_for_every_input():
    assert set(HEALTH_RULES) == {(h, i) for h in Health for i in Input}


# start, pool options, events, final health, effects of the last event.
# Written out by hand, apart from HEALTH_RULES, so that a wrong rule fails here.
TRANSITIONS = [
    (UP, {}, [OK], UP, set()),
    (UP, {}, [STALE_OK], UP, set()),
    (UP, {"fall": 1}, [FAIL], DOWN, {"Publish", "Transition", "ResetFlows"}),
    (UP, {"fall": 2}, [FAIL], UP, set()),
    (UP, {"fall": 2}, [FAIL, FAIL], DOWN, {"Publish", "Transition", "ResetFlows"}),
    (UP, {"fall": 2}, [FAIL, OK, FAIL], UP, set()),  # the streak must be unbroken
    (UP, {"passive": "check"}, [PASSIVE], SUSPECT, {"Publish", "Transition", "CheckNow"}),
    (UP, {"passive": "suspect"}, [PASSIVE], SUSPECT, {"Publish", "Transition"}),
    (UP, {"passive": "down"}, [PASSIVE], DOWN, {"Publish", "Transition", "ResetFlows"}),
    (UP, {"passive": "ignore"}, [PASSIVE], UP, {"Ignored"}),
    (UP, {"check": "none"}, [PASSIVE], UP, {"Ignored"}),  # nothing could bring it back
    (SUSPECT, {}, [OK], UP, {"Publish", "Transition"}),
    (SUSPECT, {}, [STALE_OK], SUSPECT, {"CheckNow"}),
    (SUSPECT, {"fall": 3}, [FAIL], DOWN, {"Publish", "Transition", "ResetFlows"}),
    (SUSPECT, {"passive": "check"}, [PASSIVE], SUSPECT, {"CheckNow"}),
    (SUSPECT, {"passive": "suspect"}, [PASSIVE], SUSPECT, set()),
    (SUSPECT, {"passive": "down"}, [PASSIVE], DOWN, {"Publish", "Transition", "ResetFlows"}),
    (DOWN, {"rise": 2}, [OK], DOWN, set()),
    (DOWN, {"rise": 2}, [OK, OK], UP, {"Publish", "Transition"}),
    (DOWN, {"rise": 2}, [OK, FAIL, OK], DOWN, set()),
    (DOWN, {"rise": 1}, [STALE_OK], DOWN, set()),
    (DOWN, {}, [FAIL], DOWN, set()),
    (DOWN, {"passive": "check"}, [PASSIVE], DOWN, set()),
    (DOWN, {"passive": "down"}, [PASSIVE], DOWN, set()),
]


@pytest.mark.parametrize("start,opts,events,final,effects", TRANSITIONS,
                         ids=[f"{t[0]}-{'-'.join(type(e).__name__ for e in t[2])}-{t[1]}"
                              for t in TRANSITIONS])
def test_health_transition(start, opts, events, final, effects):
    pool, b = pool_in(start, **opts)
    out = []
    for ev in events:
        out = pool.apply(ev)
    assert b.health == final
    assert kinds(out) == effects
    if "Publish" in effects:
        assert Publish(frozenset({0})) in out
    if "Transition" in effects:
        t = next(e for e in out if isinstance(e, Transition))
        assert (t.service, t.backend, t.what, t.old, t.new) == (
            "web", "203.0.113.10:80", "health", start, final)


def test_suspicion_confirmed_by_a_check_names_both():
    pool, b = pool_in(UP)
    pool.apply(PASSIVE)
    (t,) = [e for e in pool.apply(FAIL) if isinstance(e, Transition)]
    assert (t.new, t.detail, t.confirmed) == ("down", "passive: syn_rst", "refused")


def test_suspicion_is_timed_by_the_passive_event_and_only_a_later_check_clears_it():
    pool, b = pool_in(UP)
    pool.apply(PassiveFailure(0, "syn_timeout", "198.51.100.2", at=50.0))
    assert b.health == SUSPECT and b.suspected_at == 50.0
    assert pool.apply(CheckResult(0, True, started=49.9)) == [CheckNow(0)]
    assert b.health == SUSPECT
    pool.apply(CheckResult(0, True, started=50.1))
    assert b.health == UP


def test_a_transition_restarts_the_streak():
    pool, b = pool_in(UP, rise=2, passive="down")
    pool.apply(OK)
    pool.apply(OK)
    pool.apply(PASSIVE)
    assert b.health == DOWN
    pool.apply(OK)  # the passes before the failure do not count toward rise
    assert b.health == DOWN
    pool.apply(OK)
    assert b.health == UP


@pytest.mark.parametrize("health,admin,eligible,alive", [
    (UP, ENABLED, True, True),
    (UP, DRAINING, False, True),
    (UP, DISABLED, False, False),
    (SUSPECT, ENABLED, False, False),
    (SUSPECT, DRAINING, False, False),
    (DOWN, ENABLED, False, False),
    (DOWN, DRAINING, False, False),
    (DOWN, DISABLED, False, False),
])
def test_what_states_mean_for_traffic(health, admin, eligible, alive):
    pool, b = pool_in(health)
    b.admin = admin
    assert (b.eligible, b.alive) == (eligible, alive)


@pytest.mark.parametrize("start,admin,opts,effects", [
    (ENABLED, DRAINING, {}, {"Publish", "Transition"}),
    (ENABLED, DISABLED, {}, {"Publish", "Transition", "ResetFlows"}),
    (DRAINING, DISABLED, {}, {"Publish", "Transition", "ResetFlows"}),
    (DISABLED, ENABLED, {}, {"Publish", "Transition"}),
    (ENABLED, ENABLED, {}, set()),
    (ENABLED, DISABLED, {"on_down": "keep"}, {"Publish", "Transition"}),
    (ENABLED, DISABLED, {"protocol": "udp", "check": "udp"}, {"Publish", "Transition"}),
])
def test_admin_transition(start, admin, opts, effects):
    pool, b = pool_in(UP, **opts)
    b.admin = start
    out = pool.apply(SetAdmin(0, admin))
    assert b.admin == admin and kinds(out) == effects
    if "ResetFlows" in effects:
        assert ResetFlows("web", "203.0.113.10:80", 0) in out


def test_flows_are_reset_once_when_a_disabled_backend_also_goes_down():
    pool, b = pool_in(UP, fall=1)
    assert "ResetFlows" in kinds(pool.apply(SetAdmin(0, Admin.DISABLED)))
    assert "ResetFlows" not in kinds(pool.apply(FAIL))
    assert b.health == DOWN


def test_a_suspicion_never_resets_flows():
    for policy in ("check", "suspect"):
        pool, b = pool_in(UP, passive=policy)
        assert "ResetFlows" not in kinds(pool.apply(PASSIVE))
    assert not ADMIN_TRAITS[DRAINING].condemned


def test_weight():
    pool, b = pool_in(UP)
    assert kinds(pool.apply(SetWeight(0, 0))) == {"Publish", "Transition"}
    assert not b.eligible and b.alive
    assert pool.apply(SetWeight(0, 0)) == []
    with pytest.raises(PoolError, match="0..65535"):
        pool.apply(SetWeight(0, 70000))


def passive_from(client, at):
    return PassiveFailure(0, "syn_timeout", client, at)


def test_failures_from_distinct_clients_within_the_window_condemn():
    pool, b = pool_in(UP, threshold=3, window_ms=1000)
    for at in (1.0, 1.1, 1.2, 1.3):  # one client, however often, is one client
        pool.apply(passive_from("198.51.100.2", at))
    assert b.health == SUSPECT
    pool.apply(passive_from("198.51.100.3", 1.4))
    out = pool.apply(passive_from("198.51.100.4", 1.5))
    assert b.health == DOWN and "ResetFlows" in kinds(out)
    t = next(e for e in out if isinstance(e, Transition))
    assert "from 3 clients within 1000 ms" in t.detail


def test_failures_older_than_the_window_are_forgotten():
    pool, b = pool_in(UP, threshold=3, window_ms=1000)
    pool.apply(passive_from("198.51.100.2", 1.0))
    pool.apply(passive_from("198.51.100.3", 1.5))
    pool.apply(passive_from("198.51.100.4", 2.1))  # the first is 1.1 s old by now
    assert b.health == SUSPECT
    assert set(b.passive_clients) == {"198.51.100.3", "198.51.100.4"}


def test_events_for_removed_backends_are_dropped():
    pool, _ = pool_in(UP)
    assert pool.apply(CheckResult(999, False)) == []


def test_reconfigure_keeps_state_and_never_reuses_ids():
    pool = PoolState(config(backends=3))
    b0, b1, b2 = pool.services[0].backends
    b1.health = DOWN
    b1.admin = DRAINING
    out = pool.reconfigure(config(backends=2))
    assert out == [Publish(frozenset({0}))]
    assert pool.services[0].backends == [b0, b1] and b1.health == DOWN
    pool.reconfigure(config(backends=4))
    assert [b.id for b in pool.services[0].backends] == [0, 1, 3, 4]
    pool.reconfigure(config(backends=4, vip="192.0.2.101"))  # another service now
    assert pool.services[0].id == 1 and pool.services[0].backends[0].health == UP


def test_removed_backends_are_retired_until_their_flows_end():
    pool = PoolState(config(backends=3))
    pool.reconfigure(config(backends=2))
    assert [(s.id, [b.id for b in s.backends]) for s in pool.retired] == [(0, [2])]
    # Added again, it is a new backend: the retired one keeps its id and flows.
    pool.reconfigure(config(backends=3))
    assert [b.id for b in pool.services[0].backends] == [0, 1, 3]
    # A service removed (here: moved to another VIP) retires all its backends.
    pool.reconfigure(config(backends=1, vip="192.0.2.101"))
    assert [(s.id, s.cfg.vip, [b.id for b in s.backends]) for s in pool.retired] == [
        (0, "192.0.2.100", [0, 1, 3]), (0, "192.0.2.100", [2])]
    flows = {0: 1, 1: 0, 2: 0, 3: 0}
    assert pool.prune_retired(flows.__getitem__)
    assert [[b.id for b in s.backends] for s in pool.retired] == [[0]]  # with flows
    assert not pool.prune_retired(flows.__getitem__)
    flows[0] = 0
    assert pool.prune_retired(flows.__getitem__) and pool.retired == []


def test_reconfigure_refuses_when_ids_run_out_and_changes_nothing():
    pool = PoolState(config(backends=3))
    before = [(s.id, [b.id for b in s.backends]) for s in pool.services]
    pool.next_backend_id = pool.max_ids[1] - 1
    with pytest.raises(PoolError, match="ids exhausted"):
        pool.reconfigure(config(backends=3, vip="192.0.2.101"))
    assert [(s.id, [b.id for b in s.backends]) for s in pool.services] == before


def test_restore_undoes_a_reload_but_never_gives_ids_back():
    pool = PoolState(config(backends=3))
    b0, b1, b2 = pool.services[0].backends
    b1.weight = 7                           # `natlb backend weight`, kept
    pool.reconfigure(config(backends=3))    # a retired backend from before: none
    snap = pool.snapshot()
    c = config(backends=2)
    s0 = c.services[0]  # the refused config changes a weight too
    c = replace(c, services=type(c.services)([replace(s0, backends=type(s0.backends)(
        [replace(s0.backends[0], weight=5), s0.backends[1]]))]))
    pool.reconfigure(c, {2: (4, 400, 4, 400)})
    assert (pool.retired[0].backends, b0.weight) == ([b2], 5)
    assert pool.services[0].departed == (4, 400, 4, 400)
    assert pool.restore(snap) == [Publish(frozenset({0}))]
    assert pool.services[0].backends == [b0, b1, b2] and pool.retired == []
    assert (b0.weight, b1.weight, b0.cfg.weight) == (1, 7, 1)
    assert pool.by_backend_id[2] == (pool.services[0], b2)
    # b2 is back and its kernel counters were never cleared: they count it
    # again, so the refused reload's departed share must not stay as well.
    assert pool.services[0].departed == (0, 0, 0, 0)
    pool.reconfigure(config(backends=4))
    assert [b.id for b in pool.services[0].backends] == [0, 1, 2, 3]


def kernel_share(pool, kernel):
    """A service's counters as status reads them (status.read_counters):
    its backends' kernel counts plus what departed backends carried."""
    return {s.id: tuple(sum(v) for v in zip(s.departed, *(kernel.get(b.id, (0, 0, 0, 0))
                                                          for b in s.backends), strict=True))
            for s in pool.services}


def test_a_refused_reload_never_moves_the_service_counters():
    # The kernel's counters are per backend id and never cleared (a slot's
    # clearing leaves them): a restored backend counts its own again, and a
    # backend only the refused config had keeps its share in departed.
    pool = PoolState(config(backends=3))
    kernel = {0: (1, 100, 1, 100), 2: (4, 400, 4, 400)}
    before = kernel_share(pool, kernel)
    snap = pool.snapshot()
    pool.reconfigure(config(backends=2), kernel)          # b2 leaves
    assert kernel_share(pool, kernel) == before
    pool.restore(snap, kernel)
    assert kernel_share(pool, kernel) == before
    # A refused config that adds a backend the kernel carried for meanwhile.
    snap = pool.snapshot()
    pool.reconfigure(config(backends=4), kernel)
    kernel[3] = (2, 200, 2, 200)
    during = kernel_share(pool, kernel)
    pool.restore(snap, kernel)
    assert kernel_share(pool, kernel) == during


def test_find():
    pool, _ = pool_in(UP)
    assert pool.find("web", "203.0.113.11")[1].id == 1
    with pytest.raises(PoolError, match="no service"):
        pool.find("mail", "203.0.113.11")
    with pytest.raises(PoolError, match="has no backend"):
        pool.find("web", "203.0.113.99")


def test_find_ipv6_backend_by_any_spelling():
    pool = PoolState(parse({"service": [{
        "name": "web6", "vip": "2001:db8::100", "port": 80,
        "backend": [{"address": "2001:db8:113:1::2"}, {"address": "2001:db8:113:1::2",
                                                       "port": 8080}]}]}))
    for spelling in ("[2001:db8:113:1::2]:8080", "[2001:DB8:113:1:0::2]:8080"):
        assert pool.find("web6", spelling)[1].cfg.port == 8080
    with pytest.raises(PoolError, match=r"ambiguous.*\[ADDRESS\]:PORT for IPv6"):
        pool.find("web6", "2001:db8:113:1::2")
    with pytest.raises(PoolError, match="has no backend"):
        pool.find("web6", "[2001:db8:113:1::2]:81")


def test_ignored_policy_says_why():
    pool, _ = pool_in(UP, passive="ignore")
    assert pool.apply(PASSIVE) == [Ignored("web", "203.0.113.10:80", "passive: syn_rst")]
