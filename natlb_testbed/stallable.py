"""`natlb run` whose NFQUEUE worker 0 a test can make hang: SIGUSR2 makes it
sleep in its loop for a minute (csrc/natlb_test.h, nl_test_stall) while the
rest of natlb, the event loop included, goes on.  What the watchdog test
needs; SIGSTOP would stop the event loop too.

    python -m natlb_testbed.stallable run -c FILE
"""

from __future__ import annotations

import signal
import sys

from natlb import cli, core

STALL_MS = 60_000


def main() -> int:
    signal.signal(signal.SIGUSR2, lambda *_: core.stall_worker(0, STALL_MS))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
