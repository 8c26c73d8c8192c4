"""The C counters read back field by field (natlb.core unpacks struct
nl_counters from its bytes: a field out of place would shift every figure)."""

from scapy.layers.inet import IP, TCP

from natlb.config import parse
from natlb.core import Core, CoreConfig, Counters
from natlb.pool import Pool

from .services import CLIENT, many_services


def test_each_field_reads_back_where_it_was_counted():
    config = parse(many_services(2, 3))
    core = Core(CoreConfig(max_flows=1024))
    try:
        pool = Pool(config, core)
        pool.publish()
        svc = pool.services[1]
        core.process(bytes(IP(src=CLIENT, dst=svc.cfg.vip) / TCP(sport=40000, dport=svc.cfg.port,
                                                                 flags="S")), 1)
        be = core.backend_counters()
        hit = [b.id for b in svc.backends if be[b.id].new_flows]
        assert len(hit) == 1
        bid = hit[0]
        syn = be[bid]
        assert (syn.packets_in, syn.new_flows, syn.active_flows, syn.inactive_flows) == (1, 1, 1, 0)
        assert syn.bytes_in == 40 and syn.packets_out == syn.bytes_out == 0
        core.seed_counters(True, bid, Counters(10, 2000, 30, 4000, 50))
        core.seed_counters(False, svc.id, Counters(11, 2001, 31, 4001, 51))
        assert core.backend_counters()[bid] == Counters(11, 2040, 30, 4000, 51, 1, 0)
        assert core.service_counters()[svc.id] == Counters(12, 2041, 31, 4001, 52, 0, 0)
        others = [c for i, c in enumerate(core.backend_counters()) if i != bid]
        assert len(others) == core.max_backends - 1 and all(c == Counters() for c in others)
    finally:
        core.close()
