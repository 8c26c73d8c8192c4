"""natlb.nftwire gives the bytes pyroute2 gives, for every set-element and
counter-object message of the fast-path golden table and a reload's flush."""

from natlb import nftwire, ruleset, steering

from .test_ruleset import spec


def test_same_bytes_as_pyroute2():
    s = ruleset.Spec(**{**vars(spec("mark", fastpath=True)),
                        "fast_counts": {1: (1, 2, 3, 1 << 40)}})
    msgs = ruleset.build(s) + ruleset.flush_fast("natlb")
    done = 0
    for i, m in enumerate(msgs):
        fast = nftwire.encode(m, steering.NFPROTO_IPV4, 0x405, 100 + i)
        if fast is None:
            assert m.kind not in (ruleset.SETELEM, ruleset.OBJ), m.what
            continue
        cls = steering.MESSAGE_CLASSES[m.kind]()
        cls["nfgen_family"] = steering.NFPROTO_IPV4
        cls["attrs"] = m.attrs
        cls["header"]["type"] = (nftwire.NFNL_SUBSYS_NFTABLES << 8) | m.mtype
        cls["header"]["flags"] = 0x405
        cls["header"]["sequence_number"] = 100 + i
        cls.encode()
        assert fast == cls.data, m.what
        done += 1
    assert done >= 15


def test_counter_dump_is_read():
    objs = [ruleset.Message(ruleset.OBJ, 18, [
        ("NFTA_OBJ_TABLE", t), ("NFTA_OBJ_NAME", n), ("NFTA_OBJ_TYPE", 1),
        ("NFTA_OBJ_DATA", {"attrs": [("NFTA_COUNTER_BYTES", b), ("NFTA_COUNTER_PACKETS", p)]})],
        0, n) for t, n, p, b in (("natlb", "in_0", 3, 1 << 40), ("other", "x", 1, 2))]
    data = b"".join(nftwire.encode(m, 2, 2, i) for i, m in enumerate(objs))
    assert nftwire.counter_objects(data) == (
        [("natlb", "in_0", 3, 1 << 40), ("other", "x", 1, 2)], False)
    done = (20).to_bytes(4, "little") + (nftwire.NLMSG_DONE).to_bytes(2, "little") + bytes(14)
    assert nftwire.counter_objects(data + done)[1] is True


def test_every_message_of_a_batch_carries_its_tables_family():
    """The ip6 table's set elements go through nftwire too: sent with the
    IPv4 family they name a table that does not exist."""
    from .test_ruleset_ipv6 import dual

    msgs = ruleset.build(dual())
    data, _ = steering.encode(msgs, 0)
    families, off = [], 0
    while off < len(data):
        length, mtype = int.from_bytes(data[off:off + 4], "little"), data[off + 5]
        if mtype == nftwire.NFNL_SUBSYS_NFTABLES:
            families.append(data[off + 16])
        off += (length + 3) & ~3
    assert families == [m.family for m in msgs]
    assert ruleset.NFPROTO_IPV6 in families
