"""Metrics of an IPv6 service: the labels keep the plain address (the port
has its own label), the counters follow IPv6 traffic, and the endpoint
serves on an IPv6 address."""

import http.client
import socket

import pytest
from scapy.layers.inet import TCP
from scapy.layers.inet6 import IPv6

from natlb.config import parse
from natlb.core import Core, CoreConfig
from natlb.metrics_http import MetricsServer
from natlb.pool import Pool

CONFIG = {"service": [
    {"name": "web6", "vip": "2001:db8::100", "port": 80,
     "backend": [{"address": "2001:db8:113:1::2"}, {"address": "2001:db8:113:2::2"}]},
    {"name": "web4", "vip": "192.0.2.100", "port": 80, "backend": [{"address": "203.0.113.2"}]},
]}
WEB6 = {"service": "web6", "vip": "2001:db8::100", "port": "80", "protocol": "tcp"}


@pytest.fixture
def served():
    config = parse(CONFIG)
    core = Core(CoreConfig(max_flows=1024))
    pool = Pool(config, core)
    pool.publish()
    for i in range(4):
        syn = IPv6(src="2001:db8:100::7", dst="2001:db8::100") / TCP(sport=40000 + i, dport=80,
                                                                      flags="S")
        core.process(bytes(syn), 1)
    yield pool, config
    core.close()


def test_ipv6_service_labels_and_counts(served):
    pool, config = served
    server = MetricsServer(pool, config.lb)
    try:
        get = server.registry.get_sample_value
        assert get("natlb_connections_total", WEB6) == 4
        per_backend = [get("natlb_backend_connections_total",
                           {**WEB6, "address": f"2001:db8:113:{k}::2", "backend_port": "80"})
                       for k in (1, 2)]
        assert per_backend == [2, 2]
        assert get("natlb_connections_total",
                   {"service": "web4", "vip": "192.0.2.100", "port": "80",
                    "protocol": "tcp"}) == 0
    finally:
        server.stop()


def test_endpoint_on_an_ipv6_address(served):
    pool, _ = served
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    lb = parse({**CONFIG, "lb": {"metrics": f"[::1]:{port}"}}).lb
    server = MetricsServer(pool, lb)
    server.start()
    try:
        c = http.client.HTTPConnection("::1", port, timeout=5)
        c.request("GET", "/metrics")
        body = c.getresponse().read().decode()
    finally:
        server.stop()
    assert 'natlb_connections_total{port="80",protocol="tcp",service="web6",' \
           'vip="2001:db8::100"} 4.0' in body
