"""The test plays systemd for a natlb it starts: it owns NOTIFY_SOCKET
(receiving each sender's pid, as systemd does), and with subreaper=True it
adopts `natlb restart`'s successor as systemd adopts a unit's new main
process.  Leaving the `with` block stops everything it started or adopted
and gives all of it up, whether the test passed or not.

    with PlaysSystemd(testbed, subreaper=True) as sd:
        p = sd.track(start natlb with NOTIFY_SOCKET=sd.notify.getsockname())
        sd.wait_ready(p)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from typing import Any


def _subreaper(on: bool) -> None:
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def stop(testbed: Any, proc: subprocess.Popen) -> None:
    """SIGTERM (then SIGKILL) to a process the testbed started; forgotten by it."""
    testbed.stop(proc)
    testbed.procs.remove(proc)


class PlaysSystemd:
    def __init__(self, testbed: Any, subreaper: bool = False) -> None:
        self.testbed = testbed
        self.subreaper = subreaper
        # A path, not the abstract namespace: natlb reaches it from the
        # router's network namespace.
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify.bind(str(testbed.workdir / f"notify-{os.urandom(3).hex()}"))
        self.procs: list[subprocess.Popen] = []
        self.successor = 0        # an adopted restart successor's pid, until reaped

    def __enter__(self) -> PlaysSystemd:
        if self.subreaper:
            _subreaper(True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.successor:
            # After a failure: the successor must not outlive the test.
            os.kill(self.successor, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.successor, 0)
            self.successor = 0
        if self.subreaper:
            _subreaper(False)
        for p in reversed(self.procs):
            stop(self.testbed, p)
        self.procs.clear()
        self.notify.close()

    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        """A process the testbed started for this unit: stopped on leaving."""
        self.procs.append(proc)
        return proc

    def adopt(self, pid: int) -> None:
        """The unit's new main process (a restart successor, our child as
        subreaper): killed and reaped on leaving unless stop_successor ran."""
        self.successor = pid

    def stop_successor(self) -> int:
        """SIGTERM to the adopted successor, reaped by us as systemd's would
        be by it; its exit code."""
        pid, self.successor = self.successor, 0
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 30.0) -> list[str]:
        """Datagrams up to and including the first READY=1."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(0.2)
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                assert proc.poll() is None, f"natlb exited {proc.returncode} before READY=1"
                continue
            got.append(msg)
            if "READY=1" in msg.split("\n"):
                return got
        raise AssertionError(f"no READY=1 within {timeout}s: {got}")
