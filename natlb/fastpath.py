"""The tc fast path's control plane (lb.fastpath): loads the BPF object
(natlb.core.FastPath over csrc/tcfast.c), attaches it to every Ethernet
interface of this namespace, at start and whenever one appears
(natlb/linkwatch.py), keeps its backend slots in step with what is
published, empties its flows when natlb resets or moves flows or an
interface goes, and reads what it carried.  The programs themselves:
csrc/bpf/fastpath.bpf.c.

Host changes go through the undo journal first (kind "tc_filter", reverted
here): natlb's two filters on an interface, and its clsact qdisc when natlb
created it (a qdisc that was there before is left in place).  An interface
that goes takes them with it: its entry is forgotten, not undone."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from natlb import nftlist
from natlb.config import LBConfig
from natlb.core import Core, CoreError, FastPath, ServiceTable
from natlb.errors import HostError
from natlb.linkwatch import Link
from natlb.undo import Journal, reverter

log = logging.getLogger("natlb.fastpath")

# natlb's filters, the same in every natlb (a successor replaces its
# predecessor's by them): "nlb" and "nl".
HANDLE = 0x6E6C62
PRIORITY = 0x6E6C
ARPHRD_ETHER = 1
PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
Slot = tuple[str, int, str, int, int]        # vip, vport, address, port, protocol


class FastPathError(HostError):
    """The kernel refused the fast path's BPF programs or filters."""


# The netfilter hooks a carried packet never reaches: tc ingress redirects
# it (bpf_redirect_neigh) before netdev ingress and the IP stack.  Egress
# (netdev egress, tc egress) it still passes.
NF_INET_PRE_ROUTING, NF_INET_FORWARD, NF_INET_POST_ROUTING, NF_NETDEV_INGRESS = 0, 2, 4, 0
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_NETDEV, NFPROTO_IPV6 = 1, 2, 5, 10
SKIPPED_HOOKS = {
    NFPROTO_INET: {NF_INET_PRE_ROUTING, NF_INET_FORWARD, NF_INET_POST_ROUTING},
    NFPROTO_IPV4: {NF_INET_PRE_ROUTING, NF_INET_FORWARD, NF_INET_POST_ROUTING},
    NFPROTO_IPV6: {NF_INET_PRE_ROUTING, NF_INET_FORWARD, NF_INET_POST_ROUTING},
    NFPROTO_NETDEV: {NF_NETDEV_INGRESS},
}


def skipped_chains(chains: Iterable[nftlist.Chain], own_table: str) -> list[nftlist.Chain]:
    """The host's base chains (not natlb's own) that carried packets skip."""
    return [c for c in chains if c.hook in SKIPPED_HOOKS.get(c.family, ())
            and not (c.table == own_table and c.family in (NFPROTO_IPV4, NFPROTO_IPV6))]


def warn_skipped(lb: LBConfig) -> None:
    """Say which of the host's nftables chains (iptables-nft's too) the
    fast path's packets skip: an operator's firewall there does not see them."""
    try:
        chains = skipped_chains(nftlist.base_chains(), lb.table)
    except HostError as e:
        log.debug("%s", e)
        return
    if not chains:
        return
    what = ("no packet of an rr, wrr, sh or maglev service's flows (kernel decisions)"
            if lb.fastpath_decide else "no packet it carries (a flow's packets after one "
            "passed the queue)")
    log.warning("fast path: %s meets these nftables chains: %s (README, \"Beside a host "
                "firewall\")", what, ", ".join(map(str, chains)))


@reverter("tc_filter")
def _undo_filter(entry: dict[str, Any]) -> None:
    FastPath.detach(entry["ifindex"], entry["handle"], entry["priority"], entry["qdisc"])


def _interfaces() -> list[tuple[int, str, bool]]:
    """(ifindex, name, has a clsact qdisc) of every Ethernet interface (the
    programs read an Ethernet header; loopback and L3 tunnels have none).
    VLAN devices, bridges, bonds, macvlans and VXLANs are Ethernet too: each
    sees its own frames untagged at its own hook (README "The fast path")."""
    with IPRoute() as ipr:
        clsact = {q["index"] for q in ipr.get_qdiscs() if q.get_attr("TCA_KIND") == "clsact"}
        return [(link["index"], link.get_attr("IFLA_IFNAME"), link["index"] in clsact)
                for link in ipr.get_links() if link["ifi_type"] == ARPHRD_ETHER]


def _has_clsact(ifindex: int) -> bool:
    with IPRoute() as ipr:
        return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=ifindex))


def _exists(ifindex: int) -> bool:
    with IPRoute() as ipr:
        try:
            ipr.link("get", index=ifindex)
        except NetlinkError:
            return False
    return True


class TcFastPath:
    def __init__(self, lb: LBConfig) -> None:
        half = {k: max(1, int(lb.timeouts_s[k] * 500))
                for k in ("tcp_established", "udp", "tcp_syn")}
        try:
            # An entry lives half of natlb's own timeout and is never
            # refreshed: it always expires before natlb's flow does, whose
            # next packet is queued and renews it (README "The fast path").
            # A carried FIN cuts both entries to natlb's own closing
            # timeout, which its flow gets when natlb applies the FIN.
            # Learned from a SYN, they live half of tcp_syn until the
            # handshake's last ACK is carried; and a SYN-ACK is carried only
            # within three quarters of syn_timeout_ms of its SYN: a later
            # one is natlb's (its held-SYN timer may move the flow, and then
            # drops that SYN-ACK: README "Failover").
            self.fp = FastPath(lb.max_backends, lb.max_flows, half["tcp_established"],
                               half["udp"], max(1, int(lb.timeouts_s["tcp_fin"] * 1000)),
                               syn_lifetime_ms=half["tcp_syn"],
                               synack_window_ms=(lb.syn_timeout_ms * 3 // 4
                                                 if lb.syn_timeout_ms else half["tcp_syn"]),
                               max_services=lb.max_services,
                               decide_slots=lb.fastpath_decide_slots)
        except CoreError as e:
            raise FastPathError(f"lb.fastpath = true, but {e}") from None
        self._slots: dict[int, Slot] = {}
        self._n_slots = 0     # read by counts() on the loop thread: one int, no dict
        # ifindex -> name of the interfaces carrying our filters; changed by
        # the link watch's thread, read (copied) by status.
        self.interfaces: dict[int, str] = {}
        self.forgotten = 0    # flow entries forgotten with their interface
        # What a predecessor's programs counted (natlb restart): ours count
        # from 0, the counters natlb shows carry on (carry_on).
        self._carried: dict[str, int] = {}
        self._journal: Journal | None = None
        # Kernel decisions (lb.fastpath_decide): on only while our observer
        # applies their records (observe .. stop_observing).
        self.decide = bool(lb.fastpath_decide)
        self._core: Core | None = None
        self._too_big = 0     # services last logged as left queued
        self.services_decided = 0

    def attach(self, journal: Journal) -> list[str]:
        """On every Ethernet interface (an interface that vanishes meanwhile
        is skipped); the names attached to.  Again after a lost link
        notification: what came is attached, what went is forgotten."""
        self._journal = journal
        listed = _interfaces()
        for ifindex in set(self.interfaces) - {i for i, _, _ in listed}:
            self.gone(Link(ifindex, self.interfaces[ifindex], True))
        # A predecessor's (natlb restart, a crash) on an interface gone since.
        present = {i for i, _, _ in listed}
        for e in list(journal.entries):
            if e["kind"] == "tc_filter" and e["ifindex"] not in present:
                journal.forget("tc_filter", ifindex=e["ifindex"])
        for ifindex, name, has_clsact in listed:
            self._attach(ifindex, name, has_clsact)
        return sorted(self.interfaces.values())

    def added(self, link: Link) -> None:
        """A link appeared, or changed (a rename, up, down)."""
        if not link.ether:
            return
        if link.index in self.interfaces:
            self.interfaces[link.index] = link.name
            return
        try:
            if self._attach(link.index, link.name, _has_clsact(link.index)):
                log.info("fast path: tc programs on %s, which appeared", link.name)
        except FastPathError as e:
            log.error("fast path: not on %s (its flows are queued): %s", link.name, e)

    def gone(self, link: Link) -> None:
        """A link went (deleted, or moved to another namespace): our filters
        went with it.  Its flows' entries go too, as if the ifindex had
        never been: a later device given the same index must not receive
        them (a dead one makes carry pass packets on: bpf_check_mtu fails)."""
        assert self._journal is not None
        name = self.interfaces.pop(link.index, None)
        if name is not None:
            self._journal.forget("tc_filter", ifindex=link.index)
        n = self.fp.flush_interface(link.index)
        self.forgotten += n
        if name is not None or n:
            log.info("fast path: %s is gone; forgot its %d flow entries", link.name or name, n)

    def _attach(self, ifindex: int, name: str, has_clsact: bool) -> bool:
        """Journaled first; False if the interface is gone meanwhile."""
        journal = self._journal
        assert journal is not None
        if not journal.has("tc_filter", ifindex=ifindex):
            journal.record("tc_filter", ifindex=ifindex, ifname=name, handle=HANDLE,
                           priority=PRIORITY, qdisc=not has_clsact)
        try:
            self.fp.attach(ifindex, HANDLE, PRIORITY)
        except CoreError as e:
            if not _exists(ifindex):
                journal.forget("tc_filter", ifindex=ifindex)
                log.info("fast path: %s went away as natlb attached to it", name)
                return False
            raise FastPathError(f"{name}: {e}") from None
        self.interfaces[ifindex] = name
        return True

    def status(self) -> dict[str, Any]:
        """For natlb status: where the programs are, what went with
        interfaces that were deleted, what the observer applied."""
        return {"interfaces": sorted(list(self.interfaces.values())),
                "entries_forgotten": self.forgotten, "observer": self.observer_counts(),
                "decisions": self.decisions()}

    def publish(self, tables: Iterable[ServiceTable]) -> None:
        """Backend slots as published (either family): only the changed
        ones are written."""
        want: dict[int, Slot] = {}
        for t in tables:
            for b in t.backends:
                want[b.id] = (t.vip, t.port, b.address, b.port, PROTOCOLS[t.protocol])
        for bid in set(self._slots) - set(want):
            self.fp.clear_backend(bid)
            del self._slots[bid]
        for bid, slot in want.items():
            if self._slots.get(bid) != slot:
                self.fp.set_backend(bid, *slot)
                self._slots[bid] = slot
        self._n_slots = max(self._slots, default=-1) + 1
        self._publish_decisions()

    def _publish_decisions(self) -> None:
        """The services the kernel may decide, with their tables, as the
        core has just published them (published before the programs may
        read them; off, none is decided but they are kept in step)."""
        if self._core is None:
            return
        placed, too_big = self.fp.publish(self._core)
        self.services_decided = placed
        if too_big != self._too_big:
            if too_big:
                log.warning("fast path: %d services' tables find no room in the kernel's "
                            "(lb.fastpath_decide_slots): their new flows are queued", too_big)
            self._too_big = too_big

    def forget(self, backend_ids: Iterable[int]) -> None:
        """The kernel stops carrying these backends' flows: their next
        packets go to natlb.  The other backends' flows stay carried."""
        n = self.fp.flush_backends(backend_ids)
        log.debug("fast path: forgot %d flow entries", n)

    def counts(self) -> dict[int, tuple[int, int, int, int]]:
        """Backend id -> (packets in, bytes in, packets out, bytes out)
        carried by the kernel alone."""
        n = self._n_slots
        return self.fp.counters(n) if n else {}

    def observe(self, core: Core) -> None:
        """From now on what the kernel carries and tells (FIN, RST, the
        handshake, a UDP flow's first answer) reaches core's flows (before
        the filters are attached: none is missed)."""
        self.fp.observe(core)
        self._core = core
        self._publish_decisions()
        self.fp.set_decide(self.decide)

    def observer_counts(self) -> dict[str, int]:
        """The observer's records: applied to a flow, not believed (changed
        nothing), and packets queued instead for want of room in the ring."""
        applied, ignored = self.fp.observe_counts()
        return self._plus_carried({"applied": applied, "ignored": ignored,
                                   "ring_full": self.fp.ring_full()})

    # Of decisions(): states, not counts, so nothing to carry on.
    GAUGES = frozenset({"on", "services", "services_no_room"})

    def counters(self) -> dict[str, int]:
        """The counters a successor carries on (natlb restart), by name."""
        return {**self.observer_counts(),
                **{k: v for k, v in self.decisions().items() if k not in self.GAUGES}}

    def carry_on(self, counted: dict[str, int]) -> None:
        """A successor: add what the predecessor counted (counters())."""
        for k, v in counted.items():
            self._carried[k] = self._carried.get(k, 0) + int(v)

    def _plus_carried(self, counts: dict[str, int]) -> dict[str, int]:
        return {k: v + self._carried.get(k, 0) if k not in self.GAUGES else v
                for k, v in counts.items()}

    def stop_observing(self) -> None:
        """Before core closes, and when a successor takes over: the kernel
        stops placing first packets (they are queued: to the successor in a
        handover) before the observer applies its last records, so no entry
        is left that no natlb hears of."""
        self.fp.set_decide(False)
        self.fp.stop_observing()
        self._core = None

    def pause_decisions(self) -> None:
        """A handover begins: first packets are queued."""
        self.fp.set_decide(False)

    def resume_decisions(self) -> None:
        """A handover failed: decisions as configured again (observe() sets
        them too, after a stop)."""
        if self._core is not None:
            self.fp.set_decide(self.decide)

    def decisions(self) -> dict[str, int]:
        """New flows' first packets placed by the kernel (applied by
        natlb, refused and forgotten), and queued instead by reason."""
        applied, refused = self.fp.placed_counts()
        st = self.fp.stats()
        return self._plus_carried({
            "on": int(self.decide and self._core is not None),
            "services": self.services_decided, "services_no_room": self._too_big,
            "placed": applied, "refused": refused,
            **{k: v for k, v in st.items() if k.startswith("fallback_")}})

    def close(self) -> None:
        """The filters stay until the journal removes them (or a successor
        replaces them); they keep the programs and maps alive."""
        self.fp.close()
