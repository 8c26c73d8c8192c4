"""IPv6 through natlb, dual stack: the IPv4 promises, kept over IPv6 in both
rewrite modes, and both families served by one natlb at once."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from natlb_testbed.testbed import (
    VIP,
    VIP6,
    backend_addr6,
    basic_config,
    udp_service,
    web_service,
)

from .conftest import natlb_cli, router_state
from .test_reload import hup_and_wait
from .test_restart import result, wait_gone
from .test_traffic import queued_packets

MODES = pytest.mark.parametrize("rewrite", ["mark", "copy"])
# ICMPv6 echo (the kernel fills in the checksum of a raw ICMPv6 socket):
# prints how many of N requests were answered, within 2 s each.
PING6 = """
import os, socket, struct, sys
dst, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.settimeout(2)
ident, got = os.getpid() & 0xffff, 0
for seq in range(n):
    s.sendto(struct.pack("!BBHHH", 128, 0, 0, ident, seq) + b"natlb", (dst, 0))
    try:
        while True:
            data, peer = s.recvfrom(1500)
            if data[0] == 129 and struct.unpack("!HH", data[4:8]) == (ident, seq):
                got += 1
                break
    except TimeoutError:
        pass
print(got)
"""
V6_PEER = f"[{VIP6}]"


def config6(tb, rewrite: str, **kw) -> str:
    return basic_config(tb, family=6, lb_extra=f'rewrite = "{rewrite}"', **kw)


def status(tb) -> dict:
    return json.loads(natlb_cli(tb, "status", "--json", "-s", tb.control_socket).stdout)


@MODES
def test_http_spreads_over_three_backends_on_an_ipv6_vip(testbed, natlb, rewrite):
    natlb(config6(testbed, rewrite))
    res = testbed.client_run("http-stream", "--host", VIP6, "--port", "80", "--count", "30",
                             "--interval-ms", "5")
    assert all(r["ok"] for r in res), res
    assert Counter(r["backend"] for r in res) == {"b1": 10, "b2": 10, "b3": 10}
    # status shows IPv6 in the usual bracket form, the JSON plain addresses.
    text = natlb_cli(testbed, "status", "-s", testbed.control_socket).stdout
    assert f"TCP [{VIP6}]:80 rr (web)" in text
    assert f"-> [{backend_addr6(1)}]:80" in text
    svc = status(testbed)["services"][0]
    assert svc["vip"] == VIP6 and svc["new_flows"] == 30
    assert {b["address"] for b in svc["backends"]} == {backend_addr6(k) for k in (1, 2, 3)}


@MODES
def test_udp_echo_over_ipv6(testbed, natlb, rewrite):
    natlb(f'[lb]\ncontrol_socket = "{testbed.control_socket}"\nrewrite = "{rewrite}"\n'
          + udp_service("dns6", [1, 2], family=6))
    res = testbed.client_run("udp-stream", "--host", VIP6, "--port", "53", "--count", "20")
    assert all(r["ok"] for r in res), res
    assert {r["peer"] for r in res} == {f"{V6_PEER}:53"}      # never a backend address
    assert Counter(r["backend"] for r in res) == {"b1": 10, "b2": 10}


@pytest.mark.parametrize("lb_extra", ['rewrite = "copy"\ngso = false',
                                      'rewrite = "copy"\ngso = true', 'rewrite = "mark"'],
                         ids=["copy", "copy-gso", "mark"])
def test_100mb_each_way_intact_over_ipv6(testbed, natlb, lb_extra):
    natlb(basic_config(testbed, family=6, lb_extra=lb_extra, interval_ms=1000))
    for cmd, seed in (("blob", 7), ("upload", 8)):
        r = testbed.client_run(cmd, "--host", VIP6, "--port", "80", "--size", str(100 << 20),
                               "--seed", str(seed), "--timeout", "60")[0]
        assert r["ok"], (cmd, r)
    web = status(testbed)["services"][0]
    assert web["bytes_in"] > 100 << 20 and web["bytes_out"] > 100 << 20, web


@MODES
def test_path_mtu_discovery_over_a_1280_byte_link(testbed, natlb, rewrite):
    """The client's side of the router carries IPv6's minimum MTU, the client
    advertises an MSS for 1500: the backends' full-size segments must shrink,
    which needs the router's Packet Too Big (sent to the VIP, their apparent
    source) to reach the backend that sent them."""
    natlb(config6(testbed, rewrite))
    for k in range(1, testbed.n_backends + 1):    # what an earlier run taught them
        testbed.backend_cmd(k, "ip", "-6", "route", "flush", "cache")
    testbed.router_cmd("ip", "link", "set", "cl0", "mtu", "1280")
    try:
        r = testbed.client_run("blob", "--host", VIP6, "--port", "80", "--size", str(4 << 20),
                               "--seed", "12", "--timeout", "10")[0]
    finally:
        testbed.router_cmd("ip", "link", "set", "cl0", "mtu", "1500")
    assert r["ok"], r
    assert status(testbed)["failover"]["pmtu_relayed"] >= 1


@MODES
def test_killed_backend_loses_no_new_connection_over_ipv6(testbed, natlb, rewrite):
    natlb(config6(testbed, rewrite, interval_ms=50, syn_timeout_ms=30))
    victim = f"[{backend_addr6(2)}]:80"
    dead_since: list[float] = []
    proc, results = testbed.client_stream("http-stream", "--host", VIP6, "--port", "80",
                                          "--count", "150", "--interval-ms", "10",
                                          "--timeout", "3")
    seen = []
    try:
        for r in results:
            seen.append(r)
            if r["i"] == 40:
                testbed.fail_backend(2, "kill")
                dead_since.append(time.time())    # the clients' clock: same host
        proc.wait()
        testbed.wait_state(victim, lambda b: b["health"] == "down", "down")
    finally:
        testbed.repair_backend(2, "kill")
    lost = [r for r in seen if not r["ok"]
            and (r["stage"] == "connect" or r["wall"] >= dead_since[0])]
    assert lost == [], lost
    assert {r["backend"] for r in seen if r["ok"] and r["wall"] >= dead_since[0]} <= {"b1", "b3"}


@MODES
def test_ipv4_and_ipv6_services_in_one_config(testbed, natlb, rewrite):
    """web on the IPv4 VIP over b1-b3, web6 on the IPv6 VIP over b2-b3, dns6
    over UDP on the IPv6 VIP: each family reaches only its own backends."""
    natlb(basic_config(testbed, lb_extra=f'rewrite = "{rewrite}"',
                       extra_services=web_service("web6", [2, 3], family=6)
                       + udp_service("dns6", [1, 3], family=6)))
    web4 = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "9")
    web6 = testbed.client_run("http-stream", "--host", VIP6, "--port", "80", "--count", "8")
    dns6 = testbed.client_run("udp-stream", "--host", VIP6, "--port", "53", "--count", "8")
    assert all(r["ok"] for r in web4 + web6 + dns6), (web4, web6, dns6)
    assert Counter(r["backend"] for r in web4) == {"b1": 3, "b2": 3, "b3": 3}
    assert Counter(r["backend"] for r in web6) == {"b2": 4, "b3": 4}
    assert Counter(r["backend"] for r in dns6) == {"b1": 4, "b3": 4}
    flows = {s["name"]: s["new_flows"] for s in status(testbed)["services"]}
    assert flows == {"web": 9, "web6": 8, "dns6": 8}
    state = router_state(testbed)
    assert "table ip natlb" in state and "table ip6 natlb" in state


def test_neighbour_discovery_and_echo_are_never_queued(testbed, natlb):
    """Without health checks nothing but clients' traffic reaches natlb's
    queues: neighbour discovery (both sides of the router, caches flushed)
    and echo to the VIP pass through the router's kernel untouched."""
    natlb(config6(testbed, "mark", health="none"))
    for dev in ("cl0", "b1"):
        testbed.router_cmd("ip", "-6", "neigh", "flush", "dev", dev)
    before = queued_packets(testbed)
    ping = testbed.client_cmd(sys.executable, "-c", PING6, VIP6, "3")
    assert ping.stdout.strip() == "3", ping.stderr
    neigh = testbed.router_cmd(sys.executable, "-c", PING6, backend_addr6(1), "1")
    assert neigh.stdout.strip() == "1", neigh.stderr
    assert queued_packets(testbed) == before
    # And the traffic that is natlb's still is: its flows (the SYNs placed by
    # the kernel and told to natlb: lb.fastpath_decide).
    flows = testbed.status()["services"][0]["new_flows"]
    res = testbed.client_run("http-stream", "--host", VIP6, "--port", "80", "--count", "3")
    assert all(r["ok"] for r in res)
    assert testbed.status()["services"][0]["new_flows"] - flows == 3


def test_exit_removes_ipv6_address_rules_and_forwarding(testbed, natlb):
    before = router_state(testbed)
    p = natlb(basic_config(testbed, extra_services=web_service("web6", [1, 2], family=6)))
    during = router_state(testbed)
    assert "table ip6 natlb" in during and VIP6 in during
    assert "ipv6/conf/all/forwarding=1" in during
    testbed.stop(p, signal.SIGTERM)
    assert p.returncode == 0
    assert router_state(testbed) == before


def test_sigkill_with_ipv6_is_cleaned_up_by_the_guardian(testbed, natlb):
    before = router_state(testbed)
    p = natlb(config6(testbed, "mark"))
    assert "table ip6 natlb" in router_state(testbed)
    p.kill()
    p.wait()
    deadline = time.monotonic() + 5
    while router_state(testbed) != before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert router_state(testbed) == before


def test_mixed_family_service_exits_2_and_touches_nothing(testbed):
    before = router_state(testbed)
    bad = basic_config(testbed, family=6).replace(f'address = "{backend_addr6(2)}"',
                                                   'address = "203.0.113.10"')
    r = natlb_cli(testbed, "run", "-c", str(testbed.write_config(bad)))
    assert (r.returncode, r.stderr.strip()) == (
        2, 'natlb: config: service[0].backend[1].address = "203.0.113.10": IPv4, but vip '
           f"{VIP6} is IPv6 (a service is one family)")
    assert router_state(testbed) == before


@MODES
def test_reload_adds_then_removes_the_ipv6_services(testbed, natlb, rewrite):
    """SIGHUP to a config with the first IPv6 service makes the ip6 table,
    the VIP and IPv6 forwarding while IPv4 flows go on; back to IPv4 only,
    the ip6 table goes once the removed services' last flows end (closed
    flows time out in half a second here; the VIP stays until exit, as a
    removed IPv4 VIP does)."""
    v4 = basic_config(testbed, lb_extra=f'rewrite = "{rewrite}"\n'
                      "[lb.timeouts]\ntcp_close = 0.5\ntcp_fin = 0.5")
    p = natlb(v4)
    assert "table ip6 natlb" not in router_state(testbed)
    hold = testbed.hold(VIP)
    testbed.write_config(v4 + web_service("web6", [1, 3], family=6))
    assert hup_and_wait(testbed, p)["ok"], testbed.natlb_log()
    res = testbed.client_run("http-stream", "--host", VIP6, "--port", "80", "--count", "4")
    assert Counter(r["backend"] for r in res if r["ok"]) == {"b1": 2, "b3": 2}, res
    state = router_state(testbed)
    assert "table ip6 natlb" in state and "ipv6/conf/all/forwarding=1" in state
    testbed.write_config(v4)
    assert hup_and_wait(testbed, p)["ok"], testbed.natlb_log()
    deadline = time.monotonic() + 15
    while "table ip6 natlb" in router_state(testbed):
        assert time.monotonic() < deadline, testbed.natlb_log()
        time.sleep(0.2)
    assert hold.survived()                     # the IPv4 flow lived through both


def test_cluster_service_on_ipv6_serves_and_checks(testbed, natlb):
    """One node of a cluster service over IPv6 (cluster.c is family-aware):
    traffic is served and the node's own health checks are answered (their
    replies pass before the reply rules, fib daddr type local)."""
    natlb(basic_config(testbed, family=6, scheduler="maglev").replace(
        'scheduler = "maglev"', 'scheduler = "maglev"\ncluster = true'))
    for k in (1, 2, 3):
        testbed.wait_health(f"[{backend_addr6(k)}]:80", "up")
    res = testbed.client_run("http-stream", "--host", VIP6, "--port", "80", "--count", "12")
    assert all(r["ok"] for r in res), res
    assert status(testbed)["services"][0]["new_flows"] == 12


def test_ipv6_vip_announced_only_while_a_backend_takes_flows(testbed, natlb):
    """lb.announce = "healthy": the IPv6 VIP is on the interface (a /128,
    no duplicate address detection) while a backend takes new flows."""
    natlb(basic_config(testbed, family=6, lb_extra='announce = "healthy"'))

    def vip_flags(present: bool) -> str:
        deadline = time.monotonic() + 10
        while True:
            out = testbed.router_cmd("ip", "-6", "addr", "show", "dev", "lo").stdout
            if (f"{VIP6}/128" in out) == present:
                return out
            assert time.monotonic() < deadline, out
            time.sleep(0.05)

    assert "nodad" in vip_flags(True).split(f"{VIP6}/128", 1)[1].splitlines()[0]
    for k in (1, 2, 3):
        natlb_cli(testbed, "backend", "disable", "web", backend_addr6(k), "-s",
                  testbed.control_socket)
    vip_flags(False)
    natlb_cli(testbed, "backend", "enable", "web", f"[{backend_addr6(2)}]:80", "-s",
              testbed.control_socket)
    vip_flags(True)
    res = testbed.client_run("http-stream", "--host", VIP6, "--port", "80", "--count", "3")
    assert [r.get("backend") for r in res] == ["b2"] * 3, res


def test_restart_hands_over_ipv6_flows(testbed, natlb):
    """natlb restart with IPv4 and IPv6 services under IPv6 load: no
    established or new IPv6 connection lost, the ip6 table kept in place,
    and the successor's exit leaves nothing."""
    before = router_state(testbed)
    text = basic_config(testbed, health="none",
                        extra_services=web_service("web6", [1, 2, 3], family=6)).replace(
        'kind = "tcp"\ninterval_ms = 100', 'kind = "none"\ninterval_ms = 100')
    old = natlb(text)
    load = testbed.python(testbed.client, "natlb_testbed.hosts", "churn", "--host", VIP6,
                          "--port", "80", "--keepalive", "10", "--interval-ms", "15",
                          "--seconds", "4", "--timeout", "15", stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)
    r = natlb_cli(testbed, "restart", "-c", str(testbed.write_config(text)))
    assert r.returncode == 0, r.stderr + testbed.natlb_log()
    pid = int(r.stdout.split()[2])
    try:
        assert old.wait(timeout=10) == 0
        res = result(load)
        assert res["established_lost"] == 0 and res["new_failed"] == 0, res
        assert res["new"] > 100 and res["keepalive_requests"] > 100, res
        assert "table ip6 natlb" in router_state(testbed)
    finally:
        os.kill(pid, signal.SIGTERM)
        wait_gone(pid)
    assert router_state(testbed) == before


# A real DNS exchange, not an echo: each backend answers any A question with
# 192.0.2.<its number>, on port 5353; the VIP's port 53 maps to it.
DNS_SERVER = """
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
k = int(sys.argv[2])
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(512)
    answer = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, k])
    s.sendto(q[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + q[12:] + answer, peer)
"""
# n queries, each from a new socket (a new flow); per query the answer's last
# octet, or None (no answer) or -1 (an answer that does not match the query,
# or not from the VIP's port 53).
DNS_CLIENT = """
import json, os, socket, struct, sys
vip, n = sys.argv[1], int(sys.argv[2])
out = []
for i in range(n):
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        name = b"".join(bytes([len(p)]) + p for p in (b"www%d" % i, b"example")) + b"\\0"
        q = struct.pack("!HHHHHH", (os.getpid() + i) & 0xffff, 0x0100, 1, 0, 0, 0)
        q += name + struct.pack("!HH", 1, 1)
        s.sendto(q, (vip, 53))
        try:
            a, peer = s.recvfrom(512)
        except TimeoutError:
            out.append(None)
            continue
        ok = a[:2] == q[:2] and a[12:len(q)] == q[12:] and peer[:2] == (vip, 53)
        out.append(a[-1] if ok else -1)
print(json.dumps(out))
"""


@MODES
def test_dns_over_ipv6(testbed, natlb, rewrite):
    servers = []
    try:
        for k in (1, 2, 3):
            p = testbed.spawn(testbed.backend(k), [sys.executable, "-c", DNS_SERVER,
                                                   backend_addr6(k), str(k)],
                              stdout=subprocess.PIPE, text=True)
            servers.append(p)
            assert p.stdout and p.stdout.readline().strip() == "ready"
        backends = "\n".join(f'[[service.backend]]\naddress = "{backend_addr6(k)}"\nport = 5353'
                             for k in (1, 2, 3))
        natlb(f'[lb]\ncontrol_socket = "{testbed.control_socket}"\nrewrite = "{rewrite}"\n' + f"""
[[service]]
name = "dns6"
vip = "{VIP6}"
port = 53
protocol = "udp"
scheduler = "rr"
[service.health]
kind = "dns"
name = "natlb.example"
interval_ms = 200
timeout_ms = 1000
{backends}
""")
        r = subprocess.run(["ip", "netns", "exec", testbed.client, sys.executable, "-c",
                            DNS_CLIENT, VIP6, "12"], capture_output=True, text=True, timeout=60)
        answers = json.loads(r.stdout)
        assert Counter(answers) == {1: 4, 2: 4, 3: 4}, answers
    finally:
        for p in servers:
            testbed.stop(p)
            testbed.procs.remove(p)
