"""The tc fast path on interfaces beyond the testbed's plain veths, with real
traffic: a VLAN device, a bridge, a bond and a macvlan on the router, each
carrying its flows; an interface that appears while natlb runs (filters,
reverse-path filtering off, journaled: gone after SIGTERM, after SIGKILL
through the guardian, handed over by `natlb restart`); one deleted while
natlb runs (its filters and flow entries forgotten, the stop clean); one
that vanishes while natlb starts (the start goes on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from natlb_testbed.testbed import CLIENT_ADDR, VIP, basic_config

from .conftest import natlb_cli, router_state
from .test_restart import wait_gone
from .test_traffic import queued_packets

BLOB = 4 << 20


@dataclass
class Side:
    """A namespace of the test's own behind one router interface."""

    ns: str
    dev: str          # the router's interface the traffic goes through
    lower: str        # the veth under it (dev itself for "plain")
    router_addr: str
    addr: str         # the namespace's address


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def kernel_has(tb, kind: str) -> bool:
    """Can this kernel make such a device (a VM's may lack 802.1Q or bonding)?"""
    name = f"{tb.prefix[:9]}k"
    r = tb.router_cmd("ip", "link", "add", "name", name, "type", kind,
                      *(["id", "7"] if kind == "vlan" else []))
    tb.router_cmd("ip", "link", "del", name)
    return "Unknown device type" not in r.stderr


@contextmanager
def side(tb, tag: str, kind: str, block: int) -> Iterator[Side]:
    """Namespace {prefix}-{tag} behind a router interface of this kind,
    203.0.113.(200 + 4 * block)/30 between them (the testbed uses .4-.15;
    a VXLAN's underlay .(240 + 4 * block)/30)."""
    ns, r = f"{tb.prefix}-{tag}", tb.router
    base = 200 + 4 * block
    router_addr, addr = f"203.0.113.{base + 1}", f"203.0.113.{base + 2}"
    under_r, under_s = f"203.0.113.{base + 41}", f"203.0.113.{base + 42}"
    lower = f"{tag}v"
    dev = {"plain": lower, "vlan": f"{tag}.100", "bridge": f"{tag}br", "bond": f"{tag}bo",
           "macvlan": f"{tag}mv", "vxlan": f"{tag}vx"}[kind]
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", r, "link", "add", lower, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", r, "link", "set", lower, "up")
        _ip("-n", ns, "link", "set", "eth0", "up")
        peer = "eth0"
        if kind == "vlan":
            # Tagged on the wire; each end's VLAN device sends and receives
            # untagged frames.
            _ip("-n", r, "link", "add", "link", lower, "name", dev, "type", "vlan", "id", "100")
            _ip("-n", ns, "link", "add", "link", "eth0", "name", "eth0.100", "type", "vlan",
                "id", "100")
            peer = "eth0.100"
        elif kind in ("bridge", "bond"):
            _ip("-n", r, "link", "add", dev, "type", kind)
            _ip("-n", r, "link", "set", lower, "down")    # a bond takes only a down slave
            _ip("-n", r, "link", "set", lower, "master", dev)
            _ip("-n", r, "link", "set", lower, "up")
        elif kind == "macvlan":
            _ip("-n", r, "link", "add", "link", lower, "name", dev, "type", "macvlan", "mode",
                "bridge")
        elif kind == "vxlan":
            # Ethernet over UDP: the veth carries only the underlay.
            for n, me, other, link, name in ((r, under_r, under_s, lower, dev),
                                             (ns, under_s, under_r, "eth0", "vx0")):
                _ip("-n", n, "addr", "add", f"{me}/30", "dev", link)
                _ip("-n", n, "link", "add", name, "type", "vxlan", "id", "42", "local", me,
                    "remote", other, "dstport", "4789", "dev", link)
            peer = "vx0"
        _ip("-n", r, "link", "set", dev, "up")
        _ip("-n", r, "addr", "add", f"{router_addr}/30", "dev", dev)
        _ip("-n", ns, "link", "set", peer, "up")
        _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", peer)
        _ip("-n", ns, "route", "add", "default", "via", router_addr)
        # A bridge has no carrier for a moment: the state is compared later.
        wait_for(f"{dev} up", lambda: "LOWER_UP" in tb.router_cmd(
            "ip", "link", "show", dev).stdout)
        yield Side(ns, dev, lower, router_addr, addr)
    finally:
        for d in {dev, lower}:
            subprocess.run(["ip", "-n", r, "link", "del", d], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def status(tb) -> dict:
    r = natlb_cli(tb, "status", "--json", "-s", tb.control_socket)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def tc_on(tb, dev: str) -> str:
    """The device's qdiscs and filters, as text."""
    return "\n".join(tb.router_cmd("tc", *cmd, "dev", dev, *where).stdout
                     for cmd, where in ((["qdisc", "show"], []), (["filter", "show"], ["ingress"]),
                                        (["filter", "show"], ["egress"])))


def carried(tb, dev: str) -> bool:
    text = tc_on(tb, dev)
    return "carry" in text and "learn" in text


def wait_for(what, pred, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            assert got, what
            return got
        time.sleep(0.05)


def rp_filter(tb, dev: str) -> str:
    return tb.router_cmd("cat", f"/proc/sys/net/ipv4/conf/{dev}/rp_filter").stdout.strip()


@pytest.fixture
def strict_default(testbed):
    """New router interfaces start with strict reverse-path filtering (as
    many distributions set it), which natlb turns off on each."""
    path = "/proc/sys/net/ipv4/conf/default/rp_filter"
    old = testbed.router_cmd("cat", path).stdout.strip()
    testbed.router_cmd("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=1")
    yield
    testbed.router_cmd("sysctl", "-qw", f"net.ipv4.conf.default.rp_filter={old}")


def download(tb, ns: str) -> dict:
    """BLOB bytes from the VIP, fetched from namespace ns."""
    p = tb.python(ns, "natlb_testbed.hosts", "blob", "--host", VIP, "--port", "80", "--size",
                  str(BLOB), "--seed", "5", "--timeout", "30", stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate(timeout=60)
    tb.procs.remove(p)
    return json.loads(out.strip().splitlines()[-1])


def assert_carried(tb, fetch) -> None:
    """A 4 MiB download is thousands of packets each way (hundreds after
    GRO): with both directions carried by the kernel natlb sees a handful
    (3 when measured; 260 through a VXLAN without our programs on it)."""
    queued = queued_packets(tb)
    r = fetch()
    assert r["ok"], r
    assert queued_packets(tb) - queued < 50, queued_packets(tb) - queued


@pytest.mark.parametrize("kind", ["vlan", "bridge", "macvlan", "vxlan", "bond"])
def test_a_backend_behind_each_kind_of_ethernet_interface_is_carried(testbed, natlb, kind):
    """Routed through a VLAN device, a bridge, a macvlan, a VXLAN, a bond:
    carried by the programs on that device (its lower one passes them)."""
    if kind in ("vlan", "bond") and not kernel_has(testbed, kind):
        pytest.skip(f"this kernel cannot make a {kind} device")
    with side(testbed, "lk", kind, 0) as s:
        server = testbed.python(s.ns, "natlb_testbed.hosts", "serve", "--name", "lk",
                                stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            before = router_state(testbed)
            p = natlb(basic_config(testbed).split("[[service.backend]]")[0] +
                      f'[[service.backend]]\naddress = "{s.addr}"\nport = 80\n')
            testbed.wait_health(f"{s.addr}:80", "up")
            assert {s.dev, s.lower} <= set(status(testbed)["fastpath"]["interfaces"])
            assert carried(testbed, s.dev) and carried(testbed, s.lower)
            assert_carried(testbed, lambda: testbed.client_run(
                "blob", "--host", VIP, "--port", "80", "--size", str(BLOB), "--seed", "3",
                "--timeout", "30")[0])
            testbed.stop(p, signal.SIGTERM)
            assert router_state(testbed) == before
        finally:
            testbed.stop(server)
            testbed.procs.remove(server)


def test_an_interface_that_appears_is_carried_and_one_that_goes_is_forgotten(
        testbed, natlb, strict_default):
    before = router_state(testbed)
    # No health checks: a check timing out on a loaded machine resets the
    # backend's flows and empties the fast path, the held flow's entries too.
    p = natlb(basic_config(testbed, health="none"))
    with side(testbed, "lt", "plain", 1) as s:
        wait_for("filters on the new interface", lambda: carried(testbed, s.dev))
        assert s.dev in status(testbed)["fastpath"]["interfaces"]
        assert rp_filter(testbed, s.dev) == "0"
        # The client there: its packets come in on the new interface.
        assert_carried(testbed, lambda: download(testbed, s.ns))
        hold = testbed.python(s.ns, "natlb_testbed.hosts", "hold", "--host", VIP, "--port",
                              "80", "--timeout", "30", stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(hold.stdout.readline())["backend"]
            forgotten = status(testbed)["fastpath"]["entries_forgotten"]
            _ip("-n", testbed.router, "link", "del", s.dev)
            st = wait_for("the interface forgotten", lambda: (
                s.dev not in (x := status(testbed))["fastpath"]["interfaces"] and x))
        finally:
            testbed.stop(hold)
            testbed.procs.remove(hold)
        # Both entries of the held connection: in from it, out to it.
        assert st["fastpath"]["entries_forgotten"] - forgotten >= 2, st["fastpath"]
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "6")
    assert all(r["ok"] for r in res), res
    testbed.stop(p, signal.SIGTERM)
    assert p.returncode == 0
    assert "cleanup" not in testbed.natlb_log(), testbed.natlb_log()
    assert router_state(testbed) == before


def test_a_late_interface_is_cleaned_by_the_guardian_after_sigkill(testbed, natlb,
                                                                   strict_default):
    p = natlb(basic_config(testbed, lb_extra="restart_grace_ms = 1000"))
    with side(testbed, "lg", "plain", 2) as s:
        wait_for("filters on the new interface", lambda: carried(testbed, s.dev))
        assert rp_filter(testbed, s.dev) == "0"
        p.kill()
        p.wait()
        assert carried(testbed, s.dev)             # left for a successor...
        # ...and undone once the grace is over, as at start.
        wait_for("the guardian's undo", lambda: "clsact" not in tc_on(testbed, s.dev))
        assert not carried(testbed, s.dev) and rp_filter(testbed, s.dev) == "1"


def test_restart_hands_a_late_interface_over(testbed, natlb, strict_default):
    natlb(basic_config(testbed))
    with side(testbed, "lr", "plain", 3) as s:
        wait_for("filters on the new interface", lambda: carried(testbed, s.dev))
        r = natlb_cli(testbed, "restart", "-c", str(testbed.workdir / "natlb.toml"))
        assert r.returncode == 0, r.stderr + testbed.natlb_log()
        pid = int(r.stdout.split()[2])
        try:
            # The successor opens the control socket once its predecessor has
            # let it go.
            wait_for("the successor's status", lambda: natlb_cli(
                testbed, "status", "-s", testbed.control_socket).returncode == 0)
            assert s.dev in status(testbed)["fastpath"]["interfaces"]
            assert_carried(testbed, lambda: download(testbed, s.ns))
        finally:
            os.kill(pid, signal.SIGTERM)
            wait_gone(pid)
        # The successor undid what its predecessor set on the late interface.
        assert not carried(testbed, s.dev) and "clsact" not in tc_on(testbed, s.dev)
        assert rp_filter(testbed, s.dev) == "1"


def test_an_interface_that_vanishes_as_natlb_starts_does_not_stop_it(testbed, natlb):
    before = router_state(testbed)
    _ip("-n", testbed.router, "link", "add", "lvanish0", "type", "bridge")
    p = testbed.start_natlb(testbed.write_config(basic_config(testbed)),
                            module="natlb_testbed.vanishing",
                            env={"NATLB_TEST_VANISH": "lvanish0"})
    try:
        assert "lvanish0" not in status(testbed)["fastpath"]["interfaces"]
        res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "6")
        assert all(r["ok"] for r in res), res
        testbed.stop(p, signal.SIGTERM)
        assert p.returncode == 0 and "cleanup" not in testbed.natlb_log(), testbed.natlb_log()
        assert router_state(testbed) == before
    finally:
        testbed.stop(p)
        testbed.procs.remove(p)
        testbed.router_cmd("ip", "link", "del", "lvanish0")


# Claims a killed natlb's journal from its guardian, as a successor would,
# prints it and undoes it (in the router's namespace).
CLAIM = """
import json, sys
from natlb.undo import claim, undo_all
entries = claim(sys.argv[1], 5.0)
print(json.dumps(entries))
sys.exit(1 if entries is None or undo_all(entries) else 0)
"""


def test_a_deleted_interface_leaves_the_journal_and_the_guardians_copy(
        testbed, natlb, strict_default):
    before = router_state(testbed)
    p = natlb(basic_config(testbed, lb_extra="restart_grace_ms = 10000"))
    with side(testbed, "ld", "plain", 4) as s:
        wait_for("filters on the new interface", lambda: carried(testbed, s.dev))
        index = int(testbed.router_cmd("cat", f"/sys/class/net/{s.dev}/ifindex").stdout)
        _ip("-n", testbed.router, "link", "del", s.dev)
        wait_for("the interface forgotten",
                 lambda: s.dev not in status(testbed)["fastpath"]["interfaces"])
    p.kill()
    p.wait()
    r = testbed.router_cmd(sys.executable, "-c", CLAIM, testbed.control_socket + ".guardian")
    assert r.returncode == 0, r.stdout + r.stderr
    entries = json.loads(r.stdout)
    # What the guardian would have undone: the testbed's interfaces, not the gone one.
    filters = {e["ifindex"] for e in entries if e["kind"] == "tc_filter"}
    assert len(filters) >= 4 and index not in filters, entries
    assert not [e for e in entries if s.dev in e.get("path", "")], entries
    assert router_state(testbed) == before


# In a namespace: every frame on eth0 whose IPv4 id is 4242, tagged or not,
# for the seconds given, as JSON lines; "ready" first.
CAPTURE = """
import json, select, socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
s.setsockopt(263, 8, 1)                       # SOL_PACKET, PACKET_AUXDATA
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
while (left := end - time.monotonic()) > 0:
    if not select.select([s], [], [], left)[0]:
        break
    data, anc, _, _ = s.recvmsg(65535, socket.CMSG_SPACE(20))
    status = tci = 0
    for level, kind, d in anc:
        if (level, kind) == (263, 8):
            status, _, _, _, _, tci = struct.unpack_from("=IIIHHH", d)
    inline = data[12:14] == b"\\x81\\x00"
    ip = data[18:] if inline else data[14:]
    if data[12:14] in (b"\\x08\\x00", b"\\x81\\x00") and ip[4:6] == (4242).to_bytes(2, "big"):
        print(json.dumps({"tagged": inline or bool(status & 0x10),
                          "vid": (int.from_bytes(data[14:16], "big") if inline else tci) & 0xfff}),
              flush=True)
"""

# In the client's namespace: one TCP ACK with data on a connection's tuple,
# IPv4 id 4242, to the router's MAC, with an 802.1Q tag of VLAN vid.
SEND_TAGGED = """
import sys
from scapy.all import IP, TCP, Dot1Q, Ether, get_if_hwaddr, sendp
sport, mac, vid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ip = IP(src=sys.argv[4], dst=sys.argv[5], id=4242) / TCP(sport=sport, dport=80, flags="A")
sendp(Ether(dst=mac, src=get_if_hwaddr("eth0")) / Dot1Q(vlan=vid) / ip / b"tagged",
      iface="eth0", verbose=False)
"""


@pytest.mark.parametrize("vid", [100, 0])
def test_a_tagged_frame_on_an_untagged_interface_is_not_carried_tagged(testbed, natlb, vid):
    """What the kernel does without the fast path: a frame of VLAN 100 on an
    interface with no VLAN 100 device is not the router's (dropped); a VID 0
    (priority) tag is stripped.  Never is a tagged frame sent on to a backend."""
    natlb(basic_config(testbed, health="none", backends=[1]))
    h = testbed.hold(VIP)
    try:
        ss = testbed.client_cmd("ss", "-tnH", "state", "established", "dst", VIP).stdout
        sport = ss.split()[2].rsplit(":", 1)[1]
        mac = testbed.router_cmd("cat", "/sys/class/net/cl0/address").stdout.strip()
        cap = testbed.spawn(testbed.backend(1), [sys.executable, "-c", CAPTURE, "5"],
                            stdout=subprocess.PIPE, text=True)
        assert cap.stdout.readline().strip() == "ready"
        r = testbed.client_cmd(sys.executable, "-c", SEND_TAGGED, sport, mac, str(vid),
                               CLIENT_ADDR, VIP)
        assert r.returncode == 0, r.stderr
        out, _ = cap.communicate(timeout=30)
        testbed.procs.remove(cap)
        seen = [json.loads(line) for line in out.splitlines()]
        assert not [f for f in seen if f["tagged"]], seen
    finally:
        testbed.stop(h.proc)
        testbed.procs.remove(h.proc)


def test_a_failed_restart_goes_on_watching_links(testbed, natlb):
    """natlb stops watching links while it hands over; if the successor
    fails, it watches them again (and its programs are on every interface)."""
    p = natlb(basic_config(testbed))
    # Valid as a file, but the successor's preflight fails on this host.
    bad = testbed.write_config(basic_config(testbed, lb_extra='interface = "nosuchif0"'))
    r = natlb_cli(testbed, "restart", "-c", str(bad))
    assert r.returncode == 2 and "restart failed: config: lb.interface" in r.stderr, r.stderr
    assert p.poll() is None
    with side(testbed, "lf", "plain", 5) as s:
        wait_for("filters on the new interface", lambda: carried(testbed, s.dev))
        assert_carried(testbed, lambda: download(testbed, s.ns))
