"""nfnetlink queued-packet messages as the kernel sends them (NFQNL_MSG_PACKET),
for the parse tests and the fuzz seeds (fuzz/seeds.py)."""

import struct

NFQNL_MSG_PACKET = (3 << 8) | 0     # NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
NFQA_PACKET_HDR = 1
NFQA_MARK = 3
NFQA_IFINDEX_INDEV = 5
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
SKB_CSUMNOTREADY = 1
SKB_GSO = 2


def attr(kind: int, data: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + bytes(-len(raw) % 4)


def message(attrs: bytes, msg_type: int = NFQNL_MSG_PACKET, queue: int = 0) -> bytes:
    """nlmsghdr + nfgenmsg (AF_INET, version 0, queue) + attributes."""
    body = struct.pack("!BBH", 2, 0, queue) + attrs
    return struct.pack("=IHHII", 16 + len(body), msg_type, 0, 0, 0) + body


def queued_packet(payload: bytes | None, packet_id: int = 1, skb_info: int | None = None,
                  cap_len: int | None = None, queue: int = 0) -> bytes:
    """A queued packet with the attributes the workers read (and one they skip)."""
    attrs = attr(NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 0) + b"\0")
    attrs += attr(NFQA_IFINDEX_INDEV, struct.pack("!I", 2))
    if skb_info is not None:
        attrs += attr(NFQA_SKB_INFO, struct.pack("!I", skb_info))
    if cap_len is not None:
        attrs += attr(NFQA_CAP_LEN, struct.pack("!I", cap_len))
    if payload is not None:
        attrs += attr(NFQA_PAYLOAD, payload)
    return message(attrs, queue=queue)
