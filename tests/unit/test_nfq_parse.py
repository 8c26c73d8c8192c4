"""The workers' parse of one queued-packet message (nl_nfq_parse): what it
reads, and that malformed messages are refused or read only within bounds."""

import struct

from natlb.core import (
    PKT_CSUM_PARTIAL,
    PKT_CSUM_VERIFIED,
    PKT_GSO,
    PKT_HEAD_ONLY,
    parse_queue_message,
)

from .nfqmsg import (
    NFQA_PACKET_HDR,
    NFQA_PAYLOAD,
    NFQA_SKB_INFO,
    SKB_CSUMNOTREADY,
    SKB_GSO,
    attr,
    message,
    queued_packet,
)

PAYLOAD = bytes(range(40))
HDR = attr(NFQA_PACKET_HDR, struct.pack("!IHBx", 77, 0x0800, 0))


def test_queued_packet_is_read():
    q = parse_queue_message(queued_packet(PAYLOAD, packet_id=77))
    assert q is not None
    # No NFQA_SKB_INFO: the kernel verified the checksums.
    assert (q.packet_id, q.payload, q.flags) == (77, PAYLOAD, PKT_CSUM_VERIFIED)


def test_skb_info_and_cap_len_become_packet_flags():
    q = parse_queue_message(queued_packet(PAYLOAD, skb_info=SKB_CSUMNOTREADY | SKB_GSO,
                                          cap_len=1500))
    assert q is not None and q.flags == PKT_CSUM_PARTIAL | PKT_GSO | PKT_HEAD_ONLY


def test_no_payload_is_reported_as_such():
    q = parse_queue_message(queued_packet(None, packet_id=5))
    assert q is not None and q.payload is None


def test_without_packet_header_or_of_another_type_it_is_refused():
    assert parse_queue_message(message(attr(NFQA_PAYLOAD, PAYLOAD))) is None
    assert parse_queue_message(message(HDR, msg_type=(3 << 8) | 1)) is None
    short_hdr = attr(NFQA_PACKET_HDR, b"\0\0")
    assert parse_queue_message(message(short_hdr + attr(NFQA_PAYLOAD, PAYLOAD))) is None


def test_message_longer_than_the_buffer_is_refused():
    raw = queued_packet(PAYLOAD)
    assert parse_queue_message(raw[:-4]) is None
    assert parse_queue_message(raw[:10]) is None
    assert parse_queue_message(b"") is None


def test_attribute_past_the_message_end_stops_the_walk():
    # A payload attribute claiming 4 bytes more than the message holds.
    bad = struct.pack("=HH", 4 + len(PAYLOAD) + 4, NFQA_PAYLOAD) + PAYLOAD
    q = parse_queue_message(message(HDR + bad))
    assert q is not None and q.payload is None


def test_skb_info_without_its_value_is_ignored():
    # The fuzz reproducer fuzz/crashes/nfq/skb-info-without-value: a 4-byte
    # NFQA_SKB_INFO last in the message used to be read 4 bytes past its end
    # (here into bytes after the message that would set every flag).  Now it
    # makes the message doubtful: nothing is vouched for.
    raw = message(HDR + attr(NFQA_PAYLOAD, PAYLOAD) + struct.pack("=HH", 4, NFQA_SKB_INFO))
    q = parse_queue_message(raw + b"\xff" * 4)
    assert q is not None and q.flags == 0 and q.payload == PAYLOAD
