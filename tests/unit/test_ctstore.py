"""The flow table in a file: a successor adopts it (in place, or copied into
another size), with its own ids; a table of another layout is refused."""

from scapy.layers.inet import IP, TCP

from natlb.core import Core, CoreConfig, Verdict, monotonic_ms

from .services import BACKENDS, CLIENT, VIP, make_service

TIMEOUTS = {"tcp_syn": 5_000, "tcp_established": 60_000, "tcp_fin": 3_000,
            "tcp_close": 1_000, "udp": 2_000}


def new_core(path, max_flows=64, services=None):
    # Every packet queued: a reset then closes a flow at once (with the fast
    # path it waits for the probe's answer, see README).
    c = Core(CoreConfig(max_flows=max_flows, workers=1, timeouts_ms=TIMEOUTS, fastpath=False))
    c.publish(services or [make_service()])
    return c, c.store(str(path))


def pkt(sport, flags, src=CLIENT, dst=VIP, dport=80):
    return bytes(IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags))


def open_flows(c, n, now):
    """n established flows; their backends, by client port."""
    out = {}
    for sport in range(2000, 2000 + n):
        v, fwd = c.process(pkt(sport, "S"), now)
        assert v == Verdict.REWRITE
        backend = IP(fwd).dst
        assert c.process(pkt(8080, "SA", backend, CLIENT, sport), now)[0] == Verdict.REWRITE
        assert c.process(pkt(sport, "A"), now)[0] == Verdict.REWRITE
        out[sport] = backend
    return out


def still_there(c, flows, now):
    """Every flow's next packet goes to the same backend; replies map back."""
    for sport, backend in flows.items():
        v, fwd = c.process(pkt(sport, "PA"), now)
        assert v == Verdict.REWRITE and IP(fwd).dst == backend, sport
        v, rep = c.process(pkt(8080, "PA", backend, CLIENT, sport), now)
        assert v == Verdict.REWRITE and IP(rep).src == VIP


def test_adopted_in_place_keeps_flows_and_gauges(tmp_path):
    path = tmp_path / "t.flows"
    a, rep = new_core(path)
    assert rep.result == "created"
    now = monotonic_ms()
    flows = open_flows(a, 10, now)
    a.close()                      # a crash leaves the file as it is
    b, rep = new_core(path)
    assert (rep.result, rep.adopted, rep.dropped) == ("adopted", 10, 0)
    assert b.flow_count() == 10
    assert sum(x.active_flows for x in b.backend_counters(3)) == 10
    still_there(b, flows, now + 10)
    # A packet of an unknown connection is still refused.
    assert b.process(pkt(3999, "A"), now + 10)[0] == Verdict.DROP
    b.close()


def test_other_max_flows_copies_and_new_ids_are_used(tmp_path):
    path = tmp_path / "t.flows"
    a, _ = new_core(path)
    now = monotonic_ms()
    flows = open_flows(a, 12, now)
    a.close()
    # The successor numbers its services and backends differently.
    other = make_service(sid=3)
    b, rep = new_core(path, max_flows=256, services=[other])
    assert (rep.result, rep.adopted, rep.old_max_flows) == ("copied", 12, 64)
    still_there(b, flows, now + 10)
    ids = [b.backend_counters(64)[3 * 16 + i].active_flows for i in range(3)]
    assert sum(ids) == 12
    b.close()


def test_flows_of_a_removed_backend_are_dropped(tmp_path):
    path = tmp_path / "t.flows"
    a, _ = new_core(path)
    now = monotonic_ms()
    flows = open_flows(a, 9, now)
    a.close()
    b, rep = new_core(path, services=[make_service(addrs=BACKENDS[:2])])
    gone = sum(1 for be in flows.values() if be == BACKENDS[2])
    assert (rep.adopted, rep.dropped) == (9 - gone, gone)
    still_there(b, {s: be for s, be in flows.items() if be != BACKENDS[2]}, now + 10)
    b.close()


def test_table_of_another_layout_is_refused_and_replaced(tmp_path):
    path = tmp_path / "t.flows"
    a, _ = new_core(path)
    now = monotonic_ms()
    flows = open_flows(a, 5, now)
    a.close()
    data = bytearray(path.read_bytes())
    layout = Core.layout().to_bytes(4, "little")
    assert data[8:12] == layout        # the header's layout field
    data[8:12] = (Core.layout() ^ 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    b, rep = new_core(path)
    assert (rep.result, rep.adopted) == ("refused", 0)
    assert rep.reason == "written by another layout version"
    assert b.flow_count() == 0
    assert b.process(pkt(next(iter(flows)), "A"), now + 10)[0] == Verdict.DROP
    b.close()
    assert Core(CoreConfig(max_flows=64)).layout() == Core.layout()


def test_corrupt_links_are_refused(tmp_path):
    path = tmp_path / "t.flows"
    a, _ = new_core(path, max_flows=16)
    open_flows(a, 3, monotonic_ms())
    a.close()
    data = bytearray(path.read_bytes())
    # Point every bucket head past the end of the flows array.
    buckets = 4096 + ((16 * Core.entry_size() + 63) & ~63)
    data[buckets:] = (1000).to_bytes(4, "little") * ((len(data) - buckets) // 4)
    path.write_bytes(bytes(data))
    b, rep = new_core(path, max_flows=16)
    assert (rep.result, rep.reason) == ("refused", "corrupt links")
    b.close()


def test_expired_flows_are_not_adopted(tmp_path):
    path = tmp_path / "t.flows"
    a, _ = new_core(path)
    open_flows(a, 4, monotonic_ms() - 120_000)   # established timeout is 60 s
    a.close()
    b, rep = new_core(path)
    assert (rep.result, rep.adopted, rep.dropped) == ("adopted", 0, 4)
    b.close()


def test_readopt_gives_flows_back_their_ids(tmp_path):
    """A successor adopted the table in place (other ids) and failed: the
    predecessor takes it back."""
    path = tmp_path / "t.flows"
    a, _ = new_core(path)
    now = monotonic_ms()
    flows = open_flows(a, 6, now)
    b, rep = new_core(path, services=[make_service(sid=5)])
    assert rep.result == "adopted"
    b.close()
    assert a.readopt(now + 5).adopted == 6
    assert sum(x.active_flows for x in a.backend_counters(3)) == 6
    still_there(a, flows, now + 10)
    assert a.backend_counters(3)[0].packets_in > 0
    a.close()


def test_ipv6_and_ipv4_flows_are_adopted_with_their_addresses(tmp_path):
    from scapy.layers.inet6 import IPv6

    from .test_ipv6 import BACKENDS6, CLIENT6, VIP6, v6_service

    def pkt6(sport, flags, src=CLIENT6, dst=VIP6, dport=80):
        return bytes(IPv6(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags))

    path = tmp_path / "t.flows"
    services = [v6_service(sid=0), make_service(sid=1)]
    a, _ = new_core(path, services=services)
    now = monotonic_ms()
    flows4 = open_flows(a, 3, now)
    flows6 = {}
    for sport in range(3000, 3003):
        backend = IPv6(a.process(pkt6(sport, "S"), now)[1]).dst
        assert a.process(pkt6(8080, "SA", backend, CLIENT6, sport), now)[0] == Verdict.REWRITE
        flows6[sport] = backend
    a.close()
    b, rep = new_core(path, services=services)
    assert (rep.result, rep.adopted, rep.dropped) == ("adopted", 6, 0)
    still_there(b, flows4, now + 10)
    for sport, backend in flows6.items():
        v, fwd = b.process(pkt6(sport, "A"), now + 10)
        assert v == Verdict.REWRITE and IPv6(fwd).dst == backend in BACKENDS6
        v, rep6 = b.process(pkt6(8080, "A", backend, CLIENT6, sport), now + 10)
        assert v == Verdict.REWRITE and IPv6(rep6).src == VIP6
    b.close()


# Core.layout() of the last build before IPv6 (48-byte flows, 32-bit addresses).
IPV4_ONLY_LAYOUT = 0x9DAE20C0


def test_table_claiming_layout_2_with_another_size_is_refused(tmp_path):
    assert Core.layout() != IPV4_ONLY_LAYOUT
    path = tmp_path / "t.flows"
    a, _ = new_core(path)
    open_flows(a, 2, monotonic_ms())
    a.close()
    data = bytearray(path.read_bytes())
    data[8:12] = IPV4_ONLY_LAYOUT.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    b, rep = new_core(path)
    assert (rep.result, rep.reason) == ("refused", "inconsistent size")
    b.close()


def fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def write_layout2_table(path, flows, max_flows=64, n_buckets=64, seed=0x2545F491):
    """A flow table as the last build before IPv6 wrote it (csrc/ctstore.c,
    layout 2): 4 KiB header, 48-byte entries with 32-bit addresses, buckets.
    flows: (client, cport, vip, vport, backend, bport, proto, state, expires,
    service id, backend id, client_seq_next, server_seq_next)."""
    import socket
    import struct

    boot = open("/proc/sys/kernel/random/boot_id", "rb").read()[:39]
    header = struct.pack("<QIIIIII40s", 0x574F4C4654434C4E, Core.layout_v2(), 4096,
                         max_flows, n_buckets, seed, 1, boot).ljust(4096, b"\0")
    entries = [bytearray(48) for _ in range(max_flows)]
    buckets = [0xFFFFFFFF] * n_buckets
    for i, (cl, cp, vip, vp, be, bp, proto, state, exp, sid, bid, cseq, sseq) in enumerate(flows):
        caddr, cport = socket.inet_aton(cl), struct.pack("!H", cp)
        h = fmix32(int.from_bytes(caddr, "little") ^ seed)
        b = fmix32(h ^ (int.from_bytes(cport, "little") << 8) ^ proto) & (n_buckets - 1)
        entries[i][:] = (caddr + socket.inet_aton(vip) + socket.inet_aton(be) + cport
                         + struct.pack("!HH", vp, bp)
                         + struct.pack("<BBIIHHIIIHBB", proto, state, buckets[b], exp & 0xFFFFFFFF,
                                       sid, bid, 1000, cseq, sseq, 0xFFFF, 1, 0))
        buckets[b] = i
    path.write_bytes(header + b"".join(entries) + struct.pack(f"<{n_buckets}I", *buckets))


def test_table_of_the_ipv4_only_build_is_converted_and_its_flows_go_on(tmp_path):
    assert Core.layout_v2() == IPV4_ONLY_LAYOUT != Core.layout()
    path = tmp_path / "t.flows"
    now = monotonic_ms()
    est = 3   # NL_FS_ESTABLISHED
    flows = {2000 + i: BACKENDS[i] for i in range(3)}
    write_layout2_table(path, [
        *[(CLIENT, sport, VIP, 80, be, 8080, 6, est, now + 60_000, 0, BACKENDS.index(be),
           1001, 5001) for sport, be in flows.items()],
        (CLIENT, 2100, VIP, 80, BACKENDS[0], 8080, 6, est, now - 1000, 0, 0, 1, 1),   # expired
        (CLIENT, 2101, VIP, 80, "203.0.113.99", 8080, 6, est, now + 60_000, 0, 7, 1, 1),  # gone
    ])
    b, rep = new_core(path)
    assert (rep.result, rep.adopted, rep.dropped, rep.old_max_flows) == ("copied", 3, 2, 64)
    assert b.flow_count() == 3
    assert [c.active_flows for c in b.backend_counters(3)] == [1, 1, 1]
    still_there(b, flows, now + 10)
    # Its sequence numbers came along: a reset sends in-window RSTs.
    assert b.reset_backend(BACKENDS.index(flows[2000])) == 1
    rst = IP(b.outbox_take())
    assert (rst.dst, rst[TCP].flags, rst[TCP].dport) == (CLIENT, "R", 2000)
    b.close()
    # The converted table is of the current layout: the next start adopts it in place.
    c, rep = new_core(path)
    assert (rep.result, rep.adopted) == ("adopted", 2)
    c.close()
