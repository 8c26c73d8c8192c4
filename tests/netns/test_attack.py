"""No client can fail a backend (issue 9): bad-checksum SYNs and spoofed
"backend" RSTs from the client side, while other connections are held open
and new ones keep coming.  Outcomes are read from `natlb status --json`."""

import json
import subprocess
import sys
from pathlib import Path

from natlb_testbed.testbed import CLIENT_ADDR, VIP, backend_addr, basic_config

from .conftest import natlb_cli

ATTACKER = Path(__file__).with_name("attacker.py")


def status(testbed):
    r = natlb_cli(testbed, "status", "--json", "-s", testbed.control_socket)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_attacker_fails_no_backend_and_resets_no_connection(testbed, natlb):
    # Default passive policy ("check"); checks tolerant of a busy machine, so
    # that only what the attacker does could take a backend down.
    natlb(basic_config(testbed, timeout_ms=500).replace("fall = 1", "fall = 3"))
    before = status(testbed)
    # Idle keep-alive connections on every backend, asked again after the attack.
    holds = testbed.hold_each_backend(VIP, {"b1", "b2", "b3"})
    mac = testbed.router_cmd("cat", "/sys/class/net/cl0/address").stdout.strip()
    with testbed.watch() as watch:  # natlb's backend states, from its control socket
        attacker = testbed.spawn(testbed.client, [
            sys.executable, str(ATTACKER), "--client", CLIENT_ADDR, "--vip", VIP,
            "--backends", *(backend_addr(k) for k in (1, 2, 3)), "--router-mac", mac,
            "--rounds", "12", "--interval-ms", "150"], stdout=subprocess.PIPE, text=True)
        # New connections keep being served during the attack.
        fresh = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "40",
                                   "--interval-ms", "50", "--timeout", "2")
        out, _ = attacker.communicate(timeout=60)
        assert json.loads(out) == {"bad_syns": 12, "spoofed_rsts": 18}
        survived = [h.survived() for h in holds]
        after = status(testbed)

    assert survived == [True] * len(holds)  # nobody was reset
    assert [r for r in fresh if not r["ok"]] == []
    backends = after["services"][0]["backends"]
    assert [(b["health"], b["admin"]) for b in backends] == [("up", "enabled")] * 3
    assert after["failover"]["resets_sent"] == before["failover"]["resets_sent"]
    assert [c for c in watch.changes if c.health == "down"] == []
    # The attack reached natlb: it either doubted a backend and checked it,
    # or the data path refused the packets (checksum, ingress) and counted them.
    doubted = sum(b["passive_failures"] for b in backends)
    refused = sum(after["reasons"][k] - before["reasons"][k]
                  for k in after["reasons"] if k not in ("not_ours", "unsupported"))
    assert doubted + refused > 0, (after["reasons"], watch.changes)
