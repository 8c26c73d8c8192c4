"""Host network configuration natlb needs, through pyroute2 and /proc/sys:
the VIP addresses, IPv4 forwarding (and IPv6 forwarding when a VIP is
IPv6), reverse-path filtering off, routes the config asks for.  Each
change goes through the undo journal first; things that were already in
place are left alone and not undone.  The revert of
each kind of change is registered here, next to the change.

Also reads the routing table: the interfaces each backend is routed
through, from which natlb believes its replies (natlb.ruleset)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Iterable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from natlb.config import LBConfig, family
from natlb.errors import ConfigError, HostError, no_such_interface
from natlb.undo import Journal, reverter

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
# Only with an IPv6 VIP: forwarding changes how every interface treats
# router advertisements, which an IPv4-only natlb has no business doing.
SYSCTLS_IPV6 = {
    "/proc/sys/net/ipv6/conf/all/forwarding": "1",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables": "0",
}
IFA_F_NODAD = 0x02
# Changes that reach beyond natlb: said once, as a warning, when made.
SIDE_EFFECTS = {
    "/proc/sys/net/bridge/bridge-nf-call-iptables":
        "iptables and nftables rules no longer see the frames this host bridges "
        "(a firewall over bridged traffic: Docker's, Kubernetes')",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables":
        "ip6tables and nftables rules no longer see the IPv6 frames this host bridges",
}


RUNTIME_DIR = os.path.dirname(LBConfig().control_socket)


class NetSetupError(HostError):
    """The host refused a change (an address, a route, a sysctl)."""


@reverter("address")
def _undo_address(entry: dict[str, Any]) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=entry["ifname"])
        if idx:
            try:
                ipr.addr("del", index=idx[0], address=entry["address"],
                         prefixlen=entry["prefixlen"])
            except NetlinkError as e:  # already gone
                log.debug("address undo: %s", e)


@reverter("route")
def _undo_route(entry: dict[str, Any]) -> None:
    with IPRoute() as ipr:
        try:
            ipr.route("del", **entry["spec"])
        except NetlinkError as e:  # already gone
            log.debug("route undo: %s", e)


@reverter("directory")
def _undo_directory(entry: dict[str, Any]) -> None:
    # Made for the control socket: a socket left by a killed natlb goes with
    # it; anything else in it is someone else's, and the directory stays.
    sock = entry.get("socket")
    if sock and os.path.exists(sock) and stat.S_ISSOCK(os.lstat(sock).st_mode):
        os.unlink(sock)
    try:
        os.rmdir(entry["path"])
    except OSError as e:  # already gone, or not empty
        log.debug("directory undo: %s", e)


def runtime_dir(control_socket: str, journal: Journal) -> None:
    """The control socket's directory, when it is the default /run/natlb and
    systemd's RuntimeDirectory= did not make it (a manual run)."""
    parent = os.path.dirname(os.path.abspath(control_socket))
    if not os.path.isdir(parent):
        journal.record("directory", path=parent, socket=os.path.abspath(control_socket))
        os.mkdir(parent, 0o700)


@reverter("sysctl")
def _undo_sysctl(entry: dict[str, Any]) -> None:
    try:
        with open(entry["path"], "w") as f:
            f.write(entry["old"])
    except FileNotFoundError:  # an interface's, gone with it
        log.debug("sysctl undo: %s is gone", entry["path"])


def _set_sysctl(path: str, value: str, journal: Journal) -> None:
    try:
        with open(path) as f:
            old = f.read().strip()
    except FileNotFoundError:  # no such module, or an interface gone meanwhile
        return
    if old == value:
        return
    journal.record("sysctl", path=path, old=old)
    try:
        with open(path, "w") as f:
            f.write(value)
    except FileNotFoundError:  # the interface went just now: nothing to undo
        journal.forget("sysctl", path=path)
        return
    if path in SIDE_EFFECTS:
        name = path.removeprefix("/proc/sys/").replace("/", ".")
        log.warning("%s %s -> %s while natlb runs: %s", name, old, value, SIDE_EFFECTS[path])


def rp_filter_path(ifname: str) -> str:
    return f"/proc/sys/net/ipv4/conf/{ifname}/rp_filter"


def interface_added(ifname: str, journal: Journal) -> None:
    """An interface that appeared while natlb runs: reverse-path filtering
    off on it too (as apply() does on every interface at start)."""
    _set_sysctl(rp_filter_path(ifname), "0", journal)


def interface_gone(ifname: str, journal: Journal) -> None:
    """Its sysctls went with it: nothing to restore."""
    journal.forget("sysctl", path=rp_filter_path(ifname))


def vip_prefixlen(vip: str) -> int:
    return 128 if family(vip) == 6 else 32


def add_vip(ipr: IPRoute, ifindex: int, vip: str) -> None:
    """The VIP as a host address.  An IPv6 one without duplicate address
    detection: natlb answers for it at once, not after a second or two of
    being tentative (and never falls back to "dadfailed")."""
    extra = {"flags": IFA_F_NODAD} if family(vip) == 6 else {}
    ipr.addr("add", index=ifindex, address=vip, prefixlen=vip_prefixlen(vip), **extra)


def withdraw_vips(interface: str, keep: Iterable[str], journal: Journal) -> list[str]:
    """VIPs natlb added on `interface` that are not in `keep` (a reload
    removed their services, whose flows have ended): removed, then out of the
    journal (a crash between the two leaves an undo that finds it gone).
    Addresses that were there before natlb were never journaled: untouched."""
    keep = set(keep)
    gone = sorted({e["address"] for e in list(journal.entries)
                   if e["kind"] == "address" and e["ifname"] == interface} - keep)
    for vip in gone:
        _undo_address({"ifname": interface, "address": vip, "prefixlen": vip_prefixlen(vip)})
        journal.forget("address", ifname=interface, address=vip)
        log.info("VIP %s removed from %s: no service has it any more", vip, interface)
    return gone


def local_addresses(ipr: IPRoute, ifindex: int) -> set[str]:
    """Both families' addresses on the interface, in canonical text."""
    return {str(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")))
            for a in ipr.get_addr(index=ifindex)}


def preflight(lb: LBConfig) -> None:
    """Config values only this host can judge, checked before anything is
    touched, so a wrong one is a config error (exit 2) like any other."""
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=lb.interface):
            raise no_such_interface("lb.interface", lb.interface)
        for i, r in enumerate(lb.routes):
            if r.device and not ipr.link_lookup(ifname=r.device):
                raise no_such_interface(f"lb.route[{i}].device", r.device)
    parent = os.path.dirname(os.path.abspath(lb.control_socket))
    # The default's /run/natlb is made at start when systemd did not make it.
    if not os.path.isdir(parent) and parent != RUNTIME_DIR:
        raise ConfigError(f'lb.control_socket = "{lb.control_socket}": no directory {parent}')


def apply(lb: LBConfig, vips: Iterable[str], journal: Journal, ipv6: bool = False) -> None:
    """ipv6: a service is IPv6 (its VIP may come later, from the announcer)."""
    try:
        _apply(lb, vips, journal, ipv6)
    except NetlinkError as e:
        raise NetSetupError(f"network setup: {e.args[-1]}") from None


def _apply(lb: LBConfig, vips: Iterable[str], journal: Journal, ipv6: bool) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=lb.interface)
        if not idx:
            raise no_such_interface("lb.interface", lb.interface)
        ifindex = idx[0]
        if lb.interface == "lo":
            ipr.link("set", index=ifindex, state="up")
        have = local_addresses(ipr, ifindex)
        vips = sorted(set(vips))
        for vip in vips:
            if vip in have:
                log.info("VIP %s already on %s; leaving it in place", vip, lb.interface)
                continue
            journal.record("address", ifname=lb.interface, address=vip,
                           prefixlen=vip_prefixlen(vip))
            add_vip(ipr, ifindex, vip)
        for i, r in enumerate(lb.routes):
            spec: dict[str, object] = {"dst": r.destination}
            if r.gateway:
                spec["gateway"] = r.gateway
            if r.table is not None:
                spec["table"] = r.table
            if r.device:
                dev = ipr.link_lookup(ifname=r.device)
                if not dev:
                    raise no_such_interface(f"lb.route[{i}].device", r.device)
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
    sysctls = dict(SYSCTLS)
    if ipv6 or any(family(v) == 6 for v in vips):
        sysctls.update(SYSCTLS_IPV6)
    for path, value in sysctls.items():
        _set_sysctl(path, value, journal)
    # The effective rp_filter is the larger of "all" and the interface's own.
    for conf in sorted(os.listdir("/proc/sys/net/ipv4/conf")):
        if conf not in ("all", "default"):
            _set_sysctl(rp_filter_path(conf), "0", journal)


def _oifs(route: Any) -> set[int]:
    out = set()
    if route.get_attr("RTA_OIF"):
        out.add(route.get_attr("RTA_OIF"))
    for hop in route.get_attr("RTA_MULTIPATH") or ():
        if hop.get("oif"):
            out.add(hop["oif"])
    return out


def backend_ingress(addresses: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """address -> the ifindexes it is routed through: the kernel's own route
    lookup, plus every next hop of the longest matching route in that table
    when it is multipath (the lookup names just one of them).  An address
    without a route maps to no interface: its replies are not believed."""
    out: dict[str, tuple[int, ...]] = {}
    addresses = sorted(set(addresses))
    with IPRoute() as ipr:
        routes = [r for af in (socket.AF_INET, socket.AF_INET6)
                  if any(family(a) == (6 if af == socket.AF_INET6 else 4) for a in addresses)
                  for r in ipr.get_routes(family=af) if r["type"] == 1]
        for addr in addresses:
            try:
                got = ipr.route("get", dst=addr)[0]
            except NetlinkError as e:
                log.warning("backend %s: no route (%s); its replies will be dropped",
                            addr, e.args[-1])
                out[addr] = ()
                continue
            oifs = _oifs(got)
            table = got.get_attr("RTA_TABLE")
            ip = ipaddress.ip_address(addr)
            best: Any = None
            best_len = -1
            for r in routes:
                if (r.get_attr("RTA_TABLE") or r["table"]) != table or r["dst_len"] <= best_len:
                    continue
                if (r["family"] == socket.AF_INET6) != (ip.version == 6):
                    continue
                dst = r.get_attr("RTA_DST") or ("::" if ip.version == 6 else "0.0.0.0")
                if ip in ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False):
                    best, best_len = r, r["dst_len"]
            if best is not None:
                oifs |= _oifs(best)
            out[addr] = tuple(sorted(oifs))
    return out
