"""Netlink bytes of the two message kinds a large table is made of: set
elements and counter objects (tens of thousands at 65,536 backends), and
the counter objects read back (status, metrics and rates read them).
pyroute2's generic encoder takes about 1 ms a message, which made such a
table take minutes to encode; these take microseconds and give the same
bytes (tests/unit/test_nftwire.py compares them).  Every other message
(tables, chains, sets, rules: a few dozen) stays with pyroute2."""

from __future__ import annotations

import struct
from typing import Any

from natlb import ruleset

NFNL_SUBSYS_NFTABLES = 10
NLMSG_ERROR, NLMSG_DONE = 2, 3
# Attribute numbers (linux/netfilter/nf_tables.h).
SET_ELEM_LIST = {"NFTA_SET_ELEM_LIST_TABLE": 1, "NFTA_SET_ELEM_LIST_SET": 2,
                 "NFTA_SET_ELEM_LIST_ELEMENTS": 3}
NFTA_LIST_ELEM = 1      # the first of a list's entries
SET_ELEM = {"NFTA_SET_ELEM_KEY": 1, "NFTA_SET_ELEM_DATA": 2, "NFTA_SET_ELEM_OBJREF": 9}
NFTA_DATA_VALUE = 1
OBJ = {"NFTA_OBJ_TABLE": 1, "NFTA_OBJ_NAME": 2, "NFTA_OBJ_TYPE": 3, "NFTA_OBJ_DATA": 4}
COUNTER = {"NFTA_COUNTER_BYTES": 1, "NFTA_COUNTER_PACKETS": 2}


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
    out = []
    for name, v in e["attrs"]:
        kind = SET_ELEM[name]
        out.append(_string(kind, v) if name == "NFTA_SET_ELEM_OBJREF" else _value(kind, v))
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


def _counter_obj(attrs: list[Any]) -> bytes:
    out = []
    for name, v in attrs:
        kind = OBJ[name]
        if name == "NFTA_OBJ_TYPE":
            out.append(_attr(kind, struct.pack("!I", v)))
        elif name == "NFTA_OBJ_DATA":
            out.append(_attr(kind, b"".join(_attr(COUNTER[k], struct.pack("!Q", n))
                                            for k, n in v["attrs"])))
        else:
            out.append(_string(kind, v))
    return b"".join(out)


def counter_objects(data: bytes) -> tuple[list[tuple[str, str, int, int]], bool]:
    """A netlink dump of counter objects: (table, name, packets, bytes) of
    each, and whether the dump ended (NLMSG_DONE or an error)."""
    out = []
    off = 0
    while off + 16 <= len(data):
        length, mtype = struct.unpack_from("=IH", data, off)
        if length < 16 or mtype in (NLMSG_ERROR, NLMSG_DONE):
            return out, True
        attrs = _attrs(data, off + 20, off + length)     # past nlmsghdr and nfgenmsg
        inner = _attrs(data, *attrs.get(OBJ["NFTA_OBJ_DATA"], (0, 0)))
        out.append((_field(data, attrs, OBJ["NFTA_OBJ_TABLE"]).rstrip(b"\0").decode(),
                    _field(data, attrs, OBJ["NFTA_OBJ_NAME"]).rstrip(b"\0").decode(),
                    int.from_bytes(_field(data, inner, COUNTER["NFTA_COUNTER_PACKETS"]), "big"),
                    int.from_bytes(_field(data, inner, COUNTER["NFTA_COUNTER_BYTES"]), "big")))
        off += (length + 3) & ~3
    return out, False


def _field(data: bytes, attrs: dict[int, tuple[int, int]], kind: int) -> bytes:
    start, end = attrs.get(kind, (0, 0))
    return data[start:end]


def _attrs(data: bytes, off: int, end: int) -> dict[int, tuple[int, int]]:
    """Attribute number -> (start, end) of its payload, from off to end."""
    out = {}
    while off + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        out[kind & 0x3FFF] = (off + 4, off + length)    # without the nested/byte-order flags
        off += (length + 3) & ~3
    return out


def encode(msg: ruleset.Message, family: int, flags: int, seq: int) -> bytes | None:
    """The message's bytes, or None if it is not of a kind (or shape) done
    here: the caller then has pyroute2 encode it."""
    body = {ruleset.SETELEM: _set_elements, ruleset.OBJ: _counter_obj}.get(msg.kind)
    if body is None:
        return None
    try:
        payload = struct.pack("=BBH", family, 0, 0) + body(msg.attrs)
    except (KeyError, TypeError, ValueError):
        return None
    mtype = NFNL_SUBSYS_NFTABLES << 8 | msg.mtype
    return struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, 0) + payload
