"""Real traffic through natlb in namespaces: client -> VIP -> backends."""

import json
import signal
import time
from collections import Counter

import pytest

from natlb_testbed.testbed import VIP, basic_config, udp_service

from .conftest import natlb_cli, router_state

UDP_SERVICE = udp_service("dns", [1, 2])


@pytest.mark.parametrize("lb_extra", ['fastpath = false', 'fastpath = true'],
                         ids=["mark", "fastpath"])
def test_http_spreads_across_three_backends(testbed, natlb, lb_extra):
    natlb(basic_config(testbed, scheduler="rr", lb_extra=lb_extra))
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "30",
                             "--interval-ms", "5")
    assert all(r["ok"] for r in res), res
    assert Counter(r["backend"] for r in res) == {"b1": 10, "b2": 10, "b3": 10}


def test_tcp_and_udp_services_on_one_vip(testbed, natlb):
    natlb(basic_config(testbed, extra_services=UDP_SERVICE))
    udp = testbed.client_run("udp-stream", "--host", VIP, "--port", "53", "--count", "20")
    assert all(r["ok"] for r in udp), udp
    # Replies come from the VIP, never from a backend address.
    assert {r["peer"] for r in udp} == {f"{VIP}:53"}
    assert Counter(r["backend"] for r in udp) == {"b1": 10, "b2": 10}
    web = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "6")
    assert all(r["ok"] for r in web)
    status = json.loads(natlb_cli(testbed, "status", "--json", "-s",
                                  testbed.control_socket).stdout)
    dns = next(s for s in status["services"] if s["name"] == "dns")
    assert (dns["new_flows"], dns["packets_in"], dns["packets_out"]) == (20, 20, 20), dns


# GSO mode hands natlb super-packets with unfinished checksums: the other
# checksum path.  Mark mode leaves rewriting to nftables.  All are checked by
# the receivers' own TCP stacks and a hash.
@pytest.mark.parametrize("lb_extra", ['rewrite = "copy"\ngso = false',
                                      'rewrite = "copy"\ngso = true',
                                      'rewrite = "mark"\nfastpath = false',
                                      'rewrite = "mark"\nfastpath = true'],
                         ids=["copy", "copy-gso", "mark", "fastpath"])
def test_100mb_download_and_upload_arrive_intact(testbed, natlb, lb_extra):
    natlb(basic_config(testbed, lb_extra=lb_extra, interval_ms=1000))
    queued_before = queued_packets(testbed)
    seen_before = status_of(testbed)["queued_packets"]
    for cmd, seed in (("blob", 7), ("upload", 8)):
        r = testbed.client_run(cmd, "--host", VIP, "--port", "80", "--size", str(100 << 20),
                               "--seed", str(seed), "--timeout", "60")[0]
        assert r["ok"], (cmd, r)
    queued = queued_packets(testbed) - queued_before
    status = status_of(testbed)
    seen = status["queued_packets"] - seen_before
    # Counted per backend either way: by natlb, or by the kernel's fast path.
    web = status["services"][0]
    assert web["bytes_in"] > 100 << 20 and web["bytes_out"] > 100 << 20, web
    assert sum(b["bytes_in"] for b in web["backends"]) == web["bytes_in"]
    if "fastpath = true" in lb_extra:
        # Handshakes, FINs and the first established packet of each flow: the
        # bulk of 2 x 100 MB never crosses to userspace.
        assert seen < 1500 and queued < 1500, (seen, queued)
    else:
        assert seen > 4000 and queued > 4000, (seen, queued)


def status_of(tb) -> dict:
    return json.loads(natlb_cli(tb, "status", "--json", "-s", tb.control_socket).stdout)


def queued_packets(tb) -> int:
    """Packets the kernel has handed to natlb's queues in the router netns
    (the id sequence of /proc/net/netfilter/nfnetlink_queue)."""
    text = tb.router_cmd("cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    return sum(int(line.split()[7]) for line in text.splitlines() if line.strip())


def test_dead_backend_gets_no_new_connections_after_health_interval(testbed, natlb):
    natlb(basic_config(testbed, interval_ms=100))
    proc, results = testbed.client_stream("http-stream", "--host", VIP, "--port", "80",
                                          "--count", "150", "--interval-ms", "20",
                                          "--timeout", "3")
    seen = []
    dead_since = None
    for r in results:
        seen.append(r)
        if dead_since is None and r["i"] >= 50:
            testbed.stop(testbed.backends[2], signal.SIGKILL)
            dead_since = time.time()  # the clients' clock: same host
    proc.wait()
    try:
        testbed.wait_state("203.0.113.10:80", lambda b: b["health"] == "down", "down")
    finally:
        testbed.backends[2] = testbed.start_backend(2)
    # Connections established with b2 before it died may fail (nothing can
    # save those); no handshake may, and nothing started after its death.
    lost = [r for r in seen if not r["ok"]
            and (r["stage"] == "connect" or r["wall"] >= dead_since)]
    assert lost == [], lost
    late = [r for r in seen if r["wall"] >= dead_since]
    assert {r["backend"] for r in late} == {"b1", "b3"}, late


def test_backend_rejoins_after_rise(testbed, natlb):
    natlb(basic_config(testbed, interval_ms=100))
    testbed.stop(testbed.backends[3], signal.SIGKILL)
    time.sleep(0.5)
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "10")
    assert all(r["ok"] for r in res) and "b3" not in {r["backend"] for r in res}
    testbed.backends[3] = testbed.start_backend(3)
    testbed.wait_health("203.0.113.14:80", "up")  # rise = 2 at 100 ms
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "9")
    assert Counter(r["backend"] for r in res) == {"b1": 3, "b2": 3, "b3": 3}


def test_exit_removes_table_address_and_sysctls(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed))
    during = router_state(testbed)
    assert "table ip natlb" in during and VIP in during
    testbed.stop(p, signal.SIGTERM)
    assert p.returncode == 0
    assert router_state(testbed) == before


def test_sigkill_is_cleaned_up_by_the_guardian(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed))
    assert "table ip natlb" in router_state(testbed)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while router_state(testbed) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert router_state(testbed) == before


@pytest.mark.parametrize("lb_extra,error", [
    ('interface = "nosuchif0"', 'lb.interface = "nosuchif0": no such interface'),
    ('control_socket = "/nonexistent/dir/natlb.sock"',
     'lb.control_socket = "/nonexistent/dir/natlb.sock": no directory /nonexistent/dir'),
])
def test_host_dependent_config_errors_exit_2(testbed, lb_extra, error):
    before = router_state(testbed)
    text = basic_config(testbed).replace(f'control_socket = "{testbed.control_socket}"', "")
    path = testbed.write_config(text.replace("[lb]", "[lb]\n" + lb_extra))
    r = natlb_cli(testbed, "run", "-c", str(path))
    assert (r.returncode, r.stderr.strip()) == (2, f"natlb: config: {error}")
    assert router_state(testbed) == before


def test_bad_config_exits_2_and_touches_nothing(testbed):
    before = router_state(testbed)
    bad = basic_config(testbed).replace('port = 80\nprotocol', 'port = 70000\nprotocol')
    path = testbed.write_config(bad)
    r = natlb_cli(testbed, "run", "-c", str(path))
    assert r.returncode == 2
    assert r.stderr.strip() == "natlb: config: service[0].port = 70000: must be 1..65535"
    assert router_state(testbed) == before


def test_two_queue_workers_share_the_conntrack(testbed, natlb):
    # NFQUEUE balancing hashes addresses, and the NAT changes them: a flow's
    # two directions land on different queues, so different workers.
    natlb(basic_config(testbed, lb_extra="workers = 2"))
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "60",
                             "--interval-ms", "5")
    assert all(r["ok"] for r in res), [r for r in res if not r["ok"]]
    assert Counter(r["backend"] for r in res) == {"b1": 20, "b2": 20, "b3": 20}
    r = testbed.client_run("blob", "--host", VIP, "--port", "80", "--size", str(20 << 20),
                           "--seed", "11", "--timeout", "60")[0]
    assert r["ok"], r
    queues = {q["queue"] for q in json.loads(natlb_cli(
        testbed, "status", "--json", "-s", testbed.control_socket).stdout)["queues"]}
    assert queues == {0, 1}


def test_path_mtu_discovery_works_through_natlb(testbed, natlb):
    # The router's link to the client carries at most 1400 bytes, but the
    # client advertises an MSS for 1500: the backends' full-size segments must
    # shrink, which needs the router's "fragmentation needed" (sent to the
    # VIP, their apparent source) to reach the backend that sent them.
    natlb(basic_config(testbed))
    testbed.router_cmd("ip", "link", "set", "cl0", "mtu", "1400")
    try:
        r = testbed.client_run("blob", "--host", VIP, "--port", "80", "--size", str(4 << 20),
                               "--seed", "12", "--timeout", "10")[0]
    finally:
        testbed.router_cmd("ip", "link", "set", "cl0", "mtu", "1500")
    assert r["ok"], r
    # No segment bigger than the link reached the client, GSO packets
    # included: the fast path carries those only when each segment fits.
    assert 0 < r["rcv_mss"] <= 1400 - 40, r
    status = json.loads(natlb_cli(testbed, "status", "--json", "-s",
                                  testbed.control_socket).stdout)
    assert status["failover"]["pmtu_relayed"] >= 1
