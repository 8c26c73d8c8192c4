"""Config validation: every error is one line naming the key and the value."""

import subprocess
import sys
from pathlib import Path

import pytest

from natlb.config import ConfigError, LBConfig, load, parse

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "natlb.toml"

MINIMAL = {
    "service": [{
        "name": "web", "vip": "192.0.2.100", "port": 80,
        "backend": [{"address": "203.0.113.10"}],
    }]
}


def with_(path, value):
    import copy

    raw = copy.deepcopy(MINIMAL)
    node = raw
    *parents, last = path
    for p in parents:
        node = node[p]
    node[last] = value
    return raw


def test_example_config_loads():
    cfg = load(EXAMPLE)
    assert [s.name for s in cfg.services] == ["web", "dns"]
    assert cfg.lb.queues == [0, 1]
    assert cfg.services[0].backends[1].port == 80  # defaults to the service port


def test_defaults():
    cfg = parse(MINIMAL)
    s = cfg.services[0]
    assert (s.protocol, s.scheduler, s.backends[0].port, s.backends[0].weight) == ("tcp", "rr",
                                                                                  80, 1)


@pytest.mark.parametrize("path,value,message", [
    (("service", 0, "port"), 70000, "service[0].port = 70000: must be 1..65535"),
    (("service", 0, "vip"), "192.0.2.300",
     'service[0].vip = "192.0.2.300": not an IPv4 or IPv6 address'),
    (("service", 0, "scheduler"), "random",
     'service[0].scheduler = "random": must be one of rr, wrr, lc, sh, maglev'),
    (("service", 0, "protocol"), "sctp", 'service[0].protocol = "sctp": must be one of tcp, udp'),
    (("service", 0, "colour"), "red", 'service[0].colour = "red": unknown key'),
    (("service", 0, "backend", 0, "port"), 0, "service[0].backend[0].port = 0: must be 1..65535"),
    (("service", 0, "backend", 0, "weight"), -1,
     "service[0].backend[0].weight = -1: must be 0..65535"),
    (("service", 0, "health"), {"kind": "icmp"},
     'service[0].health.kind = "icmp": must be one of tcp, http, udp, dns, exec, none'),
    (("service", 0, "health"), {"interval_ms": 1},
     "service[0].health.interval_ms = 1: must be 10..3600000"),
    (("service", 0, "health"), {"kind": "tcp", "path": "/x"},
     'service[0].health.path = "/x": not a key of kind "tcp"'),
    (("service", 0, "health"), {"kind": "http", "colour": "red"},
     'service[0].health.colour = "red": unknown key'),
    (("service", 0, "health"), {"kind": "exec"},
     'service[0].health.command: missing (required for kind = "exec")'),
    (("service", 0, "failover"), {"passive": "maybe"},
     'service[0].failover.passive = "maybe": must be one of check, suspect, down, ignore'),
    (("service", 0, "failover"), {"passive": "down", "passive_threshold": 3},
     'service[0].failover.passive_threshold = 3: needs passive = "check" or "suspect", '
     'not "down"'),
    (("service", 0, "failover"), {"passive_window_ms": 0},
     "service[0].failover.passive_window_ms = 0: must be 1..3600000"),
    (("lb",), {"workers": 99}, "lb.workers = 99: must be 1..16"),
    (("lb",), {"timeouts": {"tcp_syn": 0}},
     "lb.timeouts.tcp_syn = 0: must be seconds, 0.001..604800"),
    (("lb",), {"max_fragments": -1}, "lb.max_fragments = -1: must be 0..4194304"),
    (("lb",), {"timeouts": {"fragment": 0}},
     "lb.timeouts.fragment = 0: must be seconds, 0.001..604800"),
    (("lb",), {"table": "nat lb"}, 'lb.table = "nat lb": letters, digits and _ only, at most 32'),
    (("lb",), {"fastpath": "yes"}, 'lb.fastpath = "yes": must be true or false'),
    (("lb",), {"fastpath": True, "rewrite": "copy"}, 'lb.fastpath = true: needs rewrite = "mark"'),
    (("lb",), {"fastpath_decide": "on"}, 'lb.fastpath_decide = "on": must be true or false'),
    (("lb",), {"fastpath_decide": True, "fastpath": False},
     "lb.fastpath_decide = true: needs lb.fastpath = true"),
    (("lb",), {"fastpath_decide_slots": 1}, "lb.fastpath_decide_slots = 1: must be 2..67108864"),
])
def test_errors_name_key_and_value(path, value, message):
    with pytest.raises(ConfigError) as e:
        parse(with_(path, value))
    assert str(e.value) == message


def test_health_kinds_are_their_own_dataclasses():
    from natlb.config import HttpCheck, TcpCheck

    h = parse(with_(("service", 0, "health"), {"kind": "http", "path": "/ok", "fall": 3}))
    assert h.services[0].health == HttpCheck(fall=3, path="/ok")
    assert parse(MINIMAL).services[0].health == TcpCheck()
    assert parse(MINIMAL).services[0].failover.passive == "check"


def test_duplicate_service():
    raw = {"service": MINIMAL["service"] * 2}
    with pytest.raises(ConfigError, match=r"service\[1\] = \"192.0.2.100:80/tcp\": duplicate"):
        parse(raw)


def test_duplicate_backend():
    raw = with_(("service", 0, "backend"), [{"address": "203.0.113.10"}] * 2)
    with pytest.raises(ConfigError, match=r"backend\[1\].*duplicate backend"):
        parse(raw)


def test_missing_required():
    with pytest.raises(ConfigError, match=r"^service\[0\].vip: missing"):
        parse({"service": [{"name": "x", "port": 1, "backend": [{"address": "203.0.113.1"}]}]})


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "natlb", *args], capture_output=True, text=True)


def test_cli_check_ok_and_exit_2(tmp_path):
    assert run_cli("check", "-c", str(EXAMPLE)).returncode == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[service]]\nname="w"\nvip="192.0.2.1"\nport=80\nweight=3\n'
                   '[[service.backend]]\naddress="203.0.113.1"\n')
    r = run_cli("check", "-c", str(bad))
    assert r.returncode == 2
    assert r.stderr == "natlb: config: service[0].weight = 3: unknown key\n"


def test_cli_check_reports_toml_syntax(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[service]\n")
    r = run_cli("check", "-c", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "TOML syntax" in r.stderr


def test_fastpath_is_on_in_mark_mode_unless_turned_off():
    assert parse(MINIMAL).lb.fastpath is True
    assert parse(with_(("lb",), {"fastpath": False})).lb.fastpath is False
    assert parse(with_(("lb",), {"rewrite": "copy"})).lb.fastpath is False


def test_kernel_decisions_follow_the_fast_path_unless_turned_off():
    assert parse(MINIMAL).lb.fastpath_decide is True
    assert parse(with_(("lb",), {"fastpath_decide": False})).lb.fastpath_decide is False
    assert parse(with_(("lb",), {"fastpath": False})).lb.fastpath_decide is False


@pytest.mark.parametrize("given", [{}, {"fastpath": False}, {"fastpath": True},
                                   {"rewrite": "copy"}, {"rewrite": "copy", "fastpath": False},
                                   {"rewrite": "mark"}])
def test_lbconfig_built_directly_agrees_with_the_parser(given):
    """One place decides the fast path's default: LBConfig itself."""
    assert LBConfig(**given) == parse(with_(("lb",), dict(given))).lb


def test_lbconfig_built_directly_refuses_the_fast_path_in_copy_mode():
    assert LBConfig(rewrite="copy").fastpath is False
    with pytest.raises(ConfigError, match=r'^lb.fastpath = true: needs rewrite = "mark"$'):
        LBConfig(rewrite="copy", fastpath=True)


@pytest.mark.parametrize("path,value,why", [
    (("service", 0, "vip"), "0.0.0.0", "an IPv4 address that is unspecified (0.0.0.0)"),
    (("service", 0, "vip"), "127.0.0.2", "an IPv4 address that is loopback (127.0.0.0/8)"),
    (("service", 0, "vip"), "224.0.0.1", "an IPv4 address that is multicast"),
    (("service", 0, "vip"), "255.255.255.255",
     "an IPv4 address that is the limited broadcast address"),
    (("service", 0, "backend", 0, "address"), "0.0.0.0",
     "an IPv4 address that is unspecified (0.0.0.0)"),
    (("service", 0, "backend", 0, "address"), "127.0.0.1",
     "an IPv4 address that is loopback (127.0.0.0/8)"),
])
def test_addresses_no_host_forwards_to_are_refused(path, value, why):
    """As for IPv6 (test_config_ipv6): natlb forwards, and no packet is
    forwarded to or from these."""
    with pytest.raises(ConfigError) as e:
        parse(with_(path, value))
    key = ".".join(str(p) for p in path).replace("service.0", "service[0]").replace(
        "backend.0", "backend[0]")
    assert str(e.value) == f'{key} = "{value}": {why}'


def test_ipv6_loopback_is_refused():
    raw = {"service": [{"name": "w", "vip": "2001:db8::1", "port": 80,
                        "backend": [{"address": "::1"}]}]}
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert str(e.value) == ('service[0].backend[0].address = "::1": an IPv6 address that is '
                            "loopback (::1)")


@pytest.mark.parametrize("vip2", ["192.0.2.100", "203.0.113.10"])
def test_a_backend_that_is_a_vip_is_refused(vip2):
    """natlb would send the packets to itself: health checks of the VIP go
    through natlb to other backends, and the SYNs it forwards to itself
    time out as passive failures of healthy backends."""
    import copy

    raw = copy.deepcopy(MINIMAL)
    raw["service"].append({"name": "other", "vip": vip2, "port": 8080,
                           "backend": [{"address": "192.0.2.100"}, {"address": "203.0.113.11"}]})
    with pytest.raises(ConfigError) as e:
        parse(raw)
    first = 0 if vip2 == "203.0.113.10" else 1
    assert str(e.value) == {
        0: 'service[0].backend[0].address = "203.0.113.10": the VIP of service[1]; '
           "a backend must be another host",
        1: 'service[1].backend[0].address = "192.0.2.100": the VIP of service[0]; '
           "a backend must be another host"}[first]


def test_a_control_socket_path_too_long_for_unix_sockets_is_a_config_error():
    """It was found only once natlb had set the host up: a traceback, exit 1.
    The guardian's socket beside it is 9 bytes longer."""
    ok = "/run/" + "d" * (107 - len("/run/") - len("/s.guardian")) + "/s"
    assert parse(with_(("lb",), {"control_socket": ok})).lb.control_socket == ok
    long = ok.replace("/s", "/ss")
    with pytest.raises(ConfigError) as e:
        parse(with_(("lb",), {"control_socket": long}))
    assert str(e.value) == (f'lb.control_socket = "{long}": too long for a Unix socket '
                            f'({len(long) + 9} bytes with ".guardian"; at most 107)')


@pytest.mark.parametrize("lb,named", [
    ({"workers": 2}, "lb.workers = 2 (running: 1)"),
    ({"timeouts": {"tcp_fin": 2}}, "lb.timeouts.tcp_fin = 2.0 (running: 120.0)"),
    ({"route": [{"destination": "203.0.113.0/24", "device": "lo"}]},
     'lb.route[0] = {destination = "203.0.113.0/24", device = "lo"} (running: none)'),
    ({"metrics": "127.0.0.1:9100"}, 'lb.metrics = "127.0.0.1:9100" (running: "")'),
])
def test_an_lb_change_a_reload_refuses_names_the_config_key_and_value(lb, named):
    """A reload refuses [lb] changes; the error names the key as written in
    the config (not the field: timeouts_s, routes) and the value."""
    from natlb.config import lb_change

    old = parse(MINIMAL).lb
    assert lb_change(old, old) is None
    assert lb_change(old, parse(with_(("lb",), lb)).lb) == named


@pytest.mark.parametrize(("path", "value", "shown"), [
    (("service", 0, "name"), "web\nmail", r'"web\nmail"'),
    (("service", 0, "name"), "web\r", r'"web\r"'),
    (("service", 0, "name"), "w\x1b[2Jeb", r'"w\u001b[2Jeb"'),
    (("service", 0, "name"), "w\x7feb\u2028", r'"w\u007feb\u2028"'),
    (("service", 0, "health"), {"kind": "http", "path": "/\tx"}, r'"/\tx"'),
    (("lb",), {"table": "nat\nlb"}, r'"nat\nlb"'),
    (("lb",), {"interface": "eth\x000"}, r'"eth\u00000"'),
])
def test_control_characters_in_names_are_refused_in_one_line(path, value, shown):
    """A name is logged and shown in errors: a newline or an escape
    sequence in it would forge or garble log lines."""
    key = {"name": "service[0].name", "health": "service[0].health.path",
           "lb": f"lb.{next(iter(value))}" if isinstance(value, dict) else ""}[path[-1]]
    with pytest.raises(ConfigError) as e:
        parse(with_(path, value))
    assert str(e.value) == f"{key} = {shown}: must not hold control characters"
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)


def test_an_exec_check_argument_may_hold_a_newline_but_not_a_nul():
    """A script for sh -c is lines; a NUL cannot be passed to exec, and
    every check would fail with a Python error instead of a result."""
    raw = with_(("service", 0, "health"), {"kind": "exec", "command": ["sh", "-c", "a\nb"]})
    assert parse(raw).services[0].health.command == ("sh", "-c", "a\nb")
    with pytest.raises(ConfigError) as e:
        parse(with_(("service", 0, "health"), {"kind": "exec", "command": ["sh", "a\0b"]}))
    assert str(e.value).startswith("service[0].health.command = ")
    assert str(e.value).endswith(": an argument holds a NUL character")
    assert "\0" not in str(e.value) and "\n" not in str(e.value)


def test_a_check_payload_may_hold_control_characters():
    """Payloads and expected replies are bytes on the wire, not names."""
    raw = with_(("service", 0, "health"),
                {"kind": "udp", "payload": "PING\r\n\x00", "expect": "PONG\r\n"})
    raw["service"][0]["protocol"] = "udp"
    assert parse(raw).services[0].health.payload == "PING\r\n\x00"


def test_an_unknown_key_with_a_newline_is_one_line():
    with pytest.raises(ConfigError) as e:
        parse(with_(("service", 0, "na\nme"), "web"))
    assert str(e.value) == r'service[0].na\nme = "web": unknown key'


def test_cli_check_counts_in_the_right_number(tmp_path):
    one = tmp_path / "one.toml"
    one.write_text('[[service]]\nname="w"\nvip="192.0.2.1"\nport=80\n'
                   '[[service.backend]]\naddress="203.0.113.1"\n')
    r = run_cli("check", "-c", str(one))
    assert (r.returncode, r.stdout) == (0, f"{one}: ok (1 service, 1 backend)\n")
    n = sum(len(s.backends) for s in load(EXAMPLE).services)
    r = run_cli("check", "-c", str(EXAMPLE))
    assert (r.returncode, r.stdout) == (0, f"{EXAMPLE}: ok (2 services, {n} backends)\n")
