"""Prometheus metrics: built at scrape time from the C counters and the pool
(no root: a Core with published tables and packets run through it)."""

import socket
import subprocess
import sys

import pytest
from prometheus_client.exposition import generate_latest
from scapy.layers.inet import IP, TCP

from natlb.config import ConfigError, parse
from natlb.core import Core, CoreConfig
from natlb.metrics_http import MetricsServer
from natlb.pool import Pool

from .services import CLIENT, many_services

WEB = {"service": "svc0", "vip": "192.0.2.1", "port": "80", "protocol": "tcp"}


@pytest.fixture
def served():
    """A pool of 2 services x 3 backends; 7 connections to svc0 and a
    malformed packet went through the core."""
    config = parse(many_services(2, 3))
    core = Core(CoreConfig(max_flows=1024))
    pool = Pool(config, core)
    pool.publish()
    for i in range(7):
        syn = IP(src=CLIENT, dst="192.0.2.1") / TCP(sport=40000 + i, dport=80, flags="S")
        core.process(bytes(syn), 1)
    core.process(b"\x45\x00", 1)
    server = MetricsServer(pool, config.lb)
    yield server, config
    server.stop()
    core.close()


def value(server, name, **labels):
    return server.registry.get_sample_value(name, labels)


def backend_labels(config, k):
    b = config.services[0].backends[k]
    return {**WEB, "address": b.address, "backend_port": str(b.port)}


def test_counters_agree_with_the_traffic(served):
    server, config = served
    assert value(server, "natlb_connections_total", **WEB) == 7
    assert value(server, "natlb_incoming_packets_total", **WEB) == 7
    assert value(server, "natlb_outgoing_packets_total", **WEB) == 0
    per_backend = [value(server, "natlb_backend_connections_total", **backend_labels(config, k))
                   for k in range(3)]
    assert sum(per_backend) == 7 and min(per_backend) >= 2   # rr over 3
    active = sum(value(server, "natlb_backend_connections_active",
                       **backend_labels(config, k)) for k in range(3))
    assert active == 7     # not closing
    assert value(server, "natlb_backend_connections_inactive", **backend_labels(config, 0)) == 0
    assert value(server, "natlb_backend_up", **backend_labels(config, 0)) == 1
    assert value(server, "natlb_backend_weight", **backend_labels(config, 0)) == 1
    assert value(server, "natlb_dropped_packets_total", reason="malformed") == 1
    assert value(server, "natlb_flows") == 7
    assert value(server, "natlb_flow_capacity") == config.lb.max_flows
    assert value(server, "natlb_failover_total", kind="resteered") == 0
    assert value(server, "natlb_health_checks_total", result="ok") == 0


def test_fast_path_packets_count_in_metrics_rates_and_status(served):
    """Packets the kernel carried alone (fast path) are read when the counters
    are: added per backend and to its service, in every reader."""
    from natlb.rates import live_counters
    from natlb.status import collect

    server, config = served
    pool = server.collector.pool
    b0 = pool.services[0].backends[0]
    pool.kernel_counts = lambda: {b0.id: (100, 10_000, 50, 5_000)}
    assert value(server, "natlb_incoming_packets_total", **WEB) == 7 + 100
    assert value(server, "natlb_outgoing_bytes_total", **WEB) == 5_000
    per_backend = [value(server, "natlb_backend_incoming_packets_total",
                         **backend_labels(config, k)) for k in range(3)]
    assert per_backend[0] - min(per_backend[1:]) >= 100 - 1 and sum(per_backend) == 107
    live = live_counters(pool)
    assert live[("backend", b0.id)].packets_out == 50
    assert live[("service", pool.services[0].id)].bytes_in >= 10_000
    st = collect(pool, [], 0.0, 1024)
    assert st["services"][0]["packets_in"] == 107
    assert st["services"][0]["backends"][0]["bytes_out"] == 5_000


def test_the_fast_path_observers_counts_show_in_metrics_and_status(served):
    from natlb.status import collect, render

    server, _ = served
    pool = server.collector.pool
    assert value(server, "natlb_fastpath_records_total", result="applied") is None
    counts = {"applied": 40, "ignored": 2, "ring_full": 3}
    pool.observer_counts = lambda: counts
    assert value(server, "natlb_fastpath_records_total", result="applied") == 40
    assert value(server, "natlb_fastpath_records_total", result="ignored") == 2
    assert value(server, "natlb_fastpath_ring_full_total") == 3
    # The daemon adds the fast path's own status (TcFastPath.status) to collect's.
    st = {**collect(pool, [], 0.0, 1024),
          "fastpath": {"interfaces": ["cl0"], "entries_forgotten": 0, "observer": counts}}
    assert "records applied=40, not believed=2, queued for a full ring=3" in render(st)


def test_backend_state_and_checks_show(served):
    server, config = served
    pool = server.collector.pool
    svc = pool.services[0]
    for _ in range(2):
        pool.report(svc, svc.backends[1], False, "refused")
    pool.set_weight("svc0", svc.backends[2].cfg.key, 5)
    assert value(server, "natlb_backend_up", **backend_labels(config, 1)) == 0
    assert value(server, "natlb_backend_weight", **backend_labels(config, 2)) == 5
    assert value(server, "natlb_health_checks_total", result="fail") == 2


def test_the_operators_admin_state_shows(served):
    server, config = served
    pool = server.collector.pool
    keys = [b.cfg.key for b in pool.services[0].backends]
    pool.set_admin("svc0", keys[0], "draining")
    pool.set_admin("svc0", keys[1], "disabled")
    assert [value(server, "natlb_backend_admin_state", **backend_labels(config, k))
            for k in range(3)] == [1, 0, 2]


def test_250_services_every_series_present():
    config = parse(many_services(250, 3))
    core = Core(CoreConfig(max_flows=1024))
    pool = Pool(config, core)
    pool.publish()
    server = MetricsServer(pool, config.lb)
    text = generate_latest(server.registry).decode()
    core.close()
    names = [line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")]
    assert names.count("natlb_connections_total") == 250
    assert names.count("natlb_backend_outgoing_bytes_total") == 750
    assert names.count("natlb_backend_connections_active") == 750


def test_closed_collector_reads_nothing(served):
    server, _ = served
    server.collector.close()   # natlb is freeing the core: a late scrape is empty
    assert value(server, "natlb_flows") is None


def test_address_in_use_is_a_config_error(served):
    _, config = served
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        lb = parse({**many_services(1, 1), "lb": {"metrics": f"127.0.0.1:{port}"}}).lb
        server = MetricsServer(served[0].collector.pool, lb)
        with pytest.raises(ConfigError) as e:
            server.start()
    assert str(e.value) == f'lb.metrics = "127.0.0.1:{port}": address already in use'


@pytest.mark.parametrize("raw,normal", [
    ("127.0.0.1:9100", "127.0.0.1:9100"),
    ("0.0.0.0:09100", "0.0.0.0:9100"),
    ("[2001:db8:0::1]:9100", "[2001:db8::1]:9100"),
])
def test_metrics_address_forms(raw, normal):
    lb = parse({**many_services(1, 1), "lb": {"metrics": raw}}).lb
    assert lb.metrics == normal


def test_metrics_off_by_default():
    assert parse(many_services(1, 1)).lb.metrics == ""


@pytest.mark.parametrize("raw", ["9100", "localhost:9100", "127.0.0.1:0", "127.0.0.1:70000",
                                 "127.0.0.1:", "2001:db8::1:9100", "[nope]:1", ""])
def test_malformed_metrics_address(raw):
    with pytest.raises(ConfigError, match=r'^lb\.metrics = "'):
        parse({**many_services(1, 1), "lb": {"metrics": raw}})


def test_cli_check_malformed_metrics_exits_2(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[lb]\nmetrics = "127.0.0.1"\n[[service]]\nname = "w"\nvip = "192.0.2.1"\n'
                    'port = 80\n[[service.backend]]\naddress = "203.0.113.1"\n')
    r = subprocess.run([sys.executable, "-m", "natlb", "check", "-c", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == ('natlb: config: lb.metrics = "127.0.0.1": must be ADDR:PORT '
                        '(192.0.2.1:9100, [2001:db8::1]:9100), port 1..65535\n')


def test_a_reload_removing_a_backend_takes_nothing_from_its_services_counters(served):
    """What the fast path carried for a backend a reload removes stays in its
    service's counters (metrics, status, rates): a counter never goes back."""
    import dataclasses

    from natlb.config import Config
    from natlb.rates import live_counters
    from natlb.status import collect

    server, config = served
    pool = server.collector.pool
    b0 = pool.services[0].backends[0]
    pool.kernel_counts = lambda: {b0.id: (100, 10_000, 50, 5_000)}
    before = value(server, "natlb_incoming_packets_total", **WEB)
    svc0 = dataclasses.replace(config.services[0], backends=config.services[0].backends[1:])
    pool.reconfigure(Config(config.lb, (svc0, *config.services[1:])))
    assert b0.id not in pool.by_backend_id
    for _reload in range(2):   # kept across the next reload too
        assert value(server, "natlb_incoming_packets_total", **WEB) == before == 107
        assert value(server, "natlb_outgoing_bytes_total", **WEB) == 5_000
        assert collect(pool, [], 0.0, 1024)["services"][0]["bytes_in"] >= 10_000
        assert live_counters(pool)[("service", pool.services[0].id)].packets_out == 50
        pool.reconfigure(Config(config.lb, (svc0, *config.services[1:])))


def test_conntrack_and_fragment_counters_show_as_status_shows_them():
    """A full table (flows reclaimed and evicted) and a fragmented datagram
    whose later fragment came first (held, then released by its first): the
    series move as the counters `status` shows do."""
    from scapy.layers.inet import UDP, fragment

    from natlb.status import collect

    config = parse({"service": [
        {"name": "web", "vip": "192.0.2.1", "port": 80, "protocol": "tcp",
         "backend": [{"address": "203.0.113.10"}]},
        {"name": "dns", "vip": "192.0.2.1", "port": 53, "protocol": "udp",
         "backend": [{"address": "203.0.113.11"}]}]})
    core = Core(CoreConfig(max_flows=4, workers=1, max_fragments=64))
    pool = Pool(config, core)
    pool.publish()
    server = MetricsServer(pool, config.lb)
    try:
        syn_timeout = CoreConfig().timeouts_ms["tcp_syn"]
        for t, sport in ((1, 1), (1, 2), (1, 3), (1, 4), (2, 5)):   # the fifth evicts one
            core.process(bytes(IP(src=CLIENT, dst="192.0.2.1") /
                               TCP(sport=40000 + sport, dport=80, flags="S")), t)
        # Expired, all four: a new flow takes the place of one.
        core.process(bytes(IP(src=CLIENT, dst="192.0.2.1") /
                           TCP(sport=40010, dport=80, flags="S")), syn_timeout + 10)
        pkt = IP(src=CLIENT, dst="192.0.2.1", id=7) / UDP(sport=5000, dport=53) / (b"x" * 3000)
        first, *later = [bytes(f) for f in fragment(pkt, fragsize=1480)]
        t = syn_timeout + 20
        for i, f in enumerate(later):
            core.process(f, t, packet_id=i + 1)
        held_now = value(server, "natlb_fragments_held")
        tracked_now = value(server, "natlb_fragment_datagrams_tracked")
        now = collect(pool, [], 0.0, 4)["fragments"]
        # The gauges beside the counters: one must not hide the other.
        assert (now["tracked"], now["held_now"], now["held"]) == (1, 2, 2), now
        core.process(first, t)
        assert len(core.take_released()) == 2   # the workers' part, here
        status = collect(pool, [], 0.0, 4)
        ct, fr = status["conntrack"], status["fragments"]
        assert ct["evicted_tcp"] == 1 and ct["reclaimed"] > 0, ct
        assert value(server, "natlb_flows_evicted_total", protocol="tcp") == 1
        assert value(server, "natlb_flows_evicted_total", protocol="udp") == 0
        assert value(server, "natlb_flows_reclaimed_total") == ct["reclaimed"]
        assert (fr["datagrams"], fr["held"], fr["released"]) == (1, 2, 2), fr
        assert (held_now, value(server, "natlb_fragments_held")) == (2, core.fragments_held())
        assert core.fragments_held() == 0
        assert (tracked_now, value(server, "natlb_fragment_datagrams_tracked")) == (1, 0)
        datagrams = {k: value(server, "natlb_fragment_datagrams_total", kind=k)
                     for k in ("tracked", "incomplete", "overflow")}
        assert datagrams == {"tracked": 1, "incomplete": 0, "overflow": 0}
        fragments = {k: value(server, "natlb_fragments_total", kind=k)
                     for k in ("followed", "held", "released", "timeouts", "hold_full",
                               "untracked")}
        assert fragments == {k: fr[k] for k in fragments} and fragments["released"] == 2
    finally:
        server.stop()
        core.close()


def test_every_series_has_a_name_of_its_own_in_openmetrics(served):
    """Prometheus asks for OpenMetrics first (the server gives it what it
    asks for): there a counter's family is named without _total, and two
    families of one name are an invalid exposition (a strict parser refuses
    the whole scrape)."""
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    server, _ = served
    text = openmetrics(server.registry).decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    assert {"natlb_fragment_datagrams", "natlb_fragment_datagrams_tracked",
            "natlb_fragments_held"} <= set(names)
