"""Netlink bytes of the message kind a large table is made of: set
elements (tens of thousands at 65,536 backends).  pyroute2's generic
encoder takes about 1 ms a message, which made such a table take minutes
to encode; these take microseconds and give the same
bytes (tests/unit/test_nftwire.py compares them).  Also a table with a
comment: pyroute2 has no encoder for a table's user data.  Every other
message (tables, chains, sets, rules: a few dozen) stays with pyroute2."""

from __future__ import annotations

import struct
from typing import Any

from natlb import ruleset

NFNL_SUBSYS_NFTABLES = 10
# Attribute numbers (linux/netfilter/nf_tables.h).
SET_ELEM_LIST = {"NFTA_SET_ELEM_LIST_TABLE": 1, "NFTA_SET_ELEM_LIST_SET": 2,
                 "NFTA_SET_ELEM_LIST_ELEMENTS": 3}
NFTA_LIST_ELEM = 1      # the first of a list's entries
SET_ELEM = {"NFTA_SET_ELEM_KEY": 1, "NFTA_SET_ELEM_DATA": 2}
NFTA_DATA_VALUE = 1
TABLE = {"NFTA_TABLE_NAME": 1, "NFTA_TABLE_USERDATA": 6}


def _attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return struct.pack("=HH", n, kind) + payload + b"\0" * (-n % 4)


def _string(kind: int, s: str) -> bytes:
    return _attr(kind, s.encode() + b"\0")


def _value(kind: int, v: dict[str, Any]) -> bytes:
    (name, data), = v["attrs"]
    if name != "NFTA_DATA_VALUE":
        raise KeyError(name)
    return _attr(kind, _attr(NFTA_DATA_VALUE, data))


def _element(i: int, e: dict[str, Any]) -> bytes:
    out = [_value(SET_ELEM[name], v) for name, v in e["attrs"]]
    # pyroute2 numbers a list's entries from 1; the kernel reads any number.
    return _attr(NFTA_LIST_ELEM + i, b"".join(out))


def _set_elements(attrs: list[Any]) -> bytes:
    out = []
    for name, v in attrs:
        kind = SET_ELEM_LIST[name]
        if name == "NFTA_SET_ELEM_LIST_ELEMENTS":
            out.append(_attr(kind, b"".join(_element(i, e) for i, e in enumerate(v))))
        else:
            out.append(_string(kind, v))
    return b"".join(out)


def _table(attrs: list[Any]) -> bytes:
    return b"".join(_string(TABLE[name], v) if name == "NFTA_TABLE_NAME"
                    else _attr(TABLE[name], v) for name, v in attrs)


def encode(msg: ruleset.Message, family: int, flags: int, seq: int) -> bytes | None:
    """The message's bytes, or None if it is not of a kind (or shape) done
    here: the caller then has pyroute2 encode it."""
    if msg.kind == ruleset.TABLE and any(k == "NFTA_TABLE_USERDATA" for k, _ in msg.attrs):
        encode_attrs = _table
    elif msg.kind == ruleset.SETELEM:
        encode_attrs = _set_elements
    else:
        return None
    try:
        payload = struct.pack("=BBH", family, 0, 0) + encode_attrs(msg.attrs)
    except (KeyError, TypeError, ValueError):
        return None
    mtype = NFNL_SUBSYS_NFTABLES << 8 | msg.mtype
    return struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, 0) + payload
