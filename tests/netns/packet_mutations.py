"""Hostile variants of a well-formed Ethernet/IP/TCP-or-UDP frame, drawn
from a seeded random.Random: each is the frame's bytes with one kind of
damage (or two), and a name that says what was done.  The headers'
checksums are sometimes made right again after the damage, so that a
check on them does not hide every other one."""

import random
import struct
from collections.abc import Callable

from .fastpath_rules import ETH_HLEN, ones_sum

IP = ETH_HLEN


def _v6(f: bytearray) -> bool:
    return f[12:14] == b"\x86\xdd"


def _l3(f: bytearray) -> int:
    """Bytes of IP header as the frame's first byte says (IPv6: 40)."""
    return 40 if _v6(f) else 4 * (f[IP] & 0x0F)


def fix_ip4(f: bytearray) -> None:
    """IPv4's header checksum made right for the header as it now is."""
    if len(f) < IP + 20:
        return
    n = 4 * (f[IP] & 0x0F)
    if _v6(f) or n < 20 or IP + n > len(f):
        return
    f[IP + 10:IP + 12] = b"\0\0"
    f[IP + 10:IP + 12] = struct.pack("!H", 0xFFFF - ones_sum(bytes(f[IP:IP + n])))


def fix_l4(f: bytearray) -> None:
    """The TCP/UDP checksum made right over the packet as its IP header
    says it is (where that fits the frame)."""
    if len(f) < IP + 40:
        return
    v6, l3 = _v6(f), _l3(f)
    proto = f[IP + 6] if v6 else f[IP + 9]
    tot = (40 + int.from_bytes(f[IP + 4:IP + 6], "big") if v6
           else int.from_bytes(f[IP + 2:IP + 4], "big"))
    if proto not in (6, 17) or l3 < 20 or not l3 + 8 <= tot <= len(f) - IP:
        return
    c = IP + l3 + (16 if proto == 6 else 6)
    if c + 2 > IP + tot:
        return
    f[c:c + 2] = b"\0\0"
    n = tot - l3
    pseudo = (bytes(f[IP + 8:IP + 40]) + struct.pack("!IxxxB", n, proto) if v6
              else bytes(f[IP + 12:IP + 20]) + struct.pack("!xBH", proto, n))
    s = 0xFFFF - ones_sum(pseudo + bytes(f[IP + l3:IP + tot]))
    f[c:c + 2] = struct.pack("!H", s or 0xFFFF)


def _set_tot(f: bytearray, tot: int) -> None:
    if _v6(f):
        f[IP + 4:IP + 6] = struct.pack("!H", max(0, tot - 40) & 0xFFFF)
    else:
        f[IP + 2:IP + 4] = struct.pack("!H", tot & 0xFFFF)


def _tot(f: bytearray) -> int:
    return (40 + int.from_bytes(f[IP + 4:IP + 6], "big") if _v6(f)
            else int.from_bytes(f[IP + 2:IP + 4], "big"))


def _hdr_span(f: bytearray) -> int:
    """The bytes where headers are: Ethernet, IP, L4 and a little more."""
    return min(len(f), IP + _l3(f) + 28)


def flip_bits(f: bytearray, rng: random.Random) -> str:
    at = []
    for _ in range(rng.randint(1, 3)):
        i, b = rng.randrange(_hdr_span(f)), rng.randrange(8)
        f[i] ^= 1 << b
        at.append(f"{i}.{b}")
    return "flip " + ",".join(at)


def set_byte(f: bytearray, rng: random.Random) -> str:
    i = rng.randrange(_hdr_span(f))
    f[i] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
    return f"byte {i}={f[i]:#x}"


def truncate(f: bytearray, rng: random.Random) -> str:
    n = rng.randrange(ETH_HLEN + 1, len(f))    # a test run needs more than Ethernet
    del f[n:]
    return f"truncate {n}"


def ip_length(f: bytearray, rng: random.Random) -> str:
    tot = _tot(f)
    new = rng.choice((0, 1, 20, 39, 40, 47, 48, 59, 60, tot - 1, tot + 1, tot + 40, 0xFFFF,
                      rng.randrange(0x10000)))
    _set_tot(f, new)
    return f"ip length {new}"


def ipv4_options(f: bytearray, rng: random.Random) -> str:
    """IHL other than 5: options inserted (NOPs, lengths kept right), or
    only the IHL changed."""
    if _v6(f):
        return ipv6_extension(f, rng)
    words = rng.randint(1, 10)
    if rng.random() < 0.6:
        f[IP + 20:IP + 20] = b"\x01" * 4 * words
        f[IP] = 0x40 | (5 + words)
        _set_tot(f, _tot(f) + 4 * words)
        return f"ipv4 {4 * words} option bytes"
    f[IP] = 0x40 | rng.choice((0, 1, 4, 6, 15))
    return f"ipv4 ihl {f[IP] & 15}"


def ipv4_fragment(f: bytearray, rng: random.Random) -> str:
    if _v6(f):
        return ipv6_extension(f, rng, 44)
    word = rng.choice((0x2000, 0x0001, 0x2001, 0x1FFF, 0x4000, 0x8000, 0x6000, 0x4001,
                       rng.randrange(0x10000)))
    f[IP + 6:IP + 8] = struct.pack("!H", word)
    return f"ipv4 frag word {word:#06x}"


def ipv6_extension(f: bytearray, rng: random.Random, kind: int | None = None) -> str:
    """An IPv6 extension header (or another next header value) between the
    fixed header and the L4 one, lengths kept right."""
    if not _v6(f):
        return ipv4_options(f, rng)
    kind = kind if kind is not None else rng.choice((0, 43, 60, 44, 51, 50, 59, 135, 139))
    nh = f[IP + 6]
    if kind == 44:
        off_m = rng.choice((0, 1, 8, 9))
        ext = struct.pack("!BxHI", nh, off_m, 7)
    else:
        ext = bytes([nh, 0]) + b"\x01\x04" + b"\0" * 4       # 8 bytes, PadN
    f[IP + 40:IP + 40] = ext
    f[IP + 6] = kind
    _set_tot(f, _tot(f) + len(ext))
    return f"ipv6 extension {kind}"


def next_header(f: bytearray, rng: random.Random) -> str:
    p = rng.choice((0, 1, 4, 6, 17, 41, 47, 58, 132, 136, 255, rng.randrange(256)))
    f[IP + 6 if _v6(f) else IP + 9] = p
    return f"protocol {p}"


def ttl(f: bytearray, rng: random.Random) -> str:
    t = rng.choice((0, 1, 1, 2, 255))
    f[IP + 7 if _v6(f) else IP + 8] = t
    return f"ttl {t}"


def tcp_data_offset(f: bytearray, rng: random.Random) -> str:
    l4 = IP + _l3(f)
    if l4 + 13 > len(f):
        return truncate(f, rng)
    d = rng.choice((0, 1, 4, 5, 6, 8, 15))
    f[l4 + 12] = (d << 4) | (f[l4 + 12] & 0x0F)
    return f"tcp data offset {d}"


def tcp_flags(f: bytearray, rng: random.Random) -> str:
    l4 = IP + _l3(f)
    if l4 + 14 > len(f):
        return truncate(f, rng)
    fl = rng.choice((0x02, 0x12, 0x01, 0x11, 0x04, 0x14, 0x03, 0x06, 0x07, 0x00, 0xFF, 0x29,
                     0x42, 0x82, 0x18, rng.randrange(256)))
    f[l4 + 13] = fl
    return f"tcp flags {fl:#04x}"


def udp_length(f: bytearray, rng: random.Random) -> str:
    l4 = IP + _l3(f)
    if l4 + 6 > len(f):
        return truncate(f, rng)
    n = _tot(f) - _l3(f)
    u = rng.choice((0, 1, 7, 8, n - 1, n + 1, 0xFFFF, rng.randrange(0x10000)))
    f[l4 + 4:l4 + 6] = struct.pack("!H", u & 0xFFFF)
    return f"udp length {u & 0xFFFF}"


def l4_checksum(f: bytearray, rng: random.Random) -> str:
    l4 = IP + _l3(f)
    proto = f[IP + 6] if _v6(f) else f[IP + 9]
    c = l4 + (16 if proto == 6 else 6)
    if c + 2 > len(f):
        return truncate(f, rng)
    v = rng.choice((0, 0xFFFF, rng.randrange(0x10000)))
    f[c:c + 2] = struct.pack("!H", v)
    return f"l4 checksum {v:#06x}"


def vlan_tag(f: bytearray, rng: random.Random) -> str:
    tpid = rng.choice((0x8100, 0x88A8))
    f[12:12] = struct.pack("!HH", tpid, rng.choice((0, 5, 0xFFF)))
    return f"vlan {tpid:#06x}"


def ethertype(f: bytearray, rng: random.Random) -> str:
    t = rng.choice((0x0806, 0x0800, 0x86DD, 0x8847, 0x0000, 0x05DC, 0xFFFF, rng.randrange(0x10000)))
    f[12:14] = struct.pack("!H", t)
    return f"ethertype {t:#06x}"


def ip_version(f: bytearray, rng: random.Random) -> str:
    v = rng.choice((0, 4, 5, 6, 15))
    f[IP] = (v << 4) | (f[IP] & 0x0F)
    return f"ip version {v}"


def padding(f: bytearray, rng: random.Random) -> str:
    n = rng.choice((1, 2, 6, 46, rng.randrange(1, 100)))
    f.extend(rng.randbytes(n))
    return f"{n} bytes after the packet"


Mutation = Callable[[bytearray, random.Random], str]
MUTATIONS: tuple[Mutation, ...] = (
    flip_bits, flip_bits, set_byte, set_byte, truncate, ip_length, ipv4_options, ipv4_fragment,
    ipv6_extension, next_header, ttl, tcp_data_offset, tcp_flags, tcp_flags, udp_length,
    l4_checksum, vlan_tag, ethertype, ip_version, padding)


def mutate(frame: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One hostile variant of frame, and what was done to it."""
    f = bytearray(frame)
    done = [rng.choice(MUTATIONS)(f, rng)]
    if rng.random() < 0.25 and len(f) >= IP + 60:     # whole headers still: a second
        done.append(rng.choice(MUTATIONS)(f, rng))
    if rng.random() < 0.6:
        fix_ip4(f)
        done.append("ip sum fixed")
    if rng.random() < 0.5:
        fix_l4(f)
        done.append("l4 sum fixed")
    return bytes(f), "; ".join(done)
