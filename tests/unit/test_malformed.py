"""Truncated, garbage and fuzzed input never crashes or reads past the buffer."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from natlb.core import Core, CoreConfig, Verdict

from .services import CLIENT, VIP, make_service

SYN = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=40000, dport=80, flags="S"))


@pytest.mark.parametrize("cut", range(0, len(SYN)))
def test_truncated_syn_is_dropped(core, cut):
    core.publish([make_service()])
    v, out = core.process(SYN[:cut], 1)
    assert v == Verdict.DROP
    assert out == SYN[:cut]


CASES = [
    ("ihl below 5", bytes([0x44]) + SYN[1:]),
    ("ihl beyond buffer", bytes([0x4F]) + SYN[1:]),
    ("total length beyond buffer", SYN[:2] + (len(SYN) + 1).to_bytes(2, "big") + SYN[4:]),
    ("tcp data offset below 5", SYN[:32] + bytes([0x40]) + SYN[33:]),
    ("tcp data offset beyond packet", SYN[:32] + bytes([0xF0]) + SYN[33:]),
    ("udp length below 8", bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=1, dport=53, len=4))),
    # A later fragment of no datagram seen, and no packet id to hold it by.
    ("stray fragment", bytes(IP(src=CLIENT, dst=VIP, proto=6, frag=185) / (b"x" * 16))),
]


@pytest.mark.parametrize("name,raw", CASES, ids=[c[0] for c in CASES])
def test_bad_headers_dropped_and_counted(core, name, raw):
    core.publish([make_service(), make_service(protocol="udp", port=53, sid=1)])
    v, _ = core.process(raw, 1)
    assert v == Verdict.DROP
    assert sum(core.reasons().values()) == 1


def test_non_tcp_udp_passes(core):
    v, _ = core.process(bytes(IP(src=CLIENT, dst=VIP) / ICMP()), 1)
    assert v == Verdict.ACCEPT and core.reasons()["unsupported"] == 1


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_random_bytes(data):
    v, out = _FUZZ_CORE.process(data, 1)
    assert v in (Verdict.ACCEPT, Verdict.DROP, Verdict.REWRITE)
    assert len(out) == len(data)
    _FUZZ_CORE.check_table()


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=0, max_value=len(SYN) - 1), st.integers(0, 255))
def test_fuzz_single_byte_mutations(pos, value):
    raw = bytearray(SYN)
    raw[pos] = value
    v, _ = _FUZZ_CORE.process(bytes(raw) + os.urandom(3), 1)
    assert v in (Verdict.ACCEPT, Verdict.DROP, Verdict.REWRITE)
    _FUZZ_CORE.check_table()


def test_fuzzed_table_empties_when_everything_expires():
    """After the fuzz tests above: every flow they made expires and is swept,
    and the table (chains, free list, gauges) is consistent and empty."""
    for sport in range(5):      # some flows even when run alone
        _FUZZ_CORE.sweep(1 << 20)
        _FUZZ_CORE.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport + 1, dport=80,
                                                                 flags="S")), 1)
    assert _FUZZ_CORE.flow_count() > 0
    _FUZZ_CORE.check_table()
    _FUZZ_CORE.sweep(1 << 30)
    _FUZZ_CORE.check_table()
    assert _FUZZ_CORE.flow_count() == 0
    assert all(c.active_flows == 0 and c.inactive_flows == 0
               for c in _FUZZ_CORE.backend_counters(64))


def _make_fuzz_core():
    c = Core(CoreConfig(max_flows=64, workers=1))
    c.publish([make_service(), make_service(protocol="udp", port=53, sid=1)])
    return c


_FUZZ_CORE = _make_fuzz_core()
