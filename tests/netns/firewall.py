"""An operator's host firewall in the router namespace, for the tests of
natlb beside one (README, "Beside a host firewall")."""

import subprocess
import time

from natlb_testbed.testbed import VIP

# A Debian-style /etc/nftables.conf: it starts with `flush ruleset`, which
# `systemctl reload nftables` (and restart) loads again.  Input and forward
# drop what they do not accept; {allow} is where the operator's own forward
# rules go.
FIREWALL = """flush ruleset
table inet opfw {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        {allow}
    }}
}}
"""
# What README asks of such a firewall: natlb's packets are untracked (its
# rules notrack them so that the kernel's conntrack never sees its flows).
UNTRACKED = "ct state untracked accept"


def load(testbed, text: str) -> None:
    """As `nft -f /etc/nftables.conf` does."""
    p = subprocess.run(["ip", "netns", "exec", testbed.router, "nft", "-f", "-"], input=text,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def clear(testbed) -> None:
    testbed.router_cmd("nft", "delete", "table", "inet", "opfw")


def ruleset(testbed) -> str:
    return testbed.router_cmd("nft", "list", "ruleset").stdout


def answered(testbed, n: int = 4) -> int:
    """Of n HTTP requests through the VIP (2 s each at most), how many were."""
    res = testbed.client_run("http-stream", "--host", VIP, "--port", "80", "--count", str(n),
                             "--timeout", "2")
    return sum(1 for r in res if r["ok"])


def wait_table(testbed, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while "table ip natlb" not in ruleset(testbed):
        assert time.monotonic() < deadline, f"no table ip natlb again:\n{testbed.natlb_log()}"
        time.sleep(0.05)
