"""What `natlb restart` carries over besides flows, without root: backend
state by service name and address:port, traffic counters, queue banks."""

from scapy.layers.inet import IP, TCP

from natlb.config import parse
from natlb.core import Core, CoreConfig
from natlb.handover import seed_traffic, traffic
from natlb.pool import Pool
from natlb.pool_state import DOWN, DRAINING
from natlb.runstate import pool_state, restore_pool


def config(weights=(1, 1, 1), first=None):
    backends = [{"address": f"203.0.113.{10 + i}", "port": 8080, "weight": w}
                for i, w in enumerate(weights)]
    services = [{"name": "web", "vip": "192.0.2.100", "port": 80, "backend": backends}]
    if first:   # another service first: every id moves
        services.insert(0, first)
    return parse({"service": services})


def test_backend_state_follows_names_not_ids():
    a = Pool(config(), Core(CoreConfig(max_flows=64)))
    web = a.services[0]
    web.backends[0].admin = DRAINING
    web.backends[1].health = DOWN
    web.backends[2].weight = 7          # set at run time
    other = {"name": "dns", "vip": "192.0.2.101", "port": 53, "protocol": "udp",
             "backend": [{"address": "203.0.113.20"}]}
    b = Pool(config(weights=(1, 1, 1), first=other), Core(CoreConfig(max_flows=64)))
    assert restore_pool(b, pool_state(a)) == 3
    new_web = b.services[1]
    assert [x.admin for x in new_web.backends] == [DRAINING, "enabled", "enabled"]
    assert [x.health for x in new_web.backends] == ["up", DOWN, "up"]
    assert new_web.backends[2].weight == 7
    assert new_web.backends[0].id != web.backends[0].id
    # A weight changed in the config wins over the one set at run time.
    c = Pool(config(weights=(1, 1, 3)), Core(CoreConfig(max_flows=64)))
    restore_pool(c, pool_state(a))
    assert c.services[0].backends[2].weight == 3


def test_traffic_counters_continue():
    a = Pool(config(), Core(CoreConfig(max_flows=64)))
    a.publish()
    for sport in range(1000, 1006):
        syn = bytes(IP(src="198.51.100.7", dst="192.0.2.100") / TCP(sport=sport, dport=80,
                                                                     flags="S"))
        a.core.process(syn, 1)
    t = traffic(a)
    assert t["services"]["web"]["new_flows"] == 6
    other = {"name": "dns", "vip": "192.0.2.101", "port": 53, "protocol": "udp",
             "backend": [{"address": "203.0.113.20"}]}
    b = Pool(config(first=other), Core(CoreConfig(max_flows=64)))
    seed_traffic(b, t)
    assert traffic(b) == {
        "services": {"dns": {k: 0 for k in t["services"]["web"]}, **t["services"]},
        "backends": {"dns 203.0.113.20:53": {k: 0 for k in t["services"]["web"]},
                     **t["backends"]},
    }


def test_successor_takes_the_other_queue_bank():
    lb = config().lb
    assert lb.other_queues([0]) == [16]
    assert lb.other_queues([16]) == [0]
