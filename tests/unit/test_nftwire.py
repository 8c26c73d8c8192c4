"""natlb.nftwire gives the bytes pyroute2 gives, for every set-element
message of the fast-path golden table."""

from natlb import nftwire, ruleset, steering

from .test_ruleset import spec


def test_same_bytes_as_pyroute2():
    msgs = ruleset.build(spec("mark", fastpath=True))
    done = 0
    for i, m in enumerate(msgs):
        fast = nftwire.encode(m, steering.NFPROTO_IPV4, 0x405, 100 + i)
        if fast is None:
            assert m.kind != ruleset.SETELEM, m.what
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
    assert done >= 10


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
