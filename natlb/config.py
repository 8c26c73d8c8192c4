"""Load and validate natlb's TOML configuration.

Every problem is a ConfigError whose message names the key path and the
value, e.g. ``service[0].backend[1].port = 70000: must be 1..65535``.
Validation never touches the system and needs no C extension: `natlb check`
and `natlb --help` work without the compiled core.  The defaults here are
the only ones (natlb.core.CoreConfig is built from LBConfig).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
import unicodedata
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from natlb.errors import ConfigError

# The C core's ceilings (csrc/natlb.h: NL_MAX_*; lb.max_services and
# lb.max_backends choose below them), stated here so that checking a config
# needs no compiled extension; natlb.core refuses to load if they disagree.
MAX_SERVICES = 65536
MAX_BACKENDS = 65536
MAX_WORKERS = 16
# sun_path holds 108 bytes, the last one the terminating NUL.
MAX_UNIX_PATH = 107

SCHEDULERS = ("rr", "wrr", "lc", "sh", "maglev")
# rr, wrr and lc depend on a node's own history; sh is a pure function of the
# client address but remaps almost every client when one backend changes, so
# nodes whose health views differ for a moment would split flows.  Maglev
# remaps only the changed backend's share.
CLUSTER_SCHEDULERS = ("maglev",)
# csrc/cluster.c maps a reply it has no flow for back to its service: whether
# it does so for IPv6 replies too (it does: addresses are hashed and compared
# whole, whatever the family).
CLUSTER_IPV6 = True
PROTOCOLS = ("tcp", "udp")
PASSIVE = ("check", "suspect", "down", "ignore")
ON_DOWN = ("reset", "keep")


# -- health checks: one dataclass per kind --------------------------------
# A kind's dataclass holds the keys that kind accepts (besides the timing keys
# every kind shares); natlb.checkers registers a checker for each class.

@dataclass(frozen=True)
class HealthConfig:
    """What every kind shares: when to check and how many results count."""

    kind: ClassVar[str] = "none"
    interval_ms: int = 1000
    timeout_ms: int = 500
    rise: int = 2
    fall: int = 2
    port: int | None = None           # defaults to the backend port


@dataclass(frozen=True)
class NoCheck(HealthConfig):
    """No active checks: every backend counts as up."""

    kind: ClassVar[str] = "none"


@dataclass(frozen=True)
class TcpCheck(HealthConfig):
    """A connect, closed with RST."""

    kind: ClassVar[str] = "tcp"


@dataclass(frozen=True)
class HttpCheck(HealthConfig):
    kind: ClassVar[str] = "http"
    path: str = "/"
    expect_status: int = 200
    expect_body: str | None = None    # substring the body must hold


@dataclass(frozen=True)
class UdpCheck(HealthConfig):
    kind: ClassVar[str] = "udp"
    payload: str = "ping"
    expect: str | None = None         # substring the reply must hold


@dataclass(frozen=True)
class DnsCheck(HealthConfig):
    kind: ClassVar[str] = "dns"
    name: str = "."                   # the name queried (type A)


@dataclass(frozen=True)
class ExecCheck(HealthConfig):
    kind: ClassVar[str] = "exec"
    command: tuple[str, ...] = ()     # argv; NATLB_BACKEND=addr:port in env


HEALTH_KINDS: dict[str, type[HealthConfig]] = {
    c.kind: c for c in (TcpCheck, HttpCheck, UdpCheck, DnsCheck, ExecCheck, NoCheck)}


@dataclass(frozen=True)
class FailoverConfig:
    # What one failure seen in live traffic does: "check" makes the backend
    # suspect and checks it at once, the check decides (see natlb.pool_state).
    passive: str = "check"
    passive_threshold: int = 0        # distinct clients within the window: down (0: off)
    passive_window_ms: int = 10_000
    on_backend_down: str = "reset"    # established TCP flows of a dead backend


@dataclass(frozen=True)
class BackendConfig:
    address: str
    port: int
    weight: int = 1

    @property
    def key(self) -> str:
        return host_port(self.address, self.port)


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    vip: str
    port: int
    protocol: str
    scheduler: str
    health: HealthConfig
    backends: tuple[BackendConfig, ...]
    failover: FailoverConfig = FailoverConfig()
    cluster: bool = False             # several natlb nodes carry it (ECMP)


@dataclass(frozen=True)
class RouteConfig:
    destination: str
    gateway: str | None = None
    device: str | None = None
    table: int | None = None          # kernel routing table (e.g. one BIRD learns from)


@dataclass(frozen=True)
class LBConfig:
    queue: int = 0
    workers: int = 1
    max_flows: int = 1 << 20
    max_fragments: int = 4096         # fragmented datagrams tracked at once (0: drop fragments)
    interface: str = "lo"
    table: str = "natlb"
    control_socket: str = "/run/natlb/natlb.sock"
    metrics: str = ""                 # "ADDR:PORT" serves Prometheus metrics; "" is off
    gso: bool = False
    poll_us: int = 0
    syn_timeout_ms: int = 100
    resteer_tries: int = 3
    restart_grace_ms: int = 3000      # host left this long for a successor after a crash
    rewrite: str = "mark"             # mark: nft rewrites on natlb's mark; copy: natlb does
    announce: str = "always"          # healthy: a VIP is on `interface` only while it has
                                      # a backend up (what BIRD's direct protocol exports)
    # Established flows carried by the kernel (tc fast path): needs mark
    # mode; None (not given) means on in mark mode, off in copy mode, here
    # and nowhere else (__post_init__), so LBConfig(rewrite="copy") is off.
    fastpath: bool | None = None
    # The kernel places new flows' first packets itself (rr, wrr, sh,
    # maglev services): None means on with the fast path, off without.
    fastpath_decide: bool | None = None
    # Slots of the kernel's scheduler tables (4 bytes each), used by halves:
    # a service whose table finds no room has its first packets queued.
    fastpath_decide_slots: int = 1 << 20
    # Id bounds: services and backends a process may know over its lifetime
    # (ids are not reused across reloads); they size the C counters (README).
    max_services: int = 4096
    max_backends: int = 65536
    timeouts_s: dict[str, float] = field(default_factory=lambda: {
        "tcp_syn": 10.0, "tcp_established": 900.0, "tcp_fin": 120.0,
        "tcp_close": 10.0, "udp": 300.0, "fragment": 1.0,
    })
    routes: tuple[RouteConfig, ...] = ()

    def __post_init__(self) -> None:
        if self.fastpath is None:
            # On by default where it can work: the tc program carries what
            # mark mode's rewrite chain would have rewritten; copy mode
            # rewrites in natlb itself.
            object.__setattr__(self, "fastpath", self.rewrite == "mark")
        elif not isinstance(self.fastpath, bool):
            raise _fail("lb.fastpath", self.fastpath, "must be true or false")
        elif self.fastpath and self.rewrite != "mark":
            raise _fail("lb.fastpath", self.fastpath, 'needs rewrite = "mark"')
        if self.fastpath_decide is None:
            object.__setattr__(self, "fastpath_decide", bool(self.fastpath))
        elif not isinstance(self.fastpath_decide, bool):
            raise _fail("lb.fastpath_decide", self.fastpath_decide, "must be true or false")
        elif self.fastpath_decide and not self.fastpath:
            raise _fail("lb.fastpath_decide", self.fastpath_decide, "needs lb.fastpath = true")

    @property
    def queues(self) -> list[int]:
        return list(range(self.queue, self.queue + self.workers))

    @property
    def metrics_address(self) -> tuple[str, int]:
        host, _, port = self.metrics.rpartition(":")
        return host.strip("[]"), int(port)

    def other_queues(self, taken: list[int]) -> list[int]:
        """`natlb restart`: the successor's queues must not be its
        predecessor's; it takes the bank NL_MAX_WORKERS above (or below)."""
        bank = self.queues
        if not set(bank) & set(taken):
            return bank
        shift = MAX_WORKERS if self.queue + MAX_WORKERS + self.workers <= 65536 else -MAX_WORKERS
        return [q + shift for q in bank]

    @property
    def flow_table_path(self) -> str:
        """The flow table's file, named after the control socket (tmpfs under
        /run): it outlives the process, so a successor adopts it.  Named after
        the socket, not the table, because the socket is what no two natlb on
        one host can share (nodes in network namespaces share the filesystem)."""
        return os.path.abspath(self.control_socket) + ".flows"

    @property
    def run_state_path(self) -> str:
        """Backends' admin state and weight set at run time, for a natlb
        started after a crash (natlb/runstate.py)."""
        return os.path.abspath(self.control_socket) + ".state"

    @property
    def guardian_socket(self) -> str:
        """Where a crashed natlb's guardian waits for a successor."""
        return os.path.abspath(self.control_socket) + ".guardian"


@dataclass(frozen=True)
class Config:
    lb: LBConfig
    services: tuple[ServiceConfig, ...]


# -- helpers ---------------------------------------------------------------

def family(address: str) -> int:
    """4 or 6: the family of a (validated) address's text."""
    return 6 if ":" in address else 4


def host_port(address: str, port: int) -> str:
    """ADDR:PORT as people write it: an IPv6 address in brackets."""
    return f"[{address}]:{port}" if family(address) == 6 else f"{address}:{port}"


_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _is_control(c: str) -> bool:
    # Cc: C0, DEL and C1; Zl, Zp: the Unicode line and paragraph separators.
    return unicodedata.category(c) in ("Cc", "Zl", "Zp")


def _escaped(text: str) -> str:
    """Control characters as TOML escapes: an error stays one line."""
    return "".join(_ESCAPES.get(c, f"\\u{ord(c):04x}") if _is_control(c) else c
                   for c in text)


def _fmt(v: Any) -> str:
    """As the value is written in TOML."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{_escaped(v)}"' if isinstance(v, str) else _escaped(repr(v))


def _fail(path: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{_escaped(path)} = {_fmt(value)}: {why}")


def _table(raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(path, raw, "must be a table")
    return raw


def _known(raw: dict[str, Any], path: str, allowed: set[str]) -> None:
    for k in raw:
        if k not in allowed:
            raise _fail(f"{path}.{k}" if path else k, raw[k], "unknown key")


def _int(raw: dict[str, Any], key: str, path: str, default: int | None,
         lo: int, hi: int) -> int:
    if key not in raw:
        if default is None:
            raise ConfigError(f"{path}.{key}: missing (required)")
        return default
    v = raw[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(f"{path}.{key}", v, "must be an integer")
    if not lo <= v <= hi:
        raise _fail(f"{path}.{key}", v, f"must be {lo}..{hi}")
    return v


def _str(raw: dict[str, Any], key: str, path: str, default: str | None,
         choices: tuple[str, ...] | None = None, payload: bool = False) -> str:
    """payload: bytes for the wire (a check's probe, a reply it expects),
    which may hold control characters; every other string is a name that
    natlb logs and shows in one line."""
    if key not in raw:
        if default is None:
            raise ConfigError(f"{path}.{key}: missing (required)")
        return default
    v = raw[key]
    if not isinstance(v, str) or not v:
        raise _fail(f"{path}.{key}", v, "must be a non-empty string")
    if not payload and any(_is_control(c) for c in v):
        raise _fail(f"{path}.{key}", v, "must not hold control characters")
    if choices and v not in choices:
        raise _fail(f"{path}.{key}", v, f"must be one of {', '.join(choices)}")
    return v


def _host_port(raw: dict[str, Any], key: str, path: str) -> str:
    """ "ADDR:PORT" with an IPv4 address or a bracketed IPv6 one; normalized."""
    v = _str(raw, key, path, None)
    host, sep, port = v.rpartition(":")
    try:
        if host.startswith("[") and host.endswith("]"):
            addr = f"[{ipaddress.IPv6Address(host[1:-1])}]"
        else:
            addr = str(ipaddress.IPv4Address(host))
        if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError
    except ValueError:
        raise _fail(f"{path}.{key}", v, "must be ADDR:PORT (192.0.2.1:9100, [2001:db8::1]:9100), "
                    "port 1..65535") from None
    return f"{addr}:{int(port)}"


_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _ip(raw: dict[str, Any], key: str, path: str, link_local: bool = False) -> str:
    """An IPv4 or IPv6 address, in its canonical text (2001:db8::1, never
    2001:0db8:0:0::1: the marks' maps, status and the ruleset compare text).
    link_local: allowed (a route's gateway, with its device)."""
    v = _str(raw, key, path, None)
    try:
        addr = ipaddress.ip_address(v)
    except ValueError:
        raise _fail(f"{path}.{key}", v, "not an IPv4 or IPv6 address") from None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            raise _fail(f"{path}.{key}", v, "an IPv4-mapped IPv6 address; write the IPv4 address")
        # A link-local address means nothing without its interface, which
        # natlb's tables do not carry; the others are no host's.
        for bad, why in ((addr.scope_id, f"scoped (%{addr.scope_id}): not supported"),
                         (addr.is_link_local and not link_local,
                          "link-local (fe80::/10): not supported"),
                         (addr.is_multicast, "multicast"),
                         (addr.is_unspecified, "unspecified (::)"),
                         (addr.is_loopback, "loopback (::1)")):
            if bad:
                raise _fail(f"{path}.{key}", v, f"an IPv6 address that is {why}")
    else:
        # No packet is forwarded to or from these (the kernel drops them as
        # martians, or they are no one host's).
        for bad, why in ((addr.is_unspecified, "unspecified (0.0.0.0)"),
                         (addr.is_loopback, "loopback (127.0.0.0/8)"),
                         (addr.is_multicast, "multicast"),
                         (addr == _LIMITED_BROADCAST, "the limited broadcast address")):
            if bad:
                raise _fail(f"{path}.{key}", v, f"an IPv4 address that is {why}")
    return str(addr)


# -- sections --------------------------------------------------------------

def _no_keys(raw: dict[str, Any], path: str) -> dict[str, Any]:
    return {}


def _check_http(raw: dict[str, Any], path: str) -> dict[str, Any]:
    d = HttpCheck()
    url = _str(raw, "path", path, d.path)
    if not url.startswith("/"):
        raise _fail(f"{path}.path", url, "must start with /")
    return {"path": url,
            "expect_status": _int(raw, "expect_status", path, d.expect_status, 100, 599),
            "expect_body": (_str(raw, "expect_body", path, "", payload=True)
                            if "expect_body" in raw else None)}


def _check_udp(raw: dict[str, Any], path: str) -> dict[str, Any]:
    return {"payload": _str(raw, "payload", path, UdpCheck().payload, payload=True),
            "expect": _str(raw, "expect", path, "", payload=True) if "expect" in raw else None}


def _check_dns(raw: dict[str, Any], path: str) -> dict[str, Any]:
    name = _str(raw, "name", path, DnsCheck().name)
    if len(name) > 253 or any(len(label) > 63 for label in name.strip(".").split(".")):
        raise _fail(f"{path}.name", name, "not a DNS name")
    return {"name": name}


def _check_exec(raw: dict[str, Any], path: str) -> dict[str, Any]:
    if "command" not in raw:
        raise ConfigError(f"{path}.command: missing (required for kind = \"exec\")")
    command = raw["command"]
    if isinstance(command, str):
        command = command.split()
    if (not isinstance(command, list) or not command
            or not all(isinstance(c, str) and c for c in command)):
        raise _fail(f"{path}.command", command, "must be a non-empty list of strings")
    # Any other byte may be an argument (a script for sh -c has newlines);
    # a NUL cannot be one: exec refuses it at every check.
    if any("\0" in c for c in command):
        raise _fail(f"{path}.command", command, "an argument holds a NUL character")
    return {"command": tuple(command)}


# kind -> its own keys' parser; the dataclass's fields say which keys it takes.
_CHECK_KEYS = {"tcp": _no_keys, "http": _check_http, "udp": _check_udp, "dns": _check_dns,
               "exec": _check_exec, "none": _no_keys}
_ALL_CHECK_KEYS = {f.name for c in HEALTH_KINDS.values() for f in fields(c)}


def _health(raw: Any, path: str) -> HealthConfig:
    raw = _table(raw, path)
    kind = _str(raw, "kind", path, TcpCheck.kind, tuple(HEALTH_KINDS))
    cls = HEALTH_KINDS[kind]
    own = {f.name for f in fields(cls)}
    for k, v in raw.items():
        if k != "kind" and k not in own:
            why = f'not a key of kind "{kind}"' if k in _ALL_CHECK_KEYS else "unknown key"
            raise _fail(f"{path}.{k}", v, why)
    d = HealthConfig()
    return cls(
        interval_ms=_int(raw, "interval_ms", path, d.interval_ms, 10, 3_600_000),
        timeout_ms=_int(raw, "timeout_ms", path, d.timeout_ms, 1, 3_600_000),
        rise=_int(raw, "rise", path, d.rise, 1, 100),
        fall=_int(raw, "fall", path, d.fall, 1, 100),
        port=_int(raw, "port", path, 0, 1, 65535) if "port" in raw else None,
        **_CHECK_KEYS[kind](raw, path),
    )


def _failover(raw: Any, path: str) -> FailoverConfig:
    raw = _table(raw, path)
    _known(raw, path, {"passive", "passive_threshold", "passive_window_ms", "on_backend_down"})
    d = FailoverConfig()
    f = FailoverConfig(
        passive=_str(raw, "passive", path, d.passive, PASSIVE),
        passive_threshold=_int(raw, "passive_threshold", path, d.passive_threshold, 0, 1000),
        passive_window_ms=_int(raw, "passive_window_ms", path, d.passive_window_ms, 1,
                               3_600_000),
        on_backend_down=_str(raw, "on_backend_down", path, d.on_backend_down, ON_DOWN))
    if f.passive_threshold and f.passive not in ("check", "suspect"):
        raise _fail(f"{path}.passive_threshold", f.passive_threshold,
                    f'needs passive = "check" or "suspect", not "{f.passive}"')
    return f


def _backend(raw: Any, path: str, service_port: int) -> BackendConfig:
    raw = _table(raw, path)
    _known(raw, path, {"address", "port", "weight"})
    return BackendConfig(
        address=_ip(raw, "address", path),
        port=_int(raw, "port", path, service_port, 1, 65535),
        weight=_int(raw, "weight", path, 1, 0, 65535),
    )


def _service(raw: Any, path: str) -> ServiceConfig:
    raw = _table(raw, path)
    _known(raw, path, {"name", "vip", "port", "protocol", "scheduler", "health", "backend",
                       "failover", "cluster"})
    port = _int(raw, "port", path, None, 1, 65535)
    backends_raw = raw.get("backend", [])
    if not isinstance(backends_raw, list) or not backends_raw:
        raise _fail(f"{path}.backend", backends_raw, "needs at least one [[service.backend]]")
    vip = _ip(raw, "vip", path)
    backends = tuple(_backend(b, f"{path}.backend[{i}]", port)
                     for i, b in enumerate(backends_raw))
    for i, b in enumerate(backends):
        # natlb rewrites addresses, it does not translate families (no NAT64).
        if family(b.address) != family(vip):
            raise _fail(f"{path}.backend[{i}].address", b.address,
                        f"IPv{family(b.address)}, but vip {vip} is IPv{family(vip)} "
                        "(a service is one family)")
    seen: set[str] = set()
    for i, b in enumerate(backends):
        if b.key in seen:
            raise _fail(f"{path}.backend[{i}]", b.key, "duplicate backend in this service")
        seen.add(b.key)
    cluster = raw.get("cluster", False)
    if not isinstance(cluster, bool):
        raise _fail(f"{path}.cluster", cluster, "must be true or false")
    scheduler = _str(raw, "scheduler", path, "rr", SCHEDULERS)
    if cluster and scheduler not in CLUSTER_SCHEDULERS:
        raise _fail(f"{path}.scheduler", scheduler,
                    "cluster = true needs maglev (every node must choose alike, and a "
                    "backend change may move only its own share of flows)")
    if cluster and family(vip) == 6 and not CLUSTER_IPV6:
        raise _fail(f"{path}.cluster", cluster, f"not for an IPv6 service yet (vip {vip})")
    return ServiceConfig(
        name=_str(raw, "name", path, None),
        vip=vip,
        port=port,
        protocol=_str(raw, "protocol", path, "tcp", PROTOCOLS),
        scheduler=scheduler,
        health=_health(raw.get("health", {}), f"{path}.health"),
        backends=backends,
        failover=_failover(raw.get("failover", {}), f"{path}.failover"),
        cluster=cluster,
    )


def _route(raw: Any, path: str) -> RouteConfig:
    raw = _table(raw, path)
    _known(raw, path, {"destination", "gateway", "device", "table"})
    dest = _str(raw, "destination", path, None)
    try:
        dest = str(ipaddress.ip_network(dest, strict=True))
    except ValueError:
        raise _fail(f"{path}.destination", dest,
                    "not an IP network (a.b.c.d/len or 2001:db8::/len)") from None
    gw = _ip(raw, "gateway", path, link_local=True) if "gateway" in raw else None
    if gw and family(gw) != family(dest):
        raise _fail(f"{path}.gateway", gw, f"not the family of destination {dest}")
    dev = _str(raw, "device", path, "") if "device" in raw else None
    if gw and ipaddress.ip_address(gw).is_link_local and not dev:
        raise _fail(f"{path}.gateway", gw, "link-local: needs a device")
    if not gw and not dev:
        raise ConfigError(f"{path}: needs a gateway or a device")
    table = _int(raw, "table", path, 0, 1, 0xFFFFFFFF) if "table" in raw else None
    if table in (253, 254, 255):
        raise _fail(f"{path}.table", table, "the kernel's default, main and local tables "
                    "are not natlb's to fill; leave it out for main")
    return RouteConfig(dest, gw, dev, table)


def _lb(raw: Any) -> LBConfig:
    raw = _table(raw, "lb")
    _known(raw, "lb", {"queue", "workers", "max_flows", "max_fragments", "interface", "table",
                       "control_socket", "gso", "poll_us", "syn_timeout_ms", "resteer_tries",
                       "restart_grace_ms", "rewrite", "fastpath", "timeouts", "route", "metrics",
                       "announce", "max_services", "max_backends", "fastpath_decide",
                       "fastpath_decide_slots"})
    d = LBConfig()
    timeouts = dict(d.timeouts_s)
    t_raw = _table(raw.get("timeouts", {}), "lb.timeouts")
    _known(t_raw, "lb.timeouts", set(timeouts))
    for k, v in t_raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.001 <= v <= 86400 * 7:
            raise _fail(f"lb.timeouts.{k}", v, "must be seconds, 0.001..604800")
        timeouts[k] = float(v)
    workers = _int(raw, "workers", "lb", d.workers, 1, MAX_WORKERS)
    queue = _int(raw, "queue", "lb", d.queue, 0, 65535 - workers + 1)
    gso = raw.get("gso", d.gso)
    if not isinstance(gso, bool):
        raise _fail("lb.gso", gso, "must be true or false")
    rewrite = _str(raw, "rewrite", "lb", d.rewrite, ("copy", "mark"))
    # Not given: LBConfig decides (by rewrite), and checks what is given.
    fastpath = raw.get("fastpath")
    table = _str(raw, "table", "lb", d.table)
    if not table.replace("_", "").isalnum() or len(table) > 32:
        raise _fail("lb.table", table, "letters, digits and _ only, at most 32")
    control_socket = _str(raw, "control_socket", "lb", d.control_socket)
    # The guardian's socket is the longest path beside it (LBConfig.guardian_socket).
    longest = len(os.fsencode(os.path.abspath(control_socket) + ".guardian"))
    if longest > MAX_UNIX_PATH:
        raise _fail("lb.control_socket", control_socket,
                    f'too long for a Unix socket ({longest} bytes with ".guardian"; '
                    f"at most {MAX_UNIX_PATH})")
    routes_raw = raw.get("route", [])
    if not isinstance(routes_raw, list):
        raise _fail("lb.route", routes_raw, "must be an array of tables ([[lb.route]])")
    return LBConfig(
        queue=queue,
        workers=workers,
        max_flows=_int(raw, "max_flows", "lb", d.max_flows, 16, 1 << 26),
        max_fragments=_int(raw, "max_fragments", "lb", d.max_fragments, 0, 1 << 22),
        max_services=_int(raw, "max_services", "lb", d.max_services, 1, MAX_SERVICES),
        max_backends=_int(raw, "max_backends", "lb", d.max_backends, 1, MAX_BACKENDS),
        interface=_str(raw, "interface", "lb", d.interface),
        table=table,
        control_socket=control_socket,
        metrics=_host_port(raw, "metrics", "lb") if "metrics" in raw else d.metrics,
        gso=gso,
        poll_us=_int(raw, "poll_us", "lb", d.poll_us, 0, 10_000),
        syn_timeout_ms=_int(raw, "syn_timeout_ms", "lb", d.syn_timeout_ms, 0, 60_000),
        resteer_tries=_int(raw, "resteer_tries", "lb", d.resteer_tries, 1, 16),
        restart_grace_ms=_int(raw, "restart_grace_ms", "lb", d.restart_grace_ms, 0, 600_000),
        rewrite=rewrite,
        fastpath=fastpath,
        fastpath_decide=raw.get("fastpath_decide"),
        fastpath_decide_slots=_int(raw, "fastpath_decide_slots", "lb", d.fastpath_decide_slots,
                                   2, 1 << 26),
        announce=_str(raw, "announce", "lb", d.announce, ("always", "healthy")),
        timeouts_s=timeouts,
        routes=tuple(_route(r, f"lb.route[{i}]") for i, r in enumerate(routes_raw)),
    )


def _cluster_backends_unique(services: tuple[ServiceConfig, ...]) -> None:
    """A node maps a reply it has no flow for back to its service by the
    backend's address, port and protocol alone, so with a cluster service
    involved those must name one service."""
    owner: dict[tuple[str, str], int] = {}
    for i, s in enumerate(services):
        for j, b in enumerate(s.backends):
            k = (b.key, s.protocol)
            first = owner.setdefault(k, i)
            if first != i and (s.cluster or services[first].cluster):
                raise _fail(f"service[{i}].backend[{j}]", b.key,
                            f"also a backend of service[{first}]; a cluster service "
                            f"needs backends of its own")


def _backends_not_vips(services: tuple[ServiceConfig, ...]) -> None:
    """natlb forwards: a backend at a VIP is this host, to which it would
    send the packets it steers (its health checks of it go through natlb to
    other backends, whose SYNs then time out as passive failures)."""
    vips: dict[str, int] = {}
    for i, s in enumerate(services):
        vips.setdefault(s.vip, i)
    for i, s in enumerate(services):
        for j, b in enumerate(s.backends):
            if b.address in vips:
                raise _fail(f"service[{i}].backend[{j}].address", b.address,
                            f"the VIP of service[{vips[b.address]}]; a backend must be "
                            "another host")


def parse(raw: dict[str, Any]) -> Config:
    _known(raw, "", {"lb", "service"})
    lb = _lb(raw.get("lb", {}))
    services_raw = raw.get("service", [])
    if not isinstance(services_raw, list) or not services_raw:
        raise _fail("service", services_raw, "needs at least one [[service]]")
    if len(services_raw) > lb.max_services:
        raise _fail("service", f"{len(services_raw)} services",
                    f"more than lb.max_services = {lb.max_services}")
    services = tuple(_service(s, f"service[{i}]") for i, s in enumerate(services_raw))
    seen: dict[tuple[str, int, str], int] = {}
    names: set[str] = set()
    for i, s in enumerate(services):
        k = (s.vip, s.port, s.protocol)
        if k in seen:
            raise _fail(f"service[{i}]", f"{host_port(s.vip, s.port)}/{s.protocol}",
                        f"duplicate of service[{seen[k]}]")
        seen[k] = i
        if s.name in names:
            raise _fail(f"service[{i}].name", s.name, "duplicate service name")
        names.add(s.name)
    _cluster_backends_unique(services)
    _backends_not_vips(services)
    n_backends = sum(len(s.backends) for s in services)
    if n_backends > lb.max_backends:
        raise _fail("service", f"{n_backends} backends",
                    f"more than lb.max_backends = {lb.max_backends}")
    return Config(lb, services)


def _fmt_route(r: RouteConfig | None) -> str:
    if r is None:
        return "none"
    return "{" + ", ".join(f"{f.name} = {_fmt(getattr(r, f.name))}" for f in fields(r)
                           if getattr(r, f.name) is not None) + "}"


def lb_change(running: LBConfig, new: LBConfig) -> str | None:
    """The first [lb] setting that differs, as the config writes it, with
    both values (a reload cannot apply it); None if none does."""
    for f in fields(LBConfig):
        was, now = getattr(running, f.name), getattr(new, f.name)
        if was == now:
            continue
        if f.name == "timeouts_s":
            k = next(k for k in now if now[k] != was.get(k))
            return f"lb.timeouts.{k} = {_fmt(now[k])} (running: {_fmt(was.get(k))})"
        if f.name == "routes":
            i = next(i for i in range(max(len(was), len(now)))
                     if was[i:i + 1] != now[i:i + 1])
            return (f"lb.route[{i}] = {_fmt_route(now[i] if i < len(now) else None)} "
                    f"(running: {_fmt_route(was[i] if i < len(was) else None)})")
        return f"lb.{f.name} = {_fmt(now)} (running: {_fmt(was)})"
    return None


def load(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config file {_fmt(str(path))}: {e.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {_fmt(str(path))}: TOML syntax: {e}") from None
    return parse(raw)
