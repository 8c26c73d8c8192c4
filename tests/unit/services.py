"""Service tables shared by the unit tests."""

from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from natlb.core import BackendEntry, ServiceTable
from natlb.schedulers import Candidate, build_table

VIP = "192.0.2.100"
CLIENT = "198.51.100.7"
BACKENDS = ["203.0.113.10", "203.0.113.11", "203.0.113.12"]
VIP6 = "2001:db8::100"
CLIENT6 = "2001:db8:1::7"
BACKENDS6 = ["2001:db8:113::10", "2001:db8:113::11", "2001:db8:113::12"]


def make_service(scheduler="rr", port=80, backend_port=8080, protocol="tcp", sid=0,
                 addrs=BACKENDS, weights=None, down=(), draining=(), vip=VIP):
    """down: neither new flows nor alive; draining: alive, but no new flows."""
    weights = weights or [1] * len(addrs)
    entries = tuple(
        BackendEntry(a, backend_port, w, sid * 16 + i, a not in down and a not in draining,
                     a not in down)
        for i, (a, w) in enumerate(zip(addrs, weights, strict=True))
    )
    cands = [Candidate(f"{b.address}:{b.port}", b.weight, b.eligible) for b in entries]
    return ServiceTable(vip, port, protocol, scheduler, sid, entries,
                        tuple(build_table(scheduler, cands)))


@dataclass(frozen=True)
class Family:
    """One address family's client, VIP, backends and IP header: the tests
    that promise the same of both run over each."""

    ip: Any                  # scapy's IP or IPv6
    client: str
    vip: str
    backends: list[str]

    def service(self, **kw: Any) -> ServiceTable:
        return make_service(addrs=self.backends, vip=self.vip, **kw)


FAMILIES = {"ipv4": Family(IP, CLIENT, VIP, BACKENDS),
            "ipv6": Family(IPv6, CLIENT6, VIP6, BACKENDS6)}




def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def many_syns(n: int, src=lambda i: CLIENT, sport=lambda i: 1024 + i, dst=VIP,
              dport=80) -> list[bytes]:
    """n SYNs with right checksums, much faster than building each with scapy."""
    import ipaddress
    import struct

    daddr = ipaddress.IPv4Address(dst).packed
    out = []
    for i in range(n):
        saddr = ipaddress.IPv4Address(src(i)).packed
        tcp = struct.pack("!HHIIBBHHH", sport(i), dport, 1000, 0, 5 << 4, 0x02, 65535, 0, 0)
        tcp = tcp[:16] + struct.pack("!H", _csum(saddr + daddr + b"\0\x06\0\x14" + tcp)) + tcp[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, saddr, daddr)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        out.append(ip + tcp)
    return out


def many_services(n_services, n_backends, protocol="tcp"):
    """A raw config (for natlb.config.parse) of n_services, each with its own
    VIP and n_backends backends of its own."""
    return {"service": [{
        "name": f"svc{i}", "vip": f"192.0.2.{1 + i % 250}", "port": 80 + i // 250,
        "protocol": protocol, "health": {"kind": "none"},
        "backend": [{"address": f"203.0.113.{1 + (i * n_backends + j) % 250}",
                     "port": 8000 + (i * n_backends + j) // 250} for j in range(n_backends)],
    } for i in range(n_services)]}
