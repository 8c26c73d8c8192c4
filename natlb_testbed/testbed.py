"""A disposable test network in namespaces: client -- router -- N backends,
dual stack.

    client 198.51.100.2/24 --- 198.51.100.1 [router: natlb, VIP on lo]
                                 203.0.113.(4k+1)/30 --- backend k 203.0.113.(4k+2)
    client 2001:db8:100::2/64 --- 2001:db8:100::1 [router: natlb, VIP6 on lo]
                                 2001:db8:113:k::1/64 --- backend k 2001:db8:113:k::2

Only documentation address ranges are used, and only inside namespaces
created here.  Names carry a per-run prefix; close() kills exactly the
processes it started (by pid), deletes exactly the namespaces it made
and its own work directory (config, control socket, natlb.log).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natlb.config import host_port
from natlb.control import ControlError, request

VIP = "192.0.2.100"
CLIENT_ADDR = "198.51.100.2"
ROUTER_CLIENT_SIDE = "198.51.100.1"
VIP6 = "2001:db8::100"
CLIENT_ADDR6 = "2001:db8:100::2"
ROUTER_CLIENT_SIDE6 = "2001:db8:100::1"


def backend_addr(k: int) -> str:
    return f"203.0.113.{4 * k + 2}"


def backend_addr6(k: int) -> str:
    return f"2001:db8:113:{k}::2"


def backend_gateway6(k: int) -> str:
    return f"2001:db8:113:{k}::1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Testbed:
    n_backends: int = 3
    # Unique per run: pid plus a random byte; fits interface names (<= 15).
    prefix: str = field(default_factory=lambda: f"nl{os.getpid() % 100000:05d}"
                                                f"{os.urandom(1).hex()}")
    procs: list[subprocess.Popen] = field(default_factory=list)
    backends: dict[int, subprocess.Popen] = field(default_factory=dict)
    namespaces: list[str] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="natlb-tb-")))

    @property
    def client(self) -> str:
        return f"{self.prefix}-cl"

    @property
    def router(self) -> str:
        return f"{self.prefix}-lb"

    def backend(self, k: int) -> str:
        return f"{self.prefix}-b{k}"

    def backend_link(self, k: int) -> str:
        """The router-side interface facing backend k."""
        return f"b{k}"

    # -- building ----------------------------------------------------------
    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        # No duplicate address detection on the links that move in: their
        # link-local addresses are usable at once, never "tentative" for the
        # first second (neighbour discovery and state snapshots need them).
        subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw",
                        "net.ipv6.conf.all.accept_dad=0",
                        "net.ipv6.conf.default.accept_dad=0"], check=True)

    def _veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        tmp_a, tmp_b = f"{self.prefix}x", f"{self.prefix}y"
        _ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _ip("link", "set", tmp_a, "netns", ns_a)
        _ip("link", "set", tmp_b, "netns", ns_b)
        _ip("-n", ns_a, "link", "set", tmp_a, "name", name_a)
        _ip("-n", ns_b, "link", "set", tmp_b, "name", name_b)
        _ip("-n", ns_a, "link", "set", name_a, "up")
        _ip("-n", ns_b, "link", "set", name_b, "up")

    def build(self) -> Testbed:
        try:
            self._netns(self.client)
            self._netns(self.router)
            self._veth(self.client, "eth0", self.router, "cl0")
            _ip("-n", self.client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0")
            _ip("-n", self.router, "addr", "add", f"{ROUTER_CLIENT_SIDE}/24", "dev", "cl0")
            _ip("-n", self.client, "route", "add", "default", "via", ROUTER_CLIENT_SIDE)
            # nodad: usable at once, not after a second of duplicate detection.
            _ip("-n", self.client, "addr", "add", f"{CLIENT_ADDR6}/64", "dev", "eth0", "nodad")
            _ip("-n", self.router, "addr", "add", f"{ROUTER_CLIENT_SIDE6}/64", "dev", "cl0",
                "nodad")
            _ip("-n", self.client, "-6", "route", "add", "default", "via", ROUTER_CLIENT_SIDE6)
            for k in range(1, self.n_backends + 1):
                ns = self.backend(k)
                self._netns(ns)
                self._veth(ns, "eth0", self.router, self.backend_link(k))
                gw = f"203.0.113.{4 * k + 1}"
                _ip("-n", ns, "addr", "add", f"{backend_addr(k)}/30", "dev", "eth0")
                _ip("-n", self.router, "addr", "add", f"{gw}/30", "dev", self.backend_link(k))
                _ip("-n", ns, "route", "add", "default", "via", gw)
                # A failed link (fail_backend "link") must not take the address with it.
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                                "net.ipv6.conf.eth0.keep_addr_on_down=1"], check=True)
                _ip("-n", ns, "addr", "add", f"{backend_addr6(k)}/64", "dev", "eth0", "nodad")
                _ip("-n", self.router, "addr", "add", f"{backend_gateway6(k)}/64", "dev",
                    self.backend_link(k), "nodad")
                _ip("-n", ns, "-6", "route", "add", "default", "via", backend_gateway6(k))
        except BaseException:
            self.close()
            raise
        return self

    # -- processes ---------------------------------------------------------
    def spawn(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.procs.append(p)
        return p

    def python(self, ns: str, module: str, *args: str, **kw) -> subprocess.Popen:
        return self.spawn(ns, [sys.executable, "-m", module, *args], **kw)

    def start_backend(self, k: int) -> subprocess.Popen:
        p = self.python(self.backend(k), "natlb_testbed.hosts", "serve", "--name", f"b{k}",
                        stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "ready":
            raise RuntimeError(f"backend b{k} did not start")
        return p

    def start_backends(self) -> dict[int, subprocess.Popen]:
        self.backends = {k: self.start_backend(k) for k in range(1, self.n_backends + 1)}
        return self.backends

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def write_config(self, text: str) -> Path:
        path = self.workdir / "natlb.toml"
        path.write_text(text)
        return path

    @property
    def control_socket(self) -> str:
        return str(self.workdir / "natlb.sock")

    def start_natlb(self, config: Path, wait: float = 20.0, module: str = "natlb",
                    env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start natlb (or a test wrapper module taking natlb's arguments,
        with env added); return once its control socket answers (the table
        is installed by then)."""
        log = open(self.workdir / "natlb.log", "w")  # noqa: SIM115 -- lives with the process
        p = self.python(self.router, module, "run", "-c", str(config),
                        stdout=log, stderr=subprocess.STDOUT,
                        env={**os.environ, **env} if env else None)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise RuntimeError(f"natlb exited {p.returncode}:\n{self.natlb_log()}")
            try:
                self.status()
                return p
            except ControlError:
                time.sleep(0.05)
        raise RuntimeError(f"natlb did not start:\n{self.natlb_log()}")

    def status(self) -> dict[str, Any]:
        """natlb's state as the control socket serves it (``status --json``)."""
        return request(self.control_socket, {"cmd": "status"})["status"]

    def backend_state(self, key: str, service: str | None = None) -> dict[str, Any]:
        """One backend ("addr:port") from status, in `service` or any."""
        for s in self.status()["services"]:
            for b in s["backends"]:
                if host_port(b["address"], b["port"]) == key and service in (None, s["name"]):
                    return b
        raise KeyError(key)

    def wait_health(self, key: str, health: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            b = self.backend_state(key)
            if b["health"] == health or time.monotonic() > deadline:
                assert b["health"] == health, b
                return b
            time.sleep(0.02)

    def watch(self) -> StateWatch:
        return StateWatch(self)

    def natlb_log(self) -> str:
        try:
            return (self.workdir / "natlb.log").read_text()
        except FileNotFoundError:
            return ""

    def client_run(self, *args: str, timeout: float = 120) -> list[dict]:
        """Run a client generator to completion; its JSON lines."""
        p = self.python(self.client, "natlb_testbed.hosts", *args, stdout=subprocess.PIPE,
                        text=True)
        out, _ = p.communicate(timeout=timeout)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def client_stream(self, *args: str) -> tuple[subprocess.Popen, Iterator[dict]]:
        p = self.python(self.client, "natlb_testbed.hosts", *args, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)

        def lines() -> Iterator[dict]:
            assert p.stdout
            for line in p.stdout:
                if line.strip():
                    yield json.loads(line)

        return p, lines()

    def hold(self, host: str, port: int = 80) -> Hold:
        """An idle keep-alive connection that waits for a probe, not a clock
        (60 s at most): see hosts.hold."""
        p, lines = self.client_stream("hold", "--host", host, "--port", str(port),
                                      "--timeout", "60", "--probe")
        return Hold(p, lines, next(lines)["backend"])

    def hold_each_backend(self, host: str, want: set[str], tries: int = 12) -> list[Hold]:
        """Holds until every backend in `want` has one: a backend briefly
        suspect on a loaded machine is skipped by rr, so open another."""
        holds: list[Hold] = []
        for _ in range(tries):
            holds.append(self.hold(host))
            if {h.backend for h in holds} >= want:
                return holds
        raise AssertionError(f"no connection reached {want}: {[h.backend for h in holds]}")

    def wait_state(self, key: str, pred: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll a backend's status until pred(backend) holds; generous by default:
        a loaded machine is slow, and the outcome is what is asserted."""
        deadline = time.monotonic() + timeout
        while True:
            b = self.backend_state(key)
            if pred(b):
                return b
            assert time.monotonic() < deadline, f"{key}: never {what}: {b}"
            time.sleep(0.05)

    def router_cmd(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.router, *argv],
                              capture_output=True, text=True)

    def backend_cmd(self, k: int, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.backend(k), *argv],
                              capture_output=True, text=True)

    def client_cmd(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.client, *argv],
                              capture_output=True, text=True)

    # -- failures ----------------------------------------------------------
    def fail_backend(self, k: int, kind: str) -> None:
        """kill: the server process dies (connections refused);
        link: the backend's interface goes down (silence);
        blackhole: a drop rule in the backend swallows everything."""
        if kind == "kill":
            self.stop(self.backends[k], signal.SIGKILL)
        elif kind == "link":
            _ip("-n", self.backend(k), "link", "set", "eth0", "down")
        elif kind == "blackhole":
            subprocess.run(["ip", "netns", "exec", self.backend(k), "nft", "-f", "-"], check=True,
                           input="table ip blackhole {\n chain drop_all {\n"
                                 "  type filter hook input priority 0; policy drop;\n }\n}\n",
                           text=True)
        else:
            raise ValueError(kind)

    def repair_backend(self, k: int, kind: str) -> None:
        if kind == "kill":
            self.backends[k] = self.start_backend(k)
        elif kind == "link":
            _ip("-n", self.backend(k), "link", "set", "eth0", "up")
            _ip("-n", self.backend(k), "route", "replace", "default", "via",
                f"203.0.113.{4 * k + 1}")
            _ip("-n", self.backend(k), "-6", "route", "replace", "default", "via",
                backend_gateway6(k))
        elif kind == "blackhole":
            subprocess.run(["ip", "netns", "exec", self.backend(k), "nft", "delete", "table",
                            "ip", "blackhole"], check=True)

    # -- teardown ----------------------------------------------------------
    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Testbed:
        return self.build()

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Hold:
    """A `hold --probe` client: its process, its JSON lines, its backend."""

    proc: subprocess.Popen
    lines: Iterator[dict]
    backend: str

    def probe(self) -> dict:
        """Ask again on the connection now; how it went ("answered" and by
        which backend, or "reset" / "closed").  The client then exits."""
        assert self.proc.stdin
        self.proc.stdin.write("probe\n")
        self.proc.stdin.flush()
        return self.end()

    def end(self) -> dict:
        """The client's last line (it ends on a probe, a reset or its timeout)."""
        r = next(self.lines)
        self.proc.wait(timeout=30)
        return r

    def survived(self) -> bool:
        r = self.probe()
        return r["outcome"] == "answered" and r["backend"] == self.backend


@dataclass(frozen=True)
class Change:
    at: float          # natlb's own timestamp of the change (status "since")
    service: str
    backend: str       # "addr:port"
    health: str
    detail: str        # what natlb gave as the reason (status "last_check")


class StateWatch:
    """Follows natlb's backend states over the control socket from a thread
    and keeps every change, stamped with natlb's own time of the change:
    what tests and the demo assert on, instead of natlb's log lines."""

    def __init__(self, tb: Testbed, interval: float = 0.01) -> None:
        self.tb = tb
        self.interval = interval
        self.changes: list[Change] = []
        self._last: dict[tuple[str, str], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        for s in self.tb.status()["services"]:
            for b in s["backends"]:
                k = (s["name"], host_port(b["address"], b["port"]))
                now = (b["health"], b["since"])
                if self._last.get(k) != now:
                    if k in self._last:
                        self.changes.append(Change(b["since"], *k, b["health"], b["last_check"]))
                    self._last[k] = now

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._poll()
            except (ControlError, OSError, ValueError):
                pass  # natlb stopping or restarting
            self._stop.wait(self.interval)

    def saw(self, backend: str, health: str) -> list[Change]:
        return [c for c in self.changes if c.backend == backend and c.health == health]

    def __enter__(self) -> StateWatch:
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self._poll()
        except (ControlError, OSError, ValueError):
            pass


def family_addresses(family: int) -> tuple[str, Callable[[int], str]]:
    """The testbed's VIP and backend-address function of an address family."""
    return (VIP6, backend_addr6) if family == 6 else (VIP, backend_addr)


def basic_config(tb: Testbed, scheduler: str = "rr", health: str = "tcp",
                 interval_ms: int = 100, extra_services: str = "", lb_extra: str = "",
                 service_extra: str = "", backends: list[int] | None = None,
                 timeout_ms: int = 1000, syn_timeout_ms: int = 1000, family: int = 4,
                 name: str = "web") -> str:
    """natlb config: service "web" (TCP 80 on the VIP) over the testbed's
    backends (or the given ones), plus whatever the extras add.

    Timeouts are generous on purpose: on a loaded 2-core machine one check
    or one SYN-ACK can take hundreds of ms, and with fall = 1 a single slow
    check of a healthy backend takes it down and resets its flows.  Tests
    that are about fast detection ask for short ones."""
    vip, addr = family_addresses(family)
    blocks = "\n".join(
        f'[[service.backend]]\naddress = "{addr(k)}"\nport = 80\n'
        for k in (backends or range(1, tb.n_backends + 1)))
    return f"""
[lb]
control_socket = "{tb.control_socket}"
syn_timeout_ms = {syn_timeout_ms}
{lb_extra}

[[service]]
name = "{name}"
vip = "{vip}"
port = 80
protocol = "tcp"
scheduler = "{scheduler}"
[service.health]
kind = "{health}"
interval_ms = {interval_ms}
timeout_ms = {timeout_ms}
rise = 2
fall = 1
{service_extra}
{blocks}
{extra_services}
"""


def web_service(name: str, backends: list[int], family: int = 4) -> str:
    """A [[service]] block: TCP port 80 on the VIP (of the family), tcp checks."""
    vip, addr = family_addresses(family)
    blocks = "\n".join(f'[[service.backend]]\naddress = "{addr(k)}"' for k in backends)
    return f"""
[[service]]
name = "{name}"
vip = "{vip}"
port = 80
protocol = "tcp"
[service.health]
kind = "tcp"
interval_ms = 100
timeout_ms = 1000
{blocks}
"""


def unchecked_service(name: str, vip: str) -> str:
    """A [[service]] block on a VIP of its own (TCP port 80), no health
    checks, one backend (b1): a service a test adds and takes away."""
    return f"""
[[service]]
name = "{name}"
vip = "{vip}"
port = 80
[service.health]
kind = "none"
[[service.backend]]
address = "{backend_addr(1)}"
"""


def udp_service(name: str, backends: list[int], interval_ms: int = 200,
                timeout_ms: int = 1000, family: int = 4) -> str:
    """A [[service]] block: UDP port 53 on the VIP, udp health checks.  The
    timeout is generous for the reason basic_config's is: one slow answer on a
    loaded machine took a backend down for a moment and broke exact spreads."""
    vip, addr = family_addresses(family)
    blocks = "\n".join(f'[[service.backend]]\naddress = "{addr(k)}"' for k in backends)
    return f"""
[[service]]
name = "{name}"
vip = "{vip}"
port = 53
protocol = "udp"
scheduler = "rr"
[service.health]
kind = "udp"
interval_ms = {interval_ms}
timeout_ms = {timeout_ms}
{blocks}
"""
