"""A host firewall reload (`systemctl reload nftables` loading a
/etc/nftables.conf that starts with `flush ruleset`) while natlb runs."""

import signal

import pytest

from natlb_testbed.testbed import basic_config

from .conftest import router_state
from .firewall import FIREWALL, UNTRACKED, answered, clear, load, ruleset, wait_table


@pytest.mark.parametrize("lb_extra", ["fastpath = false", ""])
def test_a_firewall_reload_that_flushes_the_ruleset_leaves_natlb_serving(testbed, natlb,
                                                                         lb_extra):
    """The reload deletes natlb's table with every other: without it the
    VIP is a mere local address and the host answers clients with RSTs.
    natlb installs it again, and the operator's tables stay as loaded."""
    before = router_state(testbed)
    p = natlb(basic_config(testbed, lb_extra=lb_extra))
    assert answered(testbed) == 4
    try:
        load(testbed, FIREWALL.format(allow=UNTRACKED))
        wait_table(testbed)
        assert answered(testbed) == 4
        assert "deleted by nft" in testbed.natlb_log(), testbed.natlb_log()
        loaded = testbed.router_cmd("nft", "list", "table", "inet", "opfw").stdout
        testbed.stop(p, signal.SIGTERM)
        assert p.returncode == 0
        # Exactly the operator's ruleset is left: natlb's table went, theirs stayed.
        assert ruleset(testbed) == loaded
    finally:
        clear(testbed)
    assert router_state(testbed) == before
