"""What one backend flap costs the control plane (no root needed).

    .venv/bin/python -m bench.poolflap [--services 5] [--backends 700] [--flaps 5]

`services` maglev services of `backends` backends each.  One backend of one
service goes down and comes back, `flaps` times.  Two ways are measured:

* before: what natlb did up to issue 10 -- every change rebuilt every
  service's table and published, inline on the event loop;
* after: the pool's publisher -- only the changed service's table is
  rebuilt, on a worker thread, while the loop keeps running.

Reported per flap event: the longest the event loop was blocked (a 1 ms
ticker's worst lateness), and the time until the new state was published.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from natlb.config import parse
from natlb.core import BackendEntry, Core, CoreConfig, ServiceTable
from natlb.pool import Pool
from natlb.pool_state import CheckResult
from natlb.schedulers import Candidate, build_table


def make_config(services: int, backends: int):
    return parse({"service": [{
        "name": f"s{i}", "vip": "192.0.2.100", "port": 1000 + i, "scheduler": "maglev",
        "health": {"kind": "tcp", "fall": 1, "rise": 1},
        "backend": [{"address": f"203.0.113.{j % 250 + 1}", "port": 1000 + j // 250}
                    for j in range(backends)],
    } for i in range(services)]})


def publish_everything_inline(pool: Pool) -> None:
    """The old Pool.publish: every service's table, every time."""
    out = []
    for s in pool.services:
        entries = tuple(BackendEntry(b.cfg.address, b.cfg.port, b.weight, b.id, b.eligible,
                                     b.alive) for b in s.backends)
        cands = [Candidate(b.cfg.key, b.weight, b.eligible) for b in s.backends]
        out.append(ServiceTable(s.cfg.vip, s.cfg.port, s.cfg.protocol, s.cfg.scheduler, s.id,
                                entries, tuple(build_table(s.cfg.scheduler, cands))))
    pool.core.publish(out)


async def lag_ticker(worst: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(0.001)
        worst[0] = max(worst[0], loop.time() - t0 - 0.001)


async def measure(pool: Pool, flaps: int, offload: bool) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    if offload:
        pool.publisher.start(loop)
    svc = pool.services[0]
    victim = svc.backends[len(svc.backends) // 2]
    blocked, published = [], []
    for i in range(2 * flaps):
        worst = [0.0]
        stop = asyncio.Event()
        ticker = asyncio.create_task(lag_ticker(worst, stop))
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        if offload:
            pool.report(svc, victim, i % 2 == 1, "flap")
            await pool.publisher.idle()
        else:
            pool.state.apply(CheckResult(victim.id, i % 2 == 1, "flap", time.monotonic()))
            publish_everything_inline(pool)
        published.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)
        stop.set()
        await ticker
        blocked.append(worst[0])
    if offload:
        await pool.publisher.close()
    return {"loop_blocked_ms_max": round(max(blocked) * 1000, 1),
            "loop_blocked_ms_median": round(statistics.median(blocked) * 1000, 1),
            "published_after_ms_median": round(statistics.median(published) * 1000, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=5)
    ap.add_argument("--backends", type=int, default=700)
    ap.add_argument("--flaps", type=int, default=5)
    a = ap.parse_args()
    cfg = make_config(a.services, a.backends)
    result: dict[str, object] = {"services": a.services, "backends_each": a.backends,
                                 "scheduler": "maglev", "flap_events": 2 * a.flaps}
    for name, offload in (("before", False), ("after", True)):
        core = Core(CoreConfig(max_flows=1024, workers=1))
        pool = Pool(cfg, core)
        t0 = time.perf_counter()
        pool.publish()
        result[f"{name}_first_publish_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        result[name] = asyncio.run(measure(pool, a.flaps, offload))
        if offload:
            result["after_tables_built"] = pool.publisher.builds
        core.close()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
