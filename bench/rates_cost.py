"""What the rate estimator (``natlb status --rate``) costs a large natlb.

Run (root): .venv/bin/python -m bench.rates_cost [SERVICES] [BACKENDS_PER_SERVICE] [SECONDS]

Starts a real natlb in a namespace with SERVICES x BACKENDS (no health
checks, no traffic), once with the fast path off and once on (the tc
program's per-CPU counters are read too), and reports the CPU the idle daemon used
over SECONDS as a share of one core: with nothing else to do, that is the
estimator's sampling every 2 s.
"""

from __future__ import annotations

import sys
import time

from bench.status_scale import config, cpu_s, start
from natlb.control import request
from natlb_testbed.testbed import Testbed

SETTLE_S = 5.0


def idle_share(n_services: int, n_backends: int, seconds: float,
               fastpath: bool) -> tuple[float, float]:
    """The share of a core natlb used, and its rate estimator's interval."""
    tb = Testbed(n_backends=min(n_backends, 3))
    try:
        tb.build()
        text = config(tb, n_services, n_backends, fastpath=fastpath)
        pid = start(tb, text).pid
        time.sleep(SETTLE_S)
        c0, t0 = cpu_s(pid), time.monotonic()
        time.sleep(seconds)
        share = (cpu_s(pid) - c0) / (time.monotonic() - t0)
        st = request(tb.control_socket, {"cmd": "status"}, timeout=60)["status"]
        return share, st.get("rate_interval_s", 2.0)
    finally:
        tb.close()


def main(n_services: int = 4096, n_backends: int = 16, seconds: float = 20.0) -> int:
    print(f"{n_services} services x {n_backends} backends = {n_services * n_backends} "
          f"backends, idle, {seconds:.0f} s each:")
    for fastpath in (False, True):
        share, interval = idle_share(n_services, n_backends, seconds, fastpath)
        print(f"  fastpath = {str(fastpath).lower()}: natlb used {share * 100:.1f}% of a core; "
              f"rates sampled every {interval:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:3]), *map(float, sys.argv[3:4])))
