"""What natlb needs to run as a systemd service, without systemd: the
notification datagrams, the journald log format, the version, the rate
estimator."""

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from natlb import logsetup, sdnotify
from natlb.core import Counters
from natlb.rates import RateEstimator, render
from natlb.version import natlb_version


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    s.bind(str(path))
    s.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield s
    s.close()


def test_notify_sends_one_datagram(notify_socket):
    assert sdnotify.ready("running: 2 services")
    assert notify_socket.recv(4096).decode() == (
        f"READY=1\nSTATUS=running: 2 services\nMAINPID={os.getpid()}")
    assert sdnotify.reloading()
    fields = notify_socket.recv(4096).decode().split("\n")
    assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
    assert sdnotify.stopping()
    assert notify_socket.recv(4096).startswith(b"STOPPING=1\n")


def test_notify_abstract_namespace(monkeypatch):
    name = f"natlb-test-{os.getpid()}-{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1")
        assert s.recv(64) == b"READY=1"


def test_notify_outside_systemd_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.ready("x")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.ready("x")   # logged, never raised


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_line(monkeypatch, journal: bool, stream) -> str:
    st = os.fstat(stream.fileno())
    dev_ino = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
    monkeypatch.setenv("JOURNAL_STREAM", dev_ino)
    monkeypatch.setattr(sys, "stderr", stream)
    logsetup.configure()
    logging.getLogger("natlb.pool").warning("backend %s is DOWN", "203.0.113.6:80")
    logging.getLogger("natlb").info("two\nlines")
    for h in logging.getLogger().handlers:
        h.flush()
    stream.seek(0)
    return stream.read()


def test_journal_format_has_priority_and_no_timestamp(monkeypatch, tmp_path):
    with open(tmp_path / "log", "w+") as f:
        out = _log_line(monkeypatch, True, f)
    assert out == "<4>natlb.pool: backend 203.0.113.6:80 is DOWN\n<6>natlb: two\n<6>lines\n"


def test_other_streams_keep_timestamps(monkeypatch, tmp_path):
    with open(tmp_path / "log", "w+") as f:
        out = _log_line(monkeypatch, False, f)   # JOURNAL_STREAM names another stream
    first = out.splitlines()[0]
    assert first.endswith(" natlb.pool: backend 203.0.113.6:80 is DOWN")
    assert first[:4].isdigit() and not first.startswith("<")


def test_version_from_package_metadata():
    r = subprocess.run([sys.executable, "-m", "natlb", "--version"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    assert r.stdout == f"natlb {natlb_version()}\n" and natlb_version()[0].isdigit()


def _counters(new=0, pin=0, pout=0, bin_=0, bout=0):
    return Counters(packets_in=pin, bytes_in=bin_, packets_out=pout, bytes_out=bout,
                    new_flows=new)


def test_rates_move_a_quarter_of_the_way_each_tick():
    est = RateEstimator()
    key = ("service", 0)
    est.sample(0.0, {key: _counters()})
    assert est.get("service", 0)["cps"] == 0.0
    # 100 connections and 1000 packets per second, steadily.
    for t in range(1, 11):
        est.sample(2.0 * t, {key: _counters(new=200 * t, pin=2000 * t, bin_=2_000_000 * t)})
        if t == 1:
            assert est.get("service", 0)["cps"] == 25.0   # a quarter of 100
    r = est.get("service", 0)
    assert 94 < r["cps"] < 100 and 940 < r["inpps"] < 1000 and r["outpps"] == 0
    assert 940_000 < r["inbps"] < 1_000_000


def test_rates_forget_removed_services():
    est = RateEstimator()
    est.sample(0.0, {("backend", 3): _counters()})
    est.sample(2.0, {("backend", 3): _counters(new=10)})
    assert est.get("backend", 3)["cps"] > 0
    est.sample(4.0, {})
    assert est.get("backend", 3)["cps"] == 0.0


def test_rate_table_like_ipvsadm():
    rate = {"cps": 12.0, "inpps": 1500.0, "outpps": 1200.0, "inbps": 2_400_000.0,
            "outbps": 96_000.0}
    st = {"uptime_s": 10, "services": [{
        "protocol": "tcp", "vip": "192.0.2.100", "port": 80, "name": "web", "rate": rate,
        "backends": [{"address": "203.0.113.6", "port": 80, "rate": rate}]}]}
    lines = render(st).splitlines()
    assert lines[1].split() == ["Prot", "LocalAddress:Port", "CPS", "InPPS", "OutPPS", "InBPS",
                                "OutBPS"]
    assert lines[2].split() == ["TCP", "192.0.2.100:80", "(web)", "12", "1500", "1200",
                                "2400000", "96000"]
    assert lines[3].split() == ["->", "203.0.113.6:80", "12", "1500", "1200", "2400000",
                                "96000"]


def test_a_longer_gap_between_samples_moves_as_far_as_the_ticks_it_spans():
    every, skipped = RateEstimator(), RateEstimator()
    key = ("backend", 1)
    for est, times in ((every, (0.0, 2.0, 4.0)), (skipped, (0.0, 4.0))):
        for t in times:
            est.sample(t, {key: _counters(new=int(100 * t))})   # 100 conn/s throughout
    assert every.get("backend", 1)["cps"] == skipped.get("backend", 1)["cps"] == 43.8


def test_an_idle_counter_decays_to_zero_and_moves_again():
    est = RateEstimator()
    key = ("backend", 2)
    est.sample(0.0, {key: _counters()})
    est.sample(2.0, {key: _counters(new=20)})               # 10 conn/s for one tick
    shown = [est.get("backend", 2)["cps"]]
    for t in range(2, 40):                                   # then idle
        est.sample(2.0 * t, {key: _counters(new=20)})
        shown.append(est.get("backend", 2)["cps"])
    assert shown[0] == 2.5 and shown == sorted(shown, reverse=True) and shown[-1] == 0.0
    est.sample(80.0, {key: _counters(new=40)})
    assert est.get("backend", 2)["cps"] == 2.5


def test_sampling_that_costs_more_than_its_budget_comes_further_apart():
    est = RateEstimator()

    def costly_read():
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.02:     # 20 ms of this thread's CPU
            pass
        return {("service", 0): _counters()}

    async def one_sample():
        task = asyncio.create_task(est.run(costly_read, time.monotonic, interval=0.001,
                                           budget=0.5))
        while len(est._last) == 0:
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(one_sample())
    assert est.interval_s >= 0.02 / 0.5
