"""How long a Prometheus scrape of natlb takes (no root needed).

Run: .venv/bin/python -m bench.scrape [SERVICES] [BACKENDS_PER_SERVICE] [ROUNDS]

A Core and a Pool with SERVICES x BACKENDS published tables and traffic in
their counters; the collector natlb serves, timed both as the exposition
text alone and as a whole HTTP GET of /metrics from prometheus-client's
server on 127.0.0.1.
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.request

from prometheus_client.exposition import generate_latest, start_http_server
from prometheus_client.registry import CollectorRegistry
from scapy.layers.inet import IP, TCP

from natlb.config import parse
from natlb.core import Core, CoreConfig
from natlb.metrics import NatlbCollector
from natlb.pool import Pool
from tests.unit.services import many_services

ROUNDS = 50


def timed(fn, rounds: int = ROUNDS) -> str:
    """Wall and CPU time of this process: on a shared machine the wall time
    includes waiting for a core, the CPU time does not."""
    wall, cpu = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append((time.process_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
    return (f"wall median {statistics.median(wall):.1f} ms (min {min(wall):.1f}), "
            f"CPU median {statistics.median(cpu):.1f} ms (min {min(cpu):.1f}) over {rounds}")


def main(n_services: int = 250, n_backends: int = 3, rounds: int = ROUNDS) -> int:
    config = parse(many_services(n_services, n_backends))
    core = Core(CoreConfig(max_flows=1 << 16))
    pool = Pool(config, core)
    pool.publish()
    for i, s in enumerate(config.services):  # one connection per service
        core.process(bytes(IP(src="198.51.100.7", dst=s.vip)
                           / TCP(sport=1024 + i, dport=s.port, flags="S")), 1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NatlbCollector(pool, config.lb))
    text = generate_latest(registry)
    samples = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    text_time = timed(lambda: generate_latest(registry), rounds)
    collect_time = timed(lambda: list(registry.collect()), rounds)
    # Port 0 (an ephemeral port) is not a valid lb.metrics; start the server directly.
    httpd, _ = start_http_server(0, "127.0.0.1", registry=registry)
    url = f"http://127.0.0.1:{httpd.server_address[1]}/metrics"
    http_time = timed(lambda: urllib.request.urlopen(url).read(), rounds)
    httpd.shutdown()
    httpd.server_close()
    core.close()
    print(f"{n_services} services x {n_backends} backends: {samples} samples, "
          f"{len(text) / 1024:.0f} KiB")
    print(f"  natlb's collector alone: {collect_time}")
    print(f"  collector + exposition text: {text_time}")
    print(f"  HTTP GET /metrics (client and server threads here): {http_time}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*map(int, sys.argv[1:4])))
