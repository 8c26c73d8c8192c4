"""Service tables shared by the unit tests."""

from natlb.core import BackendEntry, ServiceTable
from natlb.schedulers import Candidate, build_table

VIP = "192.0.2.100"
CLIENT = "198.51.100.7"
BACKENDS = ["203.0.113.10", "203.0.113.11", "203.0.113.12"]


def make_service(scheduler="rr", port=80, backend_port=8080, protocol="tcp", sid=0,
                 addrs=BACKENDS, weights=None, down=(), draining=()):
    """down: neither new flows nor alive; draining: alive, but no new flows."""
    weights = weights or [1] * len(addrs)
    entries = tuple(
        BackendEntry(a, backend_port, w, sid * 16 + i, a not in down and a not in draining,
                     a not in down)
        for i, (a, w) in enumerate(zip(addrs, weights, strict=True))
    )
    cands = [Candidate(f"{b.address}:{b.port}", b.weight, b.eligible) for b in entries]
    return ServiceTable(VIP, port, protocol, scheduler, sid, entries,
                        tuple(build_table(scheduler, cands)))


