"""The tc fast path's `carry` program alone: nanoseconds per carried packet
as the kernel times it (BPF_PROG_TEST_RUN with a repeat count, through
`bpftool prog run`), per address family.  The end-to-end bench
(bench/netbench.py) moves by +-10-30% between runs on a shared 2-core
machine; this figure does not depend on the load, so it says whether a
change made the program itself slower.

    sudo .venv/bin/python -m bench.fastpath_cost [--families 4,6] [--rounds 41]

What runs: a namespace of its own with a veth pair (bpf_check_mtu needs the
out device), the object loaded by natlb.core.FastPath, one TCP flow learned
from a marked packet (the learn program), then the flow's client packet
carried `repeat` times in a row on the same buffer.  So that every run takes
the whole path (lookup hit, checks, rewrite, counters, redirect) the
backend's slot has the VIP's own address and port: the rewrite writes the
values that are there, and the key stays the flow's.  TTL starts at 255 and
the repeat count stays below it.  Each round is one `bpftool prog run` (its
average); the figure is the median of the rounds, with the quartiles.

Only the public FastPath API is used, so the same file measures an older
checkout's object for a before/after comparison (IPv4 only there, if that
checkout's fast path is)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

CPORT, PORT = 40000, 80
BID = 1
REPEAT = 200                  # < 255: the TTL decrements on every run
ADDRS = {4: ("198.51.100.2", "203.0.113.6"), 6: ("2001:db8:1::2", "2001:db8:113::6")}
SKB_MARK, SKB_INGRESS_IFINDEX, SKB_IFINDEX = 8, 36, 40   # struct __sk_buff offsets


def frame(family: int, src: str, dst: str) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    ip = IPv6(src=src, dst=dst, hlim=255) if family == 6 else IP(src=src, dst=dst, ttl=255)
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip /
                 TCP(sport=CPORT, dport=PORT, flags="A", seq=1000, ack=2000) / (b"x" * 64))


def own_program_id(name: str) -> int:
    """The id of the BPF program of that name among this process's fds."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        pid = int(next(line.split()[1] for line in info.splitlines()
                       if line.startswith("prog_id:")))
        shown = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(pid)],
                                          capture_output=True, text=True, check=True).stdout)
        if shown.get("name") == name:
            return pid
    raise RuntimeError(f"no BPF program {name} among this process's descriptors")


def measure(families: list[int], rounds: int) -> dict[int, list[float]]:
    from natlb.core import MARK_FAST, MARK_FORWARD, FastPath

    idx = {dev: socket.if_nametoindex(dev) for dev in ("cl0", "be0")}
    fp = FastPath(max_backends=16, max_flows=64, tcp_lifetime_ms=600_000,
                  udp_lifetime_ms=600_000)
    out: dict[int, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            client, vip = ADDRS[family]
            fp.set_backend(BID, vip, PORT, vip, PORT, socket.IPPROTO_TCP)
            pkt = frame(family, client, vip)
            r = fp.test_run(True, pkt, mark=MARK_FORWARD | MARK_FAST | BID,
                            ifindex=idx["be0"], ingress_ifindex=idx["cl0"])
            assert r.retval == 0 and fp.has_flow(client, vip, CPORT, PORT, socket.IPPROTO_TCP)
            assert fp.test_run(False, pkt, ifindex=idx["cl0"],
                               ingress_ifindex=idx["cl0"]).retval == 7   # TC_ACT_REDIRECT
            data, ctx = Path(tmp, f"pkt{family}"), Path(tmp, "ctx")
            data.write_bytes(pkt)
            skb = bytearray(SKB_IFINDEX + 4)
            struct.pack_into("=I", skb, SKB_INGRESS_IFINDEX, idx["cl0"])
            struct.pack_into("=I", skb, SKB_IFINDEX, idx["cl0"])
            ctx.write_bytes(bytes(skb))
            carry = own_program_id("carry")
            ns = []
            for _ in range(rounds):
                res = json.loads(subprocess.run(
                    ["bpftool", "-j", "prog", "run", "id", str(carry), "data_in", str(data),
                     "ctx_in", str(ctx), "repeat", str(REPEAT)],
                    capture_output=True, text=True, check=True).stdout)
                assert res["retval"] == 7, res          # carried, every run
                ns.append(float(res["duration"]))
            out[family] = ns
            fp.flush()
    fp.close()
    return out


def run_in_veth_namespace(prefix: str, module: str, argv: list[str]) -> tuple[int, Any]:
    """Runs `python -m module --inside argv` in a namespace of its own with a
    veth pair cl0/be0 up (bpf_check_mtu and the test runs need real
    interfaces), deleted afterwards: its exit code, and the JSON it printed
    (its stderr passed on when it failed)."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "cl0", "type", "veth", "peer",
                        "name", "be0"], check=True)
        for dev in ("cl0", "be0"):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)
        r = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-m", module,
                            "--inside", *argv], capture_output=True, text=True)
        if r.returncode:
            sys.stderr.write(r.stderr)
            return r.returncode, None
        return 0, json.loads(r.stdout)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="4,6")
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    families = [int(f) for f in a.families.split(",")]
    if a.inside:
        print(json.dumps(measure(families, a.rounds)))
        return 0
    rc, got = run_in_veth_namespace("nlcost", "bench.fastpath_cost",
                                    ["--families", a.families, "--rounds", str(a.rounds)])
    if rc:
        return rc
    print(f"carry, ns per carried TCP packet ({a.rounds} rounds of {REPEAT} runs; "
          "median [quartiles]):")
    for family, ns in got.items():
        q = statistics.quantiles(ns, n=4)
        print(f"  IPv{family}: {statistics.median(ns):.0f} [{q[0]:.0f}-{q[2]:.0f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
