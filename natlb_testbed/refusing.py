"""`natlb run` whose host refuses one nftables install: the first ruleset
that has a backend at NATLB_TEST_REFUSE_BACKEND is refused with natlb's own
SteeringError (as the kernel's refusal reaches natlb), the next one is sent.

A kernel that refuses a batch natlb builds cannot be arranged on demand (the
same rules install fine here; the real refusals are out of memory, a limit,
a kernel missing a feature), so the refusal is made at natlb's boundary with
nftables: everything above it, the reload's handling, runs as it would.

    NATLB_TEST_REFUSE_BACKEND=ADDRESS python -m natlb_testbed.refusing run -c FILE

NATLB_TEST_REFUSE_SLOW_S=S makes building the refused ruleset (natlb builds
it off the event loop) take S seconds longer, as thousands of services do:
what the loop does meanwhile meets the config that will be refused.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from natlb import cli, daemon, ruleset, steering


def main() -> int:
    address = os.environ["NATLB_TEST_REFUSE_BACKEND"]
    install = steering.Steering.install
    refused = False

    def refuse_once(self: steering.Steering, spec: ruleset.Spec) -> None:
        nonlocal refused
        if not refused and any(b.address == address for s in spec.services
                               for b in s.backends):
            refused = True
            raise steering.SteeringError("nftables refused rule: Cannot allocate memory",
                                         errno.ENOMEM)
        install(self, spec)

    steering.Steering.install = refuse_once  # type: ignore[method-assign]
    slow_s = float(os.environ.get("NATLB_TEST_REFUSE_SLOW_S", "0"))
    build = daemon.Daemon._ruleset

    def slow_build(self: daemon.Daemon) -> ruleset.Spec:
        spec = build(self)
        if not refused and any(b.address == address for s in spec.services
                               for b in s.backends):
            time.sleep(slow_s)
        return spec

    if slow_s:
        daemon.Daemon._ruleset = slow_build  # type: ignore[method-assign]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
