"""VIP addresses that follow health (``lb.announce = "healthy"``).

With several natlb nodes behind ECMP routers, a node must draw a VIP's
traffic only while it can serve it.  natlb does not speak BGP: it puts the
VIP's /32 (or /128) on ``lb.interface`` while at least one service on that VIP has a
backend taking new flows, and removes it otherwise.  A routing daemon on the
node (BIRD's ``direct`` protocol on that interface, see examples/cluster/)
announces exactly the addresses it finds there, so a VIP is withdrawn when
its last backend fails, when natlb stops, and (through the undo journal's
guardian) when natlb dies.

Every address added is journaled first; removing it at run time leaves the
entry, whose undo tolerates the address being gone already.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from natlb import netsetup
from natlb.pool import Service
from natlb.undo import Journal

log = logging.getLogger("natlb.announce")


def wanted_vips(services: Iterable[Service]) -> set[str]:
    """VIPs with at least one service that has a backend taking new flows."""
    return {s.cfg.vip for s in services if any(b.eligible for b in s.backends)}


class Announcer:
    """Adds and removes VIP addresses in one worker thread: pyroute2's
    synchronous API runs an event loop of its own, which cannot run inside
    natlb's, and the thread keeps the changes in the order they were asked."""

    def __init__(self, interface: str, journal: Journal) -> None:
        self.interface = interface
        self.journal = journal
        self.announced: set[str] = set()   # as asked for; the thread catches up
        self.foreign: set[str] = set()     # there before natlb: never touched
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="natlb-announce")

    def update(self, services: Iterable[Service], all_vips: Iterable[str]) -> Future[None]:
        """Announce the wanted VIPs that are missing, withdraw the others
        natlb announced.  ``all_vips``: every configured VIP (a VIP removed
        from the config is withdrawn too)."""
        want = wanted_vips(services)
        add = sorted(want - self.announced - self.foreign)
        remove = sorted(((self.announced | set(all_vips)) - want) & self.announced)
        for vip in add:   # journaled before it is made, as every change
            self.journal.record("address", ifname=self.interface, address=vip,
                                prefixlen=netsetup.vip_prefixlen(vip))
        self.announced = (self.announced | set(add)) - set(remove)
        return self._worker.submit(self._apply, add, remove)

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def _apply(self, add: list[str], remove: list[str]) -> None:
        if not add and not remove:
            return
        try:
            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.interface)
                if not idx:
                    log.error("lb.interface %s is gone; cannot announce VIPs", self.interface)
                    return
                have = netsetup.local_addresses(ipr, idx[0])
                for vip in add:
                    if vip in have:
                        log.warning("VIP %s was on %s before natlb; leaving it alone", vip,
                                    self.interface)
                        self.foreign.add(vip)
                        self.announced.discard(vip)
                        continue
                    netsetup.add_vip(ipr, idx[0], vip)
                    log.warning("VIP %s announced (on %s)", vip, self.interface)
                for vip in remove:
                    try:
                        ipr.addr("del", index=idx[0], address=vip,
                                 prefixlen=netsetup.vip_prefixlen(vip))
                    except NetlinkError as e:
                        log.debug("VIP %s already gone: %s", vip, e)
                    log.warning("VIP %s withdrawn: no backend up", vip)
        except (OSError, NetlinkError) as e:
            log.error("announcing VIPs on %s: %s", self.interface, e)
