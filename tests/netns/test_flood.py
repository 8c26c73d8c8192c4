"""A SYN flood of three times the flow table (issue 9, section 2): spoofed
SYNs from the client's side fill the table, and natlb must still take every
real new connection and keep every established one.  Its own module, so its
own testbed: the backends' SYN-ACK retransmissions to the spoofed addresses
go on for a minute after."""

import json
import subprocess

from natlb_testbed.testbed import VIP, basic_config

from .conftest import natlb_cli

MAX_FLOWS = 2000
FLOOD = 3 * MAX_FLOWS


def test_syn_flood_starves_no_new_connection_and_cuts_no_established_one(testbed, natlb):
    # Passive reports are ignored here: what a flood does to them is the
    # passive policy's test; this one is about the table.
    natlb(basic_config(testbed, lb_extra=f"max_flows = {MAX_FLOWS}",
                       service_extra='[service.failover]\npassive = "ignore"'))
    holds = [testbed.hold(VIP) for _ in range(6)]  # established, idle through the flood
    flood = testbed.python(testbed.client, "natlb_testbed.hosts", "syn-flood", "--host", VIP,
                           "--port", "80", "--count", str(FLOOD), "--seconds", "1.0",
                           stdout=subprocess.PIPE, text=True)
    # 30 real connections, every 50 ms: during the flood and right after it.
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", "30",
                             "--interval-ms", "50", "--timeout", "3")
    out, _ = flood.communicate(timeout=60)
    assert json.loads(out)["sent"] == FLOOD
    failed = [r for r in res if not r["ok"]]
    assert len(res) == 30 and failed == [], failed
    assert [h.survived() for h in holds] == [True] * 6
    st = json.loads(natlb_cli(testbed, "status", "--json", "-s", testbed.control_socket).stdout)
    assert st["reasons"]["table_full"] == 0
    assert st["conntrack"]["evicted_tcp"] >= FLOOD - MAX_FLOWS
