"""End-to-end benchmark: natlb against the kernel's DNAT and HAProxy (nginx
stream for UDP), measured in the same run on the same namespaces.

    client --- router --- 3 backends (nginx, nsd, iperf3)

The router runs one of: natlb (every packet queued), natlb with the kernel
fast path for established TCP flows (lb.fastpath), an nftables DNAT table,
a stateless nftables rewrite (notrack; a jhash of the client's address and
port picks the backend; replies get the VIP back by their source; no queue,
no conntrack), HAProxy (TCP mode, one thread) plus nginx stream (one worker)
for UDP.  nfqlb (an NFQUEUE balancer) is not among them: it is not packaged
in Debian and this machine has no internet to build it.  Load comes from wrk,
dnsperf and iperf3 in the client namespace.  Results are medians over
repetitions, printed as a table with natlb's ratio to each peer and written
as Markdown, JSON and a PNG chart.

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
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from natlb_testbed.testbed import VIP, Testbed, backend_addr, backend_addr6, family_addresses

N_BACKENDS = 3
PATHS = ("natlb", "natlb-fast", "kernel", "stateless", "haproxy")
NAMES = {"natlb": "natlb", "natlb-fast": "natlb fastpath = true", "kernel": "kernel nft DNAT",
         "stateless": "stateless nft rewrite (notrack, jhash)",
         "haproxy": "HAProxy TCP 1 thread (UDP: nginx stream 1 worker)"}
METRICS = {
    "conn_s": "new conn/s",
    "req_s": "keep-alive req/s",
    "dns_qps": "DNS q/s (UDP)",
    "bulk_mbit": "bulk Mbit/s",
    "p50_us": "1-conn p50 us",
    "p99_us": "1-conn p99 us",
}

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
                 rewrite: str = "copy", family: int = 4) -> None:
        self.poll_us = poll_us
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
                fastpath="true" if path == "natlb-fast" else "false",
                gso="true" if self.gso else "false", web=web, **fmt)
            text += extra_services(self.services - BASE_SERVICES, list(self.addrs.values()))
            cfg = self.tb.write_config(text)
            return [self.tb.start_natlb(cfg)]
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
        for p in procs:
            self.tb.stop(p)
            self.tb.procs.remove(p)
        table = {"kernel": "natlb_bench_dnat", "stateless": "natlb_bench_stateless"}.get(path)
        if table:
            self.router(["nft", "delete", "table", "ip6" if self.family == 6 else "ip", table])
        if path in ("kernel", "haproxy"):
            prefix = 128 if self.family == 6 else 32
            self.router(["ip", "addr", "del", f"{self.vip}/{prefix}", "dev", "lo"])

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
    def wrk(self, *extra: str, conns: int = 32) -> str:
        return self.client(["wrk", "-t1", f"-c{conns}", f"-d{self.seconds}s", "--latency",
                            *extra, f"http://{self.host}/"]).stdout

    @staticmethod
    def _rate(out: str) -> float:
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                           out)
        if errors and sum(map(int, errors.groups())) > 0:
            print(f"    wrk socket errors: {errors.group(0)}", flush=True)
        return float(m.group(1)) if m else 0.0

    @staticmethod
    def _latency_us(out: str, pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return 0.0
        return float(m.group(1)) * {"us": 1, "ms": 1000, "s": 1e6}[m.group(2)]

    def dns(self) -> float:
        out = self.client(["dnsperf", "-s", self.vip, "-d", str(self.dir / "queries"), "-l",
                           str(self.seconds), "-c", "16", "-q", "256", "-t", "2"],
                          check=False).stdout
        m = re.search(r"Queries per second:\s+([\d.]+)", out)
        lost = re.search(r"Queries lost:\s+(\d+)", out)
        if lost and int(lost.group(1)):
            print(f"    dnsperf lost {lost.group(1)} queries", flush=True)
        return float(m.group(1)) if m else 0.0

    def bulk(self) -> float:
        out = self.client(["iperf3", "-c", self.vip, "-p", "5201", "-t", str(self.seconds), "-J"],
                          check=False).stdout
        try:
            return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e6
        except (ValueError, KeyError):
            return 0.0

    @staticmethod
    def system_busy() -> float:
        """Busy CPU seconds of the whole machine (all namespaces share it)."""
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + v[4]
        return (sum(v[:8]) - idle) / 100.0

    def natlb_cpu(self) -> tuple[float, int]:
        """CPU seconds used by natlb's process and packets it handled."""
        pid = next(int(x) for x in self.router(["pgrep", "-f", "natlb run"]).stdout.split())
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "natlb", "status", "--json", "-s", self.tb.control_socket],
            capture_output=True, text=True).stdout)
        return ticks / 100.0, status["queued_packets"]

    def measure(self, path: str) -> dict[str, float]:
        procs = self.start(path)
        try:
            r: dict[str, float] = {}
            ours = path.startswith("natlb")
            cpu0 = self.natlb_cpu() if ours else None
            busy_c = self.system_busy()
            close = self.wrk("-H", "Connection: close")
            r["conn_s"] = self._rate(close)
            m = re.search(r"(\d+) requests in", close)
            conns = int(m.group(1)) if m else 1
            # The same per short connection (one request each): the packets
            # natlb still queues for a handshake and close.
            r["cpu_us_per_conn"] = (self.system_busy() - busy_c) / conns * 1e6
            if ours:
                r["packets_per_conn"] = (self.natlb_cpu()[1] - cpu0[1]) / conns
            busy0 = self.system_busy()
            pk0 = self.natlb_cpu()[1] if ours else 0
            keepalive = self.wrk()
            r["req_s"] = self._rate(keepalive)
            m = re.search(r"(\d+) requests in", keepalive)
            requests = int(m.group(1)) if m else 1
            # Machine-wide CPU per request: client, router and backends alike.
            r["cpu_us_per_req"] = (self.system_busy() - busy0) / requests * 1e6
            if ours:
                r["packets_per_req"] = (self.natlb_cpu()[1] - pk0) / requests
            r["dns_qps"] = self.dns()
            r["bulk_mbit"] = self.bulk()
            one = self.wrk(conns=1)
            r["p50_us"] = self._latency_us(one, "50")
            r["p99_us"] = self._latency_us(one, "99")
            if cpu0:
                cpu1 = self.natlb_cpu()
                r["natlb_us_per_packet"] = (cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]) * 1e6
                r["natlb_packets"] = cpu1[1] - cpu0[1]
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


def median_table(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for path in runs[0]:
        keys = runs[0][path].keys()
        out[path] = {k: statistics.median(r[path][k] for r in runs) for k in keys}
    return out


def _name(key: str) -> str:
    """A results key: a path, or path@6 for one measured over IPv6."""
    path, _, family = key.partition("@")
    return NAMES[path] + (" (IPv6)" if family == "6" else "")


def markdown(med: dict[str, dict[str, float]], meta: dict) -> str:
    head = "| path | " + " | ".join(METRICS.values()) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for path in med:
        lines.append(f"| {_name(path)} | " + " | ".join(f"{med[path][k]:,.0f}" for k in METRICS)
                     + " |")
    pairs = [(o, p) for o in ("natlb", "natlb-fast") for p in ("kernel", "stateless", "haproxy")]
    pairs += [(f"{o}@6", p) for o in ("natlb", "natlb-fast") for p in ("kernel@6", "stateless@6")]
    # With no natlb path measured: the stateless rewrite against the kernel's DNAT.
    pairs += [("stateless", "kernel"), ("stateless@6", "kernel@6")]
    for ours, peer in pairs:
        if ours not in med or peer not in med:
            continue
        cells = []
        for k in METRICS:
            a, b = med[ours][k], med[peer][k]
            cells.append(f"{a / b:.2f}x" if b else "n/a")
        lines.append(f"| {ours} / {peer} | " + " | ".join(cells) + " |")
    if "natlb" not in med or "kernel" not in med or "haproxy" not in med:
        return "\n".join(lines)
    lines.append("")
    extra = med["natlb"]["cpu_us_per_req"] - med["kernel"]["cpu_us_per_req"]
    per_pkt = extra / med["natlb"]["packets_per_req"]
    lines.append(
        f"Router CPU per queued packet: {per_pkt:.2f} us more than the kernel's DNAT "
        f"(machine-wide busy CPU per keep-alive request: natlb "
        f"{med['natlb']['cpu_us_per_req']:.1f} us, kernel {med['kernel']['cpu_us_per_req']:.1f}"
        f" us, HAProxy {med['haproxy']['cpu_us_per_req']:.1f} us; "
        f"{med['natlb']['packets_per_req']:.2f} queued packets per request). "
        f"natlb's own thread: {med['natlb']['natlb_us_per_packet']:.2f} us per packet, most of it "
        f"kernel forwarding done in its verdict syscalls.")
    lines.append(f"Medians of {meta['repetitions']} repetitions, {meta['seconds']} s per test, "
                 f"natlb workers={meta['workers']} gso={meta['gso']} poll_us={meta['poll_us']} "
                 f"rewrite={meta['rewrite']} IPv{meta.get('family', 4)}; "
                 f"latency ratios: lower is better.")
    return "\n".join(lines)


def services_markdown(path: str, runs: list[dict[int, dict[str, float]]]) -> str:
    """Medians per service count, and the ratio of the largest to the
    smallest: of the medians, and the spread of the repetitions' own."""
    counts = sorted(runs[0])
    small, big = counts[0], counts[-1]
    lines = [f"| {NAMES[path]}, services configured | new conn/s | keep-alive req/s |",
             "|---|---|---|"]
    med = {n: {k: statistics.median(r[n][k] for r in runs) for k in ("conn_s", "req_s")}
           for n in counts}
    for n in counts:
        lines.append(f"| {n} | {med[n]['conn_s']:,.0f} | {med[n]['req_s']:,.0f} |")
    cells = []
    for k in ("conn_s", "req_s"):
        each = sorted(r[big][k] / r[small][k] for r in runs if r[small][k])
        spread = f" (repetitions {each[0]:.2f}-{each[-1]:.2f})" if each else ""
        cells.append(f"{med[big][k] / med[small][k]:.2f}x{spread}" if med[small][k] else "n/a")
    lines.append(f"| {big} / {small} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(med: dict[str, dict[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no chart)")
        return
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3 * len(METRICS), 3.2))
    paths = list(med)
    for ax, (k, label) in zip(axes, METRICS.items(), strict=True):
        vals = [med[p][k] for p in paths]
        ax.bar(paths, vals, color=["#2a7", "#5c9", "#888", "#69c", "#c63"][:len(paths)])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=30)
    fig.suptitle("natlb vs kernel DNAT vs stateless nft vs HAProxy (medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-gso", action="store_true")
    ap.add_argument("--poll-us", type=int, default=0)
    ap.add_argument("--rewrite", choices=["copy", "mark"], default="mark")
    ap.add_argument("--family", default="4", choices=["4", "6", "4,6"],
                    help="4, 6, or 4,6: both, interleaved in each repetition")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--paths", default=",".join(PATHS),
                    help=f"comma-separated subset of {','.join(PATHS)}")
    ap.add_argument("--services", default="5,250",
                    help="service counts to compare through natlb (the first natlb path); "
                         "'' to skip")
    a = ap.parse_args()
    paths = [p for p in a.paths.split(",") if p]
    if any(p not in PATHS for p in paths):
        ap.error(f"--paths: one of {', '.join(PATHS)}")
    families = [int(f) for f in a.family.split(",")]
    if a.family == "6" and "haproxy" in paths:
        if a.paths != ",".join(PATHS):
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
    b = Bench(a.seconds, a.workers, not a.no_gso, a.poll_us, a.rewrite, families[0])
    runs = []
    svc_runs: list[dict[int, dict[str, float]]] = []
    try:
        b.setup()
        for rep in range(a.repetitions):
            run = {}
            for family, path, key in runs_of:
                print(f"repetition {rep + 1}/{a.repetitions}: {key}", flush=True)
                b.use_family(family)
                run[key] = b.measure(path)
                print("   ", {k: round(v, 2) for k, v in run[key].items()}, flush=True)
            runs.append(run)
            if counts:
                svc: dict[int, dict[str, float]] = {}
                b.use_family(4)    # the extra services are IPv4
                for n in counts if rep % 2 == 0 else counts[::-1]:
                    print(f"repetition {rep + 1}/{a.repetitions}: {svc_path}, {n} services",
                          flush=True)
                    svc[n] = b.measure_services(svc_path, n)
                    print("   ", {k: round(v, 2) for k, v in svc[n].items()}, flush=True)
                svc_runs.append(svc)
    finally:
        b.close()
    med = median_table(runs)
    meta = {"repetitions": a.repetitions, "seconds": a.seconds, "workers": a.workers,
            "gso": not a.no_gso, "poll_us": a.poll_us, "rewrite": a.rewrite,
            "family": a.family,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    md = markdown(med, meta)
    if svc_runs:
        md += "\n\n" + services_markdown(svc_path, svc_runs)
    (out / "bench.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps({"meta": meta, "median": med, "runs": runs,
                                                "services": svc_runs}, indent=2))
    chart(med, out / "bench.png")
    print()
    print(md)
    print(f"\nwritten: {out}/bench.md, bench.json, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
