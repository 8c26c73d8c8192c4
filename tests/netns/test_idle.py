"""Nothing queued for nothing: the answers to natlb's own health checks
(SYN-ACKs, RSTs, UDP answers, ICMP port unreachables) reach the checker
without crossing natlb's queue."""

import pytest

from natlb_testbed.testbed import VIP, backend_addr, basic_config, udp_service

from .test_traffic import queued_packets


@pytest.mark.parametrize("lb_extra", ["fastpath = false", "fastpath = true"],
                         ids=["mark", "fastpath"])
def test_health_checks_run_and_their_replies_are_never_queued(testbed, natlb, lb_extra):
    natlb(basic_config(testbed, lb_extra=lb_extra, interval_ms=100,
                       extra_services=udp_service("dns", [1, 2, 3], interval_ms=100)))
    tcp, udp = f"{backend_addr(2)}:80", f"{backend_addr(2)}:53"
    for key in (tcp, udp):
        testbed.wait_health(key, "up")
    before, kernel_before = testbed.status(), queued_packets(testbed)
    # The checks see b2 die (its kernel answers RST and port unreachable)
    # and come back: every kind of answer reached them.
    testbed.fail_backend(2, "kill")
    try:
        for key in (tcp, udp):
            testbed.wait_health(key, "down")
    finally:
        testbed.repair_backend(2, "kill")
    for key in (tcp, udp):
        testbed.wait_health(key, "up")
    after, kernel_after = testbed.status(), queued_packets(testbed)
    assert after["queued_packets"] - before["queued_packets"] == 0
    assert after["reasons"]["not_ours"] - before["reasons"]["not_ours"] == 0
    assert kernel_after - kernel_before == 0
    # Client traffic still is natlb's: its flows (their SYNs queued, or
    # placed by the kernel and told: lb.fastpath_decide).
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "3")
    assert all(r["ok"] for r in res), res
    st = testbed.status()
    assert st["services"][0]["new_flows"] - after["services"][0]["new_flows"] == 3, st
    if lb_extra == "fastpath = false":
        assert st["queued_packets"] > after["queued_packets"]
