"""What the fast path promises IPv6 beyond what its family-parametrized
tests (test_fastpath_tc, test_fastpath_udp, test_failover) show: a spoofed
backend reply arriving on the client's side is not carried (netfilter
drops it, as without the fast path); packets with extension headers are
never carried yet served all the same, whatever their flow; a reply too
big for the client's link gets its Packet Too Big, relayed to the backend,
while the rest of the transfer is carried."""

import json
import re
import sys

from natlb_testbed.testbed import CLIENT_ADDR6, VIP6, backend_addr6, basic_config, udp_service

from .test_traffic import queued_packets

FAST = 'rewrite = "mark"\nfastpath = true'

# Run in the client's namespace: sends a TCP RST that claims to come from a
# backend (the reply direction of a carried flow) out of the client's own
# interface, to the router.
SPOOF = """
import sys
from scapy.all import Ether, IPv6, TCP, sendp
src, dst, sport, dport, mac = sys.argv[1:]
sendp(Ether(dst=mac) / IPv6(src=src, dst=dst) / TCP(sport=int(sport), dport=int(dport),
                                                    flags="R"), iface="eth0", verbose=False)
"""

# Run in the client's namespace: n exchanges over one flow (UDP: one socket
# bound to a fixed port; TCP: one keep-alive connection), each datagram or
# segment the client sends with an IPv6 destination options header (PadN)
# when `ext` is 1.  Prints how many were answered right.
EXCHANGE = """
import socket, sys
from natlb_testbed.hosts import _get
proto, vip, sport, n, ext = sys.argv[1:]
sport, n, ext = int(sport), int(n), ext == "1"
kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.settimeout(3)
if ext:   # next header (the kernel's), length 0, PadN of 4: 8 bytes
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
s.bind(("::", sport))
s.connect((vip, 53 if proto == "udp" else 80))
ok = 0
for i in range(n):
    if proto == "udp":
        q = b"q%d" % i
        s.send(q)
        ok += s.recv(2048).partition(b":")[2] == q
    else:
        ok += _get(s).startswith("b")
print(ok)
"""


def router_mac(tb) -> str:
    return json.loads(tb.router_cmd("ip", "-j", "link", "show", "cl0").stdout)[0]["address"]


def spoofed_reply_drops(tb) -> int:
    """The ip6 table's counter of backend replies arriving where the backend
    is not (the `spoofed backend reply` rule)."""
    out = json.loads(tb.router_cmd("nft", "-j", "list", "table", "ip6", "natlb").stdout)
    for item in out["nftables"]:
        rule = item.get("rule")
        if rule and "@backend_services6" in json.dumps(rule):
            return next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    raise AssertionError("no spoofed backend reply rule in table ip6 natlb")


def client_port(tb) -> int:
    """The client's port of its one established connection to the VIP."""
    out = tb.client_cmd("ss", "-Htn", "state", "established", "dst", f"[{VIP6}]:80").stdout
    [port] = re.findall(rf"\[{re.escape(CLIENT_ADDR6)}\]:(\d+)", out)
    return int(port)


def test_a_spoofed_ipv6_reply_on_the_clients_side_is_not_carried(testbed, natlb):
    """An RST from a backend's address and port to a carried flow's client,
    arriving on the client's interface: carried, it would reach the client
    from the VIP (and nft would never see it); the entry's ingress check
    leaves it to netfilter, which drops and counts it."""
    natlb(basic_config(testbed, family=6, lb_extra=FAST))
    hold = testbed.hold(VIP6)
    k = int(hold.backend[1:])
    before = spoofed_reply_drops(testbed)
    r = testbed.client_cmd(sys.executable, "-c", SPOOF, backend_addr6(k), CLIENT_ADDR6, "80",
                           str(client_port(testbed)), router_mac(testbed))
    assert r.returncode == 0, r.stderr
    assert spoofed_reply_drops(testbed) == before + 1
    assert hold.survived()


def exchange(tb, proto: str, sport: int, n: int, ext: bool) -> int:
    r = tb.client_cmd(sys.executable, "-c", EXCHANGE, proto, VIP6, str(sport), str(n),
                      str(int(ext)))
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_udp_with_an_extension_header_is_queued_and_served_the_flow_carried_around_it(
        testbed, natlb):
    """One UDP flow: plain datagrams are carried once the backend answered;
    the same flow's datagrams behind a destination options header go
    through natlb one by one (the kernel never carries them), answered and
    counted all the same; plain again, carried again."""
    natlb(basic_config(testbed, family=6, lb_extra=FAST,
                       extra_services=udp_service("dns", [1, 2, 3], family=6)))

    def dns() -> dict:
        return next(s for s in testbed.status()["services"] if s["name"] == "dns")

    sport, n = 41053, 20
    phases = []
    for ext in (False, True, False):
        q0, d0 = queued_packets(testbed), dns()
        assert exchange(testbed, "udp", sport, n, ext) == n
        d1 = dns()
        phases.append(queued_packets(testbed) - q0)
        assert (d1["packets_in"] - d0["packets_in"], d1["packets_out"] - d0["packets_out"]) == \
            (n, n), (ext, d0, d1)
    plain, behind_a_header, plain_again = phases
    # Plain: the first query and its answer (a datagram may race the
    # entry's install).  Behind a header: every query.
    assert plain <= 4 and plain_again <= 2, phases
    assert behind_a_header >= n, phases


def test_tcp_with_an_extension_header_is_queued_and_served(testbed, natlb):
    """A connection whose every client segment has a destination options
    header, from its SYN on: natlb marks its packets fast as any, the
    kernel learns nothing from them, and natlb serves the whole connection;
    a plain connection's requests are carried."""
    natlb(basic_config(testbed, family=6, lb_extra=FAST))
    n = 10
    q0 = queued_packets(testbed)
    assert exchange(testbed, "tcp", 41080, n, ext=True) == n
    behind_a_header = queued_packets(testbed) - q0
    q0 = queued_packets(testbed)
    assert exchange(testbed, "tcp", 41081, n, ext=False) == n
    plain = queued_packets(testbed) - q0
    # Each request and its answer (and the handshake) queued, against the
    # plain connection's SYN (and any FIN natlb's observer did not take).
    assert behind_a_header >= 2 * n, (behind_a_header, plain)
    assert plain <= 3, (behind_a_header, plain)


def test_a_reply_too_big_for_the_clients_link_gets_packet_too_big_and_the_rest_is_carried(
        testbed, natlb):
    """IPv6's minimum MTU on the client's side of the router: a carried
    reply too big for it is left to natlb and the kernel (bpf_check_mtu),
    whose Packet Too Big, sent to the VIP, natlb relays to the backend; the
    backend's smaller segments are carried."""
    natlb(basic_config(testbed, family=6, lb_extra=FAST))
    for k in range(1, testbed.n_backends + 1):    # what an earlier run taught them
        testbed.backend_cmd(k, "ip", "-6", "route", "flush", "cache")
    testbed.router_cmd("ip", "link", "set", "cl0", "mtu", "1280")
    try:
        q0 = queued_packets(testbed)
        r = testbed.client_run("blob", "--host", VIP6, "--port", "80", "--size", str(4 << 20),
                               "--seed", "21", "--timeout", "10")[0]
        queued = queued_packets(testbed) - q0
    finally:
        testbed.router_cmd("ip", "link", "set", "cl0", "mtu", "1500")
    assert r["ok"], r
    st = testbed.status()
    assert st["failover"]["pmtu_relayed"] >= 1
    # 4 MiB is over 3,400 packets of 1,280 bytes: natlb saw a few.
    assert st["services"][0]["bytes_out"] > 4 << 20 and queued < 200, (queued, st)
