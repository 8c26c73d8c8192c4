"""What the tc fast path may do with a frame, computed in Python from the
rules the top comment of csrc/bpf/fastpath.bpf.c writes down, not from its
code: which frames it may take at all (`taken`), and what a carried frame
must look like afterwards (`check_rewrite`).  The hostile-packet tests
(test_fastpath_hostile_bpf.py) hold every outcome of the programs to these."""

import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10
RECORD_HEAD = 128              # what a record holds of the IP packet (NL_FP_HEAD)


def ones_sum(data: bytes) -> int:
    """The 16-bit one's complement sum of data (RFC 1071), folded."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@dataclass(frozen=True)
class Taken:
    """A frame the fast path may take: its family, where its L4 header
    starts in the IP packet, its IP length and its 5-tuple."""

    v6: bool
    l3: int                    # bytes of IP header: 20 or 40
    tot: int                   # the IP packet's length, as its header says
    proto: int
    src: bytes
    dst: bytes
    sport: int
    dport: int
    ttl: int
    tcp_flags: int             # 0 for UDP
    ack_seq: int               # TCP's acknowledgment number; 0 for UDP

    @property
    def key(self) -> tuple:
        return (self.v6, self.src, self.dst, self.sport, self.dport, self.proto)

    def flag(self, bit: int) -> bool:
        return bool(self.tcp_flags & bit)

    @property
    def csum_off(self) -> int:
        """Offset of the L4 checksum in the IP packet."""
        return self.l3 + (16 if self.proto == IPPROTO_TCP else 6)


def taken(frame: bytes) -> Taken | None:
    """The frame as the fast path may take it, or None: an untagged
    Ethernet frame of IPv4 (a 20-byte header, no fragment, a right header
    checksum) or IPv6 (TCP or UDP as the fixed header's next header),
    whose IP length covers the L4 header and lies within the frame; TCP
    with a data offset of 5..15 words within that length, or UDP whose
    length field is 8..its part of the packet (over IPv6 with a checksum)."""
    if len(frame) < ETH_HLEN:
        return None
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[ETH_HLEN:]
    if ethertype == ETH_P_IP:
        if len(ip) < 20 or ip[0] != 0x45 or int.from_bytes(ip[6:8], "big") & 0x3FFF:
            return None
        if ones_sum(ip[:20]) != 0xFFFF:
            return None
        v6, l3, tot, proto, ttl = False, 20, int.from_bytes(ip[2:4], "big"), ip[9], ip[8]
        src, dst = ip[12:16], ip[16:20]
    elif ethertype == ETH_P_IPV6:
        if len(ip) < 40 or ip[0] >> 4 != 6:
            return None
        v6, l3, tot, proto, ttl = True, 40, 40 + int.from_bytes(ip[4:6], "big"), ip[6], ip[7]
        src, dst = ip[8:24], ip[24:40]
    else:
        return None
    if proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return None
    if not l3 + (20 if proto == IPPROTO_TCP else 8) <= tot <= len(ip):
        return None
    l4 = ip[l3:tot]
    flags = ack_seq = 0
    if proto == IPPROTO_TCP:
        doff = l4[12] >> 4
        if doff < 5 or 4 * doff > len(l4):
            return None
        flags, ack_seq = l4[13], int.from_bytes(l4[8:12], "big")
    else:
        ulen = int.from_bytes(l4[4:6], "big")
        if not 8 <= ulen <= len(l4) or (v6 and l4[6:8] == b"\0\0"):
            return None
    return Taken(v6, l3, tot, proto, bytes(src), bytes(dst), int.from_bytes(l4[0:2], "big"),
                 int.from_bytes(l4[2:4], "big"), ttl, flags, ack_seq)


def l4_residue(ip: bytes, t: Taken) -> int:
    """The one's complement sum over the L4 segment with its pseudo-header,
    checksum field included, modulo 0xffff (0 and 0xffff are one value):
    0 for a right checksum, the same value before and after a rewrite that
    changed the sum exactly by the rewrite."""
    n = t.tot - t.l3
    if t.v6:
        pseudo = ip[8:40] + struct.pack("!IxxxB", n, t.proto)
    else:
        pseudo = ip[12:20] + struct.pack("!xBH", t.proto, n)
    return ones_sum(pseudo + ip[t.l3:t.tot]) % 0xFFFF


def check_rewrite(before: bytes, after: bytes, t: Taken, addr: bytes, port: int,
                  inbound: bool) -> None:
    """A carried frame: its destination (inbound) or source address and port
    the flow's, TTL (hop limit) one less, IPv4's header checksum right, the
    L4 checksum changed by exactly the rewrite (right stays right, wrong
    stays wrong by as much; an IPv4 UDP zero stays zero, and no other sum
    becomes zero), and not one other byte changed."""
    assert len(after) == len(before), "a carried frame changed its length"
    want = bytearray(before)
    ip = ETH_HLEN
    if t.v6:
        at = ip + (24 if inbound else 8)
        want[ip + 7] = t.ttl - 1
    else:
        at = ip + (16 if inbound else 12)
        want[ip + 8] = t.ttl - 1
        want[ip + 10:ip + 12] = after[ip + 10:ip + 12]
        assert ones_sum(bytes(after[ip:ip + 20])) == 0xFFFF, "IPv4 header checksum wrong"
    want[at:at + len(addr)] = addr
    port_at = ip + t.l3 + (2 if inbound else 0)
    want[port_at:port_at + 2] = port.to_bytes(2, "big")
    c = ip + t.csum_off
    want[c:c + 2] = after[c:c + 2]
    assert bytes(after) == bytes(want), "bytes other than the rewrite's changed"
    old_sum, new_sum = before[c:c + 2], after[c:c + 2]
    if t.proto == IPPROTO_UDP and old_sum == b"\0\0":
        assert new_sum == b"\0\0", "an IPv4 UDP datagram without a checksum got one"
        return
    if t.proto == IPPROTO_UDP:
        assert new_sum != b"\0\0", "a UDP checksum became 'none'"
    assert l4_residue(after[ip:], t) == l4_residue(before[ip:], t), \
        "the L4 checksum did not change by exactly the rewrite"
