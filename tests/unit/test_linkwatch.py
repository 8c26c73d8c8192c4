"""Reading rtnetlink link notifications (natlb/linkwatch.py), without root:
datagrams built here as the kernel lays them out."""

import socket
import struct

from natlb.linkwatch import (
    ARPHRD_ETHER,
    IFLA_IFNAME,
    RTM_DELLINK,
    RTM_NEWLINK,
    Link,
    parse,
)

ARPHRD_NONE = 0xFFFE
RTM_NEWADDR = 20


def message(kind: int, index: int, name: str, arphrd: int = ARPHRD_ETHER,
            family: int = socket.AF_UNSPEC) -> bytes:
    raw = name.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(raw), IFLA_IFNAME) + raw
    attr += b"\0" * (-len(attr) % 4)
    mtu = struct.pack("=HHI", 8, 4, 1500)              # IFLA_MTU, before the name
    body = struct.pack("=BxHiII", family, arphrd, index, 0, 0) + mtu + attr
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_links_added_and_gone_in_one_datagram():
    data = (message(RTM_NEWLINK, 7, "eth1") + message(RTM_DELLINK, 8, "tun0", ARPHRD_NONE) +
            message(RTM_NEWLINK, 9, "a-fifteen-chars"))
    assert parse(data) == [(True, Link(7, "eth1", True)), (False, Link(8, "tun0", False)),
                           (True, Link(9, "a-fifteen-chars", True))]


def test_a_bridge_port_leaving_its_bridge_is_not_the_port_going():
    """The bridge tells of its ports with family AF_BRIDGE (7)."""
    data = message(RTM_DELLINK, 7, "eth1", family=7) + message(RTM_NEWLINK, 7, "eth1", family=7)
    assert parse(data) == []


def test_other_messages_and_truncated_ones_are_skipped():
    other = struct.pack("=IHHII", 24, RTM_NEWADDR, 0, 0, 0) + b"\0" * 8
    whole = message(RTM_NEWLINK, 3, "veth0")
    assert parse(other + whole) == [(True, Link(3, "veth0", True))]
    assert parse(whole[:-3]) == []
    assert parse(b"") == [] and parse(b"\0" * 16) == []
