"""Where and how ``natlb run`` logs: always stderr, one line per event.

Under systemd, stderr is a stream to journald, which stamps each line with
its own time and reads a ``<N>`` syslog priority prefix (SyslogLevelPrefix=,
on by default); so there natlb writes neither a timestamp nor a level word.
Anywhere else (a terminal, a file the tests read) lines carry a
millisecond timestamp.  systemd sets JOURNAL_STREAM to the device and
inode of that stream; natlb believes it only if stderr still is that
stream, so a child whose stderr was redirected elsewhere keeps timestamps.
"""

from __future__ import annotations

import logging
import os
import sys

TIMESTAMPED = "%(asctime)s.%(msecs)03d %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"

# sd-daemon(3) priorities: <3> error, <4> warning, <6> info, <7> debug.
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


def stderr_is_journal() -> bool:
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<N>name: message``; journald adds time, host and unit itself."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prio = PRIORITY.get(record.levelno, 6)
        # Each line of a multi-line message (a traceback) keeps its priority.
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def configure(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TIMESTAMPED, DATEFMT))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler],
                        force=True)
