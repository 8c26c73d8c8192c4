"""Prometheus metrics (``[lb] metrics = "ADDR:PORT"``): what natlb tells a
scrape, served from natlb's own process (natlb/metrics_http.py).

Nothing is counted for Prometheus: at each scrape a custom collector reads
the C counters (the same readers ``natlb status`` uses) and the pool's
state, so scraping costs nothing per packet and nothing between scrapes.
Names follow node_exporter's ipvs collector with a ``natlb_`` prefix.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from natlb.config import LBConfig
from natlb.pool import Pool
from natlb.pool_state import DISABLED, DRAINING, ENABLED, UP
from natlb.status import queue_stats, read_counters
from natlb.version import natlb_version

SERVICE_LABELS = ["service", "vip", "port", "protocol"]
# natlb_backend_admin_state: how much of the traffic the operator lets in.
ADMIN_LEVEL = {ENABLED: 2, DRAINING: 1, DISABLED: 0}
BACKEND_LABELS = [*SERVICE_LABELS, "address", "backend_port"]

# (metric name, help, Counters field) per service and per backend.
TRAFFIC = [
    ("connections_total", "Connections (new flows) scheduled", "new_flows"),
    ("incoming_packets_total", "Packets from clients", "packets_in"),
    ("outgoing_packets_total", "Packets to clients", "packets_out"),
    ("incoming_bytes_total", "Bytes from clients", "bytes_in"),
    ("outgoing_bytes_total", "Bytes to clients", "bytes_out"),
]


class NatlbCollector(Collector):
    """Builds every natlb metric from live state at scrape time."""

    def __init__(self, pool: Pool, lb: LBConfig,
                 queues: Callable[[], list[int]] | None = None) -> None:
        self.pool = pool
        self.lb = lb
        # The queues natlb reads: lb.queues, or after a `natlb restart` the
        # other bank (LBConfig.other_queues).
        self.queues = queues or (lambda: lb.queues)
        # Scrapes run on the HTTP server's threads; the lock keeps a scrape
        # from reading a core that close() is freeing.
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            if self.closed:
                return iter(())
            return iter(self._families())

    def _families(self) -> list[Metric]:
        pool, core = self.pool, self.pool.core
        services = pool.services  # one consistent list even if a reload swaps it
        svc_ctr, be_ctr = read_counters(pool, services)

        def counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(f"natlb_{name}", doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"natlb_{name}", doc, labels=labels)

        svc_traffic = [(counter(n, d, SERVICE_LABELS), f) for n, d, f in TRAFFIC]
        be_traffic = [(counter(f"backend_{n}", d, BACKEND_LABELS), f) for n, d, f in TRAFFIC]
        up = gauge("backend_up", "1 while the backend's health state is up", BACKEND_LABELS)
        weight = gauge("backend_weight", "Weight for new flows", BACKEND_LABELS)
        admin = gauge("backend_admin_state",
                      "The operator's admin state: 2 enabled, 1 draining, 0 disabled",
                      BACKEND_LABELS)
        active = gauge("backend_connections_active", "Flows in the table not closing",
                       BACKEND_LABELS)
        inactive = gauge("backend_connections_inactive",
                         "TCP flows closing (FIN or RST seen), until they time out",
                         BACKEND_LABELS)
        # One label dict per service and per backend, shared by its samples
        # (add_metric would build one per sample: most of the collector's time).
        svc_samples = [(f.samples, f"{f.name}_total", field) for f, field in svc_traffic]
        be_samples = [(f.samples, f"{f.name}_total", field) for f, field in be_traffic]
        for s in services:
            sl = {"service": s.cfg.name, "vip": s.cfg.vip, "port": str(s.cfg.port),
                  "protocol": s.cfg.protocol}
            c = svc_ctr[s.id]
            for samples, name, field in svc_samples:
                samples.append(Sample(name, sl, getattr(c, field)))
            for b in s.backends:
                bl = {**sl, "address": b.cfg.address, "backend_port": str(b.cfg.port)}
                c = be_ctr[b.id]
                up.samples.append(Sample(up.name, bl, 1 if b.health == UP else 0))
                weight.samples.append(Sample(weight.name, bl, b.weight))
                admin.samples.append(Sample(admin.name, bl, ADMIN_LEVEL[b.admin]))
                active.samples.append(Sample(active.name, bl, c.active_flows))
                inactive.samples.append(Sample(inactive.name, bl, c.inactive_flows))
                for samples, name, field in be_samples:
                    samples.append(Sample(name, bl, getattr(c, field)))
        out: list[Metric] = [f for f, _ in svc_traffic]
        out += [up, weight, admin, active, inactive, *(f for f, _ in be_traffic)]

        dropped = counter("dropped_packets_total", "Packets dropped or passed, by reason",
                          ["reason"])
        for reason, n in core.reasons().items():
            dropped.add_metric([reason], n)
        failover = counter("failover_total", "Failover actions of the data path", ["kind"])
        for kind, n in core.failover_counters().items():
            failover.add_metric([kind], n)
        checks = counter("health_checks_total", "Active health checks completed", ["result"])
        for result, n in pool.health_checks.items():
            checks.add_metric([result], n)
        qdrop = counter("queue_dropped_packets_total",
                        "Packets the kernel dropped at natlb's NFQUEUE (queue full or "
                        "socket overrun)", ["queue"])
        for q in queue_stats(self.queues()):
            qdrop.add_metric([str(q["queue"])], q["queue_dropped"] + q["user_dropped"])
        flows = gauge("flows", "Flows in the connection table")
        flows.add_metric([], core.flow_count())
        capacity = gauge("flow_capacity", "Size of the connection table (lb.max_flows)")
        capacity.add_metric([], self.lb.max_flows)
        ct = core.conntrack_counters()
        reclaimed = counter("flows_reclaimed", "Expired flows freed early for a new flow", [])
        reclaimed.add_metric([], ct["reclaimed"])
        evicted = counter("flows_evicted", "Flows evicted from a full table for a new one "
                          "(embryonic TCP, unanswered UDP)", ["protocol"])
        evicted.add_metric(["tcp"], ct["evicted_tcp"])
        evicted.add_metric(["udp"], ct["evicted_udp"])
        fr = core.fragment_counters()
        datagrams = counter("fragment_datagrams", "Fragmented datagrams: tracked, timed out "
                            "before all their fragments passed (incomplete), or evicted or "
                            "not tracked for want of room (overflow)", ["kind"])
        fragments = counter("fragments", "Later IP fragments: given their first's verdict "
                            "(followed), held before their first, released by it, dropped "
                            "held (timeouts), not held for want of room (hold_full), of no "
                            "tracked datagram (untracked)", ["kind"])
        for kind, key in (("tracked", "datagrams"), ("incomplete", "incomplete"),
                          ("overflow", "overflow")):
            datagrams.add_metric([kind], fr[key])
        for kind in ("followed", "held", "released", "timeouts", "hold_full", "untracked"):
            fragments.add_metric([kind], fr[kind])
        tracking = gauge("fragment_datagrams_tracked", "Fragmented datagrams tracked now")
        tracking.add_metric([], core.fragments_tracked())
        held = gauge("fragments_held", "Fragments held now, waiting for their first")
        held.add_metric([], core.fragments_held())
        info = gauge("build_info", "natlb's version", ["version"])
        info.add_metric([natlb_version()], 1)
        fast: list[Metric] = []
        observer = pool.observer_counts()
        if observer is not None:
            records = counter("fastpath_records_total",
                              "Packets the kernel's fast path carried and told natlb of, "
                              "by what natlb made of them (applied to a flow, or not "
                              "believed: no flow, a bad checksum)", ["result"])
            records.add_metric(["applied"], observer["applied"])
            records.add_metric(["ignored"], observer["ignored"])
            full = counter("fastpath_ring_full_total",
                           "Packets the fast path queued to natlb instead of carrying "
                           "them: no room in its ring for their record", [])
            full.add_metric([], observer["ring_full"])
            fast = [records, full]
        decisions = pool.decision_counts()
        if decisions is not None:
            placed = counter("fastpath_decisions_total",
                             "New flows' first packets the kernel placed itself "
                             "(lb.fastpath_decide), by what natlb made of their record "
                             "(applied, or refused: the kernel forgot the flow)", ["result"])
            placed.add_metric(["applied"], decisions["placed"])
            placed.add_metric(["refused"], decisions["refused"])
            fallback = counter("fastpath_decide_fallbacks_total",
                               "New flows' first packets the kernel queued to natlb instead "
                               "of placing them, by reason", ["reason"])
            for k, v in decisions.items():
                if k.startswith("fallback_"):
                    fallback.add_metric([k.removeprefix("fallback_")], v)
            fast += [placed, fallback]
        return [*out, dropped, failover, checks, qdrop, flows, capacity, reclaimed, evicted,
                datagrams, fragments, tracking, held, info, *fast]
