"""nl_observe: a packet the kernel carried alone and told natlb of (the tc
fast path: FIN, RST, the handshake's SYN-ACK and last ACK, a UDP flow's
first answer) reaches natlb's flow afterwards, as the queued packet would
have, with nothing sent and nothing created; over both families where the
kernel carries both (the `fam` fixture)."""

import pytest
from scapy.layers.inet import IP, TCP, UDP

from natlb.core import MARK_FAST, PKT_HEAD_ONLY, Core, CoreConfig, Verdict

from .services import BACKENDS, CLIENT, FAMILIES, VIP, Family, make_service

CPORT = 40000
V4 = FAMILIES["ipv4"]


def established(core: Core, fam: Family = V4) -> str:
    """A client's connection through the handshake; its backend."""
    core.publish([fam.service()])
    v, mark = core.decide(bytes(fam.ip(src=fam.client, dst=fam.vip) /
                                TCP(sport=CPORT, dport=80, flags="S", seq=100)), 1)
    assert v == Verdict.MARK
    backend = fam.backends[mark & 0xFFF]
    core.decide(bytes(fam.ip(src=backend, dst=fam.client) /
                      TCP(sport=8080, dport=CPORT, flags="SA", seq=500, ack=101)), 2)
    core.decide(bytes(fam.ip(src=fam.client, dst=fam.vip) /
                      TCP(sport=CPORT, dport=80, flags="A", seq=101, ack=501)), 3)
    return backend


def client(flags: str, payload: bytes = b"", fam: Family = V4) -> bytes:
    return bytes(fam.ip(src=fam.client, dst=fam.vip) /
                 TCP(sport=CPORT, dport=80, flags=flags, seq=101, ack=501) / payload)


def server(backend: str, flags: str, fam: Family = V4) -> bytes:
    return bytes(fam.ip(src=backend, dst=fam.client) /
                 TCP(sport=8080, dport=CPORT, flags=flags, seq=501, ack=102))


def gauges(core: Core) -> tuple[int, int]:
    """(active, inactive) flows over all backends."""
    bs = core.backend_counters(16)
    return sum(b.active_flows for b in bs), sum(b.inactive_flows for b in bs)


@pytest.fixture
def twin():
    """A second core, to decide as queued what the first one observes."""
    c = Core(CoreConfig(max_flows=1024, workers=1, fastpath=False))
    yield c
    c.check_table()
    c.close()


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("flags", ["FA", "RA", "R"])
def test_an_observed_fin_or_rst_moves_the_flow_as_a_queued_one(core, twin, fam, side, flags):
    be, be_twin = established(core, fam), established(twin, fam)
    assert be == be_twin and gauges(core) == (1, 0)
    pkt = client(flags, fam=fam) if side == "client" else server(be, flags, fam)
    assert core.observe(pkt, 10) is True
    assert twin.decide(pkt, 10)[0] == Verdict.MARK
    assert gauges(core) == gauges(twin) == (0, 1)
    assert core.service_counters(1) == twin.service_counters(1)
    assert core.backend_counters(16) == twin.backend_counters(16)
    assert core.reasons() == twin.reasons()
    # Closed as the queued packet closes it: the port's next SYN is a new flow.
    syn = bytes(fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=CPORT, dport=80, flags="S",
                                                          seq=9000))
    for c in (core, twin):
        c.decide(syn, 20)
    assert core.service_counters(1)[0].new_flows == twin.service_counters(1)[0].new_flows == 2


def test_an_rst_observed_after_a_fin_closes(core):
    established(core)
    assert core.observe(client("FA"), 10)
    assert core.observe(client("RA"), 11)
    assert gauges(core) == (0, 1)
    assert core.flow_count() == 1


def test_an_unknown_flow_changes_nothing(core):
    established(core)
    before = (core.service_counters(1), core.backend_counters(16), core.reasons(),
              core.flow_count())
    stray = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=CPORT + 1, dport=80, flags="FA"))
    stray_reply = bytes(IP(src=BACKENDS[0], dst=CLIENT) / TCP(sport=8080, dport=CPORT + 1,
                                                             flags="R"))
    not_ours = bytes(IP(src=CLIENT, dst="192.0.2.200") / TCP(sport=CPORT, dport=80, flags="R"))
    for pkt in (stray, stray_reply, not_ours):
        assert core.observe(pkt, 10) is False
    after = (core.service_counters(1), core.backend_counters(16), core.reasons(),
             core.flow_count())
    assert after == before


def test_a_client_syn_is_never_observed_and_nothing_creates_a_flow(core):
    established(core)
    before = core.service_counters(1)
    for flags in ("S", "SA", "SF"):
        assert core.observe(client(flags, b"data"), 10) is False
    assert core.service_counters(1) == before and gauges(core) == (1, 0)
    core.publish([make_service(port=81)])
    syn = bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=5, dport=81, flags="S"))
    assert core.observe(syn, 10) is False and core.flow_count() == 1
    core.publish([make_service(protocol="udp", port=53, backend_port=53)])
    dgram = bytes(IP(src=CLIENT, dst=VIP) / UDP(sport=5, dport=53) / b"q")
    answer = bytes(IP(src=BACKENDS[0], dst=CLIENT) / UDP(sport=53, dport=5) / b"a")
    assert core.observe(dgram, 10) is False and core.observe(answer, 10) is False
    assert core.flow_count() == 1


def test_an_observed_handshake_moves_the_flow_as_a_queued_one(core, twin, fam):
    """The SYN queued, its SYN-ACK and the client's last ACK carried and
    told: natlb's flow is where the queued handshake leaves it."""
    syn = bytes(fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=CPORT, dport=80, flags="S",
                                                          seq=100))
    for c in (core, twin):
        c.publish([fam.service()])
    be = fam.backends[core.decide(syn, 1)[1] & 0xFFF]
    assert fam.backends[twin.decide(syn, 1)[1] & 0xFFF] == be
    synack = bytes(fam.ip(src=be, dst=fam.client) / TCP(sport=8080, dport=CPORT, flags="SA",
                                                        seq=500, ack=101))
    ack = bytes(fam.ip(src=fam.client, dst=fam.vip) / TCP(sport=CPORT, dport=80, flags="A",
                                                          seq=101, ack=501))
    assert core.observe(synack, 2) and core.observe(ack, 3)
    twin.decide(synack, 2)
    twin.decide(ack, 3)
    assert gauges(core) == gauges(twin) == (1, 0)
    assert core.backend_counters(16) == twin.backend_counters(16)
    assert core.reasons() == twin.reasons()
    # ESTABLISHED in both (no longer embryonic): the same answers to a FIN.
    fin = client("FA", fam=fam)
    assert core.observe(fin, 4) and twin.decide(fin, 4)[0] == Verdict.MARK
    assert gauges(core) == gauges(twin) == (0, 1)


def test_an_observed_udp_answer_marks_the_flow_answered(fam):
    core = Core(CoreConfig(max_flows=1024, workers=1, fastpath=True))
    try:
        core.publish([fam.service(protocol="udp", port=53, backend_port=53)])
        dgram = bytes(fam.ip(src=fam.client, dst=fam.vip) / UDP(sport=5000, dport=53) / b"q")
        _, mark = core.decide(dgram, 1)
        be = fam.backends[mark & 0xFFF]
        assert not core.decide(dgram, 2)[1] & MARK_FAST      # no answer yet
        answer = bytes(fam.ip(src=be, dst=fam.client) / UDP(sport=53, dport=5000) / b"a")
        assert core.observe(answer, 3)
        svc = core.service_counters(1)[0]
        assert (svc.packets_in, svc.packets_out) == (2, 1)
        assert core.decide(dgram, 4)[1] & MARK_FAST          # answered
    finally:
        core.close()


def test_a_whole_packet_with_a_bad_checksum_is_not_believed(core):
    established(core)
    bad = IP(client("R"))
    bad[TCP].chksum ^= 0x1234
    assert core.observe(bytes(bad), 10) is False
    assert core.reasons()["bad_checksum"] == 1 and gauges(core) == (1, 0)
    bad_ip = IP(client("FA"))
    bad_ip.chksum ^= 0x1234
    assert core.observe(bytes(bad_ip), 10) is False
    assert core.reasons()["bad_checksum"] == 2 and gauges(core) == (1, 0)


def test_a_head_is_believed_as_far_as_the_kernel_carried_it(core, fam):
    """A FIN with more data than the record holds: its L4 sum cannot be
    checked, and the kernel forwarded it (no router checks it): natlb's
    flow follows, as the queued path follows a head-only copy.  An IPv4
    header is whole, and is still checked (test below)."""
    established(core, fam)
    fin = fam.ip(client("FA", b"z" * 400, fam))
    fin[TCP].chksum ^= 0x1234            # unknowable from the head
    head = bytes(fin)[:128]
    assert core.observe(head, 10, PKT_HEAD_ONLY) is True
    assert gauges(core) == (0, 1)
    svc = core.service_counters(1)[0]
    hdrs = len(bytes(fin)) - 400                      # IP + TCP header
    assert (svc.packets_in, svc.bytes_in) == (3, 2 * hdrs + len(fin))  # from the IP length


def test_a_head_with_a_bad_ip_header_is_not_believed(core):
    established(core)
    fin = IP(client("FA", b"z" * 400))
    fin.chksum ^= 0x1234
    assert core.observe(bytes(fin)[:128], 10, PKT_HEAD_ONLY) is False
    assert core.reasons()["bad_checksum"] == 1 and gauges(core) == (1, 0)


def test_a_sum_a_device_is_still_to_finish_is_believed(core, fam):
    """tc sees a veth peer's packet before its L4 sum is finished
    (CHECKSUM_PARTIAL): the field holds the pseudo-header's sum alone."""
    established(core, fam)
    raw = bytearray(client("FA", fam=fam))
    ip_len, addrs = (40, raw[8:40]) if fam.ip is not IP else (20, raw[12:20])
    pseudo = addrs + bytes([0, 6]) + (len(raw) - ip_len).to_bytes(2, "big")
    s = sum(int.from_bytes(pseudo[i:i + 2], "big") for i in range(0, len(pseudo), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    raw[ip_len + 16:ip_len + 18] = s.to_bytes(2, "big")
    assert core.observe(bytes(raw), 10) is True
    assert gauges(core) == (0, 1) and core.reasons()["bad_checksum"] == 0
