"""How long ``natlb status`` takes at scale, and where the time goes.

Run (root): .venv/bin/python -m bench.status_scale [SERVICES] [BACKENDS_PER_SERVICE]

Starts a real natlb (fast path on, so the tc program's per-CPU counters are
read too) in a namespace with SERVICES x BACKENDS and times, each as a median
over ROUNDS:

- the control request round trip (the daemon collects, encodes and sends;
  this process receives and decodes);
- decoding the reply and rendering the table here;
- the whole ``natlb status``, ``status --rate`` and ``status --json``
  commands as a user runs them (a new Python each time).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from natlb.control import request
from natlb.rates import render as render_rates
from natlb.status import render
from natlb_testbed.testbed import VIP, Testbed, backend_addr

ROUNDS = 7
CLI_ROUNDS = 5



def config(tb: Testbed, n_services: int, n_backends: int, fastpath: bool = True) -> str:
    out = [f'[lb]\ncontrol_socket = "{tb.control_socket}"\n'
           f'fastpath = {str(fastpath).lower()}\n']
    for i in range(n_services):
        out.append(f'[[service]]\nname = "s{i}"\nvip = "{VIP}"\nport = {20000 + i}\n'
                   '[service.health]\nkind = "none"\n')
        out += [f'[[service.backend]]\naddress = "{backend_addr(k)}"\nport = 80\n'
                for k in range(1, n_backends + 1)]
    return "\n".join(out)


def start(tb: Testbed, text: str, wait_s: float = 300.0) -> subprocess.Popen:
    """natlb started, its table loaded: like Testbed.start_natlb, but a first
    status may take longer than the testbed's request timeout."""
    log = open(tb.workdir / "natlb.log", "w")  # noqa: SIM115 -- lives with the process
    p = tb.python(tb.router, "natlb", "run", "-c", str(tb.write_config(text)), stdout=log,
                  stderr=subprocess.STDOUT)
    deadline = time.monotonic() + wait_s
    while not os.path.exists(tb.control_socket):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"natlb did not start:\n{tb.natlb_log()}")
        time.sleep(0.1)
    request(tb.control_socket, {"cmd": "status"}, timeout=wait_s)
    return p


def cpu_s(pid: int) -> float:
    """User + system CPU of a process and its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """This process's CPU and that of its waited-for children."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], object], rounds: int = ROUNDS, daemon: int | None = None) -> str:
    """Wall time, and CPU time (here, with children, plus the daemon's if
    given): on a shared machine the wall time includes waiting for a core."""
    wall, cpu = [], []
    for _ in range(rounds):
        c0 = own_cpu_s() + (cpu_s(daemon) if daemon else 0.0)
        t0 = time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((own_cpu_s() + (cpu_s(daemon) if daemon else 0.0) - c0) * 1000)
    return (f"wall median {statistics.median(wall):.0f} ms (min {min(wall):.0f}), "
            f"CPU median {statistics.median(cpu):.0f} ms (min {min(cpu):.0f})")


def main(n_services: int = 4096, n_backends: int = 3) -> int:
    tb = Testbed(n_backends=n_backends)
    try:
        tb.build()
        t0 = time.monotonic()
        natlb = start(tb, config(tb, n_services, n_backends))
        print(f"{n_services} services x {n_backends} backends (fast path on); natlb started "
              f"in {time.monotonic() - t0:.1f} s")
        sock = tb.control_socket
        raw = json.dumps(request(sock, {"cmd": "status"}, timeout=60), separators=(",", ":"))
        st = json.loads(raw)["status"]
        assert len(st["services"]) == n_services
        print(f"  status reply: {len(raw) / 1e6:.1f} MB of JSON; rates sampled every "
              f"{st.get('rate_interval_s', 2.0):.1f} s")
        print("  control request round trip (CPU: the daemon's and ours): "
              + timed(lambda: request(sock, {"cmd": "status"}, timeout=60),
                    daemon=natlb.pid))
        print(f"  json.loads of the reply here: {timed(lambda: json.loads(raw))}")
        print(f"  render (table): {timed(lambda: render(st))}")
        print(f"  render (--rate): {timed(lambda: render_rates(st))}")
        for extra in ([], ["--rate"], ["--json"]):
            argv = [sys.executable, "-m", "natlb", "status", "-s", sock, *extra]
            cmd = " ".join(["natlb status", *extra])

            def run(argv: list[str] = argv) -> None:
                subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)

            print(f"  {cmd} (whole command; CPU: the daemon's and the command's): "
                  + timed(run, CLI_ROUNDS, daemon=natlb.pid))
        return 0
    finally:
        tb.close()


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:3])))
