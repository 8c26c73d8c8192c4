"""The fast path for UDP, over both families: a flow's datagrams after its
backend's first answer are carried by the kernel alone, counted, and moved
off a backend that dies."""

import pytest

from natlb_testbed.hosts import host_port
from natlb_testbed.testbed import basic_config, family_addresses, udp_service

from .test_traffic import queued_packets

FAST = "fastpath = true"
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def dns_config(tb, family: int) -> str:
    # "keep": the kernel must forget the flows because the backend is no
    # longer alive, not because its flows are reset.
    return basic_config(tb, lb_extra=FAST, family=family, extra_services=udp_service(
        "dns", [1, 2, 3], interval_ms=100, timeout_ms=200, family=family)
        + '[service.failover]\non_backend_down = "keep"\n')


@FAMILIES
def test_one_udp_flow_is_carried_by_the_kernel_and_counted(testbed, natlb, family):
    natlb(dns_config(testbed, family))
    vip, _ = family_addresses(family)
    before, kernel_before = testbed.status(), queued_packets(testbed)
    res = testbed.client_run("udp-stream", "--host", vip, "--port", "53", "--count", "200",
                             "--same-socket")
    assert all(r["ok"] for r in res), [r for r in res if not r["ok"]]
    assert {r["peer"] for r in res} == {host_port(vip, 53)}
    assert len({r["backend"] for r in res}) == 1
    after, kernel_after = testbed.status(), queued_packets(testbed)
    # The first query and its answer; then, at most, the datagram that
    # raced the map entry's install.
    assert after["queued_packets"] - before["queued_packets"] <= 4
    assert kernel_after - kernel_before <= 4
    dns = next(s for s in after["services"] if s["name"] == "dns")
    was = next(s for s in before["services"] if s["name"] == "dns")
    assert dns["packets_in"] - was["packets_in"] == 200
    assert dns["packets_out"] - was["packets_out"] == 200


@FAMILIES
def test_a_carried_udp_flow_moves_off_a_dead_backend(testbed, natlb, family):
    natlb(dns_config(testbed, family))
    vip, addr = family_addresses(family)
    proc, results = testbed.client_stream("udp-stream", "--host", vip, "--port", "53",
                                          "--count", "150", "--interval-ms", "20",
                                          "--timeout", "0.2", "--same-socket")
    seen, victim = [], None
    try:
        for r in results:
            seen.append(r)
            if victim is None and r["i"] >= 30 and r["ok"]:
                victim = int(r["backend"][1:])
                testbed.fail_backend(victim, "kill")
        proc.wait()
        testbed.wait_state(host_port(addr(victim), 53), lambda b: b["health"] == "down",
                           "down")
    finally:
        if victim is not None:
            testbed.repair_backend(victim, "kill")
    assert all(r["ok"] for r in seen[:30])
    late = seen[-40:]      # 0.8 s after the kill and on: long past the detection
    assert all(r["ok"] for r in late), late
    assert f"b{victim}" not in {r["backend"] for r in late}
