"""`natlb run` during whose start an interface vanishes: right after the
fast path lists the interfaces to attach to, the one named by
NATLB_TEST_VANISH is deleted (really, in the kernel), so natlb attaches to
an index that no longer exists.  What the start-up race test needs; the
real race (a container's veth going as natlb starts) is too short to hit.

    NATLB_TEST_VANISH=IFNAME python -m natlb_testbed.vanishing run -c FILE
"""

from __future__ import annotations

import os
import sys

from pyroute2 import IPRoute

from natlb import cli, fastpath


def main() -> int:
    name = os.environ["NATLB_TEST_VANISH"]
    listed = fastpath._interfaces

    def list_then_delete() -> list[tuple[int, str, bool]]:
        out = listed()
        with IPRoute() as ipr:
            for index in ipr.link_lookup(ifname=name):
                ipr.link("del", index=index)
        return out

    fastpath._interfaces = list_then_delete
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
