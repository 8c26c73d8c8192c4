"""netsetup with IPv6 VIPs in a namespace of its own: the VIP usable at
once (no duplicate address detection), IPv6 forwarding on, IPv6 routes;
and the undo journal leaves the namespace exactly as it was."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

NS = f"nl6set{os.getpid() % 100000}"

SCRIPT = textwrap.dedent("""
    import json, sys
    from pyroute2 import IPRoute
    from natlb import netsetup
    from natlb.config import parse
    from natlb.undo import Journal

    cfg = parse(json.loads(sys.argv[1]))
    journal = Journal(guardian=False)
    vips = [s.vip for s in cfg.services]
    netsetup.apply(cfg.lb, vips, journal, ipv6=True)
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=cfg.lb.interface)[0]
        addrs = {a.get_attr("IFA_ADDRESS"): a.get_attr("IFA_FLAGS")
                 for a in ipr.get_addr(index=idx)}
    ingress = netsetup.backend_ingress(["2001:db8:113:1::2", "2001:db8:77::1"])
    fwd = open("/proc/sys/net/ipv6/conf/all/forwarding").read().strip()
    print(json.dumps({"addrs": addrs, "forwarding": fwd,
                      "ingress": {k: list(v) for k, v in ingress.items()}}), flush=True)
    errors = journal.undo()
    print(json.dumps({"errors": errors}), flush=True)
""")


def ns(*argv, check=True):
    return subprocess.run(["ip", "netns", "exec", NS, *argv], capture_output=True, text=True,
                          check=check)


@pytest.fixture
def netns():
    subprocess.run(["ip", "netns", "add", NS], check=True)
    try:
        ns("ip", "link", "set", "lo", "up")
        ns("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        for dev in ("v0", "v1"):
            ns("ip", "link", "set", dev, "up")
        ns("ip", "addr", "add", "2001:db8:113:1::1/64", "dev", "v0", "nodad")
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def state() -> str:
    return "\n".join([ns("ip", "-6", "addr").stdout, ns("ip", "-4", "addr").stdout,
                      ns("ip", "-6", "route", "show", "table", "all").stdout,
                      ns("cat", "/proc/sys/net/ipv6/conf/all/forwarding").stdout])


def test_ipv6_vips_forwarding_routes_and_clean_undo(netns):
    before = state()
    raw = {"lb": {"interface": "v1", "route": [
        {"destination": "2001:db8:200::/48", "gateway": "2001:db8:113:1::2"},
        {"destination": "2001:db8:77::/48", "device": "v0"}]},
        "service": [
            {"name": "web6", "vip": "2001:db8::100", "port": 80,
             "backend": [{"address": "2001:db8:113:1::2"}]},
            {"name": "web4", "vip": "192.0.2.100", "port": 80,
             "backend": [{"address": "203.0.113.2"}]}]}
    out = ns(sys.executable, "-c", SCRIPT, json.dumps(raw)).stdout.splitlines()
    applied, undone = json.loads(out[0]), json.loads(out[1])
    assert "2001:db8::100" in applied["addrs"] and "192.0.2.100" in applied["addrs"]
    flags = applied["addrs"]["2001:db8::100"]
    assert flags & 0x02 and not flags & 0x40          # IFA_F_NODAD, never IFA_F_TENTATIVE
    assert applied["forwarding"] == "1"
    assert applied["ingress"]["2001:db8:113:1::2"] != []   # routed through v0
    assert applied["ingress"]["2001:db8:77::1"] != []      # through the route natlb added
    assert undone == {"errors": []}
    assert state() == before                          # no address, route or sysctl left


def test_ipv4_only_leaves_ipv6_forwarding_alone(netns):
    script = textwrap.dedent("""
        from natlb import netsetup
        from natlb.config import parse
        from natlb.undo import Journal
        cfg = parse({"lb": {"interface": "v1"}, "service": [{"name": "w", "vip": "192.0.2.9",
                     "port": 80, "backend": [{"address": "203.0.113.2"}]}]})
        j = Journal(guardian=False)
        netsetup.apply(cfg.lb, ["192.0.2.9"], j)
        print(open("/proc/sys/net/ipv6/conf/all/forwarding").read().strip())
        j.undo()
    """)
    assert ns(sys.executable, "-c", script).stdout.strip() == "0"
