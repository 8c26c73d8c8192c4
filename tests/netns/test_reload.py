"""SIGHUP reloads services and backends without losing flows or state."""

import signal
import time
from collections import Counter

import pytest

from natlb_testbed.testbed import VIP, backend_addr, basic_config, unchecked_service


def config(testbed, backends, lb_extra=""):
    return basic_config(testbed, backends=backends, lb_extra=lb_extra)


def hup_and_wait(testbed, proc) -> dict:
    """SIGHUP; how natlb says the reload went (status JSON)."""
    before = testbed.status()["reloads"]["count"]
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        reloads = testbed.status()["reloads"]
        if reloads["count"] > before:
            return reloads
        time.sleep(0.05)
    raise AssertionError(f"no reload seen:\n{testbed.natlb_log()}")


def spread(testbed, n=12):
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", str(n))
    assert all(r["ok"] for r in res), res
    return Counter(r["backend"] for r in res)


def backend_services(testbed) -> str:
    return testbed.router_cmd("nft", "list", "set", "ip", "natlb", "backend_services").stdout


@pytest.mark.parametrize("rewrite", ["mark", "copy", "fastpath"])
def test_reload_adds_and_removes_backends_and_keeps_old_flows(testbed, natlb, rewrite):
    mode = {"fastpath": 'fastpath = true', "mark": 'fastpath = false'}.get(
        rewrite, f'rewrite = "{rewrite}"')
    # Closed flows end within a second: the removed backend then leaves the ruleset.
    lb_extra = f'{mode}\n[lb.timeouts]\ntcp_fin = 1\ntcp_close = 1'
    p = natlb(config(testbed, [1, 2], lb_extra))
    holds = testbed.hold_each_backend(VIP, {"b1", "b2"})
    path = testbed.workdir / "natlb.toml"
    path.write_text(config(testbed, [2, 3], lb_extra))
    assert hup_and_wait(testbed, p)["ok"]
    assert spread(testbed) == {"b2": 6, "b3": 6}
    # Connections made before the reload, even to the removed b1, still
    # answer, from the same backend: its flows go on as with a drain.
    assert [(h.backend, h.survived()) for h in holds] == [(h.backend, True) for h in holds]
    removed = backend_addr(1)
    assert removed in backend_services(testbed)
    if rewrite != "mark":
        return  # leaving the ruleset does not depend on the mode: once is enough
    deadline = time.monotonic() + 30
    while removed in backend_services(testbed):
        assert time.monotonic() < deadline, f"{removed} still in the ruleset"
        time.sleep(0.2)
    assert spread(testbed, 4) == {"b2": 2, "b3": 2}


def test_bad_reload_keeps_running_config(testbed, natlb):
    p = natlb(config(testbed, [1, 2, 3]))
    path = testbed.workdir / "natlb.toml"
    path.write_text(config(testbed, [1]).replace("port = 80\nprotocol", "port = 0\nprotocol"))
    r = hup_and_wait(testbed, p)
    assert (r["ok"], r["error"]) == (False, "service[0].port = 0: must be 1..65535")
    path.write_text(config(testbed, [1], lb_extra="workers = 2"))
    r = hup_and_wait(testbed, p)
    assert (r["ok"], r["error"]) == (False, "lb.workers = 2 (running: 1): a reload cannot "
                                            "change [lb]; restart natlb to apply it "
                                            "(natlb restart -c FILE keeps the flows)")
    assert spread(testbed, 9) == {"b1": 3, "b2": 3, "b3": 3}


@pytest.mark.parametrize("fastpath", [False, True])
def test_a_reload_the_host_refuses_changes_nothing(testbed, fastpath):
    """The nftables install of the new config's rules fails: the running
    config, pool and rules stay, and the refusal is reported.  The refusal is
    made at natlb's own boundary (natlb_testbed/refusing.py: the kernel
    installs these rules fine, and its real refusals, out of memory or a
    missing feature, cannot be had on demand)."""
    lb_extra = f"fastpath = {str(fastpath).lower()}"
    p = testbed.start_natlb(testbed.write_config(config(testbed, [1, 2], lb_extra)),
                            module="natlb_testbed.refusing",
                            env={"NATLB_TEST_REFUSE_BACKEND": backend_addr(3)})
    try:
        holds = testbed.hold_each_backend(VIP, {"b1", "b2"})
        rules = backend_services(testbed)
        path = testbed.workdir / "natlb.toml"
        path.write_text(config(testbed, [2, 3], lb_extra))
        r = hup_and_wait(testbed, p)
        assert (r["ok"], r["error"]) == (
            False, "nftables refused rule: Cannot allocate memory"), r
        assert ("reload refused, keeping the running config: nftables refused rule: "
                "Cannot allocate memory") in testbed.natlb_log()
        backends = [b["address"] for s in testbed.status()["services"] for b in s["backends"]]
        assert backends == [backend_addr(1), backend_addr(2)]
        assert backend_services(testbed) == rules
        # The old services work as before: new connections go where the old
        # config sends them (b3 would take some under the refused one), and
        # those made before still answer from the same backend.
        assert spread(testbed) == {"b1": 6, "b2": 6}
        assert [(h.backend, h.survived()) for h in holds] == [(h.backend, True) for h in holds]
        # The host takes the same config at the next SIGHUP: applied whole.
        assert hup_and_wait(testbed, p)["ok"]
        assert spread(testbed) == {"b2": 6, "b3": 6}
    finally:
        testbed.stop(p)
        testbed.procs.remove(p)


def lo_addresses(testbed) -> set[str]:
    out = testbed.router_cmd("ip", "-o", "addr", "show", "dev", "lo").stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}


def test_a_vip_a_reload_removed_leaves_the_interface(testbed, natlb):
    """The host stops answering for a VIP no service has any more (ARP, its
    own ports) once the removed service's flows are gone; the other stays."""
    from .conftest import router_state

    before = router_state(testbed)
    other = unchecked_service("other", "192.0.2.101")
    p = natlb(basic_config(testbed, extra_services=other))
    assert {VIP, "192.0.2.101"} <= lo_addresses(testbed)
    testbed.write_config(basic_config(testbed))
    assert hup_and_wait(testbed, p)["ok"]
    deadline = time.monotonic() + 15
    while "192.0.2.101" in lo_addresses(testbed):
        assert time.monotonic() < deadline, testbed.natlb_log()
        time.sleep(0.2)
    assert VIP in lo_addresses(testbed)
    assert spread(testbed, 3) == {"b1": 1, "b2": 1, "b3": 1}
    # Added again by the next reload that has it, and removed on exit.
    testbed.write_config(basic_config(testbed, extra_services=other))
    assert hup_and_wait(testbed, p)["ok"]
    assert "192.0.2.101" in lo_addresses(testbed)
    testbed.stop(p)
    assert router_state(testbed) == before


def test_a_refused_reload_keeps_the_vips_of_the_services_it_removed(testbed):
    """The refused config had no service at 192.0.2.101; its flows-less
    backend was pruned while the refused rules were built (the pruning runs
    on the event loop meanwhile), and the VIP went with it.  After the
    refusal the service is back: its VIP must be too."""
    other = unchecked_service("other", "192.0.2.101")
    third = other.replace('"other"', '"third"').replace("192.0.2.101", "192.0.2.102") \
        .replace("203.0.113.6", "203.0.113.7")
    p = testbed.start_natlb(testbed.write_config(basic_config(testbed, extra_services=other)),
                            module="natlb_testbed.refusing",
                            env={"NATLB_TEST_REFUSE_BACKEND": "203.0.113.7",
                                 # beyond the pruning's period (RETIRED_CHECK_S)
                                 "NATLB_TEST_REFUSE_SLOW_S": "4"})
    try:
        assert "192.0.2.101" in lo_addresses(testbed)
        testbed.write_config(basic_config(testbed, extra_services=third))
        r = hup_and_wait(testbed, p)
        assert r["ok"] is False, r
        assert [s["name"] for s in testbed.status()["services"]] == ["web", "other"]
        time.sleep(2.5)    # a pruning after the refusal changes nothing either
        assert "192.0.2.101" in lo_addresses(testbed), testbed.natlb_log()
    finally:
        testbed.stop(p)
        testbed.procs.remove(p)


def test_natlb_reload_says_how_the_reload_went(testbed, natlb):
    """What the unit's ExecReload runs: `systemctl reload` fails when natlb
    refuses the config (kill -HUP passed whatever natlb made of it)."""
    from .conftest import natlb_cli

    natlb(config(testbed, [1, 2, 3]))
    path = testbed.workdir / "natlb.toml"
    path.write_text(config(testbed, [1, 2]))
    r = natlb_cli(testbed, "reload", "-s", testbed.control_socket)
    assert (r.returncode, r.stdout) == (0, f"reloaded {path} (1 service, 2 backends)\n"), r.stderr
    path.write_text(config(testbed, [1]).replace("port = 80\nprotocol", "port = 0\nprotocol"))
    r = natlb_cli(testbed, "reload", "-s", testbed.control_socket)
    assert (r.returncode, r.stderr) == (
        2, "natlb: reload refused, keeping the running config: config: service[0].port = 0: "
           "must be 1..65535\n")
    path.write_text(config(testbed, [1], lb_extra="workers = 2"))
    r = natlb_cli(testbed, "reload", "-c", str(path))
    assert r.returncode == 2 and "lb.workers = 2 (running: 1)" in r.stderr, r.stderr
    assert testbed.status()["reloads"]["count"] == 3
    assert spread(testbed, 4) == {"b1": 2, "b2": 2}
