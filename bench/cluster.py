"""Cluster benchmark: one of three balancer nodes behind ECMP routers (BIRD,
BFD 3 x 50 ms; natlb_testbed/cluster.py, configs from examples/cluster/)
is lost under traffic: busy keep-alive connections plus a new connection
every few ms.  Each (balancer, loss) runs on a freshly built network.

Balancers: natlb (cluster = true, maglev) and a stateless nftables NAT on
every node (jhash of the client's address and port, the same seed on all
nodes, no health checks), both on three ECMP nodes; natlb-single, natlb
on the same nodes without cluster = true (what natlb did before); and the
classic pair:
keepalived VRRP active/standby (Debian's keepalived, advert_int 1, no state
sync) moving a next-hop address on each side between two nodes that run
natlb as a single balancer (maglev, cluster = false).  Losses: crash (every packet in and out of the
node dropped: no carrier change, no BGP goodbye), freeze (every process of
the node stopped, as a paused VM; the kernel still forwards), drain
(withdraw both BGP sessions, wait for the routers, stop the balancer).

Reported: established connections lost, new connections failed and delayed
past 1 s, the longest wait of one keep-alive request, and how long the
routers took to drop the node.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bench.report import publish
from natlb_testbed.cluster import VIP, ClusterNet, backend_addr

BALANCERS = ("natlb", "nft-stateless", "vrrp", "natlb-single")
LOSSES = ("crash", "freeze", "drain")
VICTIM = 3
SEED = 0x6E61746C

STATELESS = """table ip {table} {{
  chain pre {{
    type filter hook prerouting priority raw; policy accept;
    ip daddr {vip} tcp dport 80 notrack \
      ip daddr set jhash ip saddr . tcp sport mod {n} seed {seed:#x} map {{ {slots} }}
    ip saddr {{ {backends} }} tcp sport 80 notrack ip saddr set {vip}
  }}
}}
"""


def start_stateless(net: ClusterNet, i: int) -> None:
    """What natlb's example sets up, done by hand for the nft reference: the
    VIP on lo, the route BIRD announces downstream, the sysctls, the rules."""
    node = f"n{i}"
    addrs = [backend_addr(k) for k in range(1, net.n_backends + 1)]
    rules = STATELESS.format(table=f"{net.prefix}nat", vip=VIP, n=len(addrs), seed=SEED,
                             slots=", ".join(f"{j} : {a}" for j, a in enumerate(addrs)),
                             backends=", ".join(addrs))
    net.exec(node, "nft", "-f", "-", input=rules)
    for key, value in (("ip_forward", "1"), ("conf.all.accept_local", "1"),
                       ("conf.all.rp_filter", "0"), ("conf.r1.rp_filter", "0"),
                       ("conf.r2.rp_filter", "0")):
        net.sysctl(node, f"net.ipv4.{key}", value)
    net.exec(node, "ip", "route", "add", "0.0.0.0/0", "dev", "lo", "table", "100")
    net.exec(node, "ip", "addr", "add", f"{VIP}/32", "dev", "lo")


def stop_stateless(net: ClusterNet, i: int) -> None:
    node = f"n{i}"
    net.exec(node, "ip", "addr", "del", f"{VIP}/32", "dev", "lo")
    net.exec(node, "ip", "route", "del", "0.0.0.0/0", "dev", "lo", "table", "100")
    net.exec(node, "nft", "delete", "table", "ip", f"{net.prefix}nat")


KEEPALIVED = """global_defs {{ router_id node{i} }}
vrrp_sync_group G {{ group {{ UP DOWN }} }}
vrrp_instance UP {{
  state BACKUP
  interface r1
  virtual_router_id 51
  priority {prio}
  advert_int 1
  virtual_ipaddress {{ 198.51.100.70/28 }}
}}
vrrp_instance DOWN {{
  state BACKUP
  interface r2
  virtual_router_id 52
  priority {prio}
  advert_int 1
  virtual_ipaddress {{ 192.0.2.70/28 }}
}}
"""


class VrrpNet(ClusterNet):
    """Two nodes on a shared segment each side (a bridge in R1 and R2); R1
    routes the VIP, and R2 its default, via the address VRRP moves."""

    def build(self) -> VrrpNet:
        try:
            for name in ("cl", "r1", "r2"):
                self._netns(name)
            self._link("cl", "eth0", "198.51.100.2/28", "r1", "cl", "198.51.100.1/28")
            self.exec("cl", "ip", "route", "add", "default", "via", "198.51.100.1")
            for r, addr in (("r1", "198.51.100.65/28"), ("r2", "192.0.2.65/28")):
                self.exec(r, "ip", "link", "add", "seg", "type", "bridge")
                self.exec(r, "ip", "addr", "add", addr, "dev", "seg")
                self.exec(r, "ip", "link", "set", "dev", "seg", "up")
                self.sysctl(r, "net.ipv4.ip_forward", "1")
            for i in range(1, self.n_nodes + 1):
                self._netns(f"n{i}")
                self._link("r1", f"n{i}", "0.0.0.0/32", f"n{i}", "r1", f"198.51.100.{65 + i}/28")
                self._link("r2", f"n{i}", "0.0.0.0/32", f"n{i}", "r2", f"192.0.2.{65 + i}/28")
                for r in ("r1", "r2"):
                    self.exec(r, "ip", "link", "set", "dev", f"n{i}", "master", "seg")
                self.exec(f"n{i}", "ip", "route", "add", "default", "via", "198.51.100.65")
                self.exec(f"n{i}", "ip", "route", "add", "203.0.113.0/24", "via", "192.0.2.65")
            for k in range(1, self.n_backends + 1):
                self._netns(f"b{k}")
                self._link("r2", f"b{k}", f"203.0.113.{4 * k + 1}/30",
                           f"b{k}", "eth0", f"{backend_addr(k)}/30")
                self.exec(f"b{k}", "ip", "route", "add", "default", "via", f"203.0.113.{4 * k + 1}")
            self.exec("r1", "ip", "route", "add", f"{VIP}/32", "via", "198.51.100.70")
            self.exec("r2", "ip", "route", "add", "default", "via", "192.0.2.70")
        except BaseException:
            self.close()
            raise
        return self

    def start_keepalived(self, i: int, prio: int) -> None:
        conf = self.workdir / f"keepalived-n{i}.conf"
        conf.write_text(KEEPALIVED.format(i=i, prio=prio))
        d = self.workdir
        self.bird[f"n{i}"] = self.spawn(f"n{i}", [
            "keepalived", "-n", "-P", "-f", str(conf), "-p", f"{d}/ka-n{i}.pid",
            "-r", f"{d}/ka-vrrp-n{i}.pid", "-l"],
            stdout=open(d / f"keepalived-n{i}.log", "w"),  # noqa: SIM115 -- the process's
            stderr=subprocess.STDOUT)

    def vrrp_child(self, i: int) -> int | None:
        try:
            return int((self.workdir / f"ka-vrrp-n{i}.pid").read_text())
        except (OSError, ValueError):
            return None

    def is_master(self, i: int) -> bool:
        """Node i holds the upstream next-hop address (a dead master may too)."""
        return "198.51.100.70" in self.exec(f"n{i}", "ip", "-4", "addr", "show", "dev", "r1")

    def wait_master(self, i: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_master(i):
            if time.monotonic() > deadline:
                raise AssertionError(f"node {i} did not become VRRP master")
            time.sleep(0.05)

    def natlb_config(self, i: int) -> Path:
        path = super().natlb_config(i)
        text = path.read_text().replace('announce = "healthy"', 'announce = "always"').replace(
            "cluster = true", "cluster = false")
        cut = text.index("[[lb.route]]")
        path.write_text(text[:cut] + text[text.index("[[service]]"):])
        return path


def run_vrrp(loss: str, conns: int, interval_ms: int, seconds: float) -> dict:
    """Node 1 is master (priority 150), node 2 backup (100); node 1 is lost."""
    net = VrrpNet(n_nodes=2).build()
    try:
        net.start_backends()
        for i, prio in ((1, 150), (2, 100)):
            net.start_natlb(i)
            net.start_keepalived(i, prio)
        net.wait_master(1, timeout=30)
        load = net.load(conns=conns, interval_ms=interval_ms, seconds=seconds, timeout=10)
        time.sleep(seconds / 3)
        t0 = time.monotonic()
        if loss == "crash":
            net.kill_node(1)
        elif loss == "freeze":
            net.freeze_node(1)
            child = net.vrrp_child(1)
            if child:
                os.kill(child, signal.SIGSTOP)
        else:
            net.stop(net.bird["n1"])      # keepalived leaves with priority 0
        net.wait_master(2, timeout=seconds)
        withdrawn_ms = (time.monotonic() - t0) * 1000
        if loss == "drain":
            time.sleep(1.0)
            net.stop(net.natlb[1])
        out, _ = load.communicate(timeout=seconds + 60)
        r = json.loads(out)
        r["withdrawn_ms"] = round(withdrawn_ms)
        return r
    finally:
        child = net.vrrp_child(1)
        if child:
            try:
                os.kill(child, signal.SIGCONT)
            except ProcessLookupError:
                pass
        net.freeze_node(1, resume=True)
        net.close()


def run_one(balancer: str, loss: str, conns: int, interval_ms: int, seconds: float) -> dict:
    if balancer == "vrrp":
        return run_vrrp(loss, conns, interval_ms, seconds)
    net = ClusterNet(n_nodes=3, cluster_service=balancer != "natlb-single").build()
    try:
        net.start_backends()
        net.start_bird()
        for i in range(1, 4):
            if balancer.startswith("natlb"):
                net.start_natlb(i)
            else:
                start_stateless(net, i)
        net.wait_paths(3)
        load = net.load(conns=conns, interval_ms=interval_ms, seconds=seconds, timeout=10)
        time.sleep(seconds / 3)
        t0 = time.monotonic()
        if loss == "crash":
            net.kill_node(VICTIM)
        elif loss == "freeze":
            net.freeze_node(VICTIM)
        else:
            for session in ("upstream", "downstream"):
                net.birdc(f"n{VICTIM}", "disable", session)
        net.wait_paths(2, timeout=seconds)
        withdrawn_ms = (time.monotonic() - t0) * 1000
        if loss == "drain":
            time.sleep(1.0)
            if balancer.startswith("natlb"):
                net.stop(net.natlb[VICTIM])
            else:
                stop_stateless(net, VICTIM)
        out, _ = load.communicate(timeout=seconds + 60)
        r = json.loads(out)
        r["withdrawn_ms"] = round(withdrawn_ms)
        return r
    finally:
        net.freeze_node(VICTIM, resume=True)
        net.close()


def table(results: dict) -> str:
    rows = ["| balancer (on each node) | loss | established lost | new failed | new delayed > 1 s "
            "| longest keep-alive wait | node withdrawn after |", "|---|---|---|---|---|---|---|"]
    for b, by_loss in results.items():
        for loss, r in by_loss.items():
            rows.append(f"| {b} | {loss} | {r['established_lost']} / {r['established']} | "
                        f"{r['new_failed']} / {r['new']} | {r['new_delayed']} | "
                        f"{r['keepalive_max_ms']:.0f} ms | {r['withdrawn_ms']} ms |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conns", type=int, default=30)
    ap.add_argument("--interval-ms", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=9)
    ap.add_argument("--balancers", default=",".join(BALANCERS))
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--out", default="bench-results")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    results: dict = {}
    for b in a.balancers.split(","):
        for loss in a.losses.split(","):
            r = run_one(b, loss, a.conns, a.interval_ms, a.seconds)
            results.setdefault(b, {})[loss] = r
            print(f"{b:14} {loss:7} " + json.dumps({k: v for k, v in r.items() if k != "slow"}),
                  flush=True)
    md = table(results)
    meta = (f"3 nodes behind R1 and R2 (BIRD 2, ECMP with L4 hashing, BFD 3 x 50 ms), node "
            f"{VICTIM} lost {a.seconds / 3:.0f} s into {a.seconds:.0f} s of load: {a.conns} "
            f"keep-alive connections (a request every 100 ms each) and a new connection every "
            f"{a.interval_ms} ms. natlb: examples/cluster/natlb.toml; nft-stateless: jhash "
            f"seed {SEED:#x} on every node, no health checks; vrrp: 2 nodes, keepalived "
            f"advert_int 1, no state sync, natlb (cluster = false) on both, node 1 (master) "
            f"lost; 'withdrawn' is then the backup's takeover. natlb-single: natlb with "
            f"cluster = false on the same 3 nodes. Keep-alive waits count requests that "
            f"completed.")
    publish(out, "cluster", md, meta, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
