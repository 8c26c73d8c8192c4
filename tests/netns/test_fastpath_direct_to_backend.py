"""A client reaching a backend's own address and service port through the
router (a monitoring probe, an operator's check), beside the VIP's traffic.

While the kernel decides first packets (lb.fastpath_decide, the default with
the fast path), natlb holds a published backend's answer that finds no
flow: it may be the first answer of a flow the kernel placed and natlb has
not heard of yet.  Such traffic is no flow of natlb's at all, and must flow
as the router's forwarding would carry it: the handshake after the
observer's round, the data at once, whole and with right sums (the
endpoints' own stacks check them)."""

from collections import Counter

from natlb_testbed.testbed import VIP, backend_addr, basic_config, udp_service


def test_connections_and_datagrams_straight_to_a_backend_pass_beside_the_vips(testbed, natlb):
    natlb(basic_config(testbed, lb_extra="fastpath = true",
                       extra_services=udp_service("dns", [1, 2])))
    b1 = backend_addr(1)
    web = testbed.client_run("http-stream", "--host", b1, "--port", "80", "--count", "10")
    assert all(r["ok"] for r in web) and {r["backend"] for r in web} == {"b1"}, web
    blob = testbed.client_run("blob", "--host", b1, "--port", "80", "--size", str(4 << 20),
                              "--seed", "3", "--timeout", "30")[0]
    assert blob["ok"], blob
    udp = testbed.client_run("udp-sizes", "--host", b1, "--port", "53", "--sizes", "20,1000")
    assert all(r["ok"] for r in udp) and {r["peer"] for r in udp} == {f"{b1}:53"}, udp
    # The VIP's own traffic, balanced as ever meanwhile.
    via_vip = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "9")
    assert Counter(r["backend"] for r in via_vip if r["ok"]) == {"b1": 3, "b2": 3, "b3": 3}
