"""natlb under a service manager's conditions: readiness notification,
Prometheus metrics agreeing with real traffic, rates."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families

from natlb_testbed.testbed import VIP, backend_addr, basic_config

from .conftest import natlb_cli, router_state
from .systemd import PlaysSystemd

METRICS = "127.0.0.1:9100"


def run_natlb(testbed, config_text: str, sd: PlaysSystemd, name: str = "natlb.toml"):
    """natlb as a unit of sd's (NOTIFY_SOCKET), stopped when sd is left."""
    path = testbed.workdir / name
    path.write_text(config_text)
    log = open(testbed.workdir / f"{name}.log", "w")  # noqa: SIM115 -- lives with the process
    return sd.track(testbed.python(testbed.router, "natlb", "run", "-c", str(path),
                                   env={**os.environ, "NOTIFY_SOCKET": sd.notify.getsockname()},
                                   stdout=log, stderr=subprocess.STDOUT))


# Started before natlb, it connects through the VIP the moment it reads a
# line: within 0.9 s, before the first SYN would be retransmitted.
PROBE = f"""
import socket, sys
sys.stdin.readline()
try:
    with socket.create_connection(("{VIP}", 80), timeout=0.9) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        print(s.recv(4096).split(b"\\r\\n")[0].decode(), flush=True)
except OSError as e:
    print(type(e).__name__, flush=True)
"""


def test_ready_only_once_the_vip_answers(testbed):
    before = router_state(testbed)
    probe = testbed.spawn(testbed.client, [sys.executable, "-c", PROBE], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
    with PlaysSystemd(testbed) as sd:
        p = run_natlb(testbed, basic_config(testbed), sd)
        got = sd.wait_ready(p)
        # At the moment READY=1 arrives, a connection through the VIP works.
        out, _ = probe.communicate("go\n", timeout=10)
        assert out.split()[1:2] == ["200"], out
        assert len(got) == 1 and got[0].startswith("READY=1\nSTATUS=running")
        queues = testbed.router_cmd("cat", "/proc/net/netfilter/nfnetlink_queue").stdout
        assert queues.split()[0] == "0"   # queue 0 bound
        p.send_signal(15)
        sd.notify.settimeout(10)
        assert sd.notify.recv(4096).startswith(b"STOPPING=1")
        assert p.wait(timeout=20) == 0
        assert router_state(testbed) == before


def test_reload_notifies_reloading_then_ready(testbed):
    with PlaysSystemd(testbed) as sd:
        p = run_natlb(testbed, basic_config(testbed), sd)
        sd.wait_ready(p)
        (testbed.workdir / "natlb.toml").write_text(basic_config(testbed, backends=[1, 2]))
        p.send_signal(1)
        got = sd.wait_ready(p)
        assert got[0].startswith("RELOADING=1\nMONOTONIC_USEC=") and len(got) == 2


def test_no_ready_when_the_queue_cannot_be_bound(testbed):
    # Another program holds queue 0 (a second natlb is refused before it
    # binds anything: one per network namespace).
    holder = testbed.python(testbed.router, "natlb_testbed.queue_holder", "0",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with PlaysSystemd(testbed) as sd:
            p = run_natlb(testbed, basic_config(testbed), sd)
            assert p.wait(timeout=30) == 1
            sd.notify.settimeout(0.5)
            try:
                msg = sd.notify.recv(4096)
            except TimeoutError:
                msg = None
            assert msg is None, msg
            assert "natlb" not in testbed.router_cmd("nft", "list", "tables").stdout
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def scrape(testbed) -> dict[tuple[str, tuple], float]:
    code = (f"import urllib.request; print(urllib.request.urlopen('http://{METRICS}/metrics', "
            "timeout=10).read().decode())")
    r = testbed.router_cmd(sys.executable, "-c", code)
    assert r.returncode == 0, r.stderr
    out = {}
    for fam in text_string_to_metric_families(r.stdout):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def series(samples, name, **labels) -> list[float]:
    return [v for (n, lab), v in samples.items()
            if n == name and all(dict(lab).get(k) == v2 for k, v2 in labels.items())]


def test_metrics_agree_with_traffic_through_the_vip(testbed, natlb):
    natlb(basic_config(testbed, lb_extra=f'metrics = "{METRICS}"'))
    n = 24
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", str(n),
                             "--interval-ms", "5")
    assert all(r["ok"] for r in res), res
    m = scrape(testbed)
    svc = {"service": "web", "vip": VIP, "port": "80", "protocol": "tcp"}
    assert series(m, "natlb_connections_total", **svc) == [n]
    per_backend = series(m, "natlb_backend_connections_total", **svc)
    assert len(per_backend) == 3 and sum(per_backend) == n
    for direction in ("incoming", "outgoing"):
        for unit in ("packets", "bytes"):
            total = series(m, f"natlb_{direction}_{unit}_total", **svc)[0]
            assert total > 0
            assert sum(series(m, f"natlb_backend_{direction}_{unit}_total", **svc)) == total
    assert series(m, "natlb_backend_up", address=backend_addr(2), backend_port="80") == [1]
    assert series(m, "natlb_health_checks_total", result="ok")[0] > 0
    assert series(m, "natlb_flow_capacity") == [1 << 20]
    assert series(m, "natlb_queue_dropped_packets_total", queue="0") == [0]

    # Rates: the estimator samples every 2 s; more connections until it shows them.
    deadline = time.monotonic() + 20
    while True:
        testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "10",
                           "--interval-ms", "20")
        r = natlb_cli(testbed, "status", "--rate", "-s", testbed.control_socket)
        assert r.returncode == 0, r.stderr
        row = next(line.split() for line in r.stdout.splitlines() if "(web)" in line)
        if float(row[3]) > 0 or time.monotonic() > deadline:
            break
    assert row[:3] == ["TCP", f"{VIP}:80", "(web)"] and float(row[3]) > 0, r.stdout


@contextlib.contextmanager
def address_held(testbed, port: int):
    """Another program listening on 127.0.0.1:port in the router namespace
    (SO_REUSEADDR as natlb's own server has it: only a listener makes the
    port taken)."""
    holder = testbed.spawn(testbed.router, [
        sys.executable, "-c",
        "import socket, time; s = socket.socket(); "
        f"s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port})); "
        "s.listen(); print('bound', flush=True); time.sleep(60)"], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "bound"
        yield f"127.0.0.1:{port}"
    finally:
        testbed.stop(holder)
        testbed.procs.remove(holder)


def test_metrics_address_taken_exits_2_and_touches_nothing(testbed):
    # Another port than the other tests', whose scrapes may leave TIME_WAIT on theirs.
    with address_held(testbed, 9101) as taken:
        before = router_state(testbed)
        path = testbed.write_config(basic_config(testbed, lb_extra=f'metrics = "{taken}"'))
        r = natlb_cli(testbed, "run", "-c", str(path))
        assert (r.returncode, r.stderr) == (
            2, f'natlb: config: lb.metrics = "{taken}": address already in use\n')
        assert router_state(testbed) == before


def test_restart_to_a_metrics_address_taken_exits_2_and_keeps_serving(testbed, natlb):
    """The successor binds an address its predecessor does not serve before
    it takes anything over: taken, `natlb restart` fails as for any config
    error, and the running natlb serves on (its metrics too)."""
    p = natlb(basic_config(testbed, lb_extra=f'metrics = "{METRICS}"'))
    with address_held(testbed, 9102) as taken:
        path = testbed.write_config(basic_config(testbed, lb_extra=f'metrics = "{taken}"'))
        r = natlb_cli(testbed, "restart", "-c", str(path))
        if r.returncode == 0:  # a successor serves: ours to stop
            os.kill(int(r.stdout.split()[2]), signal.SIGTERM)
            time.sleep(3)
        assert (r.returncode, r.stderr) == (
            2, f'natlb: restart failed: config: lb.metrics = "{taken}": '
               f"address already in use\n"), r.stderr + testbed.natlb_log()
    assert p.poll() is None
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "6")
    assert all(r["ok"] for r in res), res
    assert series(scrape(testbed), "natlb_connections_total", service="web") == [6]


def test_restart_from_a_wildcard_metrics_address_to_one_on_its_port(testbed, natlb):
    """0.0.0.0:P to 127.0.0.1:P: only the predecessor holds the port, so the
    restart goes through and the successor serves once the predecessor has
    let the port go (the kernel refuses the narrower bind while the wildcard
    listens, SO_REUSEADDR or not)."""
    port = 9104
    p = natlb(basic_config(testbed, lb_extra=f'metrics = "0.0.0.0:{port}"'))
    path = testbed.write_config(basic_config(testbed, lb_extra=f'metrics = "127.0.0.1:{port}"'))
    r = natlb_cli(testbed, "restart", "-c", str(path))
    assert (r.returncode, r.stderr) == (0, ""), r.stderr + testbed.natlb_log()
    successor = int(r.stdout.split()[2])
    try:
        assert p.wait(timeout=15) == 0   # its wildcard answered 127.0.0.1 until now
        code = (f"import urllib.request, time\n"
                f"for _ in range(150):\n"
                f"    try: urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=2)"
                f".read(); print('served'); break\n"
                f"    except OSError: time.sleep(0.1)\n")
        got = testbed.router_cmd(sys.executable, "-c", code)
        assert got.stdout.strip() == "served", got.stderr + testbed.natlb_log()
        assert os.path.exists(f"/proc/{successor}")
    finally:
        os.kill(successor, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while os.path.exists(f"/proc/{successor}") and time.monotonic() < deadline:
            time.sleep(0.1)


def _ppid(pid: int) -> int:
    stat = open(f"/proc/{pid}/stat").read()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_restart_successor_is_the_service_managers_child_when_ready(testbed):
    """systemd accepts a new MAINPID as its own only if that process is its
    child at that moment; otherwise `systemctl stop` SIGKILLs it without
    waiting for its clean-up.  The test plays systemd: a subreaper owning
    NOTIFY_SOCKET."""
    before = router_state(testbed)
    with PlaysSystemd(testbed, subreaper=True) as sd:
        p = run_natlb(testbed, basic_config(testbed), sd)
        sd.wait_ready(p)
        cli = subprocess.Popen([sys.executable, "-m", "natlb", "restart", "-c",
                                str(testbed.workdir / "natlb.toml")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sd.notify.settimeout(30)
        while not sd.successor:
            fields = dict(f.split("=", 1) for f in sd.notify.recv(4096).decode().split("\n")
                          if f)
            if "READY" in fields and int(fields["MAINPID"]) != p.pid:
                sd.adopt(int(fields["MAINPID"]))
                # Read at once: the predecessor is still draining its queues.
                parent = _ppid(sd.successor)
        assert parent == os.getpid(), (parent, p.pid)
        out, err = cli.communicate(timeout=30)
        assert cli.returncode == 0, err
        assert p.wait(timeout=10) == 0
        assert sd.stop_successor() == 0
        assert router_state(testbed) == before


def test_metrics_carry_on_across_a_reload_and_a_restart(testbed, natlb):
    """A reload that removes a backend and a `natlb restart` are no counter
    resets: the service's counters never go back (the kernel fast path's
    share of the removed backend included), and the successor serves the
    metrics, of the queues it reads."""
    import signal

    config = basic_config(testbed, lb_extra=f'metrics = "{METRICS}"')
    p = natlb(config)
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "24",
                             "--interval-ms", "5")
    assert all(r["ok"] for r in res), res
    svc = {"service": "web", "vip": VIP, "port": "80", "protocol": "tcp"}
    names = [f"natlb_{d}_{u}_total" for d in ("incoming", "outgoing")
             for u in ("packets", "bytes")] + ["natlb_connections_total"]
    before = {n: series(scrape(testbed), n, **svc) for n in names}

    testbed.write_config(basic_config(testbed, lb_extra=f'metrics = "{METRICS}"',
                                      backends=[1, 2]))
    count = testbed.status()["reloads"]["count"]
    p.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while testbed.status()["reloads"]["count"] == count:
        assert time.monotonic() < deadline, testbed.natlb_log()
        time.sleep(0.05)
    assert testbed.status()["reloads"]["ok"], testbed.natlb_log()
    reloaded = {n: series(scrape(testbed), n, **svc) for n in names}
    assert reloaded == before

    r = natlb_cli(testbed, "restart", "-c", str(testbed.workdir / "natlb.toml"))
    assert r.returncode == 0, r.stderr + testbed.natlb_log()
    successor = int(r.stdout.split()[2])
    try:
        # Once the restart returned, the control socket and the metrics
        # port are the successor's (the predecessor passed both on).
        status = testbed.status()
        assert status["pid"] == successor
        queues = status["queues"]
        m = scrape(testbed)
        assert p.wait(timeout=15) == 0
        assert {n: series(m, n, **svc) for n in names} == before
        served = sorted(dict(lab)["queue"] for (n, lab) in m
                        if n == "natlb_queue_dropped_packets_total")
        assert served == sorted(str(q["queue"]) for q in queues) == ["16"]
    finally:
        os.kill(successor, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while os.path.exists(f"/proc/{successor}") and time.monotonic() < deadline:
            time.sleep(0.1)


SCRAPER = f"""
import json, sys, time, urllib.request
from prometheus_client.parser import text_string_to_metric_families
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    asked = time.monotonic()
    try:
        text = urllib.request.urlopen('http://{METRICS}/metrics', timeout=5).read().decode()
        got = {{"n": 0, "queues": []}}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == "natlb_connections_total" and s.labels["service"] == "web":
                    got["n"] = s.value
                if s.name == "natlb_incoming_packets_total" and s.labels["service"] == "web":
                    got["p"] = s.value
                if s.name == "natlb_queue_dropped_packets_total":
                    got["queues"].append(int(s.labels["queue"]))
    except Exception as e:
        got = {{"error": repr(e)}}
    print(json.dumps({{"t": asked, **got}}), flush=True)
    time.sleep(0.003)
"""


def test_scrapes_are_answered_all_through_restarts(testbed, natlb):
    """The metrics port never refuses nor drops a scrape across `natlb
    restart` (the predecessor passes its listening socket on), its counters
    never go back, and a scrape made after the restart returned is the
    successor's (its queues).  Before, the successor bound the address only
    once its predecessor had exited: scrapes in between were refused."""
    config = basic_config(testbed, lb_extra=f'metrics = "{METRICS}"')
    p = natlb(config)
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "6")
    assert all(r["ok"] for r in res), res
    scraper = testbed.spawn(testbed.router, [sys.executable, "-c", SCRAPER, "40"],
                            stdout=subprocess.PIPE, text=True)
    pids, begun, returned, queues = [p.pid], [], [], []
    load = testbed.python(testbed.client, "natlb_testbed.hosts", "churn", "--host", VIP,
                          "--port", "80", "--keepalive", "2", "--interval-ms", "50",
                          "--seconds", "5", "--timeout", "15", stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(scraper.stdout.readline()).get("n") >= 6
        for _ in range(3):
            begun.append(time.monotonic())
            r = natlb_cli(testbed, "restart", "-c", str(testbed.workdir / "natlb.toml"))
            returned.append(time.monotonic())
            assert r.returncode == 0, r.stderr + testbed.natlb_log()
            pids.append(int(r.stdout.split()[2]))
            queues.append(sorted(q["queue"] for q in testbed.status()["queues"]))
            time.sleep(0.5)
        load.communicate(timeout=60)
    finally:
        scraper.terminate()
        out, _ = scraper.communicate(timeout=10)
        if len(pids) > 1:
            os.kill(pids[-1], signal.SIGTERM)
        for pid in pids[1:]:
            deadline = time.monotonic() + 15
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
    got = [json.loads(line) for line in out.splitlines()]
    failed = [g for g in got if "error" in g]
    assert not failed, (failed[:3], returned, testbed.natlb_log()[-2000:])
    assert len(got) > 100
    for counter in ("n", "p"):     # connections, packets: no reset seen
        assert [g[counter] for g in got] == sorted(g[counter] for g in got), counter
    assert got[-1]["n"] > got[0]["n"] and got[-1]["p"] > got[0]["p"]     # under traffic
    assert len({tuple(q) for q in queues}) == 2      # the two banks, in turn
    for k, at in enumerate(returned):
        # Asked after the restart returned (and before the next began): the
        # successor answers.
        until = (begun + [float("inf")])[k + 1]
        after = {tuple(sorted(g["queues"])) for g in got if at < g["t"] < until}
        assert after == {tuple(queues[k])}, (k, after, queues)


def test_health_and_fast_path_counters_carry_on_across_a_restart(testbed, natlb):
    """The health checks, the fast path's observer and its decisions are
    counted on by the successor of `natlb restart`, as the traffic is: no
    counter reset for Prometheus."""
    config = basic_config(testbed, lb_extra=f'metrics = "{METRICS}"\nfastpath = true')
    p = natlb(config)
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "24",
                             "--interval-ms", "5")
    assert all(r["ok"] for r in res), res
    watched = [("natlb_health_checks_total", {"result": "ok"}),
               ("natlb_fastpath_records_total", {"result": "applied"}),
               ("natlb_fastpath_decisions_total", {"result": "applied"})]

    def read(m):
        return [series(m, name, **labels) for name, labels in watched]

    # Checks many times more than the successor makes before it is scraped
    # (3 backends every 100 ms): a count from 0 would be seen.
    deadline = time.monotonic() + 30
    while (before := read(scrape(testbed)))[0][0] < 150 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(v and v[0] > 0 for v in before) and before[0][0] >= 150, before
    r = natlb_cli(testbed, "restart", "-c", str(testbed.workdir / "natlb.toml"))
    assert r.returncode == 0, r.stderr + testbed.natlb_log()
    successor = int(r.stdout.split()[2])
    try:
        after = read(scrape(testbed))      # the successor's, from the restart's return
        assert p.wait(timeout=15) == 0
        assert all(a[0] >= b[0] for a, b in zip(after, before, strict=True)), (before, after)
        status = testbed.status()["fastpath"]
        assert status["observer"]["applied"] >= before[1][0], status
        assert status["decisions"]["placed"] >= before[2][0], status
    finally:
        os.kill(successor, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while os.path.exists(f"/proc/{successor}") and time.monotonic() < deadline:
            time.sleep(0.1)
