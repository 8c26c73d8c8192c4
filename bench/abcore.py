"""Two builds of the C core in one process, alternating round by round: the
ratio of their per-packet cost on IPv4, measured as the thread CPU time of one
nl_process_many call over a batch (no Python per packet).  No root.

    git archive main | tar -x -C /tmp/base && (cd /tmp/base && \\
        /path/to/natlb/.venv/bin/python natlb/_build.py)
    .venv/bin/python -m bench.abcore /tmp/base/natlb/_natlb_core.*.so \\
        natlb/_natlb_core.*.so [--rounds 15] [--million] [--ipv6]

With --ipv6 the new build also runs the same measurements over IPv6 packets
in the same rounds, and a second table gives IPv6 against its IPv4; if the
old build has IPv6 too, it runs them as well and a third table compares the
two builds over IPv6.

Works across the IPv6 change of the API (struct nl_addr vs 32-bit addresses):
the builds are driven through their own cffi modules, loaded side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import struct
import time
from types import ModuleType

from natlb.schedulers import Candidate, build_table
from tests.unit.services import _csum, many_syns

VIP = bytes([192, 0, 2, 100])
MAPPED = b"\0" * 10 + b"\xff\xff"
TIMEOUTS = (5000, 60000, 5000, 1000, 30000)


def load(tag: str, path: str) -> ModuleType:
    # The module's last name must stay _natlb_core (its PyInit_ symbol).
    spec = importlib.util.spec_from_file_location(f"abcore_{tag}._natlb_core", path)
    assert spec and spec.loader
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def has_ipv6(m: ModuleType) -> bool:
    """Whether the build's addresses are struct nl_addr (IPv4 and IPv6)."""
    return m.ffi.typeof("struct nl_service_spec").fields[0][1].type.kind == "struct"


def addr(m: ModuleType, raw4: bytes):
    """An IPv4 address as the build's struct field wants it."""
    if has_ipv6(m):
        return {"w": list(struct.unpack("=4I", MAPPED + raw4))}
    return struct.unpack("=I", raw4)[0]


VIP6 = bytes.fromhex("20010db8000000000000000000000100")


def addr6(raw16: bytes):
    return {"w": list(struct.unpack("=4I", raw16))}


class Lb:
    def __init__(self, m: ModuleType, max_flows: int, scheduler: str = "rr",
                 n_backends: int = 3, proto: int = 6, v6: bool = False) -> None:
        self.m = m
        ffi, lib = m.ffi, m.lib
        cfg = ffi.new("struct nl_config *")
        cfg.max_flows = max_flows
        cfg.n_workers = 1
        cfg.resteer_tries = 1
        fields = dict(ffi.typeof("struct nl_config").fields)
        if "max_services" in fields:    # id bounds, since the limits change: natlb's defaults
            cfg.max_services = 4096
            cfg.max_backends = 65536
        for i, t in enumerate(TIMEOUTS):
            cfg.timeout_ms[i] = t
        self.lb = lib.nl_create(cfg)
        assert self.lb != ffi.NULL
        names = ["rr", "wrr", "lc", "sh", "maglev"]
        spec = ffi.new("struct nl_service_spec *", {
            "vip": addr6(VIP6) if v6 else addr(m, VIP), "port": 0x5000, "proto": proto,
            "scheduler": names.index(scheduler), "id": 0})
        bes = ffi.new("struct nl_backend_spec[]", n_backends)
        for j in range(n_backends):
            bes[j].addr = (addr6(VIP6[:4] + bytes([0, 0, 1, 0x13]) + bytes(7) + bytes([1 + j]))
                           if v6 else addr(m, bytes([203, 0, 113, 1 + j])))
            bes[j].port = 0x901F
            bes[j].weight = 1
            bes[j].id = j
            bes[j].flags = 3
        tbl = build_table(scheduler, [Candidate(f"203.0.113.{1 + j}:8080", 1, True)
                                      for j in range(n_backends)])
        table = ffi.new("uint16_t[]", list(tbl) or [0])
        snap = lib.nl_snapshot_new(1)
        assert lib.nl_snapshot_set_service(snap, 0, spec, bes, n_backends, table, len(tbl)) == 0
        assert lib.nl_publish(self.lb, snap) == 0

    def batch(self, pkts: list[bytes]):
        ffi = self.m.ffi
        stride = max(len(p) for p in pkts)
        b = ffi.new("uint8_t[]", len(pkts) * stride)
        for i, p in enumerate(pkts):
            ffi.memmove(b + i * stride, p, len(p))
        return (b, stride, ffi.new("uint32_t[]", [len(p) for p in pkts]),
                ffi.new("uint8_t[]", len(pkts)), len(pkts), bytes(ffi.buffer(b)))

    def run(self, bt, flags: int = 0, now: int = 2) -> tuple[float, int]:
        b, stride, lens, verdicts, n, orig = bt
        self.m.ffi.memmove(b, orig, len(orig))
        t0 = time.thread_time_ns()
        r = self.m.lib.nl_process_many(self.lb, 1, b, stride, lens, verdicts, n, flags, now)
        return (time.thread_time_ns() - t0) / n, r

    def close(self) -> None:
        self.m.lib.nl_destroy(self.lb)


def acks_of(syns: list[bytes]) -> list[bytes]:
    out = []
    for p in syns:
        b = bytearray(p)
        b[33] = 0x10
        b[36:38] = b"\0\0"
        b[36:38] = struct.pack("!H", _csum(bytes(b[12:20]) + b"\0\x06\0\x14" + bytes(b[20:40])))
        out.append(bytes(b))
    return out


def udp_packets(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 29, 1, 0, 64, 17, 0,
                                   struct.pack("!I", 0xC6336400 + i // 65535), VIP))
        ip[10:12] = struct.pack("!H", _csum(bytes(ip)))
        out.append(bytes(ip) + struct.pack("!HHHH", 1 + i % 65535, 80, 9, 0) + b"x")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--packets", type=int, default=20_000)
    ap.add_argument("--million", action="store_true", help="also 1,000,000 UDP flows")
    ap.add_argument("--ipv6", action="store_true", help="the new build over IPv6 too")
    a = ap.parse_args()
    mods = {"old": load("old", a.old), "new": load("new", a.new)}
    n = a.packets
    syns = many_syns(n, src=lambda i: f"198.51.100.{i % 250 + 1}",
                     sport=lambda i: 1024 + i // 250)
    acks = acks_of(syns)
    res: dict[str, dict[str, list[float]]] = {}

    def record(name: str, who: str, ns: float) -> None:
        res.setdefault(name, {}).setdefault(who, []).append(ns)

    est = {}
    for who, m in mods.items():
        lb = Lb(m, 1 << 17)
        assert lb.run(lb.batch(syns), now=1)[1] == n
        est[who] = (lb, lb.batch(acks))
    big = {}
    if a.million:
        pkts = udp_packets(1_000_000)
        for who, m in mods.items():
            lb = Lb(m, 1_000_000, proto=17)
            assert lb.run(lb.batch(pkts), now=1)[1] == len(pkts)
            big[who] = (lb, lb.batch(pkts[::50]))
    whos = list(mods)
    pk6: dict[str, list[bytes]] = {}
    old6 = a.ipv6 and has_ipv6(mods["old"])
    if a.ipv6:
        from bench.test_micro import v6_packets
        pk6 = {"syn": v6_packets(n), "ack": v6_packets(n, flags=0x10)}
        pkts = v6_packets(1_000_000, proto=17) if a.million else []
        for who, m in [("ipv6", mods["new"])] + ([("ipv6-old", mods["old"])] if old6 else []):
            whos.append(who)
            mods[who] = m
            lb = Lb(m, 1 << 17, v6=True)
            assert lb.run(lb.batch(pk6["syn"]), now=1)[1] == n
            est[who] = (lb, lb.batch(pk6["ack"]))
            if a.million:
                lb = Lb(m, 1_000_000, proto=17, v6=True)
                assert lb.run(lb.batch(pkts), now=1)[1] == len(pkts)
                big[who] = (lb, lb.batch(pkts[::50]))
    for rnd in range(a.rounds):
        order = whos if rnd % 2 == 0 else whos[::-1]
        for who in order:
            lb, bt = est[who]
            record("established TCP (checksums checked)", who, lb.run(bt)[0])
            record("established TCP (kernel verified)", who, lb.run(bt, flags=8)[0])
            if big:
                lb, bt = big[who]
                record("lookup, 1,000,000 flows", who, lb.run(bt)[0])
        for sched in ("rr", "sh", "maglev"):
            for who in order:
                v6 = who.startswith("ipv6")
                lb = Lb(mods[who], 1 << 16, scheduler=sched, n_backends=10, v6=v6)
                ns, r = lb.run(lb.batch(pk6["syn"] if v6 else syns), now=1)
                assert r == n
                record(f"new flow, {sched}", who, ns)
                lb.close()
    table(res, "old", "new", "IPv4, ns per packet (median)")
    if a.ipv6:
        table(res, "new", "ipv6", "new build: IPv4 vs IPv6")
    if old6:
        table(res, "ipv6-old", "ipv6", "IPv6, ns per packet (median)")
    print(f"{a.rounds} rounds of {n} packets, alternating")


def table(res: dict[str, dict[str, list[float]]], a: str, b: str, title: str) -> None:
    w = max(7, len(a), len(b))
    print(f"{title:<38} {a:>{w}} {b:>{w}} {'ratio':>9}  per-round ratio: median [quartiles]")
    for name, d in res.items():
        if a not in d or b not in d:
            continue
        x, y = statistics.median(d[a]), statistics.median(d[b])
        ratios = sorted(q / p for p, q in zip(d[a], d[b], strict=True))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        print(f"{name:<38} {x:{w}.1f} {y:{w}.1f} {y / x:9.2f}"
              f"  {statistics.median(ratios):.2f} [{q1:.2f}-{q3:.2f}]")


if __name__ == "__main__":
    main()
