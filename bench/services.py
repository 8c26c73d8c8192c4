"""Does natlb's per-packet cost grow with the number of services?  Keep-alive
HTTP req/s (wrk, 32 connections) through natlb with 5 services and with 250
(each of the extra ones on its own port over the same 3 nginx backends),
alternating, repetitions' medians.  A benchmark, not a test:

    sudo .venv/bin/python -m bench.services [--repetitions 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from bench.netbench import NATLB_CONFIG, Bench
from natlb_testbed.testbed import VIP


def extra_services(n: int, backends: list[str]) -> str:
    out = []
    for i in range(n):
        out.append(f'[[service]]\nname = "x{i}"\nvip = "{VIP}"\nport = {20000 + i}\n'
                   '[service.health]\nkind = "none"\n')
        out += [f'[[service.backend]]\naddress = "{a}"\nport = 80\n' for a in backends]
    return "\n".join(out)


class ServicesBench(Bench):
    extra = 0

    def start(self, path: str) -> list[subprocess.Popen]:
        web = "\n".join(f'[[service.backend]]\naddress = "{a}"' for a in self.addrs.values())
        text = NATLB_CONFIG.format(
            sock=self.tb.control_socket, workers=self.workers, poll_us=self.poll_us,
            rewrite=self.rewrite, gso="true" if self.gso else "false", web=web, vip=VIP,
            dir=self.dir, **self.addrs)
        text += extra_services(self.extra, list(self.addrs.values()))
        return [self.tb.start_natlb(self.tb.write_config(text))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    a = ap.parse_args()
    b = ServicesBench(a.seconds, 1, True, 0, "mark")
    rates: dict[int, list[float]] = {5: [], 250: []}
    try:
        b.setup()
        for rep in range(a.repetitions):
            for total in rates:
                b.extra = total - 3  # NATLB_CONFIG has 3
                procs = b.start("natlb")
                try:
                    rates[total].append(b._rate(b.wrk()))
                finally:
                    b.stop("natlb", procs)
                print(f"repetition {rep + 1}: {total} services: {rates[total][-1]:,.0f} req/s",
                      flush=True)
    finally:
        b.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"keep-alive req/s, medians of {a.repetitions}: 5 services {med[5]:,.0f}, "
          f"250 services {med[250]:,.0f} ({med[250] / med[5]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
