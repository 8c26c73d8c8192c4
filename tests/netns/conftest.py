"""Integration tier: needs root; every test network is built and removed here."""

import os
import subprocess

import pytest

from natlb_testbed.testbed import Testbed

if os.geteuid() != 0:
    pytest.skip("integration tests need root (network namespaces)", allow_module_level=True)


@pytest.fixture(scope="module")
def testbed():
    tb = Testbed(n_backends=3).build()
    try:
        tb.start_backends()
        yield tb
    finally:
        tb.close()


@pytest.fixture
def natlb(testbed):
    """Start natlb in the router namespace with a config; stop it afterwards."""
    started = []

    def start(config_text: str):
        p = testbed.start_natlb(testbed.write_config(config_text))
        started.append(p)
        return p

    yield start
    for p in started:
        testbed.stop(p)
        testbed.procs.remove(p)


def router_state(tb: Testbed) -> str:
    """Everything natlb might touch in the router namespace, as text."""
    out = []
    for cmd in (["nft", "list", "ruleset"], ["ip", "-4", "addr"], ["ip", "route"],
                ["ip", "-6", "addr"], ["ip", "-6", "route"]):
        out.append(tb.router_cmd(*cmd).stdout)
    out.append(tc_state(tb))
    for path in ("ipv4/ip_forward", "ipv4/conf/all/accept_local", "ipv4/conf/all/rp_filter",
                 "ipv6/conf/all/forwarding"):
        out.append(path + "=" + tb.router_cmd("cat", f"/proc/sys/net/{path}").stdout)
    return "\n".join(out)


def tc_state(tb: Testbed) -> str:
    """The router's qdiscs and tc filters (the fast path's programs)."""
    out = [tb.router_cmd("tc", "qdisc", "show").stdout]
    links = tb.router_cmd("ip", "-o", "link", "show").stdout
    for line in links.splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        for where in ("ingress", "egress"):
            out.append(f"{dev} {where}: " +
                       tb.router_cmd("tc", "filter", "show", "dev", dev, where).stdout)
    return "\n".join(out)


def natlb_cli(tb: Testbed, *args: str) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run(["ip", "netns", "exec", tb.router, sys.executable, "-m", "natlb",
                           *args], capture_output=True, text=True, timeout=30)
