"""The health monitor with misbehaving checkers: whatever a checker does, a
check ends, counts once, and the backend is checked again."""

import asyncio
import logging

import pytest

import natlb.health
from natlb.checkers import TaskChecker
from natlb.config import TcpCheck, parse
from natlb.core import Core, CoreConfig
from natlb.health import Monitor
from natlb.pool import Pool


@pytest.fixture
def pool():
    core = Core(CoreConfig(max_flows=1024, workers=1))
    cfg = parse({"service": [{
        "name": "web", "vip": "192.0.2.100", "port": 80,
        "health": {"kind": "tcp", "interval_ms": 20, "timeout_ms": 50, "fall": 100},
        "backend": [{"address": "203.0.113.10"}],
    }]})
    p = Pool(cfg, core)
    p.publish()
    yield p
    core.close()


def run_monitor(pool, checker_factory, until, limit_s=10.0):
    """Run the monitor with one checker until `until(monitor)` holds."""
    async def run():
        monitor = Monitor(pool, {TcpCheck: checker_factory})
        monitor.start()
        deadline = asyncio.get_running_loop().time() + limit_s
        while not until(monitor) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await monitor.stop()
        return monitor

    return asyncio.run(run())


def test_a_checker_that_raises_counts_as_failure_logged_once(pool, caplog):
    async def broken(address, port, hc):
        raise ValueError("checker bug")

    caplog.set_level(logging.ERROR, "natlb.health")
    monitor = run_monitor(pool, lambda loop: TaskChecker(loop, broken),
                          lambda m: m.completed >= 4)
    assert monitor.completed >= 4  # not stuck "in flight": checked again each interval
    b = pool.services[0].backends[0]
    assert b.last_detail == "checker error: ValueError: checker bug"
    errors = [r for r in caplog.records if "raised" in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info[0] is ValueError


def test_a_checker_whose_start_raises_is_checked_again(pool, caplog):
    class Exploding:
        def start(self, address, port, hc, done):
            raise RuntimeError("no start")

        def close(self):
            pass

    caplog.set_level(logging.ERROR, "natlb.health")
    monitor = run_monitor(pool, lambda loop: Exploding(), lambda m: m.completed >= 3)
    assert monitor.completed >= 3
    assert len([r for r in caplog.records if "raised" in r.getMessage()]) == 1


def test_a_check_that_never_ends_is_written_off(pool, monkeypatch):
    monkeypatch.setattr(natlb.health, "GRACE_S", 0.05)
    starts = []

    class Silent:
        def start(self, address, port, hc, done):
            starts.append(done)

        def close(self):
            pass

    monitor = run_monitor(pool, lambda loop: Silent(), lambda m: m.completed >= 2)
    assert monitor.completed >= 2 and len(starts) >= 2
    assert pool.services[0].backends[0].last_detail == "check did not finish"
    before = monitor.completed
    starts[0](True, "late")  # a verdict after the write-off is not counted again
    assert monitor.completed == before


class Recording:
    """Passes every check at once, noting when each started (loop time)."""

    def __init__(self, starts: list[float]) -> None:
        self.starts = starts

    def start(self, address, port, hc, done):
        self.starts.append(asyncio.get_running_loop().time())
        done(True, "connected")

    def close(self):
        pass


def test_a_passive_failure_checks_at_once(pool):
    starts = []

    async def run():
        monitor = Monitor(pool, {TcpCheck: lambda loop: Recording(starts)})
        monitor.start()
        await asyncio.sleep(0.005)
        n = len(starts)
        assert pool.passive(0, "syn_timeout", "198.51.100.2")
        b = pool.services[0].backends[0]
        # The check ran inside passive(): it started after the suspicion,
        # so it cleared it.
        assert len(starts) == n + 1 and b.health == "up"
        await monitor.stop()

    asyncio.run(run())


def test_the_schedule_wakes_for_checks_not_on_a_tick(pool):
    """Every wakeup of natlb's event loop is CPU taken from the traffic on
    the router: the monitor sleeps until a check is due or one ends, where
    it used to wake ten times per interval whatever happened."""
    class Instant:
        def start(self, address, port, hc, done):
            asyncio.get_running_loop().call_soon(done, True, "connected")

        def close(self):
            pass

    monitor = run_monitor(pool, lambda loop: Instant(), lambda m: m.completed >= 25)
    assert monitor.completed >= 25
    # One round to start a check, one when it ends; a tick of a tenth of
    # the 20 ms interval would have made about ten per check.
    assert monitor.wakeups <= 2 * monitor.completed + 3, (monitor.wakeups, monitor.completed)


def test_a_monitor_started_twice_checks_each_backend_once_per_interval(pool):
    """A failed `natlb restart` starts the monitor again, stopped or not
    (daemon._hand_over): a second schedule per service checked every
    backend twice per interval."""
    starts = []

    async def run():
        monitor = Monitor(pool, {TcpCheck: lambda loop: Recording(starts)})
        monitor.start()
        monitor.start()
        assert len(monitor.tasks) == 1
        await asyncio.sleep(0.5)            # the interval is 20 ms: about 25 checks
        await monitor.stop()

    asyncio.run(run())
    # Two schedules made about 50; a loaded machine makes fewer, never more.
    assert len(starts) <= 0.5 / 0.020 + 3, len(starts)
