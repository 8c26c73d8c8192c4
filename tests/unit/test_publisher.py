"""The publisher: tables cached per service, builds and resets off the
event loop, published state that only moves forward."""

import asyncio
import threading

import pytest
from scapy.layers.inet import IP, TCP

import natlb.publisher
from natlb.config import parse
from natlb.core import Core, CoreConfig, Verdict
from natlb.pool import Pool
from natlb.pool_state import CheckResult, SetAdmin


def config(services=3, backends=4, scheduler="maglev"):
    return parse({"service": [{
        "name": f"s{i}", "vip": "192.0.2.100", "port": 80 + i, "scheduler": scheduler,
        "health": {"kind": "tcp", "fall": 1, "rise": 1},
        "backend": [{"address": f"203.0.113.{10 + j}"} for j in range(backends)],
    } for i in range(services)]})


@pytest.fixture
def core():
    c = Core(CoreConfig(max_flows=1024, workers=1))
    yield c
    c.close()


def test_a_flap_rebuilds_only_its_service(core):
    pool = Pool(config(services=3), core)
    pool.publish()
    assert pool.publisher.builds == 3
    victim = pool.services[1].backends[2]
    pool.report(pool.services[1], victim, False, "refused")
    assert pool.publisher.builds == 4 and pool.publishes == 2
    # Only the data path's flags changed (drained: same table, new snapshot).
    pool.set_admin("s0", "203.0.113.10", "draining")
    assert pool.publisher.builds == 5 and pool.publishes == 3
    pool.set_admin("s0", "203.0.113.10", "enabled")
    assert pool.publisher.builds == 6  # back to a table seen before: rebuilt once more


def new_flow_backend(core, sport, now):
    syn = IP(src="198.51.100.2", dst="192.0.2.100") / TCP(sport=sport, dport=80, flags="S")
    v, out = core.process(bytes(syn), now)
    assert v == Verdict.REWRITE
    return IP(out).dst


def test_published_tables_steer_new_flows(core):
    pool = Pool(config(services=1, backends=3, scheduler="rr"), core)
    pool.publish()
    pool.report(pool.services[0], pool.services[0].backends[1], False, "refused")
    seen = {new_flow_backend(core, 40000 + i, 1000 + i) for i in range(12)}
    assert seen == {"203.0.113.10", "203.0.113.12"}


def test_off_loop_builds_keep_the_loop_running_and_only_move_forward(core, monkeypatch):
    pool = Pool(config(services=2, backends=3, scheduler="wrr"), core)
    pool.publish()
    published = []
    real_publish = core.publish

    def recording_publish(tables):
        published.append(tuple(e.eligible for t in tables for e in t.backends))
        real_publish(tables)

    monkeypatch.setattr(core, "publish", recording_publish)
    building = threading.Event()
    loop_ran = threading.Event()
    real_build = natlb.publisher.build_table

    def slow_build(scheduler, cands):
        building.set()
        # Only a loop that keeps running while we build can set this.
        assert loop_ran.wait(5), "the event loop was blocked by a table build"
        return real_build(scheduler, cands)

    monkeypatch.setattr(natlb.publisher, "build_table", slow_build)
    states = []

    async def flap():
        pool.publisher.start(asyncio.get_running_loop())
        svc = pool.services[0]
        for i in range(20):
            pool.report(svc, svc.backends[0], i % 2 == 1, "flap")
            states.append(tuple(b.eligible for s in pool.services for b in s.backends))
            await asyncio.sleep(0)
            if building.is_set():
                loop_ran.set()
        loop_ran.set()
        await pool.publisher.close()

    asyncio.run(flap())
    assert published[-1] == states[-1]
    assert len(published) < len(states)  # bursts coalesce
    # Every publish is a state the pool was in, in the order it was in them.
    pos = 0
    for p in published:
        pos = states.index(p, pos)


def test_resets_follow_the_publish_that_took_the_backend_out(core, monkeypatch):
    pool = Pool(config(services=1, backends=3, scheduler="rr"), core)
    pool.publish()
    calls = []
    real_publish, real_reset = core.publish, core.reset_backend

    def publish(tables):
        calls.append(("publish", tables[0].backends[1].alive))
        real_publish(tables)

    def reset(backend_id):
        calls.append(("reset", backend_id))
        return real_reset(backend_id)

    monkeypatch.setattr(core, "publish", publish)
    monkeypatch.setattr(core, "reset_backend", reset)

    async def run():
        pool.publisher.start(asyncio.get_running_loop())
        pool.apply(SetAdmin(1, "disabled"))
        pool.apply(CheckResult(1, False, "refused", 0.0))  # already condemned: no 2nd reset
        await pool.publisher.close()

    asyncio.run(run())
    assert calls[0] == ("publish", False) and calls[1] == ("reset", 1)
    assert [c for c in calls if c[0] == "reset"] == [("reset", 1)]
