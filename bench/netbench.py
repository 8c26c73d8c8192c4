"""End-to-end benchmark: natlb against the kernel's DNAT and HAProxy (nginx
stream for UDP), measured in the same run on the same namespaces.

    client --- router --- 3 backends (nginx, nsd, iperf3)

The router runs one of: natlb (every packet queued), natlb with the kernel
fast path for established TCP flows (lb.fastpath), an nftables DNAT table,
a stateless nftables rewrite (notrack; a jhash of the client's address and
port picks the backend; replies get the VIP back by their source; no queue,
no conntrack), HAProxy (TCP mode, one thread) plus nginx stream (one worker)
for UDP, and nfqlb (Nordix nfqueue-loadbalancer, `nfqlb lb`) SYN-only: only a
flow's first packet is queued to it, it marks a backend, nftables DNATs by the
mark and conntrack carries the rest (bench/nfqlb_path.py).  nfqlb is no Debian
package: its path runs where a binary is found (--nfqlb PATH, `nfqlb` on PATH or
/opt/nfqlb/bin/nfqlb) and is otherwise left out with one printed line.  Load
comes from wrk, dnsperf and iperf3 in the client namespace.

Interleaved: each repetition runs every test (--tests) on every path, the
path started afresh for each test, so that two paths' figures for a test
are measured seconds apart; the paths' order changes with each repetition
so that each path runs at each place and after each other path equally
often (balanced_orders).
Printed and written (Markdown, JSON, a PNG chart): each figure's median
over the repetitions with its min-max, and each pair's ratio as the median
of the repetitions' own ratios with their min-max.  The 1-minute load
average is recorded at each test's start and reported: the machine is
shared.

``--family 6`` runs the same load over IPv6 (the testbed is dual stack)
against the kernel's ip6 DNAT and the stateless ip6 rewrite; HAProxy/nginx
stream are IPv4 only here.
``--family 4,6`` measures both families in every repetition, interleaved,
so that their ratios to the kernel compare under the same load.

Does natlb's per-packet cost grow with its configuration?  Each repetition
also measures new conn/s and keep-alive req/s through natlb with 5 services
and with 250 (the extra ones on ports of their own over the same backends),
in alternating order (--services).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import nfqlb_path
from natlb_testbed.testbed import VIP, Testbed, backend_addr, backend_addr6, family_addresses

N_BACKENDS = 3
PATHS = ("natlb", "natlb-fast", "natlb-fast-queued", "kernel", "stateless", "haproxy",
         "nfqlb")
NAMES = {"natlb": "natlb", "natlb-fast": "natlb fastpath = true",
         "natlb-fast-queued": "natlb fastpath = true, fastpath_decide = false (first packets "
                              "queued)",
         "kernel": "kernel nft DNAT",
         "stateless": "stateless nft rewrite (notrack, jhash)",
         "haproxy": "HAProxy TCP 1 thread (UDP: nginx stream 1 worker)",
         "nfqlb": "nfqlb lb, SYN-only (first packet queued, conntrack DNAT by its mark)"}
# Each repetition runs these tests in this order; for each test every path
# is started afresh, in an order that changes with the repetition (balanced_orders).
TESTS = ("conn", "req", "dns", "bulk", "streams", "latency")
# Every figure a test gives, as the tables show it.
FIGURES = {
    "conn_s": "new conn/s",
    "req_s": "keep-alive req/s",
    "dns_qps": "DNS q/s (UDP)",
    "bulk_mbit": "bulk Mbit/s, 1 stream",
    "streams_mbit": "bulk Mbit/s, {streams} streams",
    "p50_us": "1-conn p50 us",
    "p99_us": "1-conn p99 us",
    "p999_us": "1-conn p99.9 us",
    "cpu_us_per_conn": "busy CPU per new connection, us",
    "cpu_us_per_req": "busy CPU per keep-alive request, us",
    "bulk_cpu_ms_per_gb": "busy CPU per GB, 1 stream, ms",
    "streams_cpu_ms_per_gb": "busy CPU per GB, {streams} streams, ms",
    "bulk_retrans": "bulk retransmitted segments, 1 stream",
    "streams_retrans": "bulk retransmitted segments, {streams} streams",
    "packets_per_conn": "packets queued per new connection",
    "packets_per_req": "packets queued per keep-alive request",
    "packets_per_bulk": "packets queued in the bulk test, 1 stream",
    "packets_per_streams": "packets queued in the bulk test, {streams} streams",
    "natlb_us_per_packet": "natlb's own CPU per queued packet, us",
    "natlb_wakeups_per_s": "natlb's thread wakeups per second, latency test",
    "natlb_cpu_ms_per_s": "natlb's own CPU, latency test, ms per second",
}
CHART = ("conn_s", "req_s", "dns_qps", "bulk_mbit", "streams_mbit", "p50_us", "p99_us")

SETTLE_S = 1.0        # after a path starts, before its test
BASE_SERVICES = 3     # NATLB_CONFIG's own


def extra_services(n: int, backends: list[str]) -> str:
    out = []
    for i in range(n):
        out.append(f'[[service]]\nname = "x{i}"\nvip = "{VIP}"\nport = {20000 + i}\n'
                   '[service.health]\nkind = "none"\n')
        out += [f'[[service.backend]]\naddress = "{a}"\nport = 80\n' for a in backends]
    return "\n".join(out)


NGINX_BACKEND = """
worker_processes 1;
pid {dir}/nginx-b{k}.pid;
error_log {dir}/nginx-b{k}.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  server {{ listen 80 reuseport backlog=4096; listen [::]:80 reuseport backlog=4096;
           location / {{ return 200 "b{k}\\n"; }} }}
}}
"""

NSD_CONF = """
server:
  ip-address: 0.0.0.0
  ip-address: ::
  port: 53
  username: ""
  chroot: ""
  zonesdir: "{dir}"
  pidfile: "{dir}/nsd-b{k}.pid"
  database: ""
  zonelistfile: "{dir}/nsd-b{k}.zl"
  xfrdfile: "{dir}/nsd-b{k}.xfrd"
  server-count: 1
  verbosity: 0
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: bench.test
  zonefile: bench.test.zone
"""

ZONE = """$ORIGIN bench.test.
$TTL 300
@ IN SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 300
@ IN NS ns.bench.test.
ns IN A 203.0.113.2
www IN A 203.0.113.3
"""

HAPROXY = """
global
  nbthread 1
  maxconn 8000
  pidfile {dir}/haproxy.pid
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend web
  bind {vip}:80
  default_backend web
backend web
  balance roundrobin
{web_servers}
frontend bulk
  bind {vip}:5201
  default_backend bulk
backend bulk
  balance source
  server b1 {b1}:5201
"""

NGINX_STREAM = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid {dir}/nginx-lb.pid;
error_log {dir}/nginx-lb.err;
events {{ worker_connections 4096; }}
stream {{
  upstream dns {{ {dns_servers} }}
  server {{ listen {vip}:53 udp reuseport; proxy_pass dns; proxy_responses 1;
           proxy_timeout 2s; }}
}}
"""

KERNEL_NAT = """
table {nft} natlb_bench_dnat {{
  chain pre {{
    type nat hook prerouting priority dstnat;
    {nft} daddr {vip} tcp dport 80 dnat to numgen inc mod 3 map {{ 0 : {b1}, 1 : {b2}, 2 : {b3} }}
    {nft} daddr {vip} udp dport 53 dnat to numgen inc mod 3 map {{ 0 : {b1}, 1 : {b2}, 2 : {b3} }}
    {nft} daddr {vip} tcp dport 5201 dnat to {b1}
  }}
}}
"""

# No conntrack, no queue: requests get a backend's address from a hash of the
# client's address and port (so a flow keeps its backend), replies get the
# VIP back by their source.  The reply rewrite waits for the forward hook: in
# prerouting the VIP as a source would meet the route lookup's source check.
STATELESS = """
table {nft} natlb_bench_stateless {{
  chain pre {{
    type filter hook prerouting priority raw;
    {nft} daddr {vip} notrack
    {nft} daddr {vip} tcp dport 80 {nft} daddr set jhash {nft} saddr . tcp sport mod 3 map {pick}
    {nft} daddr {vip} udp dport 53 {nft} daddr set jhash {nft} saddr . udp sport mod 3 map {pick}
    {nft} daddr {vip} tcp dport 5201 {nft} daddr set {b1}
    {nft} saddr {{ {b1}, {b2}, {b3} }} tcp sport {{ 80, 5201 }} notrack
    {nft} saddr {{ {b1}, {b2}, {b3} }} udp sport 53 notrack
  }}
  chain replies {{
    type filter hook forward priority 0;
    {nft} saddr {{ {b1}, {b2}, {b3} }} tcp sport {{ 80, 5201 }} {nft} saddr set {vip}
    {nft} saddr {{ {b1}, {b2}, {b3} }} udp sport 53 {nft} saddr set {vip}
  }}
}}
"""

NATLB_CONFIG = """
[lb]
control_socket = "{sock}"
workers = {workers}
gso = {gso}
poll_us = {poll_us}
rewrite = "{rewrite}"
fastpath = {fastpath}
{decide}
[[service]]
name = "web"
vip = "{vip}"
port = 80
scheduler = "rr"
[service.health]
kind = "tcp"
interval_ms = 1000
{web}
[[service]]
name = "dns"
vip = "{vip}"
port = 53
protocol = "udp"
scheduler = "rr"
[service.health]
kind = "none"
{web}
[[service]]
name = "bulk"
vip = "{vip}"
port = 5201
scheduler = "sh"
[service.health]
kind = "none"
[[service.backend]]
address = "{b1}"
"""


class Bench:
    def __init__(self, seconds: int, workers: int, gso: bool, poll_us: int = 0,
                 rewrite: str = "copy", family: int = 4, streams: int = 4,
                 latency_seconds: int = 0, nfqlb: str | None = None) -> None:
        self.poll_us = poll_us
        self.nfqlb = nfqlb                # the nfqlb binary, when its path is measured
        self.nfqlb_shm: list[str] = []    # its shared memory while its path runs
        self.nfqlb_queue = ""             # its iptables queue rules: "" none, else what
        #                                   to do with iptables' mangle table at stop
        self.streams = streams
        self.latency_seconds = latency_seconds or seconds
        self.natlb: subprocess.Popen | None = None    # while a natlb path runs
        self.rewrite = rewrite
        self.seconds = seconds
        self.workers = workers
        self.gso = gso
        self.tb = Testbed(n_backends=N_BACKENDS)
        self.dir = self.tb.workdir
        self.services = BASE_SERVICES    # natlb's config: this many services in all
        self.use_family(family)

    def use_family(self, family: int) -> None:
        """Which of the dual-stack testbed's addresses the next paths use."""
        self.family = family
        self.vip, addr = family_addresses(family)
        self.addrs = {f"b{k}": addr(k) for k in range(1, N_BACKENDS + 1)}
        # As a URL takes it.
        self.host = f"[{self.vip}]" if family == 6 else self.vip

    # -- environment -------------------------------------------------------
    def setup(self) -> None:
        self.tb.build()
        # wrk closes a "Connection: close" connection as soon as the response
        # is in, often before the server's FIN; the client then holds the
        # port in TIME_WAIT for 60 s, and new conn/s collapses to what the
        # port range allows (about 470/s), for whichever path runs next.
        # How early the FIN comes differs between the paths (a queued FIN
        # behind kernel-carried data), so without reuse the figure measured
        # the client's port space, not the balancer.
        subprocess.run(["ip", "netns", "exec", self.tb.client, "sysctl", "-qw",
                        "net.ipv4.tcp_tw_reuse=1",
                        "net.ipv4.ip_local_port_range=1024 65535"], check=True)
        d = self.dir
        (d / "bench.test.zone").write_text(ZONE)
        (d / "queries").write_text("www.bench.test A\n" * 10)
        for k in range(1, N_BACKENDS + 1):
            ns = self.tb.backend(k)
            (d / f"nginx-b{k}.conf").write_text(NGINX_BACKEND.format(dir=d, k=k))
            self.tb.spawn(ns, ["nginx", "-c", str(d / f"nginx-b{k}.conf"), "-g",
                               "daemon off;"], stderr=subprocess.DEVNULL)
            (d / f"nsd-b{k}.conf").write_text(NSD_CONF.format(dir=d, k=k))
            self.tb.spawn(ns, ["nsd", "-d", "-c", str(d / f"nsd-b{k}.conf")],
                          stderr=subprocess.DEVNULL)
            self.tb.spawn(ns, ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL)
        time.sleep(1.0)
        self._check_backends()

    def _check_backends(self) -> None:
        """Ask each backend's nginx directly, from the router (no NAT yet),
        over both families."""
        for k, addr in [(k, a(k)) for k in range(1, N_BACKENDS + 1)
                        for a in (backend_addr, backend_addr6)]:
            code = (f"import http.client as h;c=h.HTTPConnection('{addr}',80,timeout=2);"
                    "c.request('GET','/');print(c.getresponse().read().decode().strip())")
            for _ in range(20):
                got = self.router([sys.executable, "-c", code]).stdout.strip()
                if got == f"b{k}":
                    break
                time.sleep(0.25)
            else:
                raise RuntimeError(f"backend b{k} nginx is not answering on {addr}")

    def client(self, argv: list[str], check: bool = True,
               timeout: float | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.tb.client, *argv],
                              capture_output=True, text=True, check=check,
                              timeout=timeout or self.seconds + 30)

    def router(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.tb.router, *argv],
                              capture_output=True, text=True, **kw)

    # -- the three paths ---------------------------------------------------
    def start(self, path: str) -> list[subprocess.Popen]:
        fmt = dict(dir=self.dir, vip=self.vip, nft="ip6" if self.family == 6 else "ip",
                   **self.addrs)
        if path.startswith("natlb"):
            web = "\n".join(f'[[service.backend]]\naddress = "{a}"' for a in self.addrs.values())
            text = NATLB_CONFIG.format(
                sock=self.tb.control_socket, workers=self.workers, poll_us=self.poll_us,
                rewrite=self.rewrite,
                fastpath="true" if path.startswith("natlb-fast") else "false",
                decide="fastpath_decide = false" if path == "natlb-fast-queued" else "",
                gso="true" if self.gso else "false", web=web, **fmt)
            text += extra_services(self.services - BASE_SERVICES, list(self.addrs.values()))
            cfg = self.tb.write_config(text)
            self.natlb = self.tb.start_natlb(cfg)
            return [self.natlb]
        self.router(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1" if self.family == 6
                     else "net.ipv4.ip_forward=1"])
        if path == "stateless":
            # Forwarded, never local: a reply whose source becomes the VIP
            # must not look like one of the router's own addresses.
            pick = "{ " + ", ".join(f"{i} : {a}" for i, a in enumerate(self.addrs.values())) + " }"
            (self.dir / "stateless.nft").write_text(STATELESS.format(pick=pick, **fmt))
            self.router(["nft", "-f", str(self.dir / "stateless.nft")], check=True)
            self._check_stateless()
            return []
        if path == "nfqlb":
            return self._start_nfqlb(fmt)
        if self.family == 6:
            self.router(["ip", "addr", "add", f"{self.vip}/128", "dev", "lo", "nodad"])
        else:
            self.router(["ip", "addr", "add", f"{VIP}/32", "dev", "lo"])
        if path == "kernel":
            (self.dir / "dnat.nft").write_text(KERNEL_NAT.format(**fmt))
            self.router(["nft", "-f", str(self.dir / "dnat.nft")], check=True)
            return []
        servers = "\n".join(f"  server {n} {a}:80" for n, a in self.addrs.items())
        (self.dir / "haproxy.cfg").write_text(HAPROXY.format(web_servers=servers, **fmt))
        dns = " ".join(f"server {a}:53;" for a in self.addrs.values())
        (self.dir / "nginx-lb.conf").write_text(NGINX_STREAM.format(dns_servers=dns, **fmt))
        procs = [
            self.tb.spawn(self.tb.router, ["haproxy", "-db", "-f", str(self.dir / "haproxy.cfg")],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            self.tb.spawn(self.tb.router, ["nginx", "-c", str(self.dir / "nginx-lb.conf"), "-g",
                                           "daemon off;"], stderr=subprocess.DEVNULL),
        ]
        time.sleep(0.5)
        return procs

    def stop(self, path: str, procs: list[subprocess.Popen]) -> None:
        self.natlb = None
        for p in procs:
            self.tb.stop(p)
            self.tb.procs.remove(p)
        table = {"kernel": "natlb_bench_dnat", "stateless": "natlb_bench_stateless",
                 "nfqlb": nfqlb_path.TABLE}.get(path)
        if table:
            self.router(["nft", "delete", "table", "ip6" if self.family == 6 else "ip", table])
        if path in ("kernel", "haproxy"):
            prefix = 128 if self.family == 6 else 32
            self.router(["ip", "addr", "del", f"{self.vip}/{prefix}", "dev", "lo"])
        if self.nfqlb_queue:
            for cmd in nfqlb_path.queue_teardown(self.family, self.vip,
                                                 self.nfqlb_queue == "drop-table"):
                self.router(cmd)
            self.nfqlb_queue = ""
        nfqlb_path.remove_shm(self.nfqlb_shm)
        self.nfqlb_shm = []

    def _start_nfqlb(self, fmt: dict[str, str]) -> list[subprocess.Popen]:
        """Two `nfqlb lb`s (web over all backends, bulk to b1), each bound to its
        queue before the nft table sends it anything, then the sanity check."""
        assert self.nfqlb
        names = nfqlb_path.shm_names(self.tb.prefix)
        self.nfqlb_shm = list(names.values())
        marks = {"web": [nfqlb_path.mark(k) for k in range(1, N_BACKENDS + 1)],
                 "bulk": [nfqlb_path.mark(1)]}
        procs: list[subprocess.Popen] = []
        try:
            for svc, svc_marks in marks.items():
                shm = f"--shm={names[f'target-{svc}']}"
                self.router([self.nfqlb, "init", shm], check=True)
                self.router([self.nfqlb, "activate", shm, *map(str, svc_marks)], check=True)
                log = self.dir / f"nfqlb-{svc}.log"
                with open(log, "w") as f:
                    procs.append(self.tb.spawn(
                        self.tb.router, nfqlb_path.lb_argv(self.nfqlb, svc, names),
                        stdout=f, stderr=subprocess.STDOUT))
                nfqlb_path.wait_ready(procs[-1], log)
            (self.dir / "nfqlb.nft").write_text(
                nfqlb_path.ruleset(fmt["nft"], self.vip, self.addrs))
            self.router(["nft", "-f", str(self.dir / "nfqlb.nft")], check=True)
            had = self.router(["nft", "list", "table", *nfqlb_path.mangle_table(self.family)])
            self.nfqlb_queue = "drop-table" if had.returncode else "keep-table"
            for cmd in nfqlb_path.queue_setup(self.family, self.vip):
                self.router(cmd, check=True)
            probe = json.loads(self.client([sys.executable, "-c", nfqlb_path.PROBE,
                                            self.vip]).stdout)
            nfqlb_path.check(probe, self.nfqlb_queued(), list(self.addrs))
        except BaseException:
            self.stop("nfqlb", procs)
            raise
        return procs

    def nfqlb_queued(self) -> dict[str, int]:
        """Packets the nfqlb path's queue rules queued so far, per rule."""
        return nfqlb_path.queued(self.router(nfqlb_path.queue_listing(self.family),
                                             check=True).stdout)

    def _check_stateless(self) -> None:
        """Before measuring: every backend answers through the rewrite (a
        hash that sent all to one, or replies that never got the VIP back,
        would make fast figures of a broken balancer)."""
        seen: set[str] = set()
        code = (f"import http.client as h\nfor _ in range(30):\n"
                f" c=h.HTTPConnection('{self.vip}',80,timeout=2);c.request('GET','/')\n"
                " print(c.getresponse().read().decode().strip());c.close()")
        seen.update(self.client([sys.executable, "-c", code]).stdout.split())
        if seen != set(self.addrs):
            raise RuntimeError(f"stateless rewrite: 30 requests reached {sorted(seen)}, "
                               f"not all of {sorted(self.addrs)}")

    # -- measurements ------------------------------------------------------
    # Each returns its figures; natlb's own counters (CPU, queued packets)
    # when the path is natlb's.
    def wrk(self, *extra: str, conns: int = 32, seconds: int | None = None) -> str:
        return self.client(["wrk", "-t1", f"-c{conns}", f"-d{seconds or self.seconds}s",
                            "--latency", *extra, f"http://{self.host}/"],
                           timeout=(seconds or self.seconds) + 30).stdout

    @staticmethod
    def _rate(out: str) -> float:
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                           out)
        if errors and sum(map(int, errors.groups())) > 0:
            print(f"    wrk socket errors: {errors.group(0)}", flush=True)
        return float(m.group(1)) if m else 0.0

    @staticmethod
    def _requests(out: str) -> int:
        m = re.search(r"(\d+) requests in", out)
        return int(m.group(1)) if m else 1

    def dns(self) -> float:
        out = self.client(["dnsperf", "-s", self.vip, "-d", str(self.dir / "queries"), "-l",
                           str(self.seconds), "-c", "16", "-q", "256", "-t", "2"],
                          check=False).stdout
        m = re.search(r"Queries per second:\s+([\d.]+)", out)
        lost = re.search(r"Queries lost:\s+(\d+)", out)
        if lost and int(lost.group(1)):
            print(f"    dnsperf lost {lost.group(1)} queries", flush=True)
        return float(m.group(1)) if m else 0.0

    def bulk(self, streams: int) -> dict[str, float]:
        """iperf3 through the VIP (one backend), `streams` TCP flows; the
        sender's retransmissions too (on these veths they are reordering,
        not loss: the data of one flow is sent from both CPUs)."""
        busy0 = self.system_busy()
        out = self.client(["iperf3", "-c", self.vip, "-p", "5201", "-t", str(self.seconds),
                           "-P", str(streams), "-J"], check=False).stdout
        busy = self.system_busy() - busy0
        try:
            end = json.loads(out)["end"]
            mbit = end["sum_received"]["bits_per_second"] / 1e6
            gbytes = end["sum_received"]["bytes"] / 1e9
            retrans = float(end["sum_sent"].get("retransmits", 0))
        except (ValueError, KeyError):
            return {"mbit": 0.0, "cpu_ms_per_gb": 0.0, "retrans": 0.0}
        return {"mbit": mbit, "cpu_ms_per_gb": busy / gbytes * 1e3 if gbytes else 0.0,
                "retrans": retrans}

    def latency(self) -> dict[str, float]:
        """One connection, one request at a time, for latency_seconds:
        wrk's own histogram, read exactly (its --latency text rounds)."""
        script = self.dir / "latency.lua"
        script.write_text(LATENCY_LUA)
        out = self.wrk("-s", str(script), conns=1, seconds=self.latency_seconds)
        m = re.search(r"^LATENCY (.*)$", out, re.M)
        if not m:
            return {k: 0.0 for k in ("p50_us", "p99_us", "p999_us", "latency_samples")}
        got = dict(kv.split("=") for kv in m.group(1).split())
        return {"p50_us": float(got["p50"]), "p99_us": float(got["p99"]),
                "p999_us": float(got["p999"]), "latency_samples": float(got["n"])}

    @staticmethod
    def system_busy() -> float:
        """Busy CPU seconds of the whole machine (all namespaces share it)."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return (sum(v[:8]) - idle) / 100.0

    def natlb_cpu(self) -> tuple[float, int]:
        """CPU seconds used by this bench's natlb and the packets it queued.
        By its pid (`ip netns exec` execs natlb): other natlbs may run on
        the machine, in other namespaces."""
        assert self.natlb is not None
        with open(f"/proc/{self.natlb.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        return ticks / 100.0, int(self.tb.status()["queued_packets"])

    def natlb_switches(self) -> int:
        """Context switches of all natlb's threads so far: each is a wakeup
        that may take a CPU from the client or a backend."""
        assert self.natlb is not None
        n = 0
        for task in Path(f"/proc/{self.natlb.pid}/task").iterdir():
            try:
                text = (task / "status").read_text()
            except FileNotFoundError:
                continue        # a thread that ended meanwhile
            n += sum(int(x) for x in re.findall(r"ctxt_switches:\s+(\d+)", text))
        return n

    def run_test(self, test: str, path: str) -> dict[str, float]:
        """Start `path`, run one test, stop it: every test of every path
        starts from the same state, and the paths alternate test by test."""
        procs = self.start(path)
        try:
            # The same pause for every path: a natlb just started still
            # runs its first health checks.
            time.sleep(SETTLE_S)
            ours = path.startswith("natlb")
            cpu0 = self.natlb_cpu() if ours else (0.0, 0)
            nfq0 = self.nfqlb_queued() if path == "nfqlb" else {}
            busy0 = self.system_busy()
            r: dict[str, float] = {}
            if test in ("conn", "req"):
                out = self.wrk("-H", "Connection: close") if test == "conn" else self.wrk()
                n = self._requests(out)
                # Machine-wide busy CPU per connection (one request each) or
                # per keep-alive request: client, router and backends alike.
                r[f"{test}_s"] = self._rate(out)
                r[f"cpu_us_per_{test}"] = (self.system_busy() - busy0) / n * 1e6
                if ours:
                    cpu1 = self.natlb_cpu()
                    r[f"packets_per_{test}"] = (cpu1[1] - cpu0[1]) / n
                    r[f"natlb_cpu_s_{test}"] = cpu1[0] - cpu0[0]
                    r[f"natlb_packets_{test}"] = cpu1[1] - cpu0[1]
                elif nfq0:
                    r[f"packets_per_{test}"] = (self.nfqlb_queued()["tcp80"] - nfq0["tcp80"]) / n
            elif test == "dns":
                r["dns_qps"] = self.dns()
            elif test in ("bulk", "streams"):
                got = self.bulk(1 if test == "bulk" else self.streams)
                r.update({f"{test}_{k}": v for k, v in got.items()})
                if ours:
                    r[f"packets_per_{test}"] = float(self.natlb_cpu()[1] - cpu0[1])
                elif nfq0:
                    r[f"packets_per_{test}"] = float(self.nfqlb_queued()["tcp5201"]
                                                     - nfq0["tcp5201"])
            else:
                sw0 = self.natlb_switches() if ours else 0
                t0 = time.monotonic()
                r.update(self.latency())
                if ours:
                    # What natlb itself did meanwhile: p99 is the slowest 1%,
                    # so a cause there must touch 1% of the requests.
                    dt = time.monotonic() - t0
                    r["natlb_wakeups_per_s"] = (self.natlb_switches() - sw0) / dt
                    r["natlb_cpu_ms_per_s"] = (self.natlb_cpu()[0] - cpu0[0]) / dt * 1e3
            return r
        finally:
            self.stop(path, procs)

    def measure_services(self, path: str, total: int) -> dict[str, float]:
        """new conn/s and keep-alive req/s with `total` services configured."""
        self.services = total
        procs = self.start(path)
        try:
            return {"conn_s": self._rate(self.wrk("-H", "Connection: close")),
                    "req_s": self._rate(self.wrk())}
        finally:
            self.stop(path, procs)
            self.services = BASE_SERVICES

    def close(self) -> None:
        self.tb.close()
        nfqlb_path.remove_shm(self.nfqlb_shm)


# wrk's done() hook: its latency histogram's percentiles in microseconds.
LATENCY_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("LATENCY n=%d p50=%d p99=%d p999=%d\\n", summary.requests,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"""


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarize(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, list[float]]]:
    """Per path and figure: [median, min, max] over the repetitions that
    measured it."""
    out: dict[str, dict[str, list[float]]] = {}
    for key in runs[0]:
        figs = {k for r in runs for k in r.get(key, {})}
        out[key] = {k: list(_spread([r[key][k] for r in runs if k in r.get(key, {})]))
                    for k in sorted(figs)}
    return out


def ratios(runs: list[dict[str, dict[str, float]]], ours: str,
           peer: str) -> dict[str, list[float]]:
    """Per figure: [median, min, max] of the repetitions' own ratios (each
    from the two paths measured next to each other)."""
    out = {}
    for k in FIGURES:
        each = [r[ours][k] / r[peer][k] for r in runs
                if ours in r and peer in r and r[ours].get(k) and r[peer].get(k)]
        if each:
            out[k] = list(_spread(each))
    return out


def _name(key: str) -> str:
    """A results key: a path, or path@6 for one measured over IPv6."""
    path, _, family = key.partition("@")
    return NAMES[path] + (" (IPv6)" if family == "6" else "")


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"


def ratio_pairs(keys: list[str]) -> list[tuple[str, str]]:
    pairs = [(o, p) for o in ("natlb-fast", "natlb") for p in ("kernel", "stateless", "haproxy")]
    pairs += [("natlb-fast-queued", "kernel"), ("natlb-fast", "natlb-fast-queued")]
    pairs += [("natlb-fast", "natlb")]
    pairs += [(o, "nfqlb") for o in ("natlb-fast", "natlb-fast-queued", "natlb")]
    pairs += [("nfqlb", "kernel")]
    pairs += [(f"{o}@6", p) for o in ("natlb-fast", "natlb") for p in ("kernel@6", "stateless@6")]
    pairs += [("natlb-fast@6", "nfqlb@6"), ("nfqlb@6", "kernel@6")]
    # With no natlb path measured: the stateless rewrite against the kernel's DNAT.
    pairs += [("stateless", "kernel"), ("stateless@6", "kernel@6")]
    return [(o, p) for o, p in pairs if o in keys and p in keys]


def markdown(runs: list[dict[str, dict[str, float]]], meta: dict) -> str:
    summ = summarize(runs)
    keys = list(summ)
    figs = [k for k in FIGURES if any(k in summ[p] for p in keys)]
    label = {k: FIGURES[k].format(streams=meta["streams"]) for k in figs}
    lines = ["Medians of the repetitions (min-max):", "",
             "| figure | " + " | ".join(_name(p) for p in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for k in figs:
        cells = []
        for p in keys:
            if k in summ[p]:
                med, lo, hi = summ[p][k]
                cells.append(f"{_fmt(med)} ({_fmt(lo)}-{_fmt(hi)})")
            else:
                cells.append("")
        lines.append(f"| {label[k]} | " + " | ".join(cells) + " |")
    pairs = ratio_pairs(keys)
    if pairs:
        lines += ["", "Ratios: median of the repetitions' own ratios (min-max); for "
                  "latency and CPU lower is better:", "",
                  "| figure | " + " | ".join(f"{o} / {p}" for o, p in pairs) + " |",
                  "|---|" + "---|" * len(pairs)]
        rat = {pair: ratios(runs, *pair) for pair in pairs}
        for k in figs:
            if not any(k in rat[pair] for pair in pairs):
                continue
            cells = [(lambda m: f"{m[0]:.2f}x ({m[1]:.2f}-{m[2]:.2f})" if m else "")(
                rat[pair].get(k)) for pair in pairs]
            lines.append(f"| {label[k]} | " + " | ".join(cells) + " |")
    lines.append("")
    if all(k in summ and "cpu_us_per_req" in summ[k] and "packets_per_req" in summ.get(
            "natlb", {}) for k in ("natlb", "kernel")):
        extra = summ["natlb"]["cpu_us_per_req"][0] - summ["kernel"]["cpu_us_per_req"][0]
        per_pkt = extra / max(summ["natlb"]["packets_per_req"][0], 1e-9)
        lines.append(f"Machine-wide busy CPU per queued packet (natlb, every packet queued, "
                     f"against the kernel's DNAT, from the medians): {per_pkt:.2f} us.")
    load = meta["load_avg_1min"]
    lines.append(
        f"{meta['repetitions']} repetitions, {meta['seconds']} s per test "
        f"({meta['latency_seconds']} s for latency), paths started afresh for each test in a "
        f"balanced order (each at each place and after each other equally often); "
        f"natlb workers={meta['workers']} "
        f"gso={meta['gso']} poll_us={meta['poll_us']} rewrite={meta['rewrite']}; "
        f"IPv{meta.get('family', 4)}; load average (1 min) at the tests' starts "
        f"{load[1]:.2f}-{load[2]:.2f} (median {load[0]:.2f}); {meta['date']}.")
    return "\n".join(lines)


def services_markdown(path: str, runs: list[dict[int, dict[str, float]]]) -> str:
    """Medians per service count, and the ratio of the largest to the
    smallest: of the medians, and the spread of the repetitions' own."""
    counts = sorted(runs[0])
    small, big = counts[0], counts[-1]
    lines = [f"| {NAMES[path]}, services configured | new conn/s | keep-alive req/s |",
             "|---|---|---|"]
    for n in counts:
        cells = []
        for k in ("conn_s", "req_s"):
            med, lo, hi = _spread([r[n][k] for r in runs])
            cells.append(f"{med:,.0f} ({lo:,.0f}-{hi:,.0f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    cells = []
    for k in ("conn_s", "req_s"):
        each = [r[big][k] / r[small][k] for r in runs if r[small][k]]
        cells.append(f"{statistics.median(each):.2f}x ({min(each):.2f}-{max(each):.2f})"
                     if each else "n/a")
    lines.append(f"| {big} / {small}, the repetitions' own ratios | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(summ: dict[str, dict[str, list[float]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no chart)")
        return
    figs = [k for k in CHART if any(k in summ[p] for p in summ)]
    fig, axes = plt.subplots(1, len(figs), figsize=(3 * len(figs), 3.2))
    paths = list(summ)
    for ax, k in zip(axes if len(figs) > 1 else [axes], figs, strict=True):
        got = [summ[p].get(k, [0.0, 0.0, 0.0]) for p in paths]
        med = [g[0] for g in got]
        err = [[g[0] - g[1] for g in got], [g[2] - g[0] for g in got]]
        ax.bar(paths, med, yerr=err, capsize=3,
               color=["#2a7", "#5c9", "#888", "#69c", "#c63", "#a6c", "#cb3"][:len(paths)])
        ax.set_title(FIGURES[k].format(streams="N"), fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    fig.suptitle("natlb and its references (medians, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n paths in which each path runs at each place and after
    each other path equally often (a Williams design; for an odd n, each
    order is followed by its reverse).  A plain rotation gives every path the
    same predecessor in every repetition, so whatever a path leaves behind
    (memory freed, caches) always lands on the same one: in run O the fast
    path, always run after natlb with every packet queued, measured 0.99x
    the kernel's bulk where the same programs run as natlb-fast-queued,
    after it, measured 1.02x."""
    base, lo, hi = [0], 1, n - 1
    for j in range(1, n):
        if j % 2:
            base.append(lo)
            lo += 1
        else:
            base.append(hi)
            hi -= 1
    rows = [[(x + i) % n for x in base] for i in range(n)]
    if n % 2 == 0:
        return rows
    return [r for row in rows for r in (row, row[::-1])]


def ordered(items: list, rep: int) -> list:
    """The order of repetition `rep` (balanced_orders, one after another)."""
    orders = balanced_orders(len(items))
    return [items[i] for i in orders[rep % len(orders)]]


def select_paths(requested: str | None, nfqlb: str | None) -> tuple[list[str], str | None]:
    """The paths to measure, and a line to print about one left out.  By default
    every path, nfqlb only where its binary is usable; a path named in --paths
    that cannot run is an error (ValueError, its message the line to print)."""
    have_nfqlb = nfqlb_path.usable(nfqlb)
    if requested is None:
        if have_nfqlb:
            return list(PATHS), None
        return [p for p in PATHS if p != "nfqlb"], nfqlb_path.NO_BINARY
    paths = [p for p in requested.split(",") if p]
    if not paths or any(p not in PATHS for p in paths):
        raise ValueError(f"--paths: one or more of {', '.join(PATHS)}")
    if "nfqlb" in paths and not have_nfqlb:
        raise ValueError(nfqlb_path.NO_BINARY)
    return paths, None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--latency-seconds", type=int, default=0,
                    help="length of the 1-connection latency test (default: 2 x --seconds)")
    ap.add_argument("--streams", type=int, default=4,
                    help="parallel iperf3 flows in the 'streams' test")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-gso", action="store_true")
    ap.add_argument("--poll-us", type=int, default=0)
    ap.add_argument("--rewrite", choices=["copy", "mark"], default="mark")
    ap.add_argument("--family", default="4", choices=["4", "6", "4,6"],
                    help="4, 6, or 4,6: both, interleaved in each repetition")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--paths", default=None,
                    help=f"comma-separated subset of {','.join(PATHS)} (default: all; nfqlb "
                         "only where its binary is found)")
    ap.add_argument("--nfqlb", default=nfqlb_path.find_binary(),
                    help="the nfqlb binary for the nfqlb path (default: nfqlb on PATH, else "
                         f"{nfqlb_path.DEFAULT_BINARY} if present)")
    ap.add_argument("--tests", default=",".join(TESTS),
                    help=f"comma-separated subset of {','.join(TESTS)}")
    ap.add_argument("--services", default="5,250",
                    help="service counts to compare through natlb (the first natlb path); "
                         "'' to skip")
    a = ap.parse_args(argv)
    try:
        paths, note = select_paths(a.paths, a.nfqlb)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if note:
        print(note, flush=True)
    tests = [t for t in a.tests.split(",") if t]
    if not tests or any(t not in TESTS for t in tests):
        ap.error(f"--tests: one or more of {', '.join(TESTS)}")
    families = [int(f) for f in a.family.split(",")]
    if a.family == "6" and "haproxy" in paths:
        if a.paths is not None:
            ap.error("--family 6: haproxy is measured over IPv4 only")
        paths.remove("haproxy")
    # Results keys: the path, with @6 when measured over IPv6 next to IPv4.
    runs_of = [(f, p, f"{p}@6" if f == 6 and len(families) > 1 else p)
               for f in families for p in paths if not (f == 6 and p == "haproxy")]
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    counts = [int(n) for n in a.services.split(",") if n]
    if any(n < BASE_SERVICES for n in counts):
        ap.error(f"--services: at least {BASE_SERVICES} each")
    svc_path = next((p for p in paths if p.startswith("natlb")), "natlb")
    b = Bench(a.seconds, a.workers, not a.no_gso, a.poll_us, a.rewrite, families[0],
              streams=a.streams, latency_seconds=a.latency_seconds or 2 * a.seconds,
              nfqlb=a.nfqlb if "nfqlb" in paths else None)
    runs: list[dict[str, dict[str, float]]] = []
    loads: list[float] = []
    svc_runs: list[dict[int, dict[str, float]]] = []
    try:
        b.setup()
        for rep in range(a.repetitions):
            run: dict[str, dict[str, float]] = {key: {} for _, _, key in runs_of}
            for test in tests:
                for family, path, key in ordered(runs_of, rep):
                    b.use_family(family)
                    loads.append(os.getloadavg()[0])
                    got = b.run_test(test, path)
                    run[key].update(got)
                    print(f"repetition {rep + 1}/{a.repetitions} {test:<8} {key:<12} "
                          f"load {loads[-1]:.2f}: "
                          + ", ".join(f"{k} {v:.4g}" for k, v in got.items()), flush=True)
            for r in run.values():
                cpu = sum(r.get(f"natlb_cpu_s_{t}", 0.0) for t in ("conn", "req"))
                pk = sum(r.get(f"natlb_packets_{t}", 0.0) for t in ("conn", "req"))
                if pk:
                    r["natlb_us_per_packet"] = cpu / pk * 1e6
            runs.append(run)
            if counts:
                svc: dict[int, dict[str, float]] = {}
                b.use_family(4)    # the extra services are IPv4
                for n in counts if rep % 2 == 0 else counts[::-1]:
                    svc[n] = b.measure_services(svc_path, n)
                    print(f"repetition {rep + 1}/{a.repetitions}: {svc_path}, {n} services: ",
                          {k: round(v, 2) for k, v in svc[n].items()}, flush=True)
                svc_runs.append(svc)
    finally:
        b.close()
    meta = {"repetitions": a.repetitions, "seconds": a.seconds,
            "latency_seconds": b.latency_seconds, "streams": a.streams, "tests": tests,
            "workers": a.workers, "gso": not a.no_gso, "poll_us": a.poll_us,
            "rewrite": a.rewrite, "family": a.family, "command": " ".join(sys.argv[1:]),
            "nfqlb": a.nfqlb if "nfqlb" in paths else None,
            "load_avg_1min": list(_spread(loads)),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    md = markdown(runs, meta)
    if svc_runs:
        md += "\n\n" + services_markdown(svc_path, svc_runs)
    summ = summarize(runs)
    pairs = ratio_pairs(list(summ))
    (out / "bench.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps(
        {"meta": meta, "summary": summ,
         "ratios": {f"{o} / {p}": ratios(runs, o, p) for o, p in pairs},
         "runs": runs, "services": svc_runs}, indent=2))
    chart(summ, out / "bench.png")
    print()
    print(md)
    print(f"\nwritten: {out}/bench.md, bench.json, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
