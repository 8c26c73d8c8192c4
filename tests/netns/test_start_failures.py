"""A start that fails on the host (a route it refuses, a queue another
program owns) says why in one line, exits 1 and leaves nothing behind:
what it had done is undone, as a stop undoes it."""

import subprocess

from natlb_testbed.testbed import basic_config

from .conftest import natlb_cli, router_state


def leftovers(testbed) -> list[str]:
    """natlb's files beside its control socket (flow table, guardian)."""
    return sorted(p.name for p in testbed.workdir.iterdir() if p.name.startswith("natlb.sock"))


def test_a_route_the_host_refuses_undoes_the_table_vips_and_sysctls(testbed):
    before = router_state(testbed)
    # Valid as config; no interface of the router reaches the gateway.
    route = ('[[lb.route]]\ndestination = "203.0.113.128/25"\ngateway = "192.0.2.254"\n'
             "[[service]]")
    config = basic_config(testbed).replace("[[service]]", route, 1)
    r = natlb_cli(testbed, "run", "-c", str(testbed.write_config(config)))
    assert r.returncode == 1, r.stderr
    # natlb run logs its progress; the error is the last line, and one line.
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("natlb: route 203.0.113.128/25: "), r.stderr
    assert "Traceback" not in r.stderr
    assert router_state(testbed) == before
    assert leftovers(testbed) == []


def test_a_queue_another_program_owns_leaves_nothing_behind(testbed):
    before = router_state(testbed)
    holder = testbed.python(testbed.router, "natlb_testbed.queue_holder", "0",
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        r = natlb_cli(testbed, "run", "-c", str(testbed.write_config(basic_config(testbed))))
        assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (
            1, "natlb: bind NFQUEUE 0: Operation not permitted (another program owns this "
               "queue, or natlb lacks CAP_NET_ADMIN)"), r.stderr
        assert router_state(testbed) == before
        assert leftovers(testbed) == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
