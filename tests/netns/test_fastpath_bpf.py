"""The tc fast path's two programs (csrc/bpf/fastpath.bpf.c) run on
scapy-built frames with BPF_PROG_TEST_RUN: what learn installs from a
packet natlb marked, and what carry does with each kind of packet.  The
programs run in a namespace of this test's own (bpf_check_mtu and the test
run need real interface indexes), from one thread that entered it."""

import ctypes
import os
import socket
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP
from scapy.layers.l2 import Ether

from natlb.core import MARK_FAST, MARK_FORWARD, FastPath

TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
CLIENT, VIP, BACKEND = "198.51.100.2", "192.0.2.100", "203.0.113.6"
CPORT, VPORT, BPORT = 40000, 80, 8080
BID = 3
CLONE_NEWNET = 0x40000000


@pytest.fixture(scope="module")
def ns():
    """A namespace with two interfaces (a veth pair): the client's and the
    backend's, with a smaller MTU."""
    name = f"nlbpf{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "cl0", "type", "veth", "peer", "name",
                        "be0"], check=True)
        for dev, mtu in (("cl0", "1500"), ("be0", "1400")):
            subprocess.run(["ip", "-n", name, "link", "set", dev, "mtu", mtu, "up"], check=True)
        idx = {}
        for dev in ("cl0", "be0"):
            out = subprocess.run(["ip", "-n", name, "-o", "link", "show", dev], check=True,
                                 capture_output=True, text=True).stdout
            idx[dev] = int(out.split(":")[0])
        yield name, idx
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture(scope="module")
def inside(ns):
    """Runs functions in a thread that lives in the test namespace."""
    name, _ = ns

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    with ThreadPoolExecutor(1, initializer=enter) as ex:
        yield lambda fn, *a, **kw: ex.submit(fn, *a, **kw).result()


def open_fastpath(inside, tcp_ms: int = 60_000, closing_ms: int = 60_000,
                  synack_window_ms: int = 60_000) -> FastPath:
    fp = inside(FastPath, max_backends=16, max_flows=64, tcp_lifetime_ms=tcp_ms,
                udp_lifetime_ms=30_000, tcp_closing_ms=closing_ms, syn_lifetime_ms=30_000,
                synack_window_ms=synack_window_ms)
    fp.set_backend(BID, VIP, VPORT, BACKEND, BPORT, socket.IPPROTO_TCP)
    fp.set_backend(BID + 1, VIP, 53, BACKEND, 5353, socket.IPPROTO_UDP)
    return fp


@pytest.fixture
def fp(inside):
    f = open_fastpath(inside)
    yield f
    f.close()


def frame(ip) -> bytes:
    return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)


def tcp(src, dst, sport, dport, flags="A", ttl=64, payload=b"x" * 20, **ip_kw):
    return frame(IP(src=src, dst=dst, ttl=ttl, **ip_kw) /
                 TCP(sport=sport, dport=dport, flags=flags, seq=1000, ack=2000) / payload)


def learn(inside, fp, ns, packet=None, bid=BID):
    """natlb's marked client packet, rewritten by nft, leaving via be0."""
    _, idx = ns
    packet = packet or tcp(CLIENT, BACKEND, CPORT, BPORT)
    return inside(fp.test_run, True, packet, mark=MARK_FORWARD | MARK_FAST | bid,
                  ifindex=idx["be0"], ingress_ifindex=idx["cl0"])


def carry(inside, fp, packet, ifindex):
    return inside(fp.test_run, False, packet, ifindex=ifindex, ingress_ifindex=ifindex)


def checksums_ok(ip: IP) -> bool:
    """scapy recomputes what it is told to forget; equal means right."""
    fresh = ip.copy()
    del fresh.chksum
    del fresh.payload.chksum
    return bytes(IP(bytes(fresh))) == bytes(ip)


def test_learn_installs_both_directions_and_clears_the_mark(inside, fp, ns):
    r = learn(inside, fp, ns)
    assert (r.retval, r.mark) == (TC_ACT_OK, 0)
    assert fp.has_flow(CLIENT, VIP, CPORT, VPORT, socket.IPPROTO_TCP)
    assert fp.has_flow(BACKEND, CLIENT, BPORT, CPORT, socket.IPPROTO_TCP)
    assert fp.flow_count() == 2


def test_learn_ignores_other_marks_and_stale_ones(inside, fp, ns):
    _, idx = ns
    for mark in (MARK_FORWARD | BID, 0x6E617461, MARK_FORWARD | MARK_FAST | 9):
        r = inside(fp.test_run, True, tcp(CLIENT, BACKEND, CPORT, BPORT), mark=mark,
                   ifindex=idx["be0"], ingress_ifindex=idx["cl0"])
        assert r.retval == TC_ACT_OK
    # The slot names another address: a publish moved the backend.
    learn(inside, fp, ns, tcp(CLIENT, "203.0.113.7", CPORT, BPORT))
    assert fp.flow_count() == 0


def test_carry_rewrites_both_ways_with_right_checksums_ttl_and_counters(inside, fp, ns):
    _, idx = ns
    learn(inside, fp, ns)
    fwd = tcp(CLIENT, VIP, CPORT, VPORT, ttl=64)
    r = carry(inside, fp, fwd, idx["cl0"])
    assert r.retval == TC_ACT_REDIRECT
    ip = Ether(r.packet)[IP]
    assert (ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport, ip.ttl) == (
        CLIENT, BACKEND, CPORT, BPORT, 63)
    assert checksums_ok(ip) and bytes(ip[TCP].payload) == b"x" * 20
    rev = tcp(BACKEND, CLIENT, BPORT, CPORT, ttl=2, payload=b"y" * 100)
    r = carry(inside, fp, rev, idx["be0"])
    ip = Ether(r.packet)[IP]
    assert r.retval == TC_ACT_REDIRECT
    assert (ip.src, ip.dst, ip[TCP].sport, ip[TCP].dport, ip.ttl) == (
        VIP, CLIENT, VPORT, CPORT, 1)
    assert checksums_ok(ip)
    # Bytes as natlb counts them: the IP packet, without the Ethernet header.
    assert fp.counters()[BID] == (1, len(fwd) - 14, 1, len(rev) - 14)


def test_udp_is_carried_and_a_zero_checksum_stays_zero(inside, fp, ns):
    _, idx = ns
    learn(inside, fp, ns, frame(IP(src=CLIENT, dst=BACKEND) / UDP(sport=5000, dport=5353) / b"q"),
          bid=BID + 1)
    r = carry(inside, fp, frame(IP(src=CLIENT, dst=VIP) / UDP(sport=5000, dport=53) / b"q"),
              idx["cl0"])
    ip = Ether(r.packet)[IP]
    assert r.retval == TC_ACT_REDIRECT and (ip.dst, ip[UDP].dport) == (BACKEND, 5353)
    assert checksums_ok(ip)
    zero = IP(src=BACKEND, dst=CLIENT) / UDP(sport=5353, dport=5000, chksum=0) / b"a"
    r = carry(inside, fp, frame(zero), idx["be0"])
    ip = Ether(r.packet)[IP]
    assert r.retval == TC_ACT_REDIRECT and (ip.src, ip[UDP].sport) == (VIP, 53)
    assert ip[UDP].chksum == 0


def both_sides(fp) -> tuple[bool, bool]:
    return (fp.has_flow(CLIENT, VIP, CPORT, VPORT, socket.IPPROTO_TCP),
            fp.has_flow(BACKEND, CLIENT, BPORT, CPORT, socket.IPPROTO_TCP))


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_syn_passes_and_deletes_both_sides(inside, fp, ns, side):
    _, idx = ns
    learn(inside, fp, ns)
    packet, dev = ((tcp(CLIENT, VIP, CPORT, VPORT, flags="S"), "cl0") if side == "client"
                   else (tcp(BACKEND, CLIENT, BPORT, CPORT, flags="SA"), "be0"))
    r = carry(inside, fp, packet, idx[dev])
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert both_sides(fp) == (False, False)
    assert fp.read_events() == [] and fp.counters() == {}


SIDES = {"client": (CLIENT, VIP, CPORT, VPORT, "cl0", BACKEND, BPORT),
         "server": (BACKEND, CLIENT, BPORT, CPORT, "be0", VIP, VPORT)}


def carried_and_told(inside, fp, ns, side, flags, payload=b""):
    """Sends one packet with flags from side: it must be carried, rewritten,
    uncounted, and its head as it arrived be in the ring."""
    _, idx = ns
    src, dst, sport, dport, dev, new_addr, new_port = SIDES[side]
    packet = tcp(src, dst, sport, dport, flags=flags, payload=payload)
    r = carry(inside, fp, packet, idx[dev])
    assert r.retval == TC_ACT_REDIRECT
    ip = Ether(r.packet)[IP]
    got = (ip.dst, ip[TCP].dport) if side == "client" else (ip.src, ip[TCP].sport)
    assert got == (new_addr, new_port) and checksums_ok(ip)
    assert fp.counters() == {}            # natlb counts it when it applies it
    [(ifindex, head, tot_len)] = fp.read_events()
    assert ifindex == idx[dev] and tot_len == len(packet) - 14
    assert head == packet[14:14 + 128]
    return packet


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_fin_is_carried_told_and_keeps_both_entries(inside, fp, ns, side):
    learn(inside, fp, ns)
    carried_and_told(inside, fp, ns, side, "FA")
    assert both_sides(fp) == (True, True)
    # The final ACKs are carried too, and counted as any.
    _, idx = ns
    assert carry(inside, fp, tcp(CLIENT, VIP, CPORT, VPORT), idx["cl0"]).retval == \
        TC_ACT_REDIRECT
    assert fp.counters()[BID][0] == 1


def test_a_fin_with_data_is_told_by_its_head(inside, fp, ns):
    learn(inside, fp, ns)
    carried_and_told(inside, fp, ns, "server", "FPA", payload=b"d" * 600)


def test_a_fin_cuts_both_deadlines_to_the_closing_timeout(inside, ns):
    """Closing timeout 0: the entries die at the FIN, so neither side's
    next packet is carried (a 60 s lifetime would have carried it)."""
    _, idx = ns
    fp = open_fastpath(inside, tcp_ms=60_000, closing_ms=0)
    try:
        learn(inside, fp, ns)
        assert both_sides(fp) == (True, True)
        carried_and_told(inside, fp, ns, "client", "FA")
        for packet, dev in ((tcp(CLIENT, VIP, CPORT, VPORT), "cl0"),
                            (tcp(BACKEND, CLIENT, BPORT, CPORT), "be0")):
            assert carry(inside, fp, packet, idx[dev]).retval == TC_ACT_OK
        assert both_sides(fp) == (False, False)
    finally:
        fp.close()


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("flags", ["R", "RA"])
def test_an_rst_is_carried_told_and_deletes_both_sides(inside, fp, ns, side, flags):
    learn(inside, fp, ns)
    carried_and_told(inside, fp, ns, side, flags)
    assert both_sides(fp) == (False, False)


@pytest.mark.parametrize("flags", ["FA", "R", "S"])
def test_a_spoofed_fin_rst_or_syn_changes_nothing(inside, fp, ns, flags):
    _, idx = ns
    learn(inside, fp, ns)
    packet = tcp(CLIENT, VIP, CPORT, VPORT, flags=flags)
    r = carry(inside, fp, packet, idx["be0"])           # the client is not there
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert both_sides(fp) == (True, True) and fp.read_events() == []


def test_no_room_in_the_ring_means_the_queued_path(inside, fp, ns):
    """Nobody reads the ring: once it is full a FIN is not carried (natlb
    sees it queued) and nothing is lost; read, it has room again."""
    _, idx = ns
    learn(inside, fp, ns)
    fin = tcp(CLIENT, VIP, CPORT, VPORT, flags="FA")
    carried = 0
    for _ in range(4096):                   # the ring holds about 1800
        r = carry(inside, fp, fin, idx["cl0"])
        if r.retval == TC_ACT_OK:
            break
        assert r.retval == TC_ACT_REDIRECT
        carried += 1
    assert (r.retval, r.packet) == (TC_ACT_OK, fin) and carried > 100
    assert len(fp.read_events(8192)) == carried     # one record per carried FIN
    assert fp.ring_full() == 1                      # counted, for status and metrics
    assert carry(inside, fp, fin, idx["cl0"]).retval == TC_ACT_REDIRECT


@pytest.mark.parametrize("packet,where", [
    (frame(IP(src=CLIENT, dst=VIP, flags="MF") / TCP(sport=CPORT, dport=VPORT, flags="A")
           / (b"x" * 16)), "cl0"),
    (frame(IP(src=CLIENT, dst=VIP, frag=3, proto=6) / (b"x" * 16)), "cl0"),  # a later one
    (tcp(CLIENT, VIP, CPORT, VPORT, options=[IPOption_NOP()] * 4), "cl0"),        # IP options
    (tcp(CLIENT, VIP, CPORT, VPORT, ttl=1), "cl0"),
    (tcp(CLIENT, VIP, CPORT, VPORT), "be0"),                                   # wrong ingress
    (tcp(BACKEND, CLIENT, BPORT, CPORT), "cl0"),                               # spoofed reply
    (tcp(CLIENT, VIP, CPORT + 1, VPORT), "cl0"),                               # no entry
    (frame(IP(src=CLIENT, dst=VIP) / ICMP()), "cl0"),
    (tcp(CLIENT, VIP, CPORT, VPORT, payload=b"z" * 1420), "cl0"),              # > be0's MTU
], ids=["first-fragment", "later-fragment", "options", "ttl", "wrong-ingress", "spoofed",
        "unknown", "icmp", "too-big"])
def test_what_is_not_carried_passes_untouched(inside, fp, ns, packet, where):
    _, idx = ns
    learn(inside, fp, ns)
    r = carry(inside, fp, packet, idx[where])
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert fp.counters() == {}


def test_an_expired_entry_passes_and_goes(inside, ns):
    _, idx = ns
    fp = open_fastpath(inside, tcp_ms=0)
    try:
        learn(inside, fp, ns)
        packet = tcp(CLIENT, VIP, CPORT, VPORT)
        assert carry(inside, fp, packet, idx["cl0"]).retval == TC_ACT_OK
        assert not fp.has_flow(CLIENT, VIP, CPORT, VPORT, socket.IPPROTO_TCP)
    finally:
        fp.close()


def test_flush_forgets_every_flow(inside, fp, ns):
    learn(inside, fp, ns)
    learn(inside, fp, ns, tcp(CLIENT, BACKEND, CPORT + 1, BPORT))
    assert fp.flow_count() == 4
    assert fp.flush() == 4 and fp.flow_count() == 0
    # Many: the walk must reach every bucket, not only the first ones.
    for port in range(2000, 2030):
        learn(inside, fp, ns, tcp(CLIENT, BACKEND, port, BPORT))
    assert fp.flow_count() == 60
    assert fp.flush() == 60 and fp.flow_count() == 0


def test_flush_interface_forgets_both_entries_of_the_flows_through_it_only(inside, fp, ns):
    """A device that is gone (natlb/fastpath.py on RTM_DELLINK): the flows
    in from it or out to it are forgotten, the others kept."""
    _, idx = ns
    gone = 9999          # no device: the test run takes an ingress_ifindex as given

    def learned(cport: int, ingress: int) -> None:
        inside(fp.test_run, True, tcp(CLIENT, BACKEND, cport, BPORT),
               mark=MARK_FORWARD | MARK_FAST | BID, ifindex=idx["be0"], ingress_ifindex=ingress)

    def entries(cport: int) -> tuple[bool, bool]:
        return (fp.has_flow(CLIENT, VIP, cport, VPORT, socket.IPPROTO_TCP),
                fp.has_flow(BACKEND, CLIENT, BPORT, cport, socket.IPPROTO_TCP))

    learned(CPORT, idx["cl0"])
    learned(CPORT + 1, gone)
    assert fp.flow_count() == 4
    assert fp.flush_interface(0) == 0 and fp.flow_count() == 4
    # gone: the second flow's forward entry comes in from it, its reply
    # entry goes out to it.
    assert fp.flush_interface(gone) == 2
    assert entries(CPORT) == (True, True) and entries(CPORT + 1) == (False, False)
    assert fp.flush_interface(gone) == 0
    learned(CPORT + 1, gone)
    # be0 is on one side of each flow.
    assert fp.flush_interface(idx["be0"]) == 4 and fp.flow_count() == 0


# ---- a new connection's handshake, learned from natlb's fast SYN ----------

def learn_syn(inside, fp, ns):
    """natlb marked the client's first SYN (seq 1000) fast."""
    learn(inside, fp, ns, tcp(CLIENT, BACKEND, CPORT, BPORT, flags="S", payload=b""))
    assert both_sides(fp) == (True, True)


def hs(side: str, flags: str, ack: int = 2000) -> bytes:
    src, dst, sport, dport, *_ = SIDES[side]
    return frame(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags, seq=1000,
                                            ack=ack))


def test_the_handshake_is_carried_each_step_told_then_only_counted(inside, fp, ns):
    _, idx = ns
    learn_syn(inside, fp, ns)
    # The client's ACK before any SYN-ACK was carried: natlb's to see.
    early = hs("client", "A", ack=5001)
    assert carry(inside, fp, early, idx["cl0"]).retval == TC_ACT_OK
    # The SYN-ACK answering the SYN: carried, told (natlb: SYN_RECV).
    synack = hs("server", "SA", ack=1001)
    r = carry(inside, fp, synack, idx["be0"])
    assert r.retval == TC_ACT_REDIRECT and Ether(r.packet)[IP].src == VIP
    [(_, head, _)] = fp.read_events()
    assert head == synack[14:]
    # The client's last ACK: carried, told (natlb: ESTABLISHED).
    ack = hs("client", "A", ack=5001)
    assert carry(inside, fp, ack, idx["cl0"]).retval == TC_ACT_REDIRECT
    [(_, head, _)] = fp.read_events()
    assert head == ack[14:]
    # From then on both ways are carried and counted, untold.
    for packet, dev in ((tcp(CLIENT, VIP, CPORT, VPORT), "cl0"),
                        (tcp(BACKEND, CLIENT, BPORT, CPORT), "be0")):
        assert carry(inside, fp, packet, idx[dev]).retval == TC_ACT_REDIRECT
    assert fp.read_events() == []
    assert fp.counters()[BID][0] == 1 and fp.counters()[BID][2] == 1


@pytest.mark.parametrize("flags", ["R", "RA"])
def test_a_backends_rst_to_the_syn_is_never_carried_and_deletes_both(inside, fp, ns, flags):
    """natlb re-steers the held SYN on it: the client must never see it."""
    _, idx = ns
    learn_syn(inside, fp, ns)
    rst = hs("server", flags, ack=1001)
    r = carry(inside, fp, rst, idx["be0"])
    assert (r.retval, r.packet) == (TC_ACT_OK, rst)
    assert both_sides(fp) == (False, False) and fp.read_events() == []


@pytest.mark.parametrize("packet", [hs("server", "SA", ack=77), hs("server", "S"),
                                    hs("server", "SAF", ack=1001)],
                         ids=["wrong-ack", "syn", "syn-fin"])
def test_anything_but_the_synack_the_syn_asks_for_is_natlbs(inside, fp, ns, packet):
    _, idx = ns
    learn_syn(inside, fp, ns)
    r = carry(inside, fp, packet, idx["be0"])
    assert (r.retval, r.packet) == (TC_ACT_OK, packet)
    assert both_sides(fp) == (False, False) and fp.read_events() == []


def test_the_backend_before_its_synack_is_natlbs(inside, fp, ns):
    _, idx = ns
    learn_syn(inside, fp, ns)
    data = hs("server", "PA", ack=1001)
    assert carry(inside, fp, data, idx["be0"]).retval == TC_ACT_OK
    assert both_sides(fp) == (True, True) and fp.read_events() == []


def test_a_late_synack_is_natlbs(inside, ns):
    """After the window (before natlb's held-SYN deadline) the SYN-ACK goes
    to natlb, which may have moved the flow and then drops it."""
    _, idx = ns
    fp = open_fastpath(inside, synack_window_ms=0)
    try:
        learn_syn(inside, fp, ns)
        synack = hs("server", "SA", ack=1001)
        assert carry(inside, fp, synack, idx["be0"]).retval == TC_ACT_OK
        assert fp.read_events() == []
    finally:
        fp.close()


def test_the_client_repeating_its_syn_is_natlbs(inside, fp, ns):
    _, idx = ns
    learn_syn(inside, fp, ns)
    syn = hs("client", "S")
    assert carry(inside, fp, syn, idx["cl0"]).retval == TC_ACT_OK
    assert both_sides(fp) == (False, False)


def test_a_udp_flows_first_answer_is_told_the_next_only_counted(inside, fp, ns):
    _, idx = ns
    learn(inside, fp, ns, frame(IP(src=CLIENT, dst=BACKEND) / UDP(sport=5000, dport=5353) / b"q"),
          bid=BID + 1)
    answer = frame(IP(src=BACKEND, dst=CLIENT) / UDP(sport=5353, dport=5000) / b"a")
    assert carry(inside, fp, answer, idx["be0"]).retval == TC_ACT_REDIRECT
    [(_, head, tot_len)] = fp.read_events()
    assert head == answer[14:] and tot_len == len(answer) - 14
    assert carry(inside, fp, answer, idx["be0"]).retval == TC_ACT_REDIRECT
    assert fp.read_events() == [] and fp.counters()[BID + 1][2] == 1
