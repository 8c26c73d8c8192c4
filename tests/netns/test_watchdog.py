"""The systemd watchdog: the test plays systemd (NOTIFY_SOCKET, WATCHDOG_USEC,
WATCHDOG_PID set to the pid it starts, SIGABRT once the pings stop, a
restart) around a natlb whose worker 0 it can make hang
(natlb_testbed/stallable.py)."""

import os
import signal
import socket
import struct
import subprocess
import sys
import time

from natlb_testbed.testbed import VIP, basic_config

from .conftest import router_state
from .systemd import PlaysSystemd

INTERVAL_MS = 2000       # pings every 1 s; a worker is stuck after 1 s
BOUND_S = 1.0


def receive(s: socket.socket, timeout: float) -> tuple[str, int] | None:
    """One datagram and its sender's pid, or None after timeout."""
    s.settimeout(timeout)
    try:
        data, anc, _, _ = s.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    except TimeoutError:
        return None
    pid = next(struct.unpack("3i", d)[0] for level, kind, d in anc
               if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS))
    return data.decode(), pid


def pings(s: socket.socket, seconds: float) -> list[tuple[float, int]]:
    """(arrival, sender pid) of every WATCHDOG=1 within `seconds`."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        got = receive(s, left)
        if got and "WATCHDOG=1" in got[0].split("\n"):
            out.append((time.monotonic(), got[1]))
    return out


def start(testbed, config: str, sd: PlaysSystemd, name: str) -> subprocess.Popen:
    """As systemd starts a unit with WatchdogSec=: WATCHDOG_PID is the pid
    that execs natlb (sh's $$; `ip netns exec` and sh exec in place)."""
    path = testbed.workdir / f"{name}.toml"
    path.write_text(config)
    log = open(testbed.workdir / f"{name}.log", "w")  # noqa: SIM115 -- lives with the process
    env = {**os.environ, "NOTIFY_SOCKET": sd.notify.getsockname(),
           "WATCHDOG_USEC": str(INTERVAL_MS * 1000)}
    return sd.track(testbed.spawn(testbed.router, [
        "sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh",
        sys.executable, "-m", "natlb_testbed.stallable", "run", "-c", str(path)],
        env=env, stdout=log, stderr=subprocess.STDOUT))


def test_pings_while_serving_stop_for_a_stuck_worker_and_the_restart_adopts(testbed):
    before = router_state(testbed)
    config = basic_config(testbed, lb_extra="workers = 2")
    with PlaysSystemd(testbed) as sd:
        p = start(testbed, config, sd, "watchdog")
        sd.wait_ready(p)
        res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "20",
                                 "--interval-ms", "50")
        assert all(r["ok"] for r in res), res
        alive = pings(sd.notify, 3.5)
        assert len(alive) >= 2 and {pid for _, pid in alive} == {p.pid}, alive

        # Worker 0 hangs; worker 1 and the event loop go on.
        p.send_signal(signal.SIGUSR2)
        hung_at = time.monotonic()
        after = pings(sd.notify, 3 * INTERVAL_MS / 1000)
        # The last ping may come at a check up to the bound after the hang
        # (the worker's stamp was fresh enough then), none after the next one
        # (half a second of slack for a loaded host).
        assert all(t - hung_at < BOUND_S + INTERVAL_MS / 2000 + 0.5 for t, _ in after), \
            (after, hung_at)
        assert p.poll() is None
        log = (testbed.workdir / "watchdog.log").read_text()
        line = [x for x in log.splitlines() if "has not gone round its loop" in x]
        assert len(line) == 1 and "NFQUEUE worker 0 (queue 0)" in line[0], log

        # systemd: SIGABRT, then a restart that adopts what the guardian kept.
        p.send_signal(signal.SIGABRT)
        assert p.wait(timeout=10) == -signal.SIGABRT
        successor = start(testbed, config, sd, "watchdog-restarted")
        sd.wait_ready(successor)
        assert len(pings(sd.notify, 2.5)) >= 1
        res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "5",
                                 "--interval-ms", "50")
        assert all(r["ok"] for r in res), res
        assert "took over" in (testbed.workdir / "watchdog-restarted.log").read_text()
        successor.send_signal(signal.SIGTERM)
        assert successor.wait(timeout=20) == 0
        assert router_state(testbed) == before


def test_restart_successor_takes_over_the_pings(testbed):
    """After `natlb restart` systemd's WATCHDOG_PID names the predecessor;
    the successor, the unit's main process now, must ping in its place."""
    before = router_state(testbed)
    with PlaysSystemd(testbed, subreaper=True) as sd:
        p = start(testbed, basic_config(testbed), sd, "watchdog-handover")
        sd.wait_ready(p)
        cli = subprocess.Popen([sys.executable, "-m", "natlb", "restart", "-c",
                                str(testbed.workdir / "watchdog-handover.toml")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        got = []
        deadline = time.monotonic() + 60
        while (cli.poll() is None or p.poll() is None) and time.monotonic() < deadline:
            got += pings(sd.notify, 0.2)
        _, err = cli.communicate(timeout=5)
        assert cli.returncode == 0, err
        assert p.wait(timeout=1) == 0
        gone = len(got)
        got += pings(sd.notify, 2.5 * INTERVAL_MS / 1000)
        # What systemd checks: never an interval without a ping, across the handover.
        times = [t for t, _ in got]
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert max(gaps) < INTERVAL_MS / 1000, got
        # The predecessor is gone: every ping from now on is the successor's.
        senders = {pid for _, pid in got[gone:]}
        assert len(got) - gone >= 2 and len(senders) == 1 and p.pid not in senders, got
        sd.adopt(senders.pop())
        assert sd.stop_successor() == 0
        assert router_state(testbed) == before
