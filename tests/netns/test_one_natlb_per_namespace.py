"""One natlb per network namespace, and lb.table its own: a second natlb
(another control socket, queue and perhaps table) or a table of the
operator's that bears lb.table's name is refused before anything changes,
in one line, exit 2."""

import pytest

from natlb_testbed.testbed import basic_config

from .conftest import natlb_cli, router_state
from .firewall import answered, load, ruleset


@pytest.mark.parametrize("table,sock", [("natlb", "second.sock"), ("natlb_second", "second.sock"),
                                        ("natlb", "natlb.sock")])
def test_a_second_natlb_is_refused_and_the_first_serves_on(testbed, natlb, table, sock):
    """Another queue, and another control socket: on the same lb.table the
    second would replace the first's rules (and delete them on exit); on
    another it would put ip_forward back under the first when it stops, and
    replace the first's tc filters.  Or the same config started twice."""
    natlb(basic_config(testbed))
    mine = ruleset(testbed)
    second = basic_config(testbed).replace(testbed.control_socket, str(testbed.workdir / sock))
    second = second.replace("[lb]", f'[lb]\nqueue = 40\ntable = "{table}"')
    (testbed.workdir / "second.toml").write_text(second)
    r = natlb_cli(testbed, "run", "-c", str(testbed.workdir / "second.toml"))
    assert (r.returncode, r.stderr.strip()) == (
        2, f"natlb: another natlb runs in this network namespace (control socket "
           f"{testbed.control_socket}, table ip natlb); both would change the same sysctls, "
           f"interfaces and tc filters, and the first to stop would undo them under the "
           f"other: one natlb per network namespace")
    assert ruleset(testbed) == mine
    assert not (testbed.workdir / "second.sock.flows").exists()
    assert testbed.status()["services"][0]["name"] == "web"
    assert answered(testbed) == 4


def test_a_table_of_the_operators_with_natlbs_name_is_refused_and_kept(testbed):
    before = router_state(testbed)
    load(testbed, "table ip natlb {\n chain c {\n  counter\n }\n}\n")
    try:
        theirs = ruleset(testbed)
        r = natlb_cli(testbed, "run", "-c", str(testbed.write_config(basic_config(testbed))))
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().startswith(
            'natlb: config: lb.table = "natlb": the host has a table ip natlb that natlb did '
            "not make"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert ruleset(testbed) == theirs
    finally:
        testbed.router_cmd("nft", "delete", "table", "ip", "natlb")
    assert router_state(testbed) == before
