"""The C extension as an extension: it imports, its API header is what the
module exposes, and creating and destroying load balancers does not leak."""

import resource

from scapy.layers.inet import IP, TCP

from natlb.core import MAX_BACKENDS, MAX_SERVICES, Core, CoreConfig, Verdict

from .services import CLIENT, VIP, make_service


def test_import_and_limits():
    assert MAX_SERVICES == 256 and MAX_BACKENDS == 4096
    assert Core.entry_size() <= 64


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def cycle() -> None:
    c = Core(CoreConfig(max_flows=4096, workers=1, syn_timeout_ms=10))
    for _ in range(3):  # several publishes: old snapshots must be freed
        c.publish([make_service("maglev"), make_service("rr", port=81, sid=1)])
    for port in range(1000, 1100):
        v, out = c.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=port, dport=80,
                                                                flags="S")), 1)
        assert v == Verdict.REWRITE
    c.failover_tick(1000)  # re-sends held SYNs into the outbox
    c.close()


def test_create_destroy_does_not_leak():
    for _ in range(20):
        cycle()
    before = rss_kib()
    for _ in range(200):
        cycle()
    # Each cycle allocates a few MiB; a leak of even 1% of that would show.
    assert rss_kib() - before < 8 * 1024
