"""What ``natlb status`` reports: collected from the pool and C counters
(daemon side) and rendered as a table (CLI side)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from natlb.config import host_port

if TYPE_CHECKING:  # the CLI renders status too: keep its start light
    from natlb.core import Counters
    from natlb.pool import Pool, Service
    from natlb.rates import RateEstimator


def queue_stats(queues: list[int]) -> list[dict[str, int]]:
    """Kernel-side NFQUEUE counters for our queues (drops happen there)."""
    out = []
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as f:
            for line in f:
                v = line.split()
                if len(v) >= 7 and int(v[0]) in queues:
                    out.append({"queue": int(v[0]), "waiting": int(v[2]),
                                "queue_dropped": int(v[5]), "user_dropped": int(v[6])})
    except OSError:
        pass
    return out


def read_counters(pool: Pool, services: list[Service]) -> tuple[list[Counters], list[Counters]]:
    """The C counters of these services and their backends, indexed by id.
    Ids are never reused after a reload, so they can exceed the count."""
    n_services = max((s.id for s in services), default=-1) + 1
    n_backends = max((b.id for s in services for b in s.backends), default=-1) + 1
    svc, be = pool.core.service_counters(n_services), pool.core.backend_counters(n_backends)
    for s in services:
        if s.departed != (0, 0, 0, 0):   # the kernel's share of backends a reload removed
            svc[s.id] = _plus(svc[s.id], s.departed)
    kernel = pool.kernel_counts()
    if kernel:
        for s in services:
            for b in s.backends:
                k = kernel.get(b.id)
                if k:
                    be[b.id] = _plus(be[b.id], k)
                    svc[s.id] = _plus(svc[s.id], k)
    return svc, be


def _plus(c: Counters, k: tuple[int, int, int, int]) -> Counters:
    # Not dataclasses.replace: called per backend and service, it took a
    # tenth of a status at 4,096 services.  (type(c): the CLI imports this
    # module and must not load the C core.)
    return type(c)(c.packets_in + k[0], c.bytes_in + k[1], c.packets_out + k[2],
                   c.bytes_out + k[3], c.new_flows, c.active_flows, c.inactive_flows)


def collect(pool: Pool, queues: list[int], started: float, max_flows: int,
            rates: RateEstimator | None = None) -> dict[str, Any]:
    """Counts include the packets the kernel's fast path carried without
    natlb (read_counters)."""
    core = pool.core
    svc_ctr, be_ctr = read_counters(pool, pool.services)
    services = []
    for s in pool.services:
        backends = []
        for b in s.backends:
            c = be_ctr[b.id]
            backends.append({
                "address": b.cfg.address, "port": b.cfg.port, "weight": b.weight,
                "health": b.health, "admin": b.admin, "eligible": b.eligible,
                "since": b.last_change, "last_check": b.last_detail,
                "passive_failures": b.passive_failures, **vars(c),
            })
            if rates:
                backends[-1]["rate"] = rates.get("backend", b.id)
        d = dict(vars(svc_ctr[s.id]))
        d["active_flows"] = sum(b["active_flows"] for b in backends)
        d["inactive_flows"] = sum(b["inactive_flows"] for b in backends)
        services.append({
            "name": s.cfg.name, "vip": s.cfg.vip, "port": s.cfg.port,
            "protocol": s.cfg.protocol, "scheduler": s.cfg.scheduler,
            "health_check": s.cfg.health.kind, **d, "backends": backends,
        })
        if rates:
            services[-1]["rate"] = rates.get("service", s.id)
    packets, batches = core.io()
    return {
        "uptime_s": round(time.time() - started, 3),
        **({"rate_interval_s": round(rates.interval_s, 2)} if rates else {}),
        "flows": core.flow_count(), "flow_capacity": max_flows,
        "queued_packets": packets, "receive_batches": batches,
        "reasons": core.reasons(), "failover": core.failover_counters(),
        "conntrack": core.conntrack_counters(),
        # "held" is the counter (fragments ever held); what is held now is
        # "held_now", beside the datagrams "tracked" now.
        "fragments": {**core.fragment_counters(), "tracked": core.fragments_tracked(),
                      "held_now": core.fragments_held()},
        "queues": queue_stats(queues),
        "services": services,
    }


def _human(n: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1000:
            return f"{n}{unit}"
        n //= 1000
    return f"{n}P"


def _row(label: str, state: str, weight: str, c: dict[str, Any]) -> str:
    return (f"  {label:<38} {state:<9} {weight:>6} {c['active_flows']:>8} "
            f"{c['inactive_flows']:>7} {c['new_flows']:>8} {_human(c['packets_in']):>8} "
            f"{_human(c['packets_out']):>8} {_human(c['bytes_in']):>8} "
            f"{_human(c['bytes_out']):>8}")


def render(st: dict[str, Any]) -> str:
    """Like ``ipvsadm -Ln --stats``: a line per service, then its backends."""
    lines = [f"natlb up {st['uptime_s']:.0f}s, flows {st['flows']}/{st['flow_capacity']}, "
             f"queued packets {st['queued_packets']}"]
    lines.append(f"  {'Prot LocalAddress:Port Scheduler':<38} {'State':<9} {'Weight':>6} "
                 f"{'ActFlows':>8} {'InActFl':>7} {'NewFlows':>8} {'InPkts':>8} "
                 f"{'OutPkts':>8} {'InBytes':>8} {'OutBytes':>8}")
    for s in st["services"]:
        vip = host_port(s["vip"], s["port"])
        name = f"{s['protocol'].upper()} {vip} {s['scheduler']} ({s['name']})"
        lines.append(_row(name, "", "", s))
        for b in s["backends"]:
            state = b["health"] if b["admin"] == "enabled" else b["admin"]
            lines.append(_row(f"  -> {host_port(b['address'], b['port'])}", state,
                              str(b["weight"]), b))
    dropped = {k: v for k, v in st["reasons"].items() if v}
    if dropped:
        lines.append("  dropped/passed: " + ", ".join(f"{k}={v}" for k, v in dropped.items()))
    moved = {k: v for k, v in st.get("failover", {}).items() if v}
    if moved:
        lines.append("  failover: " + ", ".join(f"{k}={v}" for k, v in moved.items()))
    full = {k: v for k, v in st.get("conntrack", {}).items() if v}
    if full:
        lines.append("  table full: " + ", ".join(f"{k}={v}" for k, v in full.items()))
    frags = {k: v for k, v in st.get("fragments", {}).items() if v}
    if frags:
        lines.append("  fragments: " + ", ".join(f"{k}={v}" for k, v in frags.items()))
    fast = st.get("fastpath")
    if fast:
        lines.append("  fast path on: " + (", ".join(fast["interfaces"]) or "no interface"))
        observer = fast.get("observer")
        if observer:
            lines.append(f"  fast path: records applied={observer['applied']}, "
                         f"not believed={observer['ignored']}, "
                         f"queued for a full ring={observer['ring_full']}")
        dec = fast.get("decisions")
        if dec:
            why = ", ".join(f"{k.removeprefix('fallback_')}={v}" for k, v in dec.items()
                            if k.startswith("fallback_"))
            lines.append(f"  fast path decides new flows: {'on' if dec['on'] else 'off'}, "
                         f"services={dec['services']} (no room={dec['services_no_room']}), "
                         f"placed={dec['placed']}, refused={dec['refused']}, queued: {why}")
    for q in st["queues"]:
        if q["queue_dropped"] or q["user_dropped"]:
            lines.append(f"  queue {q['queue']}: kernel dropped {q['queue_dropped']}, "
                         f"socket overrun {q['user_dropped']}")
    return "\n".join(lines)
