"""natlb's mark on its nftables tables (the comment naming its control
socket) and the notifications of a table's deletion, as bytes: no root."""

import struct

from natlb import nftlist, nftwire, ruleset, tableowner, tablewatch

from .test_ruleset import spec


def test_the_table_comment_reads_back_as_nft_writes_it():
    udata = ruleset.comment_udata(tableowner.mark("/run/natlb/natlb.sock"))
    # libnftnl: type 0 (comment), length, the text with its NUL.
    assert udata[:2] == bytes([0, len(udata) - 2]) and udata.endswith(b"\0")
    comment = nftlist.comment_of(udata)
    assert comment == "natlb control socket /run/natlb/natlb.sock"
    assert tableowner.owner_of(comment) == "/run/natlb/natlb.sock"
    assert tableowner.owner_of("the operator's") is None
    assert nftlist.comment_of(b"") == ""


def test_a_table_made_anew_carries_the_comment_and_one_kept_in_place_asks_nothing():
    import dataclasses

    s = dataclasses.replace(spec("mark"), comment="natlb control socket /x.sock")
    for in_place in (False, True):
        tables = [m for m in ruleset.build(s, in_place=in_place)
                  if m.kind == ruleset.TABLE and m.mtype == 0]
        with_comment = [m for m in tables if ("NFTA_TABLE_USERDATA",
                                              ruleset.comment_udata(s.comment)) in m.attrs]
        assert with_comment, in_place
    # Without a comment the table is what it always was (the golden files).
    assert ruleset.build(spec("mark")) == ruleset.build(dataclasses.replace(s, comment=""))


def test_a_commented_table_is_encoded_with_its_user_data():
    udata = ruleset.comment_udata("natlb control socket /x.sock")
    msg = ruleset.Message(ruleset.TABLE, 0, [("NFTA_TABLE_NAME", "natlb"),
                                            ("NFTA_TABLE_USERDATA", udata)], 0x400, "table")
    data = nftwire.encode(msg, 2, 0x405, 7)
    assert data is not None
    length, mtype, flags, seq, _ = struct.unpack_from("=IHHII", data)
    assert (length, mtype, flags, seq) == (len(data), 10 << 8, 0x405, 7)
    # nfgenmsg, then NAME ("natlb\0", padded) and USERDATA.
    body = data[20:]
    assert body[:4] == struct.pack("=HH", 10, 1) and body[4:10] == b"natlb\0"
    assert body[12:16] == struct.pack("=HH", 4 + len(udata), 6)
    assert body[16:16 + len(udata)] == udata


def _msg(kind: int, family: int, attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 10 << 8 | kind, 0, 0, 0) + body


def _attr(kind: int, value: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(value), kind) + value
    return a + b"\0" * (-len(a) % 4)


def test_a_deletion_of_the_watched_table_and_who_made_it_are_read():
    data = (_msg(2, 2, _attr(1, b"natlb\0")) + _msg(2, 10, _attr(1, b"other\0"))
            + _msg(2, 10, _attr(1, b"natlb\0"))
            + _msg(15, 0, _attr(1, struct.pack("!I", 9)) + _attr(2, struct.pack("!I", 1234))
                   + _attr(3, b"nft\0")))
    assert tablewatch.parse(data, "natlb") == [
        ("deleted", 2, ""), ("deleted", 10, ""), ("generation", 1234, "nft")]


def test_a_process_name_cannot_break_the_log_line():
    data = _msg(15, 0, _attr(2, struct.pack("!I", 5)) + _attr(3, b"a\nb\0"))
    assert tablewatch.parse(data, "natlb") == [("generation", 5, "a?b")]
