"""The systemd watchdog (``WatchdogSec=``): natlb says ``WATCHDOG=1`` every
half interval, but only while its whole data path is alive.

A dead natlb is systemd's business already (Restart=on-failure); a hung one
is not: it keeps its nftables table and VIPs while the kernel queues packets
nobody reads.  So the ping proves two things: it is sent from the event
loop (a blocked loop sends nothing), and it is sent only while every
NFQUEUE worker has gone round its loop within ``bound`` (each wakes at least
every 100 ms, idle or not, and stamps the time; core.Core.worker_beats).  A
worker stuck longer is logged once, by number, queue and age, and the pings
stop: systemd kills natlb (SIGABRT) one interval after the last one and
restarts it, and the restart adopts the host as after any crash.

Enabled as sd_watchdog_enabled(3) says: WATCHDOG_USEC gives the interval,
and WATCHDOG_PID, when set, must be our pid.  A successor of `natlb
restart` inherits its predecessor's environment, hence its WATCHDOG_PID;
it becomes the unit's main process (MAINPID), so it takes that pid over
(``inherit_pid``) and passes its own on to its children and successor.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

from natlb import sdnotify

log = logging.getLogger("natlb.watchdog")
# Workers wake every 100 ms; below this a busy host's scheduling delays
# would read as a hang.
MIN_BOUND_MS = 500


def interval_ms(environ: Mapping[str, str], pid: int) -> int | None:
    """The watchdog interval systemd asks for, or None (no watchdog, or one
    meant for another process)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
        owner = environ.get("WATCHDOG_PID", "")
        if owner and int(owner) != pid:
            return None
    except ValueError:
        return None
    return usec // 1000 if usec >= 1000 else None


def inherit_pid(environ: MutableMapping[str, str], predecessor: int, pid: int) -> bool:
    """A `natlb restart` successor: take over a WATCHDOG_PID that named the
    predecessor.  True if it did."""
    if environ.get("WATCHDOG_PID") != str(predecessor):
        return False
    environ["WATCHDOG_PID"] = str(pid)
    return True


def bound_ms(interval: int) -> int:
    """How long a worker may go without a loop before natlb counts it stuck:
    half the interval, so that the last ping, sent at most this long after
    the hang, still leaves systemd a whole interval to act on."""
    return max(interval // 2, MIN_BOUND_MS)


@dataclass(frozen=True)
class Stuck:
    worker: int
    age_ms: int


def stuck(beats_ms: list[int], now_ms: int, bound: int) -> list[Stuck]:
    """Workers whose last loop is older than `bound`; ping only if none."""
    return [Stuck(i, now_ms - b) for i, b in enumerate(beats_ms) if now_ms - b > bound]


class Watchdog:
    """Pings from the event loop while the workers go round (see above)."""

    def __init__(self, interval: int, beats: Callable[[], list[int]],
                 clock: Callable[[], int], queues: Callable[[], list[int]]) -> None:
        self.interval = interval
        self.bound = bound_ms(interval)
        self.beats = beats
        self.clock = clock
        self.queues = queues
        self.stuck: list[Stuck] = []

    def check(self) -> bool:
        """One round: ping, or log what is stuck (once per episode).  True
        if it pinged."""
        now = self.clock()
        found = stuck(self.beats(), now, self.bound)
        was = {s.worker for s in self.stuck}
        self.stuck = found
        queues = self.queues()
        for s in found:
            if s.worker not in was:
                queue = queues[s.worker] if s.worker < len(queues) else "?"
                log.error("watchdog: NFQUEUE worker %d (queue %s) has not gone round its loop "
                          "for %d ms (bound %d ms); no more WATCHDOG=1: systemd restarts natlb",
                          s.worker, queue, s.age_ms, self.bound)
        if found:
            return False
        if was:
            log.warning("watchdog: every worker goes round again; pinging again")
        return sdnotify.notify("WATCHDOG=1")

    async def run(self) -> None:
        log.info("systemd watchdog: WATCHDOG=1 every %d ms while no worker is stuck "
                 "over %d ms", self.interval // 2, self.bound)
        while True:
            self.check()
            await asyncio.sleep(self.interval / 2000)


def from_environment(beats: Callable[[], list[int]], clock: Callable[[], int],
                     queues: Callable[[], list[int]]) -> Watchdog | None:
    interval = interval_ms(os.environ, os.getpid())
    return Watchdog(interval, beats, clock, queues) if interval else None
