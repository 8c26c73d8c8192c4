"""Cluster services (csrc/cluster.c): several nodes carry one VIP, each sees
some flows mid-way or in one direction only, and they agree without
sharing state."""

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP

from natlb.config import ConfigError, parse
from natlb.core import MARK_REPLY, Core, CoreConfig, CoreError, Verdict
from natlb.schedulers import Candidate, maglev_table

from .services import BACKENDS, CLIENT, VIP, make_service

BPORT = 8080


def cluster_service(**kw):
    return replace(make_service("maglev", **kw), cluster=True)


def node(service=None, **cfg):
    c = Core(CoreConfig(max_flows=4096, **cfg))
    c.publish([service or cluster_service()])
    return c


@pytest.fixture
def nodes():
    a, b = node(), node()
    yield a, b
    a.close()
    b.close()


def client_pkt(sport, flags="A", payload=b""):
    return bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80, flags=flags, seq=1000,
                                               ack=1) / payload)


def server_pkt(backend, sport, flags="A", payload=b""):
    return bytes(IP(src=backend, dst=CLIENT) / TCP(sport=BPORT, dport=sport, flags=flags,
                                                   seq=5000, ack=1001) / payload)


def backend_of(core, pkt, now=1):
    v, out = core.process(pkt, now)
    assert v == Verdict.REWRITE
    return IP(out).dst


def test_mid_flow_packet_is_steered_to_the_nodes_common_choice(nodes):
    a, b = nodes
    for sport in range(40000, 40100):
        first = backend_of(a, client_pkt(sport, "S"))
        # b never saw the SYN (another node did, then died): same backend.
        assert backend_of(b, client_pkt(sport, "A", b"GET /")) == first
    assert b.failover_counters()["adopted"] == 100
    assert b.reasons()["no_flow"] == 0
    assert {backend_of(b, client_pkt(s, "PA")) for s in range(40000, 40100)} == set(BACKENDS)


def test_mid_flow_packet_of_an_ordinary_service_is_still_dropped():
    c = node(make_service("maglev"))
    assert c.process(client_pkt(40000, "A"), 1)[0] == Verdict.DROP
    assert c.reasons()["no_flow"] == 1
    c.close()


def test_reply_without_flow_goes_back_from_the_vip(nodes):
    a, _ = nodes
    out_v, out = a.process(server_pkt(BACKENDS[1], 40000, "SA"), 1)
    assert out_v == Verdict.REWRITE
    pkt = IP(out)
    assert (pkt.src, pkt[TCP].sport, pkt.dst, pkt[TCP].dport) == (VIP, 80, CLIENT, 40000)
    ref = IP(bytes(IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA", seq=5000,
                                                  ack=1001)))
    assert pkt.chksum == ref.chksum and pkt[TCP].chksum == ref[TCP].chksum
    assert a.failover_counters()["reply_adopted"] == 1
    # Mark mode: the mark names the service, nft does the rest (an
    # established flow's reply, which the fast path may carry, names its
    # backend instead: tests/unit/test_fastpath.py).
    assert a.decide(server_pkt(BACKENDS[1], 40001, "SA"), 2) == (Verdict.MARK, MARK_REPLY | 0)


def test_reply_from_a_backend_of_an_ordinary_service_passes_untouched():
    c = node(make_service("maglev"))
    pkt = server_pkt(BACKENDS[0], 40000)
    assert c.process(pkt, 1) == (Verdict.ACCEPT, pkt)
    assert c.reasons()["not_ours"] == 1
    c.close()


def test_reply_flow_is_reused_by_the_clients_packets(nodes):
    """A node that carried only the replies keeps the backend the flow really
    uses if the client's packets move to it."""
    a, _ = nodes
    a.process(server_pkt(BACKENDS[2], 40001, "SA"), 1)
    assert backend_of(a, client_pkt(40001, "A"), 2) == BACKENDS[2]
    assert a.failover_counters()["adopted"] == 0


def gauges(core, sid_backends=(0, 1, 2)):
    cs = core.backend_counters(3)
    return sum(cs[i].active_flows for i in sid_backends), sum(
        cs[i].inactive_flows for i in sid_backends)


def test_forward_only_node_tracks_handshake_fin_and_expiry():
    c = node(timeouts_ms={"tcp_syn": 1000, "tcp_established": 50_000, "tcp_fin": 2000,
                          "tcp_close": 500, "udp": 3000})
    c.process(client_pkt(40000, "S"), 0)
    c.process(client_pkt(40000, "A"), 10)          # the SYN-ACK went through another node
    c.sweep(5000)                                    # past tcp_syn: still there
    assert c.flow_count() == 1 and gauges(c) == (1, 0)
    c.process(client_pkt(40000, "FA"), 6000)
    assert gauges(c) == (0, 1)
    c.sweep(6000 + 2001)
    assert c.flow_count() == 0 and gauges(c) == (0, 0)
    c.close()


def test_reply_only_node_tracks_handshake_and_rst():
    c = node(timeouts_ms={"tcp_syn": 1000, "tcp_established": 50_000, "tcp_fin": 2000,
                          "tcp_close": 500, "udp": 3000})
    be = BACKENDS[0]
    c.process(server_pkt(be, 40000, "SA"), 0)
    c.process(server_pkt(be, 40000, "PA", b"HTTP/1.1 200"), 10)
    c.sweep(5000)                                    # established, not a handshake
    assert c.flow_count() == 1 and gauges(c) == (1, 0)
    c.process(server_pkt(be, 40000, "R"), 6000)
    assert gauges(c) == (0, 1)
    c.sweep(6000 + 501)
    assert c.flow_count() == 0 and gauges(c) == (0, 0)
    c.close()


def test_udp_reply_without_flow():
    udp = make_service("maglev", protocol="udp", port=53, backend_port=53)
    c = node(replace(udp, cluster=True))
    v, out = c.process(bytes(IP(src=BACKENDS[0], dst=CLIENT) / UDP(sport=53, dport=5353)), 1)
    assert v == Verdict.REWRITE and IP(out).src == VIP and IP(out)[UDP].sport == 53
    c.close()


def test_known_flows_stay_while_health_views_differ():
    """Node a thinks backend 0 is down, node b does not: flows b already
    tracks stay on their backend on b; a moves only backend 0's share."""
    a = node(cluster_service(down=(BACKENDS[0],)))
    b = node()
    choice = {s: backend_of(b, client_pkt(s, "S")) for s in range(41000, 41600)}
    b.publish([cluster_service(down=(BACKENDS[0],))])
    assert all(backend_of(b, client_pkt(s, "A"), 2) == choice[s] for s in choice)
    moved = [s for s in choice if backend_of(a, client_pkt(s, "A")) != choice[s]]
    # Backend 0's flows move (a cannot know them); of the others, Maglev
    # remaps only a sliver of slots (3 of 1021 here).
    assert set(moved) >= {s for s in choice if choice[s] == BACKENDS[0]}
    assert len([s for s in moved if choice[s] != BACKENDS[0]]) <= len(choice) * 0.02
    a.close()
    b.close()


def test_cluster_services_hold_no_syn():
    c = node(syn_timeout_ms=50)
    c.process(client_pkt(40000, "S"), 0)
    c.failover_tick(1000)
    assert c.outbox_take() is None and c.read_events() == []
    c.close()


def test_core_refuses_a_backend_in_two_cluster_services():
    c = Core(CoreConfig(max_flows=64))
    other = replace(cluster_service(sid=1, port=81), vip="192.0.2.101")
    with pytest.raises(CoreError):
        c.publish([cluster_service(), other])
    with pytest.raises(CoreError):   # cluster needs maglev
        c.publish([replace(make_service("sh"), cluster=True)])
    c.close()


# -- every node builds the same table and decides alike --------------------

DECIDE = """
import array, hashlib, json, sys
from dataclasses import replace
from scapy.layers.inet import IP, TCP
from natlb.core import Core, CoreConfig
from natlb.schedulers import Candidate, maglev_table
from tests.unit.services import make_service
keys = json.loads(sys.argv[1])
table = maglev_table([Candidate(k, 1, True) for k in keys])
c = Core(CoreConfig(max_flows=4096))
c.publish([replace(make_service("maglev"), cluster=True)])
out = []
for sport in range(20000, 22000, 7):
    pkt = bytes(IP(src="198.51.100.%d" % (sport % 200 + 1), dst="192.0.2.100")
                / TCP(sport=sport, dport=80, flags="A"))
    out.append(IP(c.process(pkt, 1)[1]).dst)
print(json.dumps({"table": hashlib.sha256(
    json.dumps([keys[i] for i in table]).encode()).hexdigest(),
    "bytes": hashlib.sha256(array.array("H", table).tobytes()).hexdigest(), "choices": out}))
"""


def run_node(keys):
    r = subprocess.run([sys.executable, "-c", DECIDE, json.dumps(keys)], capture_output=True,
                       text=True, check=True, timeout=60, cwd=Path(__file__).parents[2])
    return json.loads(r.stdout)


def test_two_processes_build_identical_tables_and_choose_alike():
    keys = [f"{a}:{BPORT}" for a in BACKENDS]
    first, second = run_node(keys), run_node(keys)
    assert first == second      # the table's bytes, and every choice
    # Listed in another order, the table names the same backend per slot.
    assert run_node(list(reversed(keys)))["table"] == first["table"]
    assert len(set(first["choices"])) == 3


def test_maglev_table_does_not_depend_on_list_order():
    cands = [Candidate(f"203.0.113.{i}:80", 1 + i % 3, True) for i in range(10, 20)]
    fwd = maglev_table(cands)
    rev = maglev_table(list(reversed(cands)))
    assert [cands[i].key for i in fwd] == [list(reversed(cands))[i].key for i in rev]
    digest = hashlib.sha256(bytes(str([cands[i].key for i in fwd]), "ascii")).hexdigest()
    assert digest == hashlib.sha256(
        bytes(str([list(reversed(cands))[i].key for i in rev]), "ascii")).hexdigest()


# -- config ------------------------------------------------------------------

def svc(name, vip, scheduler="maglev", cluster=True, backends=("203.0.113.10",), proto="tcp"):
    return {"name": name, "vip": vip, "port": 80, "protocol": proto, "scheduler": scheduler,
            "cluster": cluster, "backend": [{"address": a} for a in backends]}


def test_config_cluster_needs_maglev():
    with pytest.raises(ConfigError, match=r'^service\[0\]\.scheduler = "sh": cluster = true '):
        parse({"service": [svc("w", VIP, scheduler="sh")]})
    assert parse({"service": [svc("w", VIP)]}).services[0].cluster


def test_config_cluster_backends_must_be_their_own():
    with pytest.raises(ConfigError, match=r'^service\[1\]\.backend\[0\] = "203\.0\.113\.10:80"'):
        parse({"service": [svc("a", VIP), svc("b", "192.0.2.101", "rr", cluster=False)]})
    # Another protocol on the same address and port is told apart.
    parse({"service": [svc("a", VIP), svc("b", VIP, proto="udp")]})
    # Without cluster services, sharing stays allowed.
    parse({"service": [svc("a", VIP, cluster=False), svc("b", "192.0.2.101", cluster=False)]})


def test_config_cluster_must_be_a_bool():
    with pytest.raises(ConfigError, match=r'^service\[0\]\.cluster = "yes": must be true'):
        parse({"service": [{**svc("w", VIP), "cluster": "yes"}]})


def test_config_announce_and_route_table():
    base = {"service": [svc("w", VIP)]}
    with pytest.raises(ConfigError, match=r'^lb\.announce = "sometimes": must be one of'):
        parse({**base, "lb": {"announce": "sometimes"}})
    with pytest.raises(ConfigError, match=r"^lb\.route\[0\]\.table = 254: "):
        parse({**base, "lb": {"route": [{"destination": "0.0.0.0/0", "device": "lo",
                                         "table": 254}]}})
    cfg = parse({**base, "lb": {"announce": "healthy", "route": [
        {"destination": "0.0.0.0/0", "device": "lo", "table": 100}]}})
    assert cfg.lb.announce == "healthy" and cfg.lb.routes[0].table == 100


def test_cluster_example_config_is_valid():
    from natlb.config import load

    cfg = load(Path(__file__).resolve().parents[2] / "examples" / "cluster" / "natlb.toml")
    assert cfg.lb.announce == "healthy" and cfg.services[0].cluster
    assert cfg.lb.routes[0].table == 100


def test_wanted_vips_follow_eligible_backends():
    from natlb.announce import wanted_vips
    from natlb.pool import Pool

    cfg = parse({"service": [svc("a", VIP), svc("b", "192.0.2.101",
                                                backends=("203.0.113.20",))]})
    core = Core(CoreConfig(max_flows=64))
    pool = Pool(cfg, core)
    pool.publish()
    assert wanted_vips(pool.services) == {VIP, "192.0.2.101"}
    pool.set_admin("b", "203.0.113.20", "disabled")
    assert wanted_vips(pool.services) == {VIP}
    core.close()


def test_reply_that_cannot_be_tracked_is_dropped_not_leaked():
    c = Core(CoreConfig(max_flows=16))
    c.publish([cluster_service()])
    for sport in range(16):
        assert c.process(server_pkt(BACKENDS[0], 30000 + sport, "A"), 1)[0] == Verdict.REWRITE
    assert c.process(server_pkt(BACKENDS[0], 31000, "A"), 1)[0] == Verdict.DROP
    assert c.reasons()["table_full"] == 1
    c.close()
