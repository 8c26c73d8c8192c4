"""A disposable cluster in namespaces: a client, router R1, N natlb nodes,
router R2, nginx backends.  R1, R2 and the nodes run BIRD 2 with the
configs in examples/cluster/ (as shipped: the test is what proves them).
Dual-stack: every link has an IPv4 and an IPv6 address.

    client 198.51.100.2/28 -- R1 .1             2001:db8:1::2/64 -- R1 ::1
    R1 n<i> 198.51.100.(16i+1)/28 -- node i "r1" .(16i+2)
                                                2001:db8:1:i::1/64 -- ::2
    node i "r2" 192.0.2.(16i+2)/28 -- R2 n<i> 192.0.2.(16i+1)
                                                2001:db8:2:i::2/64 -- ::1
    R2 b<k> 203.0.113.(4k+1)/30 -- backend k 203.0.113.(4k+2) (nginx :80)
                                                2001:db8:3:k::1/64 -- ::2

VIPs 192.0.2.100 and 2001:db8::100.  R1 and R2 spread flows over the nodes
with ECMP (BIRD merge paths, L4 multipath hash, both families); BFD
(3 x 50 ms) withdraws a dead node.  Names carry a
per-run prefix; close() stops exactly the processes started here (by pid)
and deletes exactly the namespaces made here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from natlb.control import request
from natlb_testbed.testbed import Hold

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "cluster"
VIP = "192.0.2.100"
VIP6 = "2001:db8::100"
CLIENT = "198.51.100.2"
CLIENT6 = "2001:db8:1::2"

NGINX = """
worker_processes 1;
pid {dir}/nginx-b{k}.pid;
error_log {dir}/nginx-b{k}.err;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  server {{ listen 80 reuseport; listen [::]:80 reuseport; location / {{ return 200 "b{k}\\n"; }} }}
}}
"""

KILL_NODE = """table inet {table} {{
  chain in {{ type filter hook prerouting priority -500; policy drop; }}
  chain out {{ type filter hook output priority -500; policy drop; }}
}}
"""


def backend_addr(k: int) -> str:
    return f"203.0.113.{4 * k + 2}"


def backend_addr6(k: int) -> str:
    return f"2001:db8:3:{k}::2"


def _run(*argv: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, input=input,
                          timeout=30)


@dataclass
class ClusterNet:
    n_nodes: int = 3
    n_backends: int = 3
    prefix: str = field(default_factory=lambda: f"nc{os.getpid() % 100000:05d}"
                                                f"{os.urandom(1).hex()}")
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="natlb-cl-")))
    namespaces: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)
    natlb: dict[int, subprocess.Popen] = field(default_factory=dict)
    bird: dict[str, subprocess.Popen] = field(default_factory=dict)
    cluster_service: bool = True     # False: natlb as a single balancer (for comparison)

    def ns(self, name: str) -> str:
        """Namespace of cl, r1, r2, n<i> or b<k>."""
        return f"{self.prefix}-{name}"

    # -- building ----------------------------------------------------------
    def _netns(self, name: str) -> str:
        ns = self.ns(name)
        _run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _link(self, a: str, if_a: str, addr_a: str, b: str, if_b: str, addr_b: str,
              addr6_a: str | None = None, addr6_b: str | None = None) -> None:
        """A veth between namespaces a and b, each end renamed, addressed
        (IPv6 without duplicate address detection: usable at once) and up."""
        tmp_a, tmp_b = f"{self.prefix}x", f"{self.prefix}y"
        _run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        for tmp, ns, name, addr, addr6 in ((tmp_a, a, if_a, addr_a, addr6_a),
                                           (tmp_b, b, if_b, addr_b, addr6_b)):
            _run("ip", "link", "set", tmp, "netns", self.ns(ns))
            v6 = f"addr add {addr6} dev {name} nodad\n" if addr6 else ""
            _run("ip", "-n", self.ns(ns), "-batch", "-",
                 input=f"link set {tmp} name {name}\naddr add {addr} dev {name}\n{v6}"
                       f"link set dev {name} up\n")

    def _routes(self, name: str, *routes: str) -> None:
        """Static routes in one namespace, each "DST via GW" (the family is
        the destination's: ::/0 for an IPv6 default)."""
        _run("ip", "-n", self.ns(name), "-batch", "-",
             input="".join(f"route add {r}\n" for r in routes))

    def exec(self, name: str, *argv: str, input: str | None = None) -> str:
        return _run("ip", "netns", "exec", self.ns(name), *argv, input=input).stdout

    def sysctl(self, name: str, key: str, value: str) -> None:
        _run("ip", "netns", "exec", self.ns(name), "sysctl", "-q", "-w", f"{key}={value}")

    def build(self) -> ClusterNet:
        try:
            for name in ("cl", "r1", "r2"):
                self._netns(name)
            self._link("cl", "eth0", f"{CLIENT}/28", "r1", "cl", "198.51.100.1/28",
                       f"{CLIENT6}/64", "2001:db8:1::1/64")
            self._routes("cl", "default via 198.51.100.1", "::/0 via 2001:db8:1::1")
            for i in range(1, self.n_nodes + 1):
                self._netns(f"n{i}")
                self._link("r1", f"n{i}", f"198.51.100.{16 * i + 1}/28",
                           f"n{i}", "r1", f"198.51.100.{16 * i + 2}/28",
                           f"2001:db8:1:{i}::1/64", f"2001:db8:1:{i}::2/64")
                self._link("r2", f"n{i}", f"192.0.2.{16 * i + 1}/28",
                           f"n{i}", "r2", f"192.0.2.{16 * i + 2}/28",
                           f"2001:db8:2:{i}::1/64", f"2001:db8:2:{i}::2/64")
                self._routes(f"n{i}", f"default via 198.51.100.{16 * i + 1}",
                             f"203.0.113.0/24 via 192.0.2.{16 * i + 1}",
                             f"::/0 via 2001:db8:1:{i}::1",
                             f"2001:db8:3::/48 via 2001:db8:2:{i}::1")
            for k in range(1, self.n_backends + 1):
                self._netns(f"b{k}")
                self._link("r2", f"b{k}", f"203.0.113.{4 * k + 1}/30",
                           f"b{k}", "eth0", f"{backend_addr(k)}/30",
                           f"2001:db8:3:{k}::1/64", f"{backend_addr6(k)}/64")
                self._routes(f"b{k}", f"default via 203.0.113.{4 * k + 1}",
                             f"::/0 via 2001:db8:3:{k}::1")
            for r in ("r1", "r2"):
                _run("ip", "netns", "exec", self.ns(r), "sysctl", "-q", "-w",
                     "net.ipv4.ip_forward=1", "net.ipv4.fib_multipath_hash_policy=1",
                     "net.ipv4.conf.all.rp_filter=0", "net.ipv6.conf.all.forwarding=1",
                     "net.ipv6.fib_multipath_hash_policy=1")
        except BaseException:
            self.close()
            raise
        return self

    # -- processes ---------------------------------------------------------
    def spawn(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", self.ns(name), *argv], cwd=ROOT, **kw)
        self.procs.append(p)
        return p

    def start_backends(self) -> None:
        for k in range(1, self.n_backends + 1):
            conf = self.workdir / f"nginx-b{k}.conf"
            conf.write_text(NGINX.format(dir=self.workdir, k=k))
            self.spawn(f"b{k}", ["nginx", "-e", str(self.workdir / f"nginx-b{k}.err"), "-c",
                                 str(conf), "-g", "daemon off;"], stderr=subprocess.DEVNULL)

    def bird_socket(self, name: str) -> str:
        return str(self.workdir / f"bird-{name}.ctl")

    def start_bird(self) -> None:
        confs = {"r1": "r1-bird.conf", "r2": "r2-bird.conf"}
        confs.update({f"n{i}": f"node{i}-bird.conf" for i in range(1, self.n_nodes + 1)})
        for name, conf in confs.items():
            log = open(self.workdir / f"bird-{name}.log", "w")  # noqa: SIM115 -- the process's
            self.bird[name] = self.spawn(name, ["bird", "-f", "-c", str(EXAMPLES / conf), "-s",
                                                self.bird_socket(name)],
                                         stdout=log, stderr=subprocess.STDOUT)

    def birdc(self, name: str, *cmd: str) -> str:
        return _run("ip", "netns", "exec", self.ns(name), "birdc", "-s", self.bird_socket(name),
                    *cmd).stdout

    def natlb_config(self, i: int) -> Path:
        """examples/cluster/natlb.toml with this node's control socket."""
        text = (EXAMPLES / "natlb.toml").read_text().replace(
            'control_socket = "/run/natlb.sock"',
            f'control_socket = "{self.workdir}/natlb-n{i}.sock"')
        if not self.cluster_service:
            text = text.replace("cluster = true", "cluster = false")
        path = self.workdir / f"natlb-n{i}.toml"
        path.write_text(text)
        return path

    def natlb_log(self, i: int) -> str:
        try:
            return (self.workdir / f"natlb-n{i}.log").read_text()
        except FileNotFoundError:
            return ""

    def start_natlb(self, i: int, wait: float = 20.0) -> subprocess.Popen:
        log = open(self.workdir / f"natlb-n{i}.log", "w")  # noqa: SIM115 -- the process's
        p = self.spawn(f"n{i}", [sys.executable, "-m", "natlb", "run", "-c",
                                 str(self.natlb_config(i))], stdout=log, stderr=subprocess.STDOUT)
        self.natlb[i] = p
        deadline = time.monotonic() + wait
        while "natlb running" not in self.natlb_log(i):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"natlb on node {i} did not start:\n{self.natlb_log(i)}")
            time.sleep(0.05)
        return p

    def natlb_status(self, i: int) -> dict[str, Any]:
        """Node i's ``natlb status`` (a Unix socket: reachable from any namespace)."""
        reply = request(f"{self.workdir}/natlb-n{i}.sock", {"cmd": "status"})
        status: dict[str, Any] = reply["status"]
        return status

    def natlb_cli(self, i: int, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns(f"n{i}"), sys.executable, "-m",
                               "natlb", *args, "-s", f"{self.workdir}/natlb-n{i}.sock"],
                              capture_output=True, text=True, timeout=30)

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # -- routing state -----------------------------------------------------
    def paths(self, router: str, dst: str, family: int = 4) -> int:
        """How many next hops `router`'s kernel has for `dst` ("default" or a
        prefix) in `family` (4 or 6)."""
        out = _run("ip", "-n", self.ns(router), f"-{family}", "route", "show", dst).stdout
        if not out.strip():
            return 0
        return max(1, out.count("nexthop"))

    def bird_routes(self, router: str, prefix: str) -> set[str]:
        """The BGP sessions BIRD on `router` has a route for `prefix` from
        (BIRD's own view, before the kernel's: `show route`)."""
        return set(re.findall(r"\[(\w+) ", self.birdc(router, "show", "route", prefix)))

    def wait_paths(self, n: int, down: int | None = None, timeout: float = 30.0,
                   family: int = 4) -> None:
        """Until R1 has n paths to the VIP of `family` and R2 `down` (default
        n) default paths of that family."""
        vip = VIP if family == 4 else VIP6
        deadline = time.monotonic() + timeout
        want = (n, n if down is None else down)
        while (got := (self.paths("r1", vip, family),
                       self.paths("r2", "default", family))) != want:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {want} paths, R1 has {got[0]} to {vip}, R2 {got[1]} "
                    f"default:\n{self.birdc('r1', 'show', 'proto')}")
            time.sleep(0.1)

    # -- load and failures -------------------------------------------------
    def load(self, vip: str = VIP, **kw: float) -> subprocess.Popen:
        """Client load on `vip` (natlb_testbed.cluster_load; kw: its options)."""
        args = [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        return self.spawn("cl", [sys.executable, "-m", "natlb_testbed.cluster_load", vip, *args],
                          stdout=subprocess.PIPE, text=True)

    def hold(self, vip: str = VIP) -> Hold:
        """An idle keep-alive connection from the client to `vip`, after
        one request, waiting for a probe (60 s at most): see hosts.hold."""
        p = self.spawn("cl", [sys.executable, "-m", "natlb_testbed.hosts", "hold", "--host", vip,
                              "--port", "80", "--timeout", "60", "--probe"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def lines() -> Iterator[dict]:
            assert p.stdout
            for line in p.stdout:
                if line.strip():
                    yield json.loads(line)

        out = lines()
        return Hold(p, out, next(out)["backend"])

    def freeze_node(self, i: int, resume: bool = False) -> None:
        """Every process of node i stopped (SIGSTOP), as a paused VM: natlb
        and BIRD; the kernel keeps forwarding what needs no process."""
        for p in (self.natlb.get(i), self.bird.get(f"n{i}")):
            if p and p.poll() is None:
                p.send_signal(signal.SIGCONT if resume else signal.SIGSTOP)

    def kill_node(self, i: int) -> None:
        """Hard death: every packet in or out of node i dropped, no carrier
        change, no BGP goodbye.  nft drops what the stack sees; natlb's
        fast path (tc, ahead of netfilter) would still carry established
        flows, so the node's tc filters go too, as they would with its
        power."""
        node = self.ns(f"n{i}")
        _run("ip", "netns", "exec", node, "nft", "-f", "-",
             input=KILL_NODE.format(table=f"{self.prefix}kill"))
        qdiscs = json.loads(_run("tc", "-n", node, "-j", "qdisc", "show").stdout)
        for dev in sorted({q["dev"] for q in qdiscs if q["kind"] == "clsact"}):
            _run("tc", "-n", node, "qdisc", "del", "dev", dev, "clsact")

    # -- teardown ----------------------------------------------------------
    def close(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)
        self.procs.clear()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)
