"""Restarts under traffic: `natlb restart` (with an [lb] change) and SIGKILL
followed by an immediate start lose no established connection."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from natlb_testbed.testbed import VIP, backend_addr, basic_config, unchecked_service

from .conftest import natlb_cli, router_state


def config(testbed, lb_extra=""):
    # No health checks: a check timing out on a loaded machine would reset
    # established flows (on_backend_down) and blur what these tests measure.
    return basic_config(testbed, health="none", lb_extra=lb_extra)


def churn(testbed, seconds):
    """10 busy keep-alive connections and a new connection every 15 ms."""
    return testbed.python(testbed.client, "natlb_testbed.hosts", "churn", "--host", VIP,
                          "--port", "80", "--keepalive", "10", "--interval-ms", "15",
                          "--seconds", str(seconds), "--timeout", "15",
                          stdout=subprocess.PIPE, text=True)


def result(proc):
    out, _ = proc.communicate(timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def flow_file(testbed):
    return Path(testbed.control_socket + ".flows")


def new_flows(testbed):
    status = natlb_cli(testbed, "status", "--json", "-s", testbed.control_socket)
    return json.loads(status.stdout)["services"][0]["new_flows"]


def wait_gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still running")


@pytest.mark.parametrize("old_lb,new_lb,store", [
    ("max_flows = 4096", "max_flows = 8192", "copied into max_flows 8192"),
    ('rewrite = "copy"', 'rewrite = "mark"', "adopted into"),
    # The tc fast path: the successor replaces the filters (flows are learned
    # again from their next queued packet).
    ("fastpath = false", "fastpath = true", "adopted into"),
    ("fastpath = true", "fastpath = true\nmax_flows = 8192", "copied into max_flows 8192"),
])
def test_restart_hands_over_flows_with_an_lb_change(testbed, natlb, old_lb, new_lb, store):
    # The last start must claim the killed successor's journal within the
    # grace: 3 s was once too short for a start on a loaded machine.
    old_lb, new_lb = old_lb + "\nrestart_grace_ms = 10000", new_lb + "\nrestart_grace_ms = 10000"
    before = router_state(testbed)
    old = natlb(config(testbed, old_lb))
    load = churn(testbed, 4)
    time.sleep(1.5)
    before_flows = new_flows(testbed)
    # What the successor finds its predecessor's state by cannot change.
    bad = testbed.write_config(config(testbed, 'table = "natlb2"'))
    r = natlb_cli(testbed, "restart", "-c", str(bad))
    assert r.returncode == 2 and "lb.table" in r.stderr, r.stderr
    path = testbed.write_config(config(testbed, new_lb))
    r = natlb_cli(testbed, "restart", "-c", str(path))
    assert r.returncode == 0, r.stderr + testbed.natlb_log()
    pid = int(r.stdout.split()[2])
    try:
        assert store in r.stdout, r.stdout
        assert old.wait(timeout=10) == 0
        res = result(load)
        assert res["established_lost"] == 0, (res, testbed.natlb_log())
        assert res["new_failed"] == 0, res
        assert res["new"] > 100 and res["keepalive_requests"] > 100, res
        status = natlb_cli(testbed, "status", "--json", "-s", testbed.control_socket)
        assert json.loads(status.stdout)["flow_capacity"] == (8192 if "8192" in new_lb
                                                              else 1 << 20)
        # The counters carry on from the predecessor's: every connection counts.
        assert new_flows(testbed) >= res["new"] + 10 > before_flows + 10
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    # The successor's guardian took over the journal too: a crash of the
    # successor is survived like any other.
    again = natlb(config(testbed, new_lb))
    assert "took over" in testbed.natlb_log()
    testbed.stop(again)
    assert router_state(testbed) == before
    assert not flow_file(testbed).exists()


def test_sigkill_then_start_loses_no_established_connection(testbed, natlb):
    before = router_state(testbed)
    cfg = config(testbed)
    first = natlb(cfg)
    load = churn(testbed, 4)
    time.sleep(1.5)
    first.kill()
    first.wait()
    natlb(cfg)
    log = testbed.natlb_log()
    assert "took over" in log and "adopted in place" in log, log
    res = result(load)
    assert res["established_lost"] == 0, res
    assert res["new_failed"] == 0, res
    # The fixture stops the successor with SIGTERM: everything goes.
    for p in list(testbed.procs):
        if p.args[-3:] == ["run", "-c", str(testbed.workdir / "natlb.toml")]:
            testbed.stop(p)
    assert router_state(testbed) == before


def test_a_crash_restart_keeps_what_the_operator_set_a_stop_does_not(testbed, natlb):
    """A backend disabled for maintenance stays out after natlb crashes and
    starts again (it took the flows and the host over; it takes the admin
    states and weights too), and no new connection reaches it.  A stop and
    start begins from the config, as documented, and leaves no file."""
    cfg = config(testbed)
    first = natlb(cfg)
    sock = testbed.control_socket
    for args in (("disable", "web", backend_addr(1)), ("weight", "web", backend_addr(2), "5")):
        r = natlb_cli(testbed, "backend", *args, "-s", sock)
        assert r.returncode == 0, r.stderr
    state = Path(sock + ".state")
    assert state.exists()
    first.kill()
    first.wait()
    again = natlb(cfg)
    assert "kept the admin state and weight of 3 backends" in testbed.natlb_log()

    def backends():
        return {b["address"]: b for b in testbed.status()["services"][0]["backends"]}

    b = backends()
    assert (b[backend_addr(1)]["admin"], b[backend_addr(2)]["weight"]) == ("disabled", 5), b
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "12")
    assert all(r["ok"] for r in res), res
    assert {r["backend"] for r in res} == {"b2", "b3"}, res
    testbed.stop(again, signal.SIGTERM)
    assert not state.exists()
    natlb(cfg)
    b = backends()
    assert {(x["admin"], x["weight"]) for x in b.values()} == {("enabled", 1)}, b


def test_crash_without_successor_leaves_a_clean_host_after_the_grace(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed, lb_extra="restart_grace_ms = 1500"))
    assert flow_file(testbed).exists()
    p.kill()
    p.wait()
    # Left in place for a successor...
    assert "table ip natlb" in router_state(testbed)
    deadline = time.monotonic() + 10
    while router_state(testbed) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    # ...and cleaned once the grace period is over.
    assert router_state(testbed) == before
    assert not flow_file(testbed).exists()


def test_sigterm_is_a_stop_and_the_next_start_is_fresh(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed))
    held, lines = testbed.client_stream("hold", "--host", VIP, "--port", "80",
                                        "--timeout", "1")
    next(lines)
    testbed.stop(p, signal.SIGTERM)
    assert router_state(testbed) == before and not flow_file(testbed).exists()
    natlb(basic_config(testbed))
    assert "flow table" in testbed.natlb_log() and ": new" in testbed.natlb_log()
    held.wait()


def test_failed_successor_leaves_the_running_natlb_serving(testbed, natlb):
    p = natlb(config(testbed))
    # Valid as a file, but the successor's preflight fails on this host.
    bad = testbed.write_config(config(testbed, 'interface = "nosuchif0"'))
    r = natlb_cli(testbed, "restart", "-c", str(bad))
    # A config error, if only the successor can see it: exit 2, and the
    # error named (not "connection reset by peer").
    assert (r.returncode, r.stderr) == (2, 'natlb: restart failed: config: lb.interface = '
                                           '"nosuchif0": no such interface\n'), r.stderr
    assert p.poll() is None
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "6")
    assert all(x["ok"] for x in res), res


def test_a_vip_the_new_config_has_not_leaves_the_interface_at_restart(testbed, natlb):
    """The successor adopts its predecessor's host changes: a VIP the new
    config no longer has leaves lb.interface (its flows are dropped on
    adoption anyway), and the kept one stays."""
    other = unchecked_service("other", "192.0.2.101")
    natlb(config(testbed) + other)

    def lo():
        return testbed.router_cmd("ip", "-o", "addr", "show", "dev", "lo").stdout

    assert "192.0.2.101/32" in lo()
    r = natlb_cli(testbed, "restart", "-c", str(testbed.write_config(config(testbed))))
    assert r.returncode == 0, r.stderr + testbed.natlb_log()
    pid = int(r.stdout.split()[2])
    try:
        assert "192.0.2.101/32" not in lo() and f"{VIP}/32" in lo(), lo()
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)


def test_the_control_socket_answers_all_through_restarts(testbed, natlb):
    """`natlb status` never finds the control socket unanswered across
    `natlb restart`, and once the command returns it is the successor that
    answers: the predecessor passes its listening socket on.  Before, the
    path was gone between the predecessor's exit and the successor's bind,
    and the predecessor answered for a while after the restart returned."""
    import threading

    from natlb.control import ControlError

    first = natlb(config(testbed))
    replies: list[tuple[float, int | str]] = []    # (asked at, who answered)
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            asked = time.monotonic()
            try:
                pid: int | str = testbed.status()["pid"]
            except (ControlError, OSError, ValueError) as e:
                pid = f"{type(e).__name__}: {e}"
            replies.append((asked, pid))
            time.sleep(0.002)

    asker = threading.Thread(target=ask)
    asker.start()
    pids = [first.pid]
    begun: list[float] = []
    returned: list[float] = []
    try:
        for _ in range(3):
            begun.append(time.monotonic())
            r = natlb_cli(testbed, "restart", "-c", str(testbed.write_config(config(testbed))))
            returned.append(time.monotonic())
            assert r.returncode == 0, r.stderr + testbed.natlb_log()
            pids.append(int(r.stdout.split()[2]))
            time.sleep(0.3)
    finally:
        stop.set()
        asker.join()
        for pid in pids[1:-1]:
            wait_gone(pid)
    try:
        failed = [(round(t - begun[0], 3), p) for t, p in replies if isinstance(p, str)]
        assert not failed, (failed[:5], [round(t - begun[0], 3) for t in begun + returned],
                            testbed.natlb_log()[-3000:])
        assert len(replies) > 100
        for k, at in enumerate(returned):
            # Asked after the restart returned (and before the next began):
            # the successor answers.
            after = {p for t, p in replies if at < t < (begun + [float("inf")])[k + 1]}
            assert after == {pids[k + 1]}, (k, after, pids)
    finally:
        os.kill(pids[-1], signal.SIGTERM)
        wait_gone(pids[-1])
