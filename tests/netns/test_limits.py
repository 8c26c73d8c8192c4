"""4,096 services: the kernel takes the whole nft batch, and the service with
the highest id carries traffic (fast path on, so its counter objects and
maps are in the batch too)."""

import time

from natlb_testbed.testbed import VIP, backend_addr

N_SERVICES = 4096


def many_services(tb) -> str:
    out = [f'[lb]\ncontrol_socket = "{tb.control_socket}"\nfastpath = true\n']
    for i in range(N_SERVICES):
        out.append(f'[[service]]\nname = "s{i}"\nvip = "{VIP}"\nport = {20000 + i}\n'
                   '[service.health]\nkind = "none"\n')
        out += [f'[[service.backend]]\naddress = "{backend_addr(k)}"\nport = 80\n'
                for k in range(1, tb.n_backends + 1)]
    return "\n".join(out)


def test_4096_services_load_and_the_last_one_serves(testbed, natlb):
    t0 = time.monotonic()
    natlb(many_services(testbed))
    started_s = time.monotonic() - t0
    vips = testbed.router_cmd("nft", "list", "set", "ip", "natlb", "vips").stdout
    # nft names the protocol only where /etc/protocols exists (not on a bare
    # Debian root without netbase).
    assert vips.count(f"{VIP} . tcp . ") + vips.count(f"{VIP} . 6 . ") == N_SERVICES, started_s
    last = 20000 + N_SERVICES - 1
    res = testbed.client_run("http-stream", "--host", VIP, "--port", str(last), "--count", "6")
    assert all(r["ok"] for r in res), res
    s = next(s for s in testbed.status()["services"] if s["port"] == last)
    assert s["new_flows"] == 6 and len(s["backends"]) == testbed.n_backends
