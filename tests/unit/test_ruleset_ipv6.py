"""The ip6 table: made only for IPv6 services, the same rules as the ip
table over IPv6 fields and sets (vips6, replies6...), golden-tested."""

from __future__ import annotations

import os
import socket

import pytest

from natlb import ruleset

from .test_ruleset import GOLDEN, MARKS, TCP, UDP, _elements, _rules, spec

V6 = ruleset.NFPROTO_IPV6


def dual(rewrite: str = "mark", fastpath: bool = False) -> ruleset.Spec:
    """The IPv4 golden spec plus IPv6 services on 2001:db8::100 (TCP and UDP)."""
    v4 = spec(rewrite, fastpath)
    web6 = ruleset.Service(2, "2001:db8::100", 80, TCP, (
        ruleset.Backend(3, "2001:db8:113:1::2", 80), ruleset.Backend(4, "2001:db8:113:2::2", 8080)))
    dns6 = ruleset.Service(3, "2001:db8::100", 53, UDP, (ruleset.Backend(5, "2001:db8:113:1::2",
                                                                         53),))
    ingress = {**v4.ingress, "2001:db8:113:1::2": (3,), "2001:db8:113:2::2": (4, 7)}
    return ruleset.Spec(**{**vars(v4), "services": (*v4.services, web6, dns6),
                           "ingress": ingress})


def v6_only(messages: list[ruleset.Message]) -> list[ruleset.Message]:
    return [m for m in messages if m.family == V6]


@pytest.mark.parametrize("rewrite", ["mark", "copy", "fastpath"])
def test_golden(rewrite: str) -> None:
    s = dual("mark", fastpath=True) if rewrite == "fastpath" else dual(rewrite)
    text = ruleset.render(ruleset.build(s))
    path = GOLDEN / f"ruleset_ipv6_{rewrite}.txt"
    if os.environ.get("NATLB_GOLDEN") == "write":
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("rewrite,fastpath", [("mark", False), ("copy", False), ("mark", True)])
def test_ipv4_table_is_unchanged_by_ipv6_services(rewrite: str, fastpath: bool) -> None:
    v4 = ruleset.build(spec(rewrite, fastpath))
    both = ruleset.build(dual(rewrite, fastpath))
    assert [m for m in both if m.family != V6] == v4
    assert not v6_only(v4)                      # no ip6 table without an IPv6 service
    assert {m.family for m in both} == {ruleset.NFPROTO_IPV4, V6}


def test_ipv6_sets_and_marks() -> None:
    msgs = ruleset.build(dual())
    vip = socket.inet_pton(socket.AF_INET6, "2001:db8::100")
    assert _elements(msgs, "vips6") == [vip + bytes([TCP, 0, 0, 0]) + b"\0\x50\0\0",
                                        vip + bytes([UDP, 0, 0, 0]) + b"\0\x35\0\0"]
    # backend 4 is routed over two interfaces: both believed.
    b4 = socket.inet_pton(socket.AF_INET6, "2001:db8:113:2::2")
    assert {k[-4:] for k in _elements(msgs, "backend_hosts6") if k.startswith(b4)} == {
        (4).to_bytes(4, "little"), (7).to_bytes(4, "little")}
    # The same marks as IPv4 (the C core's are family-independent); each
    # family's maps hold only its own backends and services.
    assert _elements(msgs, "backend_addr6") == [(MARKS.forward | i).to_bytes(4, "little")
                                                for i in (3, 4, 5)]
    assert _elements(msgs, "service_addr6") == [(MARKS.reply | i).to_bytes(4, "little")
                                                for i in (2, 3)]
    assert _elements(msgs, "backend_addr") == [(MARKS.forward | i).to_bytes(4, "little")
                                               for i in (0, 1, 2)]


def test_the_fast_path_rule_rewrites_ipv6_from_the_ip6_maps() -> None:
    """The ip6 table keeps fast marks for tc as the ip table does, writing
    the 16-byte destination (offset 24) with the L4 pseudo-header sum and
    no header checksum, from backend_addr6/backend_port6."""
    rules = _rules(v6_only(ruleset.build(dual(fastpath=True))))
    fast = [r for r in rules if "fast" in r.what]
    assert [r.what for r in fast] == [
        "rule rewrite fast path: tcp to a backend, mark kept for tc",
        "rule rewrite fast path: udp to a backend, mark kept for tc"]
    for r in fast:
        text = ruleset.render([r])
        assert "set=backend_addr6" in text and "set=backend_port6" in text
        assert ("payload_offset=24, payload_len=16, payload_csum_type=0, payload_csum_offset=0, "
                "payload_csum_flags=(NFT_PAYLOAD_L4CSUM_PSEUDOHDR)") in text


def _icmpv6_matches(rule: ruleset.Message) -> list[tuple[int, int]]:
    """(from, to) of every ICMPv6 type range a rule tests."""
    out = []
    for e in dict(rule.attrs)["NFTA_RULE_EXPRESSIONS"]:
        a = dict(e["attrs"])
        if a["NFTA_EXPR_NAME"] == "range":
            d = dict(a["NFTA_EXPR_DATA"]["attrs"])
            out.append((d["NFTA_RANGE_FROM_DATA"]["attrs"][0][1][0],
                        d["NFTA_RANGE_TO_DATA"]["attrs"][0][1][0]))
    return out


def test_only_icmpv6_errors_are_queued_never_neighbour_discovery() -> None:
    rules = _rules(v6_only(ruleset.build(dual())))
    icmp = [r for r in rules if "icmpv6" in r.what]
    assert [r.what for r in icmp] == [
        "rule prerouting icmpv6 from a backend to this host",     # accepted, not queued
        "rule prerouting icmpv6 from a backend", "rule prerouting spoofed backend icmpv6",
        "rule prerouting icmpv6 to a service", "rule output local icmpv6 error"]
    for r in icmp:
        assert _icmpv6_matches(r) == [(1, 2)]       # dest unreachable, packet too big
    # No other rule names ICMPv6 at all: types 133-137 (and the rest) pass.
    text = ruleset.render([r for r in rules if r not in icmp])
    assert "range" not in text
    assert f"data={{value={socket.IPPROTO_ICMPV6:02x}}}" not in text


def test_ipv6_fragments_use_the_fragment_header() -> None:
    rules = _rules(v6_only(ruleset.build(dual())))
    queued = [ruleset.render([r]) for r in rules if "prerouting" in r.what and "fragment" in r.what]
    assert len(queued) == 4                      # tcp, udp x to a service, from a backend
    assert all("name=exthdr" in line and "type=44" in line for line in queued)
    later = [ruleset.render([r]) for r in rules if "later fragment" in r.what]
    assert len(later) == 2
    # A later fragment has no L4 header: address only, no pseudo-header update.
    assert all("csum_flags" not in line and "exthdr_offset=2, exthdr_len=2" in line
               for line in later)


def test_ipv6_rules_do_not_grow_with_services() -> None:
    def many6(n: int) -> ruleset.Spec:
        services = tuple(ruleset.Service(i, f"2001:db8::{i + 1:x}", 1000 + i, TCP, tuple(
            ruleset.Backend(i * 3 + k, f"2001:db8:113:{k}::2", 10000 + i) for k in range(3)))
            for i in range(n))
        return ruleset.Spec("natlb", services, (0,), MARKS, "mark",
                            {f"2001:db8:113:{k}::2": (2,) for k in range(3)})

    small, big = ruleset.build(many6(1)), ruleset.build(many6(250))
    assert [m.attrs for m in _rules(small)] == [m.attrs for m in _rules(big)]
    assert len(_elements(big, "vips6")) == 250 and len(_elements(big, "replies6")) == 750


def test_replies_to_this_host_pass_in_both_tables() -> None:
    """The host's own connections' answers (health checks) pass before the
    reply rules, in the ip6 table too: never queued."""
    msgs = ruleset.build(dual())
    passing = [m for m in _rules(msgs) if m.what == "rule prerouting reply to this host"]
    assert [m.family for m in passing] == [ruleset.NFPROTO_IPV4, V6]
    assert "lookup_set=replies6" in ruleset.render([passing[1]])
    icmp6 = [m for m in _rules(msgs)
             if m.what == "rule prerouting icmpv6 from a backend to this host"]
    assert len(icmp6) == 1 and "set=vip_addrs6" in ruleset.render(icmp6)
