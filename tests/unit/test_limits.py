"""Services and backends in the thousands: [lb] max_services and max_backends
bound the ids, a config at the defaults' size publishes to the C core and
encodes as an nftables batch, and the marks keep the ids apart."""

from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP

from natlb import ruleset, steering
from natlb.config import MAX_BACKENDS, MAX_SERVICES, LBConfig, parse
from natlb.core import MARK_FAST, MARK_FORWARD, MARK_REPLY, Core, CoreConfig, CoreError, Verdict
from natlb.errors import ConfigError
from natlb.pool import Pool

from .services import make_service

N_SERVICES, PER_SERVICE = 4096, 16     # 65,536 backends


def big_config(n_services: int = N_SERVICES, per_service: int = PER_SERVICE,
               lb: dict | None = None) -> dict:
    return {"lb": lb or {}, "service": [{
        "name": f"s{i}", "vip": f"192.0.2.{i // 1000 + 1}", "port": 1000 + i % 1000,
        "health": {"kind": "none"},
        "backend": [{"address": f"203.0.113.{k + 1}", "port": 10000 + i} for k in
                    range(per_service)],
    } for i in range(n_services)]}


def test_defaults_take_4096_services_and_65536_backends():
    assert (LBConfig().max_services, LBConfig().max_backends) == (4096, 65536)
    assert MAX_SERVICES == MAX_BACKENDS == 65536


def test_a_config_at_the_limits_publishes_and_encodes():
    cfg = parse(big_config())
    core = Core(CoreConfig(max_flows=1024, workers=1))
    try:
        pool = Pool(cfg, core)
        pool.publish()
        last = pool.services[-1]
        syn = IP(src="198.51.100.2", dst=last.cfg.vip) / TCP(sport=4000, dport=last.cfg.port,
                                                              flags="S")
        v, out = core.process(bytes(syn), 1000)
        assert v == Verdict.REWRITE and IP(out).dport == 10000 + N_SERVICES - 1
        assert max(b.id for b in last.backends) == N_SERVICES * PER_SERVICE - 1
        # Counted in the slots of the highest ids.
        chosen = next(b for b in last.backends if b.cfg.address == IP(out).dst)
        assert core.backend_counters()[chosen.id].new_flows == 1
        assert core.service_counters()[last.id].new_flows == 1

        services = ruleset.services_from_pool(pool.services)
        spec = ruleset.Spec("natlb", services, (0,), ruleset.Marks(
            own=0x6E617461, forward=MARK_FORWARD, reply=MARK_REPLY, fast=MARK_FAST), "mark",
            {f"203.0.113.{k + 1}": (2,) for k in range(PER_SERVICE)}, fastpath=True)
        msgs = ruleset.build(spec)
    finally:
        core.close()
    data, what = steering.encode(msgs, 1)
    off = 0
    while off < len(data):
        length = int.from_bytes(data[off:off + 4], "little")
        assert length < 1 << 16
        off += (length + 3) & ~3
    assert len(what) == len(msgs)
    elements = {}
    for m in msgs:
        a = dict(m.attrs)
        if m.kind == ruleset.SETELEM:
            name = a["NFTA_SET_ELEM_LIST_SET"]
            elements[name] = elements.get(name, 0) + len(a["NFTA_SET_ELEM_LIST_ELEMENTS"])
    assert elements["vips"] == N_SERVICES
    assert elements["backend_addr"] == N_SERVICES * PER_SERVICE
    assert elements["service_addr"] == N_SERVICES


def test_marks_keep_the_largest_ids_apart():
    top_b, top_s = MAX_BACKENDS - 1, MAX_SERVICES - 1
    marks = {MARK_FORWARD | top_b, MARK_FORWARD | top_b | MARK_FAST, MARK_REPLY | top_s}
    bases = {MARK_FORWARD, MARK_FORWARD | MARK_FAST, MARK_REPLY}
    assert {m & ~0xFFFFF for m in marks} == bases and len(bases) == 3
    assert not (top_b | top_s) & MARK_FAST


def test_ids_at_or_over_the_core_bounds_are_refused():
    core = Core(CoreConfig(max_flows=64, workers=1, max_services=2, max_backends=40))
    try:
        core.publish([make_service(sid=1)])          # backend ids 16..18
        with pytest.raises(CoreError):
            core.publish([make_service(sid=2)])      # service id 2
        with pytest.raises(CoreError):
            core.publish([make_service(sid=1, addrs=[f"203.0.113.{i}" for i in range(30)])])
        assert len(core.backend_counters()) == 40
        assert core.backend_counters(50)[45].packets_in == 0   # past the bound: zeros
    finally:
        core.close()
    with pytest.raises(CoreError):
        Core(CoreConfig(max_flows=64, max_services=0))
    with pytest.raises(CoreError):
        Core(CoreConfig(max_flows=64, max_backends=MAX_BACKENDS + 1))


@pytest.mark.parametrize(("lb", "n", "message"), [
    ({"max_services": 0}, 1, "lb.max_services = 0: must be 1..65536"),
    ({"max_backends": 70000}, 1, "lb.max_backends = 70000: must be 1..65536"),
    ({"max_services": "many"}, 1, 'lb.max_services = "many": must be an integer'),
    ({"max_services": 3}, 4, 'service = "4 services": more than lb.max_services = 3'),
    ({"max_backends": 30}, 2, 'service = "32 backends": more than lb.max_backends = 30'),
])
def test_bad_limits_are_one_line_errors(lb, n, message):
    with pytest.raises(ConfigError) as e:
        parse(big_config(n, lb=lb))
    assert str(e.value) == message
