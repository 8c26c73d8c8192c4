"""Host network configuration natlb needs, through pyroute2 and /proc/sys:
the VIP addresses, IPv4 forwarding, reverse-path filtering off, routes the
config asks for.  Each change goes through the undo journal first; things
that were already in place are left alone and not undone."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from natlb.config import ConfigError, LBConfig
from natlb.undo import Journal

log = logging.getLogger("natlb.net")

SYSCTLS = {
    # Forward the rewritten packets.
    "/proc/sys/net/ipv4/ip_forward": "1",
    # A rewritten reply leaves with the VIP, a local address, as its source:
    # the kernel calls that a martian unless accept_local is on, and the
    # reverse-path check (route to the VIP is via lo) would fail too.
    "/proc/sys/net/ipv4/conf/all/accept_local": "1",
    "/proc/sys/net/ipv4/conf/all/rp_filter": "0",
    # Backends behind a bridge: bridged frames must not hit our prerouting
    # hook a second time (only if br_netfilter is loaded).
    "/proc/sys/net/bridge/bridge-nf-call-iptables": "0",
}


class NetSetupError(RuntimeError):
    pass


def _set_sysctl(path: str, value: str, journal: Journal) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        old = f.read().strip()
    if old == value:
        return
    journal.record("sysctl", path=path, old=old)
    with open(path, "w") as f:
        f.write(value)


def preflight(lb: LBConfig) -> None:
    """Config values only this host can judge, checked before anything is
    touched, so a wrong one is a config error (exit 2) like any other."""
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=lb.interface):
            raise ConfigError(f'lb.interface = "{lb.interface}": no such interface')
        for i, r in enumerate(lb.routes):
            if r.device and not ipr.link_lookup(ifname=r.device):
                raise ConfigError(f'lb.route[{i}].device = "{r.device}": no such interface')
    parent = os.path.dirname(os.path.abspath(lb.control_socket))
    if not os.path.isdir(parent):
        raise ConfigError(f'lb.control_socket = "{lb.control_socket}": no directory {parent}')


def apply(lb: LBConfig, vips: Iterable[str], journal: Journal) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=lb.interface)
        if not idx:
            raise NetSetupError(f"lb.interface = \"{lb.interface}\": no such interface")
        ifindex = idx[0]
        if lb.interface == "lo":
            ipr.link("set", index=ifindex, state="up")
        have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=ifindex, family=2)}
        for vip in sorted(set(vips)):
            if vip in have:
                log.info("VIP %s already on %s; leaving it in place", vip, lb.interface)
                continue
            journal.record("address", ifname=lb.interface, address=vip, prefixlen=32)
            ipr.addr("add", index=ifindex, address=vip, prefixlen=32)
        for r in lb.routes:
            spec: dict[str, object] = {"dst": r.destination}
            if r.gateway:
                spec["gateway"] = r.gateway
            if r.device:
                dev = ipr.link_lookup(ifname=r.device)
                if not dev:
                    raise NetSetupError(f"route device \"{r.device}\": no such interface")
                spec["oif"] = dev[0]
            try:
                ipr.route("add", **spec)
            except NetlinkError as e:
                if e.code == 17:  # EEXIST: someone else's route; never remove it
                    log.info("route %s already present; leaving it in place", r.destination)
                    continue
                raise NetSetupError(f"route {r.destination}: {e.args[1]}") from None
            # Recorded after the add: only a route we created may be removed.
            journal.record("route", spec=spec)
    for path, value in SYSCTLS.items():
        _set_sysctl(path, value, journal)
    # The effective rp_filter is the larger of "all" and the interface's own.
    for conf in sorted(os.listdir("/proc/sys/net/ipv4/conf")):
        if conf not in ("all", "default"):
            _set_sysctl(f"/proc/sys/net/ipv4/conf/{conf}/rp_filter", "0", journal)
