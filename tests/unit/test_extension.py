"""The C extension as an extension: it imports, its API header is what the
module exposes, and creating and destroying load balancers does not leak."""

import resource
import threading

import pytest
from scapy.layers.inet import IP, TCP

from natlb.core import MAX_BACKENDS, MAX_SERVICES, Core, CoreConfig, CoreError, Verdict

from .services import CLIENT, VIP, make_service


def test_import_and_limits():
    assert MAX_SERVICES == MAX_BACKENDS == 65536
    assert Core.entry_size() <= 128     # three 128-bit addresses (issue 14)


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


@pytest.mark.parametrize("key,value", [("syn_timeout_ms", 1 << 31), ("syn_timeout_ms", 2**32 - 1),
                                       ("resteer_tries", 0), ("max_flows", 0)])
def test_create_refuses_values_that_would_wrap(key, value):
    with pytest.raises(CoreError):
        Core(CoreConfig(**{key: value}))


def test_publish_while_another_thread_processes():
    """Callers outside the workers (tests, tools) hold the snapshot they read:
    without that, a publish freed it under them (ASan: heap-use-after-free
    in find_service).  The sanitizer build of this suite catches a regression;
    here, every packet must still get a sane verdict."""
    c = Core(CoreConfig(max_flows=1 << 16, workers=1, syn_timeout_ms=10))
    c.publish([make_service("rr")])
    batch = c.process_many([bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=1 + i % 60000, dport=80,
                                                                 flags="S"))
                            for i in range(200)], now_ms=1)
    stop = threading.Event()

    def work():
        t = 1
        while not stop.is_set():
            batch.reset()
            c.process_batch(batch)
            c.failover_tick(t)
            t += 20

    th = threading.Thread(target=work)
    th.start()
    try:
        for i in range(300):
            c.publish([make_service("rr" if i % 2 else "maglev"),
                       make_service("wrr", port=81 + i % 5, sid=1)])
    finally:
        stop.set()
        th.join()
    assert set(batch.verdict_list()) <= {Verdict.REWRITE}
    c.close()
