"""A hostile client, run inside the client namespace by test_attack.py.

Each round sends one SYN to the VIP with a wrong TCP checksum (the backend's
stack drops it silently, so natlb sees a SYN that times out) and, on odd
rounds, RSTs that claim to come from each backend, acknowledging that SYN,
sent from the client side.  Bounded: `rounds` rounds, `interval_ms` apart.
Prints one JSON line when done.
"""

import argparse
import json
import random
import time

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.sendrecv import sendp


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", required=True)
    ap.add_argument("--vip", required=True)
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--backends", nargs="+", required=True)
    ap.add_argument("--router-mac", required=True)
    ap.add_argument("--iface", default="eth0")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--interval-ms", type=int, default=150)
    a = ap.parse_args()
    assert a.rounds <= 100
    eth = Ether(dst=a.router_mac)
    sent = {"bad_syns": 0, "spoofed_rsts": 0}
    for i in range(a.rounds):
        sport, seq = random.randint(20000, 60000), random.getrandbits(32)
        syn = IP(src=a.client, dst=a.vip) / TCP(sport=sport, dport=a.port, flags="S", seq=seq)
        bad = IP(bytes(syn))  # parsed back: the right checksum filled in, then spoiled
        bad[TCP].chksum ^= 0x5A5A
        sendp(eth / bad, iface=a.iface, verbose=False)
        sent["bad_syns"] += 1
        if i % 2:
            time.sleep(0.005)
            rsts = [eth / IP(src=b, dst=a.client) / TCP(sport=a.port, dport=sport, flags="RA",
                                                         seq=0, ack=(seq + 1) & 0xFFFFFFFF)
                    for b in a.backends]
            sendp(rsts, iface=a.iface, verbose=False)
            sent["spoofed_rsts"] += len(rsts)
        time.sleep(a.interval_ms / 1000)
    print(json.dumps(sent), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
