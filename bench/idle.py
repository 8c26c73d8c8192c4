"""What natlb queues with no client traffic at all: 9 backends health-checked
(two TCP services and one UDP service over the testbed's 3 backends), every
100 ms.  Prints packets/s handed to natlb's queues and passed as `not_ours`,
from natlb's own counters (status: queued_packets, reasons).

    sudo .venv/bin/python -m bench.idle [--seconds 10] [--fastpath]
"""

from __future__ import annotations

import argparse
import sys
import time

from natlb_testbed.testbed import Testbed, basic_config, udp_service

INTERVAL_MS = 100


def config(tb: Testbed, fastpath: bool) -> str:
    second = basic_config(tb, interval_ms=INTERVAL_MS).split("[[service]]", 1)[1]
    second = second.replace('name = "web"', 'name = "web2"').replace("port = 80\nprotocol",
                                                                     "port = 8080\nprotocol")
    return (basic_config(tb, interval_ms=INTERVAL_MS,
                         lb_extra="fastpath = true" if fastpath else "")
            + "\n[[service]]" + second
            + udp_service("dns", [1, 2, 3], interval_ms=INTERVAL_MS))


def counts(tb: Testbed) -> tuple[int, int]:
    """packets queued to natlb, and passed by it as not its own"""
    st = tb.status()
    return st["queued_packets"], st["reasons"]["not_ours"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--fastpath", action="store_true")
    a = ap.parse_args()
    with Testbed(n_backends=3) as tb:
        tb.start_backends()
        p = tb.start_natlb(tb.write_config(config(tb, a.fastpath)))
        try:
            n_backends = sum(len(s["backends"]) for s in tb.status()["services"])
            time.sleep(1)    # past start-up
            q0, n0 = counts(tb)
            t0 = time.monotonic()
            time.sleep(a.seconds)
            q1, n1 = counts(tb)
            dt = time.monotonic() - t0
        finally:
            tb.stop(p)
    print(f"{n_backends} backends checked every {INTERVAL_MS} ms, no client traffic, "
          f"{dt:.1f} s: queued {(q1 - q0) / dt:.1f} packets/s, "
          f"not_ours {(n1 - n0) / dt:.1f} packets/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
