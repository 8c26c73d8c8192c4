"""`natlb restart`: a running natlb hands over to a new process.

The old process (A) starts the successor (B) from the installed code with
the config re-read, and talks to it over a socketpair, one JSON object per
line.  Only one process decides packets and writes the flow table at any
moment:

    A -> B  {"journal", "queues", "pool", "control_fd", "metrics"}  host
            changes to own, A's queues, health/admin/weight state, the
            number of A's listening control socket, which B inherited, and
            the address A serves metrics on
   (B -> A  {"want": "metrics"}  if B serves metrics and A offered its
            listening socket ("metrics_socket"); A -> B sends it
            (SCM_RIGHTS, so that a B which never asks never holds it))
    B       publishes its tables, binds its own queues (the other bank),
            paused: the kernel holds what arrives there
    B -> A  {"bound": queues, "metrics": whether B will serve A's socket}
    A       stops health checks, then forwards every packet it receives to
            B's queues undecided (an NF_QUEUE verdict) and stops touching
            the flow table; stops accepting on the metrics socket (scrapes
            wait in its backlog for B: none sees a counter go back)
    A -> B  {"released": true, "traffic"}  and A's final counters
    B       adopts the flow table file (in place, or copied when max_flows
            changed), replaces the nftables rules with its own queue
            numbers in one batch (chains, hence queued packets, are kept),
            then starts reading
    B -> A  {"serving": summary}  with "control": whether B serves that
            listening socket (an older B binds the path once A removed it,
            and the metrics address once A let it go); B serves the metrics
            socket from now on
    A       stops accepting on the control socket (B, which inherited its
            listening socket, accepts from now on: `natlb status` never
            finds the path unanswered), waits until its own queues are
            empty, answers `natlb restart` with the summary and exits
            without undoing anything: B's guardian holds the journal now.

If B fails before it serves, A takes its packets back and goes on.

B is started as an orphan (spawn_orphan): under systemd it must be a child
of the service manager by the time it reports READY=1 with its MAINPID, or
systemd marks the main process "not our child", cannot see it exit, and
SIGKILLs it at `systemctl stop` without waiting for its clean-up.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from typing import Any

from natlb.core import Counters
from natlb.pool import Pool
from natlb.status import queue_stats, read_counters


class HandoverError(RuntimeError):
    # The successor's own refusal carries its exit code (2: a config error
    # only it could see, e.g. a missing interface); anything else is 1.
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Channel:
    """JSON lines over one end of a socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = sock.makefile("r")

    def send(self, **msg: Any) -> None:
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def receive(self, timeout: float, what: str = "a message") -> dict[str, Any]:
        self.sock.settimeout(timeout)
        try:
            line = self.reader.readline()
        except TimeoutError:
            raise HandoverError(f"no {what} within {timeout:.0f} s") from None
        if not line:
            raise HandoverError(f"the other side exited before {what}")
        msg = json.loads(line)
        if "error" in msg:
            raise HandoverError(msg["error"], int(msg.get("exit", 1)))
        return msg

    def send_socket(self, sock: socket.socket, **msg: Any) -> None:
        """One message with a descriptor of ours attached (SCM_RIGHTS).  Only
        when the other side asked for it: it must read it with
        receive_socket, with nothing of ours buffered before it."""
        socket.send_fds(self.sock, [json.dumps(msg).encode() + b"\n"], [sock.fileno()])

    def receive_socket(self, timeout: float, what: str) -> socket.socket | None:
        """The socket sent with send_socket (None if none came with it)."""
        self.sock.settimeout(timeout)
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, 1 << 12, 1)
            while data and not data.endswith(b"\n"):
                more = self.sock.recv(1 << 12)
                if not more:
                    break
                data += more
        except TimeoutError:
            raise HandoverError(f"no {what} within {timeout:.0f} s") from None
        if not data:
            raise HandoverError(f"the other side exited before {what}")
        return socket.socket(fileno=fds[0]) if fds else None

    def expect(self, key: str, timeout: float) -> Any:
        msg = self.receive(timeout, repr(key))
        if key not in msg:
            raise HandoverError(f"expected {key!r}, got {sorted(msg)}")
        return msg[key]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


TRAFFIC = ("packets_in", "bytes_in", "packets_out", "bytes_out", "new_flows")


def traffic(pool: Pool) -> dict[str, dict[str, dict[str, int]]]:
    """The traffic counters of every service and backend, by name and key,
    with what the kernel's fast path carried (the successor's starts at 0)."""
    svc, be = read_counters(pool, pool.services)
    return {
        "services": {s.cfg.name: {k: getattr(svc[s.id], k) for k in TRAFFIC}
                     for s in pool.services},
        "backends": {f"{s.cfg.name} {b.cfg.key}": {k: getattr(be[b.id], k) for k in TRAFFIC}
                     for s in pool.services for b in s.backends},
    }


def seed_traffic(pool: Pool, t: dict[str, dict[str, dict[str, int]]]) -> None:
    """The successor's counters continue from its predecessor's."""
    for s in pool.services:
        if s.cfg.name in t["services"]:
            pool.core.seed_counters(False, s.id, Counters(**t["services"][s.cfg.name]))
        for b in s.backends:
            c = t["backends"].get(f"{s.cfg.name} {b.cfg.key}")
            if c:
                pool.core.seed_counters(True, b.id, Counters(**c))


def wait_drained(queues: list[int], timeout: float = 3.0) -> int:
    """Waits until the kernel holds no packet for `queues` (checked three
    times in a row); returns how many were still waiting at the end."""
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        waiting = sum(q["waiting"] for q in queue_stats(queues))
        quiet = quiet + 1 if waiting == 0 else 0
        if quiet >= 3:
            return 0
        time.sleep(0.02)
    return sum(q["waiting"] for q in queue_stats(queues))


def spawn_orphan(argv: list[str], fds: tuple[int, ...]) -> int:
    """Starts argv in its own session (it outlives us), passing it `fds`,
    with init or the nearest subreaper as its parent (what systemd checks
    when told a new MAINPID); returns its pid."""
    # sh forks the successor, prints its pid ($!) and exits at once, which
    # re-parents the successor.  Its stdout goes to our stderr (where its
    # logs go anyway), not into the pipe we read the pid from.
    sh = subprocess.Popen(["/bin/sh", "-c", '"$@" >&2 & echo $!', "natlb-restart", *argv],
                          pass_fds=fds, stdout=subprocess.PIPE, start_new_session=True)
    out, _ = sh.communicate(timeout=10)
    if sh.returncode != 0 or not out.strip().isdigit():
        raise HandoverError(f"could not start the successor ({argv[0]})")
    return int(out)
