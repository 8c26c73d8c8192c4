"""``natlb run``: wires the data path, the pool, health checks, the host
network setup and the control socket together, and takes it all down again.

SIGHUP reloads the config file (services and backends; see Daemon.reload).
`natlb restart` hands everything over to a new process (natlb/handover.py).

Start order: take over a crashed predecessor's journal from its guardian
(if one waits), publish the tables, adopt or create the flow table file,
bind the NFQUEUE workers (a steering rule with no reader would drop
traffic, since natlb is fail-closed), then the nftables table, then
addresses and sysctls: a VIP is never local without its rules, which would
make the host itself answer clients with RSTs.  Stop order is the reverse,
driven by the undo journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from natlb import fastpath, netsetup, ruleset, runstate, sdnotify, tableowner, watchdog
from natlb.announce import Announcer
from natlb.config import Config, host_port, lb_change, load
from natlb.config import family as config_family
from natlb.control import ControlServer
from natlb.core import (
    MARK_FAST,
    MARK_FORWARD,
    MARK_REPLY,
    RAW_MARK,
    Core,
    CoreConfig,
    CoreError,
    StoreReport,
    monotonic_ms,
)
from natlb.errors import ConfigError, NatlbError, RequestError
from natlb.fastpath import TcFastPath
from natlb.handover import (
    Channel,
    HandoverError,
    seed_traffic,
    spawn_orphan,
    traffic,
    wait_drained,
)
from natlb.health import Monitor
from natlb.linkwatch import Link, LinkWatch
from natlb.metrics_http import MetricsServer
from natlb.pool import Pool, PoolError
from natlb.rates import RateEstimator, live_counters
from natlb.runstate import pool_state, restore_pool
from natlb.status import collect
from natlb.steering import Steering
from natlb.tablewatch import TableWatch
from natlb.undo import Journal, claim

log = logging.getLogger("natlb")
# How often backends removed by a reload are looked at for remaining flows.
RETIRED_CHECK_S = 2.0


def _has_ipv6(config: Config) -> bool:
    return any(config_family(s.vip) == 6 for s in config.services)


def describe_store(path: str, r: StoreReport) -> str:
    if r.result == "created":
        return f"flow table {path}: new"
    if r.result == "refused":
        return f"flow table {path} refused ({r.reason}); starting with an empty table"
    how = (f"copied from a table of {r.old_max_flows} flows" if r.result == "copied"
           else "adopted in place")
    return (f"flow table {path}: {r.adopted} flows {how}; {r.dropped} dropped "
            f"(expired, or service/backend no longer configured)")


class Daemon:
    """One running natlb: the pieces that live as long as the process."""

    def __init__(self, config: Config, path: str | None,
                 handover_fd: int | None = None) -> None:
        self.config = config
        self.path = path
        self.core = Core(CoreConfig.from_lb(config.lb))
        self.pool = Pool(config, self.core)
        self.pool.operator_changed = self._save_run_state
        self.steering = Steering(config.lb.table)
        # Loaded before anything on the host changes: a kernel that refuses
        # it stops natlb with one clear error.
        self.fast = TcFastPath(config.lb) if config.lb.fastpath else None
        if self.fast:
            self.pool.publisher.forget_fast = self.fast.forget
            self.pool.publisher.on_publish = self.fast.publish
            self.pool.kernel_counts = self.fast.counts
            self.pool.observer_counts = self.fast.observer_counts
            self.pool.decision_counts = self.fast.decisions
        self.journal: Journal | None = None
        self.links: LinkWatch | None = None
        self._known_links: set[int] = set()  # rp_filter seen to (the link watch's thread)
        self.monitor: Monitor | None = None
        # Served in the status JSON: how the last SIGHUP went.
        self.reloads: dict[str, Any] = {"count": 0, "at": None, "ok": None, "error": None}
        # The queues read are the other bank's after a `natlb restart`.
        self.metrics = (MetricsServer(self.pool, config.lb, lambda: self.queues)
                        if config.lb.metrics else None)
        self.rates = RateEstimator()
        self.announcer: Announcer | None = None
        self.queues = config.lb.queues
        # A predecessor handing over to us (natlb restart), or None.
        self.predecessor = Channel(socket.socket(fileno=handover_fd)) if handover_fd else None
        # Still true once the handover is done (self.predecessor is None then).
        self.successor_of_restart = self.predecessor is not None
        if self.predecessor:
            # The socketpair's peer is the predecessor, whatever its version.
            peer, _, _ = struct.unpack("3i", self.predecessor.sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            watchdog.inherit_pid(os.environ, peer, os.getpid())
        self.store_report: StoreReport | None = None
        self.control: ControlServer | None = None
        # A successor: the predecessor's listening control socket, until served.
        self.inherited_control: socket.socket | None = None
        self.handed_over = False
        self._stop: asyncio.Event | None = None
        self._restarting = False
        self.serving = False             # a successor: once it has taken over
        # A reload and the retired-backend pruner both rebuild the ruleset
        # from the pool in an executor: one at a time, so the last installed
        # is built from the latest pool.
        self._ruleset_lock = asyncio.Lock()
        # A reload is between its new pool and its rules: the pool it shows
        # may still be put back (_reload), so nothing is pruned meanwhile.
        self._reloading = False
        # Another program deleting our nftables table (a firewall reload's
        # `flush ruleset`): it is installed again (_restore_tables).
        self.table_watch: TableWatch | None = None
        self._restores: set[asyncio.Task[None]] = set()

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
            log.info("service %s %s/%s %s -> %s", s.name, host_port(s.vip, s.port), s.protocol,
                     s.scheduler, ", ".join(b.key for b in s.backends))

    def _ruleset(self) -> ruleset.Spec:
        """Start and reload: the routing table is read again each time."""
        lb = self.config.lb
        services = ruleset.services_from_pool(self.pool.services, self.pool.state.retired)
        ingress = netsetup.backend_ingress(b.address for s in services for b in s.backends)
        return ruleset.Spec(table=lb.table, services=services, queues=tuple(self.queues),
                            marks=ruleset.Marks(own=RAW_MARK, forward=MARK_FORWARD,
                                                reply=MARK_REPLY, fast=MARK_FAST),
                            rewrite=lb.rewrite, ingress=ingress,
                            fragments=lb.max_fragments > 0,
                            fastpath=lb.fastpath,
                            comment=tableowner.mark(lb.control_socket))

    def _install_table(self) -> None:
        spec = self._ruleset()
        self._log_ingress(spec)
        self.steering.install(spec)

    @staticmethod
    def _log_ingress(spec: ruleset.Spec) -> None:
        for addr, ifindexes in sorted(spec.ingress.items()):
            log.debug("replies from backend %s believed via ifindex %s", addr,
                      ", ".join(map(str, ifindexes)) or "none (no route)")

    def setup_host(self, after_rules: Callable[[], None] | None = None) -> None:
        lb = self.config.lb
        assert self.journal is not None
        netsetup.runtime_dir(lb.control_socket, self.journal)
        # Rules first, always: a VIP must never be local, nor announced to
        # routers (announce = "healthy", natlb/announce.py), without them; on
        # exit the journal runs backwards, withdrawing them while steering works.
        if not self.journal.has("nft_table", table=lb.table):
            self.journal.record("nft_table", table=lb.table)
        self._install_table()
        if after_rules:
            after_rules()
        if self.fast:
            # Before the filters, after the flow table found its home
            # (_open_store): every FIN or RST ours carry reaches the flows.
            self.fast.observe(self.core)
        # Before the interfaces are listed (filters, rp_filter): no link
        # that comes or goes from now on is missed.
        self._open_link_watch()
        if self.fast:
            # After the rules (which keep the fast marks for it); a
            # predecessor's filters carry on until these replace them.
            names = self.fast.attach(self.journal)
            log.info("fast path: tc programs on %s", ", ".join(names) or "no interface")
            fastpath.warn_skipped(lb)
        netsetup.apply(lb, self._vips_at_start(), self.journal, ipv6=_has_ipv6(self.config))
        assert self.links is not None
        self.links.start()
        if lb.announce == "healthy":
            self.announcer = Announcer(lb.interface, self.journal)
            self.pool.listeners.append(self._announce)
            self.announcer.update(self.pool.services, []).result()
        log.info("nftables table %s installed%s (%s queue verdict, rewrite by %s), queues %s",
                 lb.table, " (ip and ip6)" if self.steering.ipv6 else "",
                 "nft" if self.steering.native_queue else "xt NFQUEUE",
                 "nft on natlb's mark" if lb.rewrite == "mark" else "natlb", self.queues)
        self._log_services()

    # -- interfaces that come and go (natlb/linkwatch.py's thread) -----------
    def _open_link_watch(self) -> None:
        self.links = LinkWatch(self._link_added, self._link_gone, self._links_lost)
        self.links.open()
        self._known_links = {i for i, _ in socket.if_nameindex()}

    def _close_link_watch(self) -> None:
        """Returns once no link change will touch the host or the journal."""
        if self.links:
            self.links.close()
            self.links = None

    def _link_added(self, link: Link) -> None:
        assert self.journal is not None
        if link.index not in self._known_links:
            self._known_links.add(link.index)
            netsetup.interface_added(link.name, self.journal)
        if self.fast:
            self.fast.added(link)

    def _link_gone(self, link: Link) -> None:
        assert self.journal is not None
        self._known_links.discard(link.index)
        netsetup.interface_gone(link.name, self.journal)
        if self.fast:
            self.fast.gone(link)

    def _links_lost(self) -> None:
        """The kernel dropped link notifications: list the links again."""
        log.warning("link notifications lost (too many at once); looking at every link again")
        assert self.journal is not None
        now = dict(socket.if_nameindex())
        for index in self._known_links - set(now):
            self._known_links.discard(index)
        for index, name in now.items():
            if index not in self._known_links:
                self._known_links.add(index)
                netsetup.interface_added(name, self.journal)
        if self.fast:
            self.fast.attach(self.journal)

    def _open_store(self) -> None:
        lb = self.config.lb
        self.store_report = self.core.store(lb.flow_table_path)
        text = describe_store(lb.flow_table_path, self.store_report)
        (log.warning if self.store_report.result == "refused" else log.info)(text)

    def _own_store(self) -> None:
        assert self.journal is not None
        path = self.config.lb.flow_table_path
        if not self.journal.has("flow_table", path=path):
            self.journal.record("flow_table", path=path)

    def _save_run_state(self) -> None:
        """Backends' admin states and weights, for a natlb started after a
        crash (natlb/runstate.py): at start, at every operator change and
        reload."""
        if self.journal is None:
            return
        path = self.config.lb.run_state_path
        if not self.journal.has("run_state", path=path):
            self.journal.record("run_state", path=path)
        try:
            runstate.save(path, self.pool)
        except OSError as e:
            log.warning("run-time state not saved to %s: %s (a crash restart would start "
                        "every backend from the config)", path, e)

    def _journal(self, inherited: list[dict[str, Any]]) -> Journal:
        lb = self.config.lb
        return Journal(guardian=True, grace_ms=lb.restart_grace_ms,
                       socket_path=lb.guardian_socket, inherited=inherited)

    async def reload(self) -> NatlbError | None:
        """SIGHUP or `natlb reload`: apply a changed config without losing
        flows.  Services and backends may change; [lb] settings need a
        restart.  A bad config is reported (log, status JSON, and the
        returned error for `natlb reload`) and the running one kept."""
        if not self.path:
            return None
        try:
            await self._reload(self.path)
        except NatlbError as e:
            log.error("reload refused, keeping the running config: %s", e)
            self.reloads = {"count": self.reloads["count"] + 1, "at": time.time(),
                            "ok": False, "error": str(e)}
            return e
        self.reloads = {"count": self.reloads["count"] + 1, "at": time.time(), "ok": True,
                        "error": None}
        log.info("reloaded %s", self.path)
        self._save_run_state()
        self._log_services()
        return None

    async def _reload(self, path: str) -> None:
        new = load(path)
        changed = lb_change(self.config.lb, new.lb)
        if changed:
            raise ConfigError(f"{changed}: a reload cannot change [lb]; restart natlb to "
                              f"apply it (natlb restart -c FILE keeps the flows)")
        # The kernel places no first packet of a new service before its
        # rules are in place (a packet the kernel leaves to natlb must reach
        # its queue): decisions pause until _reinstall is done.
        if self.fast:
            self.fast.pause_decisions()
        self._reloading = True
        try:
            await self._reconfigure(new)
        finally:
            self._reloading = False
        if self.monitor:
            await self.monitor.stop()
            self.monitor.start()

    async def _reconfigure(self, new: Config) -> None:
        """_reload's pool, rules and VIPs (decisions paused by the caller)."""
        try:
            before = self.pool.reconfigure(new)
        except PoolError as e:
            if self.fast:
                self.fast.resume_decisions()
            raise RequestError(str(e)) from None
        old = self.config
        old_vips = {s.vip for s in old.services}
        self.config = new
        new_vips = set() if self.announcer else {s.vip for s in new.services} - old_vips
        first_ipv6 = _has_ipv6(new) and not any(config_family(v) == 6 for v in old_vips)
        loop = asyncio.get_running_loop()
        # Rules first: a VIP must never be local without them.  Routes may
        # have changed too: the ruleset reads them in the executor.
        try:
            await self._reinstall()
        except NatlbError:
            # Refused: nothing changes.  Only the real install can tell (the
            # host may refuse at commit: memory, limits, a kernel without a
            # feature), so the pool is rolled back rather than the ruleset
            # tried first.  nft applies a batch whole or not at all: the old
            # table is still in place, and Steering only notes an install
            # that succeeded, so the old rules need no reinstall.  The old
            # tables go back before the kernel decides again.
            self.pool.restore(before)
            self.config = old
            await self.pool.publisher.idle()
            raise
        finally:
            if self.fast:
                self.fast.resume_decisions()
        if new_vips or first_ipv6:
            assert self.journal is not None
            journal = self.journal
            # pyroute2's synchronous API runs its own event loop: not in ours.
            await loop.run_in_executor(None, lambda: netsetup.apply(new.lb, new_vips, journal,
                                                                    ipv6=first_ipv6))

    async def _reinstall(self) -> None:
        loop = asyncio.get_running_loop()
        async with self._ruleset_lock:
            self.steering.install(await loop.run_in_executor(None, self._ruleset))

    def _withdraw_vips_now(self) -> None:
        """VIPs no service needs any more (not even a removed one's lingering
        flows) leave lb.interface: after a reload once those flows are gone,
        and at start for VIPs a predecessor or a crashed natlb added.  With
        announce = "healthy" the announcer withdraws them itself.  Not in
        the event loop: pyroute2 runs one of its own."""
        if self.config.lb.announce == "healthy" or self.journal is None:
            return
        keep = {s.cfg.vip for s in [*self.pool.services, *self.pool.state.retired]}
        try:
            netsetup.withdraw_vips(self.config.lb.interface, keep, self.journal)
        except (OSError, NetlinkError) as e:  # the VIP stays until exit
            log.error("removing VIPs no service has: %s", e)

    async def _withdraw_vips(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._withdraw_vips_now)

    async def prune_retired(self, every_s: float = RETIRED_CHECK_S) -> None:
        """Drop backends a reload removed from the ruleset once their flows
        have ended (until then their packets must still be rewritten)."""
        while True:
            await asyncio.sleep(every_s)
            retired = self.pool.state.retired
            if not retired or self._reloading:
                continue
            flows = [c.active_flows + c.inactive_flows for c in self.core.backend_counters(
                max(b.id for s in retired for b in s.backends) + 1)]
            if self.pool.state.prune_retired(flows.__getitem__):
                try:
                    # The VIP first, then its rules: the host never answers
                    # for a VIP whose rules are gone.
                    await self._withdraw_vips()
                    await self._reinstall()
                except NatlbError as e:  # the old table stays: more rules, no harm
                    log.error("ruleset without retired backends not installed: %s", e)

    # -- natlb restart: the old process's side -----------------------------
    async def restart(self, req: dict[str, Any]) -> dict[str, Any]:
        """Control request: hand over to a new natlb started with the config
        file in req (this process's own file by default)."""
        path = str(req.get("config") or self.path or "")
        try:
            new = load(path)
        except ConfigError as e:
            return {"ok": False, "error": f"config: {e}", "exit": 2}
        for key in ("table", "control_socket"):
            # The successor finds the table, its rules and the flow table file by these.
            if getattr(new.lb, key) != getattr(self.config.lb, key):
                return {"ok": False, "exit": 2,
                        "error": f"config: lb.{key} = {getattr(new.lb, key)!r}: cannot change "
                                 f"across a restart; stop natlb and start it again"}
        if self._restarting:
            return {"ok": False, "error": "a restart is already in progress"}
        self._restarting = True
        try:
            summary = await self._hand_over(path)
        except (HandoverError, CoreError, OSError) as e:
            log.error("restart failed, this natlb carries on: %s", e)
            return {"ok": False, "error": f"restart failed: {e}",
                    "exit": getattr(e, "exit_code", 1)}
        finally:
            self._restarting = False
        self.handed_over = True
        assert self._stop is not None
        # Stop once the reply is on its way to `natlb restart`.
        asyncio.get_running_loop().call_later(0.1, self._stop.set)
        return {"ok": True, **summary}

    async def _hand_over(self, path: str) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        mine, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "natlb", "run", "-c", os.path.abspath(path),
                "--handover-fd", str(theirs.fileno())]
        # Our control socket's listening socket goes too: the successor
        # accepts on it once it serves, and the path never stops answering.
        assert self.control is not None
        control_fd = self.control.fileno()
        pid = spawn_orphan(argv, (theirs.fileno(), control_fd))
        theirs.close()
        ch = Channel(mine)
        forwarding = False
        metrics_given: asyncio.Future[None] | None = None
        if self.fast:
            # First packets queued from now on (to us, then to the
            # successor): the handshakes the kernel placed before complete,
            # told to our observer, while the successor starts; none is
            # placed where no natlb will hear of it.
            self.fast.pause_decisions()
        # The successor watches links from before it lists them; ours must
        # change nothing once the journal is sent (nor attach our programs
        # over its own).  Nor may we install our table over its.
        self._close_link_watch()
        self._close_table_watch()
        try:
            assert self.journal is not None
            metrics = self.metrics if self.metrics and self.metrics.serving else None
            ch.send(journal=self.journal.entries, queues=self.queues,
                    pool=pool_state(self.pool),
                    metrics=metrics.address if metrics else None,
                    metrics_socket=metrics is not None, control_fd=control_fd)
            reply = await loop.run_in_executor(None, ch.receive, 30, "'bound'")
            if reply.get("want") == "metrics" and metrics and metrics.server:
                ch.send_socket(metrics.server.socket, metrics_socket=True)
                reply = await loop.run_in_executor(None, ch.receive, 30, "'bound'")
            if "bound" not in reply:
                raise HandoverError(f"expected 'bound', got {sorted(reply)}")
            queues = reply["bound"]
            # The successor serves our metrics socket: we stop accepting on
            # it before our counters go to the successor, so that no scrape
            # sees them go back (one of ours after one of its); scrapes
            # wait in the socket's backlog until the successor serves.
            if reply.get("metrics") and metrics:
                # (Under way while the checks stop: it takes up to POLL_S.)
                metrics_given = loop.run_in_executor(None, metrics.give_away)
            log.info("restart: successor pid %d bound queues %s", pid, queues)
            if self.monitor:
                await self.monitor.stop()
            await loop.run_in_executor(None, self.core.forward_to, queues)
            forwarding = True
            if self.fast:
                # The successor applies what its own programs carry; ours
                # must not touch the flows it is adopting.
                self.fast.stop_observing()
            if metrics_given:
                await metrics_given
            final = traffic(self.pool)
            # Counters the successor goes on with (Prometheus sees no reset):
            # the checks stopped above, the observer just now.
            ch.send(released=True, traffic=final, health_checks=self.pool.health_checks,
                    fastpath=self.fast.counters() if self.fast else {})
            served = await loop.run_in_executor(None, ch.expect, "serving", 30)
            if served.pop("control", False):
                # From now on `natlb status` is the successor's to answer.
                self.control.give_away()
        except BaseException:
            if self.fast:
                self.fast.resume_decisions()
            if metrics_given and metrics:
                with contextlib.suppress(Exception):
                    await metrics_given
                metrics.resume()
            if forwarding:
                # The successor may have re-identified our flows already.
                self.core.readopt()
                self.core.forward_to([])
                if self.fast:
                    self.fast.observe(self.core)
                # pyroute2 (the routes it reads) cannot run in our loop.
                await loop.run_in_executor(None, self._install_table)
            if self.monitor:
                self.monitor.start()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)   # init (or the subreaper) reaps it
            await loop.run_in_executor(None, self._rewatch_links)
            self._open_table_watch()
            raise
        finally:
            ch.close()
        left = await loop.run_in_executor(None, wait_drained, self.queues)
        log.info("restart: successor pid %d serves; %d packets left in our queues",
                 pid, left)
        return {"pid": pid, "queues": {"old": self.queues, "new": queues},
                "counters": final["services"], **served}

    # -- another program deleting our table (natlb/tablewatch.py's thread) ---
    def _open_table_watch(self) -> None:
        loop = asyncio.get_running_loop()

        def deleted(who: str) -> None:
            loop.call_soon_threadsafe(self._table_deleted, who)

        watch = TableWatch(self.config.lb.table, deleted)
        try:
            watch.start()
        except OSError as e:
            log.error("nftables notifications: %s; a table another program deletes will "
                      "not be installed again", e)
            return
        self.table_watch = watch

    def _close_table_watch(self) -> None:
        """Returns once no deletion will be reported."""
        if self.table_watch:
            self.table_watch.close()
            self.table_watch = None

    def _table_deleted(self, who: str) -> None:
        task = asyncio.get_running_loop().create_task(self._restore_tables(who))
        self._restores.add(task)
        task.add_done_callback(self._restores.discard)

    async def _restore_tables(self, who: str) -> None:
        """Our table is gone (or notifications were lost, who = ""): without
        it no packet reaches natlb and the host answers for the VIPs itself,
        so it goes in again, whole."""
        loop = asyncio.get_running_loop()
        async with self._ruleset_lock:
            if self._restarting or (self._stop and self._stop.is_set()):
                return
            try:
                gone = await loop.run_in_executor(None, self.steering.missing)
                if not gone:
                    return
                log.warning("nftables table %s deleted by %s (a firewall reload with "
                            "'flush ruleset'?); installing it again", " and ".join(gone),
                            who or "another program")
                self.steering.install(await loop.run_in_executor(None, self._ruleset))
            except NatlbError as e:
                log.error("nftables table %s not installed again: %s",
                          self.config.lb.table, e)
                return
            log.info("nftables table %s installed again", self.config.lb.table)

    def _rewatch_links(self) -> None:
        """A failed handover: watch links again, and our programs on every
        interface again (the successor may have replaced them).  Not in the
        event loop: pyroute2 runs one of its own."""
        try:
            self._open_link_watch()
            if self.fast:
                assert self.journal is not None
                self.fast.attach(self.journal)
            assert self.links is not None
            self.links.start()
        except Exception as e:  # the handover's own error is the one raised
            log.error("restart failed, and so did watching links again: %s", e)

    # -- natlb restart: the new process's side -------------------------------
    def _take_over(self) -> None:
        """Successor: bind paused, let the predecessor stop deciding, adopt
        its flow table and host changes, swap the rules, start reading."""
        ch = self.predecessor
        assert ch is not None
        lb = self.config.lb
        first = ch.receive(30)
        fd = first.get("control_fd")
        if isinstance(fd, int):
            self.inherited_control = ControlServer.inherited(fd, lb.control_socket)
        metrics_socket = None
        if self.metrics and first.get("metrics_socket"):
            # The predecessor's listening socket, served once we serve (a
            # scrape before then would see counters not yet carried over).
            ch.send(want="metrics")
            metrics_socket = ch.receive_socket(30, "the metrics socket")
            if metrics_socket is not None and not self.metrics.can_adopt(metrics_socket):
                metrics_socket.close()
                metrics_socket = None
        if (self.metrics and metrics_socket is None and "metrics" in first
                and not self.metrics.shares_port_with(first["metrics"])):
            # An address the predecessor's server cannot clash with is bound
            # now, before anything is taken over: taken, the restart fails
            # as for any config error.  One on its port (the same address, or
            # a wildcard on either side) is bound once it exits.
            self.metrics.start()
        restored = restore_pool(self.pool, first["pool"])
        self.pool.publish()
        # Everything slow happens before or after the pause, not in it.
        self.journal = self._journal(first["journal"])
        self.queues = lb.other_queues(first["queues"])
        self.core.start(self.queues, gso=lb.gso, mark=lb.rewrite == "mark", paused=True)
        ch.send(bound=self.queues, metrics=metrics_socket is not None)
        released = ch.receive(30, "'released'")
        # The pause: packets wait in the kernel queues until resume().
        seed_traffic(self.pool, released["traffic"])
        for result, n in released.get("health_checks", {}).items():
            if result in self.pool.health_checks:
                self.pool.health_checks[result] += n
        if self.fast:
            self.fast.carry_on(released.get("fastpath", {}))
        self._open_store()
        self._own_store()
        self.setup_host(self.core.resume)
        self._withdraw_vips_now()
        if metrics_socket is not None:
            assert self.metrics is not None
            self.metrics.adopt(metrics_socket)
        self._save_run_state()      # after the pause: not the packets' wait
        r = self.store_report
        assert r is not None
        ch.send(serving={"flows": r.adopted, "flows_dropped": r.dropped, "store": r.result,
                         "max_flows": lb.max_flows, "backends": restored,
                         "backends_total": sum(len(s.backends) for s in self.pool.services),
                         "control": self.inherited_control is not None})
        self.serving = True
        ch.close()
        self.predecessor = None

    async def serve(self) -> None:
        lb = self.config.lb
        started = time.time()
        stop = self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reload_tasks: set[asyncio.Task[None]] = set()

        async def notified_reload() -> NatlbError | None:
            sdnotify.reloading()
            try:
                return await self.reload()
            finally:
                sdnotify.ready("running")

        async def control_reload(req: dict[str, Any]) -> dict[str, Any]:
            # `natlb reload` (the unit's ExecReload): the outcome comes back,
            # so `systemctl reload` fails when the reload is refused.
            refused = await notified_reload()
            if refused is not None:
                why = f"config: {refused}" if isinstance(refused, ConfigError) else str(refused)
                return {"ok": False, "exit": refused.exit_code,
                        "error": f"reload refused, keeping the running config: {why}"}
            return {"ok": True, "config": self.path, "services": len(self.config.services),
                    "backends": sum(len(s.backends) for s in self.config.services)}

        def on_hup() -> None:
            task = loop.create_task(notified_reload())
            reload_tasks.add(task)
            task.add_done_callback(reload_tasks.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        self.pool.publisher.start(loop)  # table builds and flow resets leave the loop
        control = self.control = ControlServer(
            lb.control_socket, self.pool,
            lambda: {"pid": os.getpid(),
                     **collect(self.pool, self.queues, started, lb.max_flows, self.rates),
                     "reloads": self.reloads,
                     **({"fastpath": self.fast.status()} if self.fast else {})},
            restart=self.restart, reload=control_reload)
        if self.inherited_control:
            await control.adopt(self.inherited_control)
            self.inherited_control = None
        else:
            # A predecessor that did not pass its socket on (an older natlb)
            # gives the path up as it exits.
            await control.start(wait_s=10.0)
        self.monitor = Monitor(self.pool)

        def on_events() -> None:
            # The data path signals its event fd; no polling, no per-packet Python.
            for ev in self.core.read_events():
                self.pool.passive(ev.backend_id, ev.kind, ev.client)

        loop.add_reader(self.core.event_fd(), on_events)
        rates = loop.create_task(self.rates.run(lambda: live_counters(self.pool), time.monotonic))
        pruner = loop.create_task(self.prune_retired())
        dog = watchdog.from_environment(self.core.worker_beats, monotonic_ms,
                                        lambda: self.queues)
        pinger = loop.create_task(dog.run()) if dog else None
        self._open_table_watch()
        # Deleted since it went in, before the watch was open?
        self._table_deleted("")
        try:
            self.monitor.start()
            log.info("natlb running; control socket %s%s", lb.control_socket,
                     f", metrics on http://{lb.metrics}/metrics" if lb.metrics else "")
            if self.successor_of_restart and self.metrics and not self.metrics.serving:
                # The predecessor lets the address go as it exits.
                loop.run_in_executor(None, self.metrics.start_when_free, 10.0)
            # Queues bound, table loaded, VIPs up, control socket open.
            n = len(self.config.services)
            sdnotify.ready(f"running: {n} service{'' if n == 1 else 's'}")
            await stop.wait()
            log.info("handed over; exiting" if self.handed_over else "stopping")
            if not self.handed_over:   # the successor is the unit's main process now
                sdnotify.stopping()
        finally:
            self._close_table_watch()   # before the table goes (the journal's undo)
            for task in self._restores:
                task.cancel()
            rates.cancel()
            pruner.cancel()
            if pinger:
                pinger.cancel()
            loop.remove_reader(self.core.event_fd())
            await asyncio.gather(*reload_tasks, return_exceptions=True)
            await self.monitor.stop()
            await control.stop()
            await self.pool.publisher.close()

    def run(self) -> int:
        try:
            return self._run_checked()
        except NatlbError as e:
            if self.predecessor:
                # Still handing over: `natlb restart` reports why, with our
                # exit code, rather than a connection reset.
                why = f"config: {e}" if isinstance(e, ConfigError) else str(e)
                with contextlib.suppress(OSError):
                    self.predecessor.send(error=why, exit=e.exit_code)
            raise

    def _run_checked(self) -> int:
        lb = self.config.lb
        netsetup.preflight(lb)
        if not self.predecessor:
            # Another natlb's table, or the operator's of that name, is not
            # ours to replace (and delete on exit).
            tableowner.check(lb.table, lb.control_socket)
        if self.metrics and not self.predecessor:
            self.metrics.start()  # a taken address is a config error, before any change
        return self._run()     # its clean-up stops the metrics, before the core goes

    def _run(self) -> int:
        lb = self.config.lb
        try:
            if self.predecessor:
                self._take_over()
            else:
                crashed = ControlServer.check_free(lb.control_socket)
                crashed |= os.path.exists(lb.flow_table_path)
                # Its guardian listens within milliseconds of the death.
                inherited = claim(lb.guardian_socket, 2.0 if crashed else 0.0) or []
                if inherited:
                    log.info("took over %d host changes from a crashed natlb's guardian",
                             len(inherited))
                # From here on whatever fails leaves nothing behind: the
                # journal (with a claimed predecessor's changes) is undone.
                self.journal = self._journal(inherited)
                # The flow table's file lives beside the control socket, so its
                # directory (when natlb, not systemd, makes it) comes first.
                run_dir = os.path.dirname(os.path.abspath(lb.control_socket))
                if not os.path.isdir(run_dir):
                    self.journal.record("directory", path=run_dir,
                                        socket=os.path.abspath(lb.control_socket))
                    os.mkdir(run_dir, 0o700)
                if any(e.get("kind") == "run_state" and e.get("path") == lb.run_state_path
                       for e in inherited):
                    # What the operator had set, not the config's defaults:
                    # a backend disabled for maintenance stays out.  (Only
                    # a file the crashed natlb's journal owned: another may
                    # be a failed successor's, left behind.)
                    kept = runstate.load(lb.run_state_path)
                    if kept:
                        n = restore_pool(self.pool, kept, health=False)
                        log.info("kept the admin state and weight of %d backends from the "
                                 "crashed natlb", n)
                self.pool.publish()
                self._open_store()
                self._own_store()
                self._save_run_state()
                self.core.start(self.queues, gso=lb.gso, mark=lb.rewrite == "mark")
                self.setup_host()
                self._withdraw_vips_now()   # a crashed natlb's, of services now gone
                self.serving = True
            asyncio.run(self.serve())
        finally:
            self._close_link_watch()           # before the journal is undone
            if self.fast:
                self.fast.stop_observing()     # before the core it applies to
            if self.announcer:
                self.announcer.close()
            if self.journal and (self.handed_over
                                 or (self.successor_of_restart and not self.serving)):
                # Our successor owns the host now, or (a failed takeover) our
                # predecessor still does.  A start that failed undoes what
                # it did (below), as a stop does.
                self.core.stop()
                self.journal.hand_over()
            elif self.journal:
                for e in self.journal.undo():
                    log.error("cleanup: %s", e)
                self.core.stop()
            if self.metrics:
                self.metrics.stop()            # no scrape reads a closed core
            self.core.close()
            if self.fast:
                self.fast.close()
            if self.handed_over:
                log.info("left the host to the successor; bye")
            elif self.serving:
                log.info("removed everything natlb added; bye")
        return 0


def run(config: Config, path: str | None = None, handover_fd: int | None = None) -> int:
    return Daemon(config, path, handover_fd).run()
