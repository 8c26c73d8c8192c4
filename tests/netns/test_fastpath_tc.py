"""The tc fast path on the host: natlb's filters on every interface of the
router while it runs, carrying traffic; nothing of it left after SIGTERM,
nor after SIGKILL once the guardian's grace is over; a clsact qdisc that was
there before natlb is left in place."""

import json
import signal
import time

from natlb_testbed.testbed import VIP, basic_config

from .conftest import natlb_cli, router_state, tc_state

FAST = "fastpath = true"


def interfaces(tb) -> list[str]:
    links = tb.router_cmd("ip", "-o", "link", "show").stdout
    return [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()
            if "link/ether" in line]


def filters(tb, dev: str, where: str) -> str:
    return tb.router_cmd("tc", "filter", "show", "dev", dev, where).stdout


def status(tb) -> dict:
    return json.loads(natlb_cli(tb, "status", "--json", "-s", tb.control_socket).stdout)


def test_filters_on_every_interface_and_gone_after_sigterm(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed, lb_extra=FAST))
    devs = interfaces(testbed)
    assert len(devs) >= 2
    for dev in devs:
        for where, prog in (("ingress", "carry"), ("egress", "learn")):
            assert prog in filters(testbed, dev, where), (dev, where)
    r = testbed.client_run("blob", "--host", VIP, "--port", "80", "--size", str(4 << 20),
                           "--seed", "3", "--timeout", "30")[0]
    assert r["ok"], r
    st = status(testbed)
    # 4 MiB is thousands of packets: natlb saw few, yet counts every byte
    # (the kernel's counters added).
    web = st["services"][0]
    assert web["bytes_out"] > 4 << 20 and st["queued_packets"] < 200, st
    testbed.stop(p, signal.SIGTERM)
    assert router_state(testbed) == before


def test_sigkill_leaves_filters_for_a_successor_then_the_guardian_removes_them(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed, lb_extra=f"{FAST}\nrestart_grace_ms = 1500"))
    p.kill()
    p.wait()
    assert "carry" in tc_state(testbed)         # left for a successor...
    deadline = time.monotonic() + 10
    while router_state(testbed) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert router_state(testbed) == before      # ...and gone after the grace


def test_a_clsact_qdisc_that_was_there_stays(testbed, natlb):
    dev = interfaces(testbed)[0]
    testbed.router_cmd("tc", "qdisc", "add", "dev", dev, "clsact")
    try:
        before = router_state(testbed)
        assert "clsact" in before
        p = natlb(basic_config(testbed, lb_extra=FAST))
        assert "carry" in filters(testbed, dev, "ingress")
        testbed.stop(p, signal.SIGTERM)
        after = router_state(testbed)
        assert after == before and "clsact" in after
    finally:
        testbed.router_cmd("tc", "qdisc", "del", "dev", dev, "clsact")
