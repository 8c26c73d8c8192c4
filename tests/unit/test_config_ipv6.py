"""IPv6 in the config: one family per service, both families side by side,
every mistake one line naming the key and the value."""

import subprocess
import sys

import pytest

from natlb import config
from natlb.config import ConfigError, parse


def service(name="web6", vip="2001:db8::100", port=80, backends=("2001:db8:113::10",), **kw):
    return {"name": name, "vip": vip, "port": port,
            "backend": [{"address": a} for a in backends], **kw}


def test_ipv6_service_loads_in_canonical_form():
    cfg = parse({"service": [service(vip="2001:DB8:0::100",
                                     backends=("2001:db8:113:0:0:0:0:10", "2001:db8:113::14"))]})
    s = cfg.services[0]
    assert s.vip == "2001:db8::100"
    assert [b.address for b in s.backends] == ["2001:db8:113::10", "2001:db8:113::14"]
    assert s.backends[0].key == "[2001:db8:113::10]:80"


def test_one_vip_address_carries_both_families_side_by_side():
    cfg = parse({"service": [
        service("web4", vip="192.0.2.100", backends=("203.0.113.2",)),
        service("web6", vip="2001:db8::100", backends=("2001:db8:113::2",)),
        service("dns6", vip="2001:db8::100", port=53, protocol="udp",
                backends=("2001:db8:113::2",)),
    ]})
    assert [config.family(s.vip) for s in cfg.services] == [4, 6, 6]


@pytest.mark.parametrize("svc,message", [
    (service(backends=("2001:db8:113::10", "203.0.113.2")),
     'service[0].backend[1].address = "203.0.113.2": IPv4, but vip 2001:db8::100 is IPv6 '
     "(a service is one family)"),
    (service(vip="192.0.2.100"),
     'service[0].backend[0].address = "2001:db8:113::10": IPv6, but vip 192.0.2.100 is IPv4 '
     "(a service is one family)"),
    (service(vip="2001:db8::zz"), 'service[0].vip = "2001:db8::zz": not an IPv4 or IPv6 address'),
    (service(backends=("::ffff:203.0.113.2",)),
     'service[0].backend[0].address = "::ffff:203.0.113.2": an IPv4-mapped IPv6 address; '
     "write the IPv4 address"),
    (service(backends=("fe80::1",)),
     'service[0].backend[0].address = "fe80::1": an IPv6 address that is link-local '
     "(fe80::/10): not supported"),
    (service(vip="ff02::1"), 'service[0].vip = "ff02::1": an IPv6 address that is multicast'),
    (service(vip="::"), 'service[0].vip = "::": an IPv6 address that is unspecified (::)'),
    (service(backends=("2001:db8:113::2%eth0",)),
     'service[0].backend[0].address = "2001:db8:113::2%eth0": an IPv6 address that is '
     "scoped (%eth0): not supported"),
])
def test_mistakes_name_key_and_value(svc, message):
    with pytest.raises(ConfigError) as e:
        parse({"service": [svc]})
    assert str(e.value) == message


def test_duplicate_ipv6_service_in_bracket_form():
    with pytest.raises(ConfigError) as e:
        parse({"service": [service(), service(name="again")]})
    assert str(e.value) == ('service[1] = "[2001:db8::100]:80/tcp": duplicate of service[0]')


def test_cluster_on_ipv6_follows_the_data_path(monkeypatch):
    svc = service(cluster=True, scheduler="maglev")
    monkeypatch.setattr(config, "CLUSTER_IPV6", False)
    with pytest.raises(ConfigError) as e:
        parse({"service": [svc]})
    assert str(e.value) == "service[0].cluster = true: not for an IPv6 service yet " \
                           "(vip 2001:db8::100)"
    monkeypatch.setattr(config, "CLUSTER_IPV6", True)
    assert parse({"service": [svc]}).services[0].cluster


def test_ipv6_routes():
    raw = {"lb": {"route": [{"destination": "2001:db8:200::/48", "gateway": "2001:db8:113::1"}]},
           "service": [service()]}
    assert parse(raw).lb.routes[0].destination == "2001:db8:200::/48"
    raw["lb"]["route"][0]["gateway"] = "fe80::1"
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert str(e.value) == 'lb.route[0].gateway = "fe80::1": link-local: needs a device'
    raw["lb"]["route"][0]["device"] = "eth1"
    assert parse(raw).lb.routes[0].gateway == "fe80::1"
    raw["lb"]["route"][0]["gateway"] = "203.0.113.1"
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert str(e.value) == ('lb.route[0].gateway = "203.0.113.1": not the family of '
                            "destination 2001:db8:200::/48")


def test_cli_check_mixed_family_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[service]]\nname="w"\nvip="2001:db8::1"\nport=80\n'
                   '[[service.backend]]\naddress="203.0.113.1"\n')
    r = subprocess.run([sys.executable, "-m", "natlb", "check", "-c", str(bad)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr == ('natlb: config: service[0].backend[0].address = "203.0.113.1": IPv4, '
                        "but vip 2001:db8::1 is IPv6 (a service is one family)\n")
