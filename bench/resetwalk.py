"""nl_reset_backend walks the whole flow table: does the walk hold the GIL?
(no root)

    .venv/bin/python -m bench.resetwalk

Times one walk of a 2^24-flow table, then runs 20 walks on a thread while
the main thread spins a Python loop: had cffi kept the GIL during the C
call, the main thread could not run until each walk ended.
"""

from __future__ import annotations

import threading
import time

from natlb.core import Core, CoreConfig


def main() -> int:
    core = Core(CoreConfig(max_flows=1 << 24, workers=1))
    t0 = time.perf_counter()
    core.reset_backend(1)
    solo = time.perf_counter() - t0
    done = threading.Event()

    def walk() -> None:
        for _ in range(20):
            core.reset_backend(1)
        done.set()

    ticks = 0
    t0 = time.perf_counter()
    threading.Thread(target=walk).start()
    while not done.is_set():
        ticks += 1
    wall = time.perf_counter() - t0
    core.close()
    print(f"one walk of a 2^24-flow table: {solo * 1000:.1f} ms; 20 walks on a thread took "
          f"{wall * 1000:.0f} ms, while the main thread ran {ticks} Python loop iterations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
