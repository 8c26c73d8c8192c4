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
from typing import Any

from natlb import netsetup, ruleset, sdnotify
from natlb.announce import Announcer
from natlb.config import Config, load
from natlb.control import ControlServer
from natlb.core import MARK_FORWARD, MARK_REPLY, RAW_MARK, Core, CoreConfig
from natlb.errors import ConfigError, NatlbError, RequestError
from natlb.health import Monitor
from natlb.metrics import MetricsServer
from natlb.pool import Pool, PoolError
from natlb.rates import RateEstimator, live_counters
from natlb.status import collect
from natlb.steering import Steering
from natlb.undo import Journal

log = logging.getLogger("natlb")


class Daemon:
    """One running natlb: the pieces that live as long as the process."""

    def __init__(self, config: Config, path: str | None) -> None:
        self.config = config
        self.path = path
        self.core = Core(CoreConfig.from_lb(config.lb))
        self.pool = Pool(config, self.core)
        self.steering = Steering(config.lb.table)
        self.journal: Journal | None = None
        self.monitor: Monitor | None = None
        # Served in the status JSON: how the last SIGHUP went.
        self.reloads: dict[str, Any] = {"count": 0, "at": None, "ok": None, "error": None}
        self.metrics = MetricsServer(self.pool, config.lb) if config.lb.metrics else None
        self.rates = RateEstimator()
        self.announcer: Announcer | None = None

    def _vips_at_start(self) -> list[str]:
        """VIPs netsetup adds for good; with announce = "healthy" the
        Announcer adds and removes them instead."""
        if self.config.lb.announce == "healthy":
            return []
        return [s.vip for s in self.config.services]

    def _announce(self) -> None:
        if self.announcer:
            self.announcer.update(self.pool.services, (s.vip for s in self.config.services))

    def _log_services(self) -> None:
        for s in self.config.services:
            log.info("service %s %s:%d/%s %s -> %s", s.name, s.vip, s.port, s.protocol,
                     s.scheduler, ", ".join(b.key for b in s.backends))

    def _ruleset(self) -> ruleset.Spec:
        """Start and reload: the routing table is read again each time."""
        lb = self.config.lb
        services = ruleset.services_from_pool(self.pool.services)
        ingress = netsetup.backend_ingress(b.address for s in services for b in s.backends)
        return ruleset.Spec(table=lb.table, services=services, queues=tuple(lb.queues),
                            marks=ruleset.Marks(own=RAW_MARK, forward=MARK_FORWARD,
                                                reply=MARK_REPLY),
                            rewrite=lb.rewrite, ingress=ingress,
                            fragments=lb.max_fragments > 0,
                            own_replies_pass=any(s.cluster for s in self.config.services))

    def _install_table(self) -> None:
        spec = self._ruleset()
        self._log_ingress(spec)
        self.steering.install(spec)

    @staticmethod
    def _log_ingress(spec: ruleset.Spec) -> None:
        for addr, ifindexes in sorted(spec.ingress.items()):
            log.debug("replies from backend %s believed via ifindex %s", addr,
                      ", ".join(map(str, ifindexes)) or "none (no route)")

    def setup_host(self) -> None:
        lb = self.config.lb
        assert self.journal is not None
        netsetup.runtime_dir(lb.control_socket, self.journal)
        # With announce = "healthy", routers may send us traffic as soon as a
        # route or VIP appears (natlb/announce.py): steer first, and on exit
        # (the journal runs backwards) withdraw them while steering still works.
        steer_first = lb.announce == "healthy"
        if steer_first:
            self.journal.record("nft_table", table=lb.table)
            self._install_table()
        netsetup.apply(lb, self._vips_at_start(), self.journal)
        if not steer_first:
            self.journal.record("nft_table", table=lb.table)
            self._install_table()
        if lb.announce == "healthy":
            self.announcer = Announcer(lb.interface, self.journal)
            self.pool.listeners.append(self._announce)
            self.announcer.update(self.pool.services, []).result()
        log.info("nftables table %s installed (%s queue verdict, rewrite by %s), queues %s",
                 lb.table, "nft" if self.steering.native_queue else "xt NFQUEUE",
                 "nft on natlb's mark" if lb.rewrite == "mark" else "natlb", lb.queues)
        self._log_services()

    async def reload(self) -> None:
        """SIGHUP: apply a changed config without losing flows.  Services and
        backends may change; [lb] settings need a restart.  A bad config is
        reported (log and status JSON) and the running one kept."""
        if not self.path:
            return
        try:
            await self._reload(self.path)
        except NatlbError as e:
            log.error("reload refused, keeping the running config: %s", e)
            self.reloads = {"count": self.reloads["count"] + 1, "at": time.time(),
                            "ok": False, "error": str(e)}
            return
        self.reloads = {"count": self.reloads["count"] + 1, "at": time.time(), "ok": True,
                        "error": None}
        log.info("reloaded %s", self.path)
        self._log_services()

    async def _reload(self, path: str) -> None:
        new = load(path)
        if new.lb != self.config.lb:
            changed = [k for k in vars(new.lb) if getattr(new.lb, k) != getattr(self.config.lb, k)]
            raise ConfigError(f"lb.{changed[0]} changed; restart natlb to apply it")
        try:
            self.pool.reconfigure(new)
        except PoolError as e:
            raise RequestError(str(e)) from None
        old_vips = {s.vip for s in self.config.services}
        self.config = new
        new_vips = {s.vip for s in new.services} - old_vips
        loop = asyncio.get_running_loop()
        if new_vips and not self.announcer:
            assert self.journal is not None
            journal = self.journal
            # pyroute2's synchronous API runs its own event loop: not in ours.
            await loop.run_in_executor(None, lambda: netsetup.apply(new.lb, new_vips, journal))
        # Routes may have changed too: the ruleset reads them in the executor.
        self.steering.install(await loop.run_in_executor(None, self._ruleset))
        self._announce()
        if self.monitor:
            await self.monitor.stop()
            self.monitor.start()

    async def serve(self) -> None:
        lb = self.config.lb
        started = time.time()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reload_tasks: set[asyncio.Task[None]] = set()

        async def notified_reload() -> None:
            sdnotify.reloading()
            try:
                await self.reload()
            finally:
                sdnotify.ready("running")

        def on_hup() -> None:
            task = loop.create_task(notified_reload())
            reload_tasks.add(task)
            task.add_done_callback(reload_tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        self.pool.publisher.start(loop)  # table builds and flow resets leave the loop
        control = ControlServer(lb.control_socket, self.pool,
                                lambda: {**collect(self.pool, lb.queues, started, lb.max_flows,
                                                   self.rates),
                                         "reloads": self.reloads})
        await control.start()
        self.monitor = Monitor(self.pool)

        def on_events() -> None:
            # The data path signals its event fd; no polling, no per-packet Python.
            for ev in self.core.read_events():
                self.pool.passive(ev.backend_id, ev.kind, ev.client)

        loop.add_reader(self.core.event_fd(), on_events)
        rates = loop.create_task(self.rates.run(lambda: live_counters(self.pool), time.monotonic))
        try:
            self.monitor.start()
            log.info("natlb running; control socket %s%s", lb.control_socket,
                     f", metrics on http://{lb.metrics}/metrics" if lb.metrics else "")
            # Queues bound, table loaded, VIPs up, control socket open.
            sdnotify.ready(f"running: {len(self.config.services)} services")
            await stop.wait()
            log.info("stopping")
            sdnotify.stopping()
        finally:
            rates.cancel()
            loop.remove_reader(self.core.event_fd())
            await asyncio.gather(*reload_tasks, return_exceptions=True)
            await self.monitor.stop()
            await control.stop()
            await self.pool.publisher.close()

    def run(self) -> int:
        lb = self.config.lb
        netsetup.preflight(lb)
        ControlServer.check_free(lb.control_socket)
        if self.metrics:
            self.metrics.start()  # a taken address is a config error, before any change
        try:
            self._run()
        finally:
            if self.metrics:
                self.metrics.stop()
            self.core.close()
        return 0

    def _run(self) -> None:
        lb = self.config.lb
        self.pool.publish()
        self.core.start(lb.queues, gso=lb.gso, mark=lb.rewrite == "mark")
        self.journal = Journal(guardian=True)
        try:
            self.setup_host()
            asyncio.run(self.serve())
        finally:
            if self.announcer:
                self.announcer.close()
            for e in self.journal.undo():
                log.error("cleanup: %s", e)
            self.core.stop()
            log.info("removed everything natlb added; bye")


def run(config: Config, path: str | None = None) -> int:
    return Daemon(config, path).run()
