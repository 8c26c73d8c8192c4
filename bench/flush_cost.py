"""What forgetting the kernel's flow entries costs when a backend dies: the
walk of the fast path's flow map that `reset` (and a UDP backend's loss)
does before natlb resets the flows, timed at a given number of carried
flows.  Until it ends, the dead backend's flows are still carried to it.

    sudo .venv/bin/python -m bench.flush_cost [--flows 100000,500000] [--backends 8]

What runs: a namespace of its own with a veth pair, the object loaded by
natlb.core.FastPath with room for the flows, and each flow installed as
natlb installs it, by the learn program run (BPF_PROG_TEST_RUN) on a
packet natlb marked fast: `backends` backends share the flows evenly.
Then, on the full map, one backend's flows are forgotten
(`flush_backends`, what a reset does) and finally all of them (`flush`, as
when the observer lost keys).  Each figure is one walk's wall time; the
script repeats the whole fill and walk `--rounds` times and prints the
median and range."""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time

from bench.fastpath_cost import run_in_veth_namespace

VPORT, BPORT = 80, 8080
CLIENT_NET = "198.51.100."
VIP, BACKEND_NET = "192.0.2.100", "203.0.113."


def frame(client: str, backend: str, cport: int) -> bytes:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") /
                 IP(src=client, dst=backend) /
                 TCP(sport=cport, dport=BPORT, flags="A", seq=1000, ack=2000))


def fill(fp, n: int, backends: int, idx: dict[str, int]) -> None:
    """n flows through learn, spread over the backends; the frame is built
    once per backend and client address, then only its source port moves
    (learn reads the tuple, not the sums)."""
    from natlb.core import MARK_FAST, MARK_FORWARD
    per_client = 60000
    done = 0
    while done < n:
        c = done // per_client
        client = f"{CLIENT_NET}{1 + c}"
        base = [bytearray(frame(client, f"{BACKEND_NET}{10 + b}", 1024)) for b in range(backends)]
        for i in range(min(per_client, n - done)):
            b = (done + i) % backends
            f = base[b]
            f[34:36] = (1024 + i).to_bytes(2, "big")     # the TCP source port
            r = fp.test_run(True, bytes(f), mark=MARK_FORWARD | MARK_FAST | (b + 1),
                            ifindex=idx["be0"], ingress_ifindex=idx["cl0"])
            assert r.retval == 0
        done += min(per_client, n - done)


def measure(flows: list[int], backends: int, rounds: int) -> dict[str, list[float]]:
    from natlb.core import FastPath
    idx = {dev: socket.if_nametoindex(dev) for dev in ("cl0", "be0")}
    out: dict[str, list[float]] = {}
    for n in flows:
        fp = FastPath(max_backends=backends + 1, max_flows=max(flows) * 2,
                      tcp_lifetime_ms=600_000, udp_lifetime_ms=600_000)
        try:
            for b in range(backends):
                fp.set_backend(b + 1, VIP, VPORT, f"{BACKEND_NET}{10 + b}", BPORT,
                               socket.IPPROTO_TCP)
            for _ in range(rounds):
                fill(fp, n, backends, idx)
                live = fp.flow_count()
                assert live == 2 * n, (live, n)
                if hasattr(fp, "flush_backends"):
                    t0 = time.perf_counter()
                    one = fp.flush_backends([1])
                    out.setdefault(f"{n} one backend ms", []).append(
                        (time.perf_counter() - t0) * 1e3)
                    assert one == 2 * -(-n // backends), (one, n)
                t0 = time.perf_counter()
                fp.flush()
                out.setdefault(f"{n} all ms", []).append((time.perf_counter() - t0) * 1e3)
                assert fp.flow_count() == 0
        finally:
            fp.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--flows", default="100000,500000")
    ap.add_argument("--backends", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    flows = [int(x) for x in a.flows.split(",")]
    if a.inside:
        print(json.dumps(measure(flows, a.backends, a.rounds)))
        return 0
    rc, got = run_in_veth_namespace("nlflush", "bench.flush_cost",
                                    ["--flows", a.flows, "--backends", str(a.backends),
                                     "--rounds", str(a.rounds)])
    if rc:
        return rc
    print(f"forgetting the kernel's flow entries, {a.backends} backends "
          f"({a.rounds} rounds; median [range], ms):")
    for what, ms in got.items():
        print(f"  {what}: {statistics.median(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
