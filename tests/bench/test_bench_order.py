"""The bench's order of paths: no path always follows the same one."""

from collections import Counter

import pytest

from bench.netbench import balanced_orders, ordered


@pytest.mark.parametrize("n", range(2, 9))
def test_each_path_runs_at_each_place_and_after_each_other_equally_often(n):
    orders = balanced_orders(n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    places = Counter((place, p) for o in orders for place, p in enumerate(o))
    assert set(places.values()) == {len(orders) // n}
    after = Counter((a, b) for o in orders for a, b in zip(o, o[1:], strict=False))
    assert len(after) == n * (n - 1) and len(set(after.values())) == 1, after


def test_seven_paths_have_varied_predecessors_within_seven_repetitions():
    """The full bench's 7 paths over its usual repetitions: the path that a
    plain rotation always ran after natlb with every packet queued now
    follows four different ones."""
    paths = ["natlb", "natlb-fast", "natlb-fast-queued", "kernel", "stateless", "haproxy",
             "nfqlb"]
    before = set()
    for rep in range(7):
        o = ordered(paths, rep)
        i = o.index("natlb-fast")
        if i:
            before.add(o[i - 1])
    assert len(before) >= 4, before
