"""A backend's answer to a client that reached it straight (not through the
VIP) meets the router's own forward policy, kernel decisions on or off.

Written in the review of faeb8a9, which held such an answer and, finding
no flow after the observer's round, sent it on through natlb's raw socket:
the output path, so the forward hook never saw it.  Now natlb gives it back
to the kernel at once (no entry of the kernel's for it: not a placed flow).
Here an operator's filter on the forward hook (backend b1's DNS answers may
reach clients only through the VIP, never straight from its own address)
drops it with decisions off (the control) and must with decisions on."""

import uuid

import pytest

from natlb_testbed.testbed import backend_addr, basic_config, udp_service

# fastpath_decide defaults to true with the fast path; false is the control
# that shows the filter does drop the answer when the kernel forwards it.
DECIDE = ("true", "false")


@pytest.mark.parametrize("decide", DECIDE)
def test_a_held_answer_passed_on_still_meets_the_routers_forward_filter(testbed, natlb, decide):
    natlb(basic_config(testbed, lb_extra=f"fastpath = true\nfastpath_decide = {decide}",
                       extra_services=udp_service("dns", [1, 2])))
    b1 = backend_addr(1)
    table = f"fwd{uuid.uuid4().hex[:8]}"
    rules = (f"add table ip {table}; "
             f"add chain ip {table} forward {{ type filter hook forward priority 0; }}; "
             f"add rule ip {table} forward ip saddr {b1} udp sport 53 drop")
    added = testbed.router_cmd("nft", rules)
    assert added.returncode == 0, added.stderr
    try:
        udp = testbed.client_run("udp-sizes", "--host", b1, "--port", "53", "--sizes", "20",
                                 "--count", "3", "--timeout", "1")
        got = [r for r in udp if r["ok"]]
        assert not got, f"the router's forward filter was skipped: {got}"
    finally:
        testbed.router_cmd("nft", "delete", "table", "ip", table)
