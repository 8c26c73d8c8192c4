"""UDP datagrams larger than the path MTU travel as IP fragments: every size
must come back intact through the VIP, in both rewrite modes, over IPv4 and
IPv6 (fragment header), with the fragments in order, last-first, or
reassembled by the kernel first."""

import json

import pytest

from natlb_testbed.testbed import VIP, VIP6, basic_config, udp_service

from .conftest import natlb_cli

SIZES = [100, 1400, 4000, 8000, 30000]
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


def config(testbed, rewrite: str, family: int) -> str:
    return basic_config(testbed, lb_extra=f'rewrite = "{rewrite}"',
                        extra_services=udp_service("dns", [1, 2, 3], family=family))


def fragment_counters(testbed) -> dict[str, int]:
    st = json.loads(natlb_cli(testbed, "status", "--json", "-s", testbed.control_socket).stdout)
    return st["fragments"]


def echo(testbed, family, sizes, count, *extra) -> list[dict]:
    vip = VIP6 if family == 6 else VIP
    res = testbed.client_run("udp-sizes", "--host", vip, "--port", "53", "--count", str(count),
                             "--sizes", ",".join(map(str, sizes)), *extra)
    assert len(res) == len(sizes) * count
    assert [r for r in res if not r["ok"]] == []
    peer = f"[{vip}]:53" if family == 6 else f"{vip}:53"
    assert {r["peer"] for r in res} == {peer}     # never a backend address
    return res


@FAMILIES
@pytest.mark.parametrize("rewrite", ["mark", "copy"])
def test_udp_datagrams_of_every_size_pass_intact_both_ways(testbed, natlb, rewrite, family):
    natlb(config(testbed, rewrite, family))
    res = echo(testbed, family, SIZES, 5)
    assert len({r["backend"] for r in res}) == 3
    c = fragment_counters(testbed)
    # natlb saw the fragments itself (nothing reassembled them on the router):
    # 4000, 8000 and 30000 bytes, both ways, 5 times each.
    assert c["datagrams"] == 3 * 2 * 5 and c["followed"] > 0
    assert c["timeouts"] == c["overflow"] == c["hold_full"] == 0

    # Last fragment first, both ways: every fragment but the first is held
    # until the first comes, then released (NFQUEUE verdicts out of order).
    echo(testbed, family, [4000, 30000], 3, "--reverse")
    c2 = fragment_counters(testbed)
    assert c2["held"] - c["held"] == 3 * 2 * (2 + 20)
    assert c2["released"] == c2["held"] and c2["timeouts"] == 0
    assert c2["tracked"] == 0 and c2["held_now"] == 0


@FAMILIES
@pytest.mark.parametrize("rewrite", ["mark", "copy"])
def test_kernel_reassembly_on_the_router_is_harmless(testbed, natlb, rewrite, family):
    """Once anything in the router's namespace uses the kernel's conntrack,
    nf_defrag reassembles datagrams before natlb's chain (priority -400 <
    raw): natlb then sees whole datagrams, and the kernel fragments them
    again on the way out."""
    rules = testbed.workdir / "ctuse.nft"
    nft_family = "ip6" if family == 6 else "ip"
    rules.write_text(f"table {nft_family} ctuse {{\n chain c {{\n"
                     "  type filter hook prerouting priority 0;\n"
                     "  ct state invalid counter\n }\n}\n")
    assert testbed.router_cmd("nft", "-f", str(rules)).returncode == 0
    try:
        natlb(config(testbed, rewrite, family))
        echo(testbed, family, SIZES, 2)
        echo(testbed, family, [30000], 2, "--reverse")
        assert fragment_counters(testbed)["datagrams"] == 0
    finally:
        testbed.router_cmd("nft", "delete", "table", nft_family, "ctuse")
