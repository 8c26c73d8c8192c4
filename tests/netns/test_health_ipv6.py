"""Every health check kind over IPv6, against real peers in the testbed's
backend namespaces, run from the router's namespace as natlb runs them."""

import json
import subprocess
import sys
import textwrap

import pytest

from natlb_testbed import testbed as testbeds
from natlb_testbed.testbed import backend_addr6

# Run in the router's namespace: one check per line of input, one JSON result
# per line of output, through the checkers' registry as the monitor uses it.
RUNNER = textwrap.dedent("""
    import asyncio, json, sys
    from natlb.checkers import check_once
    from natlb.config import HEALTH_KINDS
    for line in sys.stdin:
        kind, address, port, kw = json.loads(line)
        if "command" in kw:
            kw["command"] = tuple(kw["command"])
        kw.setdefault("timeout_ms", 1000)
        hc = HEALTH_KINDS[kind](**kw)
        print(json.dumps(asyncio.run(check_once(address, port, hc))), flush=True)
""")

# A DNS server on the backend's IPv6 address: one A record for any question.
DNS_SERVER = textwrap.dedent("""
    import socket, struct, sys
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], 5353))
    print("ready", flush=True)
    while True:
        q, peer = s.recvfrom(512)
        answer = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, 1])
        s.sendto(q[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0) + q[12:] + answer, peer)
""")


@pytest.fixture(scope="module")
def bed():
    tb = testbeds.Testbed(n_backends=1).build()
    try:
        tb.start_backends()
        dns = tb.spawn(tb.backend(1), [sys.executable, "-c", DNS_SERVER, backend_addr6(1)],
                       stdout=subprocess.PIPE, text=True)
        assert dns.stdout and dns.stdout.readline().strip() == "ready"
        yield tb
    finally:
        tb.close()


def run_checks(tb, checks):
    p = subprocess.run(["ip", "netns", "exec", tb.router, sys.executable, "-c", RUNNER],
                       input="".join(json.dumps(c) + "\n" for c in checks),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [tuple(json.loads(line)) for line in p.stdout.splitlines()]


def test_every_kind_over_ipv6(bed):
    b = backend_addr6(1)
    script = ("import os,sys; sys.exit(0 if os.environ['NATLB_BACKEND'] == "
              f"'[{b}]:80' and os.environ['NATLB_BACKEND_ADDRESS'] == '{b}' else 3)")
    # Generous timeouts: a loaded machine must not turn an answer into a timeout.
    got = run_checks(bed, [[kind, addr, port, {"timeout_ms": 3000, **kw}]
                           for kind, addr, port, kw in [
        ["tcp", b, 80, {}],
        ["tcp", b, 81, {}],                                   # nothing listens: refused
        ["http", b, 80, {"expect_body": "b1"}],
        ["http", b, 80, {"expect_status": 204}],
        ["udp", b, 53, {"payload": "ping", "expect": "b1:ping"}],
        ["udp", b, 54, {}],                                   # ICMPv6 port unreachable
        ["dns", b, 5353, {"name": "www.example.test"}],
        ["exec", b, 80, {"command": [sys.executable, "-c", script]}],
        ["exec", b, 81, {"command": [sys.executable, "-c", script]}],
    ]])
    ok = [r[0] for r in got]
    assert ok == [True, False, True, False, True, False, True, True, False], got
    assert got[0] == (True, "connected")
    assert "refused" in got[1][1].lower()
    assert got[2] == (True, "HTTP 200") and got[3] == (False, "HTTP 200")
    assert got[6] == (True, "DNS 1 answers")
    assert got[8] == (False, "exit 3")


def test_silent_ipv6_peer_times_out(bed):
    """A backend whose link is down answers nothing: every kind times out
    (no route error: the router still has its own end of the link)."""
    bed.fail_backend(1, "link")
    try:
        got = run_checks(bed, [["tcp", backend_addr6(1), 80, {}],
                               ["http", backend_addr6(1), 80, {}]])
    finally:
        bed.repair_backend(1, "link")
    assert [r[0] for r in got] == [False, False], got
    assert all(r[1] in ("timeout after 1000 ms", "No route to host",
                        "Network is unreachable") for r in got), got
