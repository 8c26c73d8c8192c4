"""The watchdog's decision: heartbeat ages in, WATCHDOG=1 out or not (with
the one log line), and when sd_watchdog_enabled(3) says it is on."""

import logging
import socket

import pytest

from natlb import watchdog
from natlb.watchdog import Stuck, Watchdog


def test_interval_follows_sd_watchdog_enabled():
    assert watchdog.interval_ms({}, 42) is None
    assert watchdog.interval_ms({"WATCHDOG_USEC": "5000000"}, 42) == 5000
    assert watchdog.interval_ms({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "42"}, 42) == 5000
    # Meant for another process (our parent, a predecessor): not ours to ping.
    assert watchdog.interval_ms({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "41"}, 42) is None
    for bad in ("", "0", "-1", "999", "5s"):
        assert watchdog.interval_ms({"WATCHDOG_USEC": bad}, 42) is None, bad
    assert watchdog.interval_ms({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "x"}, 42) is None


def test_successor_takes_over_the_predecessors_watchdog_pid():
    env = {"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "100"}
    assert watchdog.interval_ms(env, 200) is None
    assert watchdog.inherit_pid(env, 100, 200)
    assert env["WATCHDOG_PID"] == "200" and watchdog.interval_ms(env, 200) == 5000
    # A WATCHDOG_PID naming someone else (or none at all) is left alone.
    other = {"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "7"}
    assert not watchdog.inherit_pid(other, 100, 200) and other["WATCHDOG_PID"] == "7"
    none = {"WATCHDOG_USEC": "5000000"}
    assert not watchdog.inherit_pid(none, 100, 200) and "WATCHDOG_PID" not in none


def test_bound_is_half_the_interval_but_never_near_the_workers_wakeup():
    assert watchdog.bound_ms(5000) == 2500
    assert watchdog.bound_ms(400) == watchdog.MIN_BOUND_MS > 100


@pytest.mark.parametrize("beats, expected", [
    ([], []),                                   # no workers running: the loop alone
    ([10_000, 9_950], []),                      # idle workers wake every 100 ms
    ([10_000, 7_500], []),                      # exactly at the bound: still alive
    ([10_000, 7_499], [Stuck(1, 2501)]),
    ([1_000, 10_000, 2_000], [Stuck(0, 9000), Stuck(2, 8000)]),
])
def test_stuck_workers_by_heartbeat_age(beats, expected):
    assert watchdog.stuck(beats, 10_000, 2500) == expected


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A NOTIFY_SOCKET the test reads, as systemd's."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(tmp_path / "notify"))
    s.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield s
    s.close()


def received(s: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(s.recv(4096))
        except BlockingIOError:
            return out


def test_pings_only_while_every_worker_goes_round(manager, caplog):
    now = [100_000]
    beats = [now[0], now[0]]
    dog = Watchdog(5000, lambda: list(beats), lambda: now[0], lambda: [4, 5])
    caplog.set_level(logging.INFO, "natlb.watchdog")
    assert dog.check() and received(manager) == [b"WATCHDOG=1"]

    now[0] += 2500                      # worker 1 goes on, worker 0 is stuck
    beats[1] = now[0]
    assert dog.check() and received(manager) == [b"WATCHDOG=1"]
    now[0] += 100
    beats[1] = now[0]
    assert not dog.check() and received(manager) == []
    now[0] += 2500
    beats[1] = now[0]
    assert not dog.check() and received(manager) == []
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert lines == ["watchdog: NFQUEUE worker 0 (queue 4) has not gone round its loop for "
                     "2600 ms (bound 2500 ms); no more WATCHDOG=1: systemd restarts natlb"]

    beats[0] = now[0]                   # it came back before systemd acted
    assert dog.check() and received(manager) == [b"WATCHDOG=1"]
    assert "pinging again" in caplog.records[-1].getMessage()
