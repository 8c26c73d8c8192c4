"""``natlb run``: wires the data path, the pool, health checks, the host
network setup and the control socket together, and takes it all down again.

SIGHUP reloads the config file (services and backends; see Daemon.reload).

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
from natlb.config import Config, ConfigError, load
from natlb.control import ControlServer
from natlb.core import MARK_FORWARD, MARK_REPLY, PROTOCOLS, RAW_MARK, Core, CoreConfig
from natlb.health import Monitor
from natlb.pool import Pool, PoolError
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


def mark_rewrites(pool: Pool) -> list[Rewrite]:
    """The stateless rewrites nft applies on natlb's verdict marks."""
    out = []
    for s in pool.services:
        proto = PROTOCOLS[s.cfg.protocol]
        out.append(Rewrite(MARK_REPLY | s.id, "saddr", s.cfg.vip, s.cfg.port, proto))
        out += [Rewrite(MARK_FORWARD | b.id, "daddr", b.cfg.address, b.cfg.port, proto)
                for b in s.backends]
    return out


class Daemon:
    """One running natlb: the pieces that live as long as the process."""

    def __init__(self, config: Config, path: str | None) -> None:
        self.config = config
        self.path = path
        self.core = Core(core_config(config))
        self.pool = Pool(config, self.core)
        self.steering = Steering(config.lb.table)
        self.journal: Journal | None = None
        self.monitor: Monitor | None = None

    def _log_services(self) -> None:
        for s in self.config.services:
            log.info("service %s %s:%d/%s %s -> %s", s.name, s.vip, s.port, s.protocol,
                     s.scheduler, ", ".join(b.key for b in s.backends))

    def _install_table(self) -> None:
        lb = self.config.lb
        rewrites = mark_rewrites(self.pool) if lb.rewrite == "mark" else None
        self.steering.install(steering_matches(self.config), lb.queues, mark=RAW_MARK,
                              rewrites=rewrites)

    def setup_host(self) -> None:
        lb = self.config.lb
        assert self.journal is not None
        netsetup.apply(lb, (s.vip for s in self.config.services), self.journal)
        self.journal.record("nft_table", table=lb.table)
        self._install_table()
        log.info("nftables table %s installed (%s queue verdict, rewrite by %s), queues %s",
                 lb.table, "nft" if self.steering.native_queue else "xt NFQUEUE",
                 "nft on natlb's mark" if lb.rewrite == "mark" else "natlb", lb.queues)
        self._log_services()

    async def reload(self) -> None:
        """SIGHUP: apply a changed config without losing flows.  Services and
        backends may change; [lb] settings need a restart.  A bad config is
        reported and the running one kept."""
        if not self.path:
            return
        try:
            new = load(self.path)
        except ConfigError as e:
            log.error("reload refused, keeping the running config: %s", e)
            return
        if new.lb != self.config.lb:
            changed = [k for k in vars(new.lb) if getattr(new.lb, k) != getattr(self.config.lb, k)]
            log.error("reload refused: lb.%s changed; restart natlb to apply it", changed[0])
            return
        try:
            self.pool.reconfigure(new)
        except PoolError as e:
            log.error("reload refused: %s", e)
            return
        old_vips = {s.vip for s in self.config.services}
        self.config = new
        new_vips = {s.vip for s in new.services} - old_vips
        if new_vips:
            assert self.journal is not None
            journal = self.journal
            # pyroute2's synchronous API runs its own event loop: not in ours.
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: netsetup.apply(new.lb, new_vips, journal))
        self._install_table()
        if self.monitor:
            await self.monitor.stop()
            self.monitor.start()
        log.info("reloaded %s", self.path)
        self._log_services()

    async def serve(self) -> None:
        lb = self.config.lb
        started = time.time()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            task = loop.create_task(self.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        self.pool.publisher.start(loop)  # table builds and flow resets leave the loop
        control = ControlServer(lb.control_socket, self.pool,
                                lambda: collect(self.pool, lb.queues, started, lb.max_flows))
        await control.start()
        self.monitor = Monitor(self.pool)

        def on_events() -> None:
            # The data path signals its event fd; no polling, no per-packet Python.
            for ev in self.core.read_events():
                self.pool.passive(ev.backend_id, ev.kind, ev.client)

        loop.add_reader(self.core.event_fd(), on_events)
        try:
            self.monitor.start()
            log.info("natlb running; control socket %s", lb.control_socket)
            await stop.wait()
            log.info("stopping")
        finally:
            loop.remove_reader(self.core.event_fd())
            await asyncio.gather(*reloads, return_exceptions=True)
            await self.monitor.stop()
            await control.stop()
            await self.pool.publisher.close()

    def run(self) -> int:
        lb = self.config.lb
        netsetup.preflight(lb)
        ControlServer.check_free(lb.control_socket)
        self.pool.publish()
        self.core.start(lb.queues, gso=lb.gso, mark=lb.rewrite == "mark")
        self.journal = Journal(guardian=True)
        try:
            self.setup_host()
            asyncio.run(self.serve())
        finally:
            for e in self.journal.undo():
                log.error("cleanup: %s", e)
            self.core.stop()
            self.core.close()
            log.info("removed everything natlb added; bye")
        return 0


def run(config: Config, path: str | None = None) -> int:
    return Daemon(config, path).run()
