"""The bench's `nfqlb` path: Nordix nfqueue-loadbalancer's `nfqlb lb` on the router,
deployed SYN-only (its README's "Improved TCP performance"): a mangle prerouting rule
queues only a flow's first packet (conntrack state new: a TCP SYN, a UDP flow's first
datagram) to nfqlb, whose verdict carries a fwmark per backend (Maglev over the
5-tuple); an nft nat prerouting rule DNATs by that mark, and conntrack carries the rest
of the flow and un-NATs the replies, which never reach a queue.  The backends do not
hold the VIP, so DNAT by mark, not policy routing by mark, is what fits this testbed.

The queue rules are iptables' (iptables-nft: still nf_tables), as nfqlb's own nfqlb.sh
writes them: `-j NFQUEUE` is the xt target, which this kernel has, where nft's native
`queue` statement needs nft_queue, which it lacks (natlb falls back the same way).

nfqlb is not a Debian package: the bench runs it only where a binary is found
(--nfqlb, `nfqlb` on PATH, or DEFAULT_BINARY).  Its shared memory (`nfqlb init`) is
machine-wide, not per namespace, so the names carry the testbed's prefix and are
removed at each stop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

DEFAULT_BINARY = Path("/opt/nfqlb/bin/nfqlb")
NO_BINARY = "nfqlb: no binary (--nfqlb PATH); not measured"
TABLE = "natlb_bench_nfqlb"          # nft: DNAT by mark
QUEUE_CHAIN = "NATLB_BENCH_NFQLB"    # iptables mangle: first packets to the queues
MARK_BASE = 100          # backend k gets fwmark 100 + k, as nfqlb.sh's `lb` numbers them
# One `nfqlb lb` per service group: web (HTTP and DNS, all backends) and bulk (iperf3,
# whose control and data connections must all reach b1, so its table holds b1 only).
QUEUES = {"web": 2, "bulk": 3}
READY_S = 5.0


def usable(binary: str | None) -> bool:
    return bool(binary) and os.path.isfile(binary) and os.access(binary, os.X_OK)


def find_binary() -> str | None:
    """`nfqlb` on PATH, else DEFAULT_BINARY if it is there."""
    found = shutil.which("nfqlb")
    if found:
        return found
    return str(DEFAULT_BINARY) if usable(str(DEFAULT_BINARY)) else None


def mark(k: int) -> int:
    return MARK_BASE + k


def shm_names(prefix: str) -> dict[str, str]:
    """Target tables and fragment-stats areas of both `nfqlb lb`s."""
    return {f"{kind}-{svc}": f"{prefix}-nfqlb-{kind}-{svc}"
            for svc in QUEUES for kind in ("target", "ft")}


def remove_shm(names: list[str]) -> None:
    for n in names:
        Path("/dev/shm", n).unlink(missing_ok=True)


def ruleset(nft: str, vip: str, backends: dict[str, str]) -> str:
    """DNAT a new flow by the mark nfqlb set (nat rules see only a flow's first packet)."""
    dnat = "\n    ".join(f"{nft} daddr {vip} meta mark {mark(k)} dnat to {addr}"
                         for k, addr in enumerate(backends.values(), 1))
    return f"""
table {nft} {TABLE} {{
  chain by_mark {{
    type nat hook prerouting priority dstnat;
    {dnat}
  }}
}}
"""


# What queued() names each queue rule's counter, in the chain's order.
RULES = (("tcp80", "tcp", 80, "web"), ("udp53", "udp", 53, "web"), ("tcp5201", "tcp", 5201, "bulk"))


def iptables(family: int) -> str:
    return "ip6tables" if family == 6 else "iptables"


def queue_setup(family: int, vip: str) -> list[list[str]]:
    """iptables commands: the chain of queue rules, then the jump to it."""
    ipt = [iptables(family), "-t", "mangle"]
    cmds = [[*ipt, "-N", QUEUE_CHAIN]]
    cmds += [[*ipt, "-A", QUEUE_CHAIN, "-d", vip, "-p", proto, "--dport", str(port),
              "-m", "conntrack", "--ctstate", "NEW", "-j", "NFQUEUE",
              "--queue-num", str(QUEUES[svc])] for _, proto, port, svc in RULES]
    return cmds + [[*ipt, "-A", "PREROUTING", "-d", vip, "-j", QUEUE_CHAIN]]


def mangle_table(family: int) -> list[str]:
    """The nft table iptables-nft keeps its mangle chains in."""
    return ["ip6" if family == 6 else "ip", "mangle"]


def queue_teardown(family: int, vip: str, drop_table: bool) -> list[list[str]]:
    """Undo queue_setup; and drop the mangle table if queue_setup created it (an empty
    one still hooks every packet of the paths measured after this one)."""
    ipt = [iptables(family), "-t", "mangle"]
    cmds = [[*ipt, "-D", "PREROUTING", "-d", vip, "-j", QUEUE_CHAIN],
            [*ipt, "-F", QUEUE_CHAIN], [*ipt, "-X", QUEUE_CHAIN]]
    return cmds + ([["nft", "delete", "table", *mangle_table(family)]] if drop_table else [])


def queue_listing(family: int) -> list[str]:
    return [iptables(family), "-t", "mangle", "-nvxL", QUEUE_CHAIN]


def queued(listing: str) -> dict[str, int]:
    """Packets each queue rule sent to nfqlb, from `iptables -nvxL` of QUEUE_CHAIN (two
    header lines, then one line per rule, its packet count first)."""
    lines = listing.strip().splitlines()[2:]
    if len(lines) != len(RULES):
        raise RuntimeError(f"nfqlb path: unexpected queue rules: {listing!r}")
    return {name: int(line.split()[0]) for (name, *_), line in zip(RULES, lines, strict=True)}


def lb_argv(binary: str, svc: str, names: dict[str, str]) -> list[str]:
    return [binary, "lb", f"--queue={QUEUES[svc]}", f"--tshm={names[f'target-{svc}']}",
            f"--ft_shm={names[f'ft-{svc}']}"]


def wait_ready(p: subprocess.Popen, log: Path) -> None:
    """`nfqlb lb` prints its socket buffer size once bound to its queue."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if "SO_RCVBUF" in log.read_text():
            return
        if p.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"nfqlb lb did not bind its queue: {log.read_text().strip()!r}")


# Run in the client namespace with the VIP as argument: 30 HTTP requests on new
# connections (which backends answered), 6 DNS queries from 6 sockets (how many got
# an answer).  The bulk port is left to its test (a bare connection makes iperf3's
# server complain): its figures say whether it passed, its queued packets whether
# nfqlb saw it.
PROBE = r"""
import http.client, json, socket, sys
vip = sys.argv[1]
seen = []
for _ in range(30):
    c = http.client.HTTPConnection(vip, 80, timeout=2)
    c.request("GET", "/")
    seen.append(c.getresponse().read().decode().strip())
    c.close()
query = (b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
         b"\x03www\x05bench\x04test\x00\x00\x01\x00\x01")
answered = 0
for _ in range(6):
    s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.sendto(query, (vip, 53))
    try:
        r = s.recv(512)
        answered += r[:2] == b"\x12\x34" and int.from_bytes(r[6:8], "big") >= 1
    except OSError:
        pass
    s.close()
print(json.dumps({"seen": seen, "dns_answered": answered}))
"""


def check(probe: dict, counts: dict[str, int], backends: list[str]) -> None:
    """Before measuring: nfqlb's marks spread new connections over every backend,
    UDP is answered through it, and only first packets were queued (a connection
    sends at least 5 packets to the VIP: SYN, ACK, request, FIN, ACK; SYN-only
    queues one, a retransmitted SYN perhaps two)."""
    problems = []
    if set(probe["seen"]) != set(backends):
        problems.append(f"30 HTTP requests reached {sorted(set(probe['seen']))}, "
                        f"not all of {backends}")
    if probe["dns_answered"] != 6:
        problems.append(f"{probe['dns_answered']} of 6 DNS queries answered")
    if not 30 <= counts["tcp80"] <= 45:
        problems.append(f"{counts['tcp80']} TCP packets queued for 30 connections "
                        "(SYN-only queues about 30)")
    if not 1 <= counts["udp53"] <= 6:
        problems.append(f"{counts['udp53']} UDP packets queued for 6 DNS flows")
    if problems:
        raise RuntimeError("nfqlb path: " + "; ".join(problems))
