"""``natlb run``: wires the data path, the pool, health checks, the host
network setup and the control socket together, and takes it all down again.

Start order: bind the NFQUEUE workers first (a steering rule with no reader
would drop traffic, since natlb is fail-closed), then addresses and sysctls,
then the nftables table.  Stop order is the reverse, driven by the undo
journal, so the table goes first and no packet waits on a dead queue.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from natlb import netsetup
from natlb.config import Config
from natlb.control import ControlServer
from natlb.core import MARK_FORWARD, MARK_REPLY, PROTOCOLS, RAW_MARK, Core, CoreConfig
from natlb.health import Monitor
from natlb.pool import Pool
from natlb.status import collect
from natlb.steering import Match, Rewrite, Steering
from natlb.undo import Journal

log = logging.getLogger("natlb")


def steering_matches(config: Config) -> list[Match]:
    matches: list[Match] = []
    seen: set[tuple[str, int, int, bool]] = set()
    for s in config.services:
        proto = PROTOCOLS[s.protocol]
        wanted = [(s.vip, s.port, proto, False)]
        wanted += [(b.address, b.port, proto, True) for b in s.backends]
        for w in wanted:
            if w not in seen:
                seen.add(w)
                matches.append(Match(*w))
    return matches


def core_config(config: Config) -> CoreConfig:
    return CoreConfig(
        max_flows=config.lb.max_flows,
        workers=config.lb.workers,
        poll_us=config.lb.poll_us,
        syn_timeout_ms=config.lb.syn_timeout_ms,
        resteer_tries=config.lb.resteer_tries,
        timeouts_ms={k: max(1, int(v * 1000)) for k, v in config.lb.timeouts_s.items()},
    )


async def _serve(config: Config, pool: Pool) -> None:
    lb = config.lb
    started = time.time()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    control = ControlServer(lb.control_socket, pool,
                            lambda: collect(pool, lb.queues, started, lb.max_flows))
    await control.start()
    monitor = Monitor(pool)

    def on_events() -> None:
        # The data path signals its event fd; no polling, no per-packet Python.
        for ev in pool.core.read_events():
            pool.passive(ev.backend_id, ev.kind)

    loop.add_reader(pool.core.event_fd(), on_events)
    try:
        monitor.start()
        log.info("natlb running; control socket %s", lb.control_socket)
        await stop.wait()
        log.info("stopping")
    finally:
        loop.remove_reader(pool.core.event_fd())
        await monitor.stop()
        await control.stop()


def mark_rewrites(pool: Pool) -> list[Rewrite]:
    """The stateless rewrites nft applies on natlb's verdict marks."""
    out = []
    for s in pool.services:
        proto = PROTOCOLS[s.cfg.protocol]
        out.append(Rewrite(MARK_REPLY | s.id, "saddr", s.cfg.vip, s.cfg.port, proto))
        out += [Rewrite(MARK_FORWARD | b.id, "daddr", b.cfg.address, b.cfg.port, proto)
                for b in s.backends]
    return out


def _setup_host(config: Config, pool: Pool, journal: Journal) -> None:
    lb = config.lb
    netsetup.apply(lb, (s.vip for s in config.services), journal)
    steering = Steering(lb.table)
    journal.record("nft_table", table=lb.table)
    rewrites = mark_rewrites(pool) if lb.rewrite == "mark" else None
    steering.install(steering_matches(config), lb.queues, mark=RAW_MARK, rewrites=rewrites)
    log.info("nftables table %s installed (%s queue verdict, rewrite by %s), queues %s",
             lb.table, "nft" if steering.native_queue else "xt NFQUEUE",
             "nft on natlb's mark" if rewrites else "natlb", lb.queues)
    for s in config.services:
        log.info("service %s %s:%d/%s %s -> %s", s.name, s.vip, s.port, s.protocol,
                 s.scheduler, ", ".join(b.key for b in s.backends))


def run(config: Config) -> int:
    ControlServer.check_free(config.lb.control_socket)
    core = Core(core_config(config))
    pool = Pool(config, core)
    pool.publish()
    core.start(config.lb.queues, gso=config.lb.gso, mark=config.lb.rewrite == "mark")
    journal = Journal(guardian=True)
    try:
        _setup_host(config, pool, journal)
        asyncio.run(_serve(config, pool))
    finally:
        errors = journal.undo()
        for e in errors:
            log.error("cleanup: %s", e)
        core.stop()
        core.close()
        log.info("removed everything natlb added; bye")
    return 0
