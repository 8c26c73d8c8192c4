"""The nftables table natlb installs, against a real kernel: big configs load
in one transaction, and backend packets are believed only from the backend
side."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from natlb_testbed.testbed import (
    CLIENT_ADDR,
    CLIENT_ADDR6,
    VIP,
    VIP6,
    backend_addr,
    backend_addr6,
    basic_config,
)

from .conftest import natlb_cli


def status(tb) -> dict:
    r = natlb_cli(tb, "status", "--json", "-s", tb.control_socket)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def many_services(tb, n: int) -> str:
    """n TCP services on the VIP (ports 10000..), each over the 3 backends."""
    out = [f'[lb]\ncontrol_socket = "{tb.control_socket}"\n']
    for i in range(n):
        out.append(f'[[service]]\nname = "s{i}"\nvip = "{VIP}"\nport = {10000 + i}\n'
                   '[service.health]\nkind = "none"\n')
        out += [f'[[service.backend]]\naddress = "{backend_addr(k)}"\nport = 80\n'
                for k in (1, 2, 3)]
    return "\n".join(out)


def test_250_services_with_3_backends_load_and_serve(testbed, natlb):
    """Was 'Message too long' while loading the table: now sets and maps,
    one transaction, whatever `natlb check` accepts."""
    path = testbed.write_config(many_services(testbed, 250))
    r = natlb_cli(testbed, "check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    natlb(path.read_text())
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "10123", "--count", "6",
                             "--timeout", "5")
    assert all(r["ok"] for r in res), res
    assert {r["backend"] for r in res} == {"b1", "b2", "b3"}
    st = status(testbed)
    assert len(st["services"]) == 250
    assert next(s for s in st["services"] if s["name"] == "s123")["new_flows"] == 6
    # The rules do not grow with the services: nine set lookups in
    # prerouting, and two for fragments (to a VIP, from a backend) per L4
    # protocol (TCP).
    listing = testbed.router_cmd("nft", "list", "chain", "ip", "natlb", "prerouting").stdout
    assert listing.count(" @") == 11, listing


ATTACK = r"""
import sys, time
from scapy.all import Ether, IP, IPv6, TCP, ICMP, ICMPv6DestUnreach, sendp, conf
conf.verb = 0
mac, client, vip, *backends = sys.argv[1:]
ip = IPv6 if ":" in vip else IP
unreach = ICMPv6DestUnreach(code=4) if ":" in vip else ICMP(type=3, code=3)
for i in range(30):
    sport = 40000 + i
    # A SYN of the attacker's own, then "the backend refuses it" from the client side.
    sendp(Ether(dst=mac) / ip(src=client, dst=vip) /
          TCP(sport=sport, dport=80, flags="S", seq=1000), iface="eth0")
    for b in backends:
        sendp(Ether(dst=mac) / ip(src=b, dst=client) /
              TCP(sport=80, dport=sport, flags="RA", seq=0, ack=1001), iface="eth0")
        sendp(Ether(dst=mac) / ip(src=b, dst=client) / unreach /
              ip(src=client, dst=b) / TCP(sport=sport, dport=80, flags="S", seq=1000),
              iface="eth0")
    time.sleep(0.02)
"""


def _counters(tb, family: str = "ip") -> list[int]:
    listing = tb.router_cmd("nft", "list", "chain", family, "natlb", "prerouting").stdout
    return [int(n) for n in re.findall(r"counter packets (\d+)", listing)]


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
def test_spoofed_backend_packets_from_the_client_side_are_dropped(testbed, natlb, family):
    vip, client = (VIP6, CLIENT_ADDR6) if family == 6 else (VIP, CLIENT_ADDR)
    addr = backend_addr6 if family == 6 else backend_addr
    natlb(basic_config(testbed, interval_ms=200, family=family))
    holds = [testbed.hold(vip) for _ in range(3)]
    link = json.loads(testbed.router_cmd("ip", "-j", "link", "show", "cl0").stdout)
    attacker = subprocess.run(
        ["ip", "netns", "exec", testbed.client, sys.executable, "-c", ATTACK,
         link[0]["address"], client, vip, *(addr(k) for k in (1, 2, 3))],
        capture_output=True, text=True, timeout=60)
    assert attacker.returncode == 0, attacker.stderr
    # 30 rounds x 3 backends of each kind, all dropped at prerouting.
    assert _counters(testbed, "ip6" if family == 6 else "ip") == [90, 90]
    time.sleep(0.5)  # long enough for any believed failure to have been acted on
    backends = [b for s in status(testbed)["services"] for b in s["backends"]]
    assert {b["health"] for b in backends} == {"up"}, backends
    assert [h.survived() for h in holds] == [True] * 3
    # Real replies still come in through the backend side.
    res = testbed.client_run("http-stream", "--host", vip, "--port", "80", "--count", "6")
    assert all(r["ok"] for r in res), res


INGRESS = """
import json, sys
from natlb.netsetup import backend_ingress
print(json.dumps(backend_ingress(sys.argv[1:])))
"""


def test_backend_ingress_follows_the_routing_table_and_every_multipath_hop(testbed):
    """A backend routed over two links is believed from both; one without a
    route from none.  Read inside a namespace of its own."""
    ns = f"{testbed.prefix}-rt"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)

        for i, net in ((1, "198.51.100.1/30"), (2, "198.51.100.5/30")):
            ip("link", "add", f"d{i}", "type", "veth", "peer", "name", f"p{i}")
            ip("addr", "add", net, "dev", f"d{i}")
            ip("link", "set", f"p{i}", "up")
            ip("link", "set", f"d{i}", "up")
        ip("route", "add", "203.0.113.0/28", "nexthop", "via", "198.51.100.2", "dev", "d1",
           "nexthop", "via", "198.51.100.6", "dev", "d2")
        ip("route", "add", "203.0.113.64/28", "via", "198.51.100.6", "dev", "d2")
        # The same over IPv6.
        for i in (1, 2):
            ip("addr", "add", f"2001:db8:{i}::1/64", "dev", f"d{i}", "nodad")
        ip("-6", "route", "add", "2001:db8:113::/48", "nexthop", "via", "2001:db8:1::2", "dev",
           "d1", "nexthop", "via", "2001:db8:2::2", "dev", "d2")
        ip("-6", "route", "add", "2001:db8:114::/48", "via", "2001:db8:2::2", "dev", "d2")
        links = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link"], check=True,
                                          capture_output=True, text=True).stdout)
        index = {link["ifname"]: link["ifindex"] for link in links}
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", INGRESS,
                            "203.0.113.2", "203.0.113.66", "192.0.2.9", "2001:db8:113::2",
                            "2001:db8:114::2", "2001:db8:999::1"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        both = sorted([index["d1"], index["d2"]])
        assert json.loads(r.stdout) == {"203.0.113.2": both, "203.0.113.66": [index["d2"]],
                                        "192.0.2.9": [], "2001:db8:113::2": both,
                                        "2001:db8:114::2": [index["d2"]], "2001:db8:999::1": []}
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
