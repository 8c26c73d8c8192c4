"""The metrics endpoint's listening socket handed from one server to
another, as `natlb restart` hands it from predecessor to successor
(natlb/metrics_http.py): a scrape is answered throughout, by the
successor once the predecessor gave the socket away."""

import http.client
import socket
import threading
import time

import pytest
from scapy.layers.inet import IP, TCP

from natlb.config import parse
from natlb.core import Core, CoreConfig
from natlb.metrics_http import MetricsServer
from natlb.pool import Pool

SERVICE = {"name": "web", "vip": "192.0.2.1", "port": 80,
           "backend": [{"address": "203.0.113.2"}]}
WEB = {"service": "web", "vip": "192.0.2.1", "port": "80", "protocol": "tcp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def natlb_with(connections: int, metrics: str) -> tuple[Core, MetricsServer]:
    config = parse({"service": [SERVICE], "lb": {"metrics": metrics}})
    core = Core(CoreConfig(max_flows=1024))
    pool = Pool(config, core)
    pool.publish()
    for i in range(connections):
        syn = IP(src="198.51.100.7", dst="192.0.2.1") / TCP(sport=40000 + i, dport=80, flags="S")
        core.process(bytes(syn), 1)
    return core, MetricsServer(pool, config.lb)


def connections(port: int) -> float:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/metrics")
        body = c.getresponse().read().decode()
    finally:
        c.close()
    line = next(x for x in body.splitlines() if x.startswith("natlb_connections_total{"))
    return float(line.rsplit(" ", 1)[1])


def wait_for(cond) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture
def pair():
    port = free_port()
    old_core, old = natlb_with(3, f"127.0.0.1:{port}")
    new_core, new = natlb_with(5, f"127.0.0.1:{port}")
    yield port, old, new
    for server, core in ((old, old_core), (new, new_core)):
        server.stop()
        core.close()


def test_scrapes_wait_for_the_successor_and_never_see_a_counter_go_back(pair):
    """As at `natlb restart`: the predecessor stops accepting, then (its
    counters handed over) the successor serves the same socket.  Scrapes
    made in between wait in the backlog; none fails, and none answered by
    the predecessor was asked after the successor had answered one."""
    port, old, new = pair
    old.start()
    assert connections(port) == 3
    got: list[tuple[float, float, float | str]] = []       # (asked, answered, value)
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            asked = time.monotonic()
            try:
                value: float | str = connections(port)
            except Exception as e:      # any failure is the test's finding
                value = repr(e)
            got.append((asked, time.monotonic(), value))

    scrapers = [threading.Thread(target=scrape) for _ in range(4)]
    for t in scrapers:
        t.start()
    try:
        wait_for(lambda: len(got) >= 20)
        sock = socket.socket(fileno=socket.dup(old.fileno()))   # what SCM_RIGHTS passes
        assert new.can_adopt(sock)
        old.give_away()
        gave = time.monotonic()
        time.sleep(0.3)                                          # the takeover
        new.adopt(sock)
        wait_for(lambda: sum(asked > gave + 0.3 for asked, _, _ in got) >= 50)
    finally:
        done.set()
        for t in scrapers:
            t.join()
    failed = [v for _, _, v in got if isinstance(v, str)]
    assert not failed, failed[:3]
    assert {v for _, _, v in got} == {3.0, 5.0}
    first_new = min(answered for _, answered, v in got if v == 5.0)
    assert max(asked for asked, _, v in got if v == 3.0) < first_new
    # Asked while nobody accepted: answered by the successor, once it served.
    waited = [(answered, v) for asked, answered, v in got if gave < asked < gave + 0.3]
    assert waited and all(v == 5.0 and answered > gave + 0.3 for answered, v in waited)
    old.stop()                                  # closes its copy only
    assert connections(port) == 5


def test_the_predecessor_serves_again_if_the_successor_never_does(pair):
    port, old, _ = pair
    old.start()
    old.give_away()
    old.resume()
    assert connections(port) == 3


def test_a_socket_on_another_address_is_not_adopted(pair):
    port, old, new = pair
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        assert not new.can_adopt(other)             # another port
    with socket.socket() as unbound:
        assert not new.can_adopt(unbound)           # not listening
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", port))
        assert not new.can_adopt(udp)
    old.start()
    with socket.socket(fileno=socket.dup(old.fileno())) as same:
        assert new.can_adopt(same)


def test_a_taken_address_is_a_config_error_naming_the_key(pair):
    from natlb.config import ConfigError

    port, old, new = pair
    old.start()
    with pytest.raises(ConfigError, match=f'lb.metrics = "127.0.0.1:{port}": address already'):
        new.start()
