"""The nftables table as data: golden messages, no root, no kernel.

A golden file changes only when the ruleset is meant to change; regenerate
with NATLB_GOLDEN=write and read the diff."""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path

import pytest

from natlb import ruleset, steering
from natlb.config import parse
from natlb.pool_state import PoolState

GOLDEN = Path(__file__).parent / "golden"
TCP, UDP = socket.IPPROTO_TCP, socket.IPPROTO_UDP
MARKS = ruleset.Marks(own=0x6E617461, forward=0x6E000000, reply=0x6E100000, fast=0x800000)


def spec(rewrite: str = "mark", fastpath: bool = False) -> ruleset.Spec:
    web = ruleset.Service(0, "192.0.2.100", 80, TCP, (
        ruleset.Backend(0, "203.0.113.2", 80), ruleset.Backend(1, "203.0.113.6", 8080)))
    dns = ruleset.Service(1, "192.0.2.100", 53, UDP, (ruleset.Backend(2, "203.0.113.2", 53),))
    # 203.0.113.6 is routed over two interfaces (multipath): both are believed.
    return ruleset.Spec(table="natlb", services=(web, dns), queues=(4, 5), marks=MARKS,
                        rewrite=rewrite, ingress={"203.0.113.2": (3,), "203.0.113.6": (3, 7)},
                        fastpath=fastpath)


@pytest.mark.parametrize("rewrite", ["mark", "copy", "fastpath"])
def test_golden(rewrite: str) -> None:
    s = spec("mark", fastpath=True) if rewrite == "fastpath" else spec(rewrite)
    text = ruleset.render(ruleset.build(s))
    path = GOLDEN / f"ruleset_{rewrite}.txt"
    if os.environ.get("NATLB_GOLDEN") == "write":
        path.write_text(text)
    assert text == path.read_text()


def _elements(messages: list[ruleset.Message], name: str) -> list[bytes]:
    out = []
    for m in messages:
        attrs = dict(m.attrs)
        if m.kind == ruleset.SETELEM and attrs["NFTA_SET_ELEM_LIST_SET"] == name:
            out += [dict(e["attrs"])["NFTA_SET_ELEM_KEY"]["attrs"][0][1]
                    for e in attrs["NFTA_SET_ELEM_LIST_ELEMENTS"]]
    return out


def test_retired_backends_stay_under_their_service() -> None:
    """A reload's removed backends (and services) are still rewritten while
    their flows last: the pool passes them as more input."""
    pool = PoolState(parse({"service": [
        {"name": n, "vip": "192.0.2.100", "port": p, "protocol": "tcp",
         "backend": [{"address": "203.0.113.2"}, {"address": "203.0.113.6"}]}
        for n, p in (("web", 80), ("alt", 81))]}))
    pool.reconfigure(parse({"service": [{"name": "web", "vip": "192.0.2.100", "port": 80,
                                         "protocol": "tcp",
                                         "backend": [{"address": "203.0.113.2"}]}]}))
    services = ruleset.services_from_pool(pool.services, pool.retired)
    assert services == (
        ruleset.Service(0, "192.0.2.100", 80, TCP, (ruleset.Backend(0, "203.0.113.2", 80),
                                                    ruleset.Backend(1, "203.0.113.6", 80))),
        ruleset.Service(1, "192.0.2.100", 81, TCP, (ruleset.Backend(2, "203.0.113.2", 81),
                                                    ruleset.Backend(3, "203.0.113.6", 81))))
    assert ruleset.services_from_pool(pool.services) == (
        ruleset.Service(0, "192.0.2.100", 80, TCP, (ruleset.Backend(0, "203.0.113.2", 80),)),)


def test_replies_are_believed_only_from_the_backend_side() -> None:
    msgs = ruleset.build(spec())
    replies = _elements(msgs, "replies")
    key = socket.inet_aton("203.0.113.6") + bytes([TCP, 0, 0, 0]) + (8080).to_bytes(2, "big")
    assert {r[-4:] for r in replies if r.startswith(key)} == {
        (3).to_bytes(4, "little"), (7).to_bytes(4, "little")}
    # A backend with no route is in no reply set: its packets are dropped as spoofed.
    s = spec()
    no_route = ruleset.Spec(**{**vars(s), "ingress": {"203.0.113.2": (3,)}})
    replies = _elements(ruleset.build(no_route), "replies")
    assert not [r for r in replies if r.startswith(socket.inet_aton("203.0.113.6"))]
    assert socket.inet_aton("203.0.113.6") in _elements(ruleset.build(no_route), "backend_addrs")


def _rules(messages: list[ruleset.Message]) -> list[ruleset.Message]:
    return [m for m in messages if m.kind == ruleset.RULE]


def many(n_services: int, per_service: int = 3) -> ruleset.Spec:
    services = []
    for i in range(n_services):
        backends = tuple(ruleset.Backend(i * per_service + k, f"203.0.113.{k + 1}", 10000 + i)
                         for k in range(per_service))
        services.append(ruleset.Service(i, f"192.0.2.{i % 250 + 1}", 1000 + i, TCP, backends))
    return ruleset.Spec("natlb", tuple(services), (0,), MARKS, "mark",
                        {f"203.0.113.{k + 1}": (2,) for k in range(per_service)})


def test_rules_do_not_grow_with_services() -> None:
    """Per-packet cost: the same rules for 1 and 250 services; only sets grow."""
    small, big = ruleset.build(many(1)), ruleset.build(many(250))
    assert [m.attrs for m in _rules(small)] == [m.attrs for m in _rules(big)]
    assert len(_elements(big, "vips")) == 250
    assert len(_elements(big, "replies")) == 750


def test_large_table_encodes_within_netlink_limits() -> None:
    """250 services x 3 backends was a 'Message too long' in one sendmsg."""
    msgs = ruleset.build(many(256, 16))  # the config's limits: 256 services, 4096 backends
    data, what = steering.encode(msgs, 1)
    off = 0
    while off < len(data):
        length = int.from_bytes(data[off:off + 4], "little")
        assert length < 1 << 16  # every attribute length fits its 16 bits
        off += (length + 3) & ~3
    assert len(what) == len(msgs)
    assert len(_elements(msgs, "backend_services")) == 4096


def test_cluster_replies_get_a_fast_rewrite_with_the_fast_path_only() -> None:
    """A cluster service's reply marked fast names its backend: the VIP and
    port by that mark (reply | fast | backend id), in a rule of its own that
    keeps the mark for tc.  Without a cluster service, or without the fast
    path, the table is what it was (the golden files)."""
    def cluster_spec(fastpath: bool) -> ruleset.Spec:
        s = spec("mark", fastpath=fastpath)
        web = dataclasses.replace(s.services[0], cluster=True)
        return dataclasses.replace(s, services=(web, s.services[1]))

    msgs = ruleset.build(cluster_spec(True))
    fast = [MARKS.reply | MARKS.fast | b for b in (0, 1)]
    assert _elements(msgs, "service_addr") == [
        m.to_bytes(4, sys.byteorder) for m in (MARKS.reply | 0, MARKS.reply | 1, *fast)]
    rules = [m.what for m in _rules(msgs)]
    assert "rule rewrite fast path: tcp reply from a cluster service, mark kept" in rules
    assert not any("udp reply from a cluster" in r for r in rules)   # dns is not one
    plain = ruleset.build(cluster_spec(False))
    assert ruleset.render(plain) == ruleset.render(ruleset.build(spec("mark")))


def test_copy_mode_has_no_rewrite_chain() -> None:
    msgs = ruleset.build(spec("copy"))
    assert [m.what for m in msgs if m.kind == ruleset.CHAIN] == [
        "chain prerouting", "chain output"]
    assert not [m for m in msgs if m.kind == ruleset.SET and dict(m.attrs)["NFTA_SET_FLAGS"]]


def test_queue_numbers_and_native_queue() -> None:
    native = ruleset.Spec(**{**vars(spec()), "native_queue": True})
    text = ruleset.render(ruleset.build(native))
    assert "name=queue, data={queue_num=4, queue_total=2}" in text
    assert "NFQUEUE" not in text
