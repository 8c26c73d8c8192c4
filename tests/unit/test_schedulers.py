"""Scheduler distributions, with the C data path indexing Python's tables."""

from collections import Counter

from scapy.layers.inet import IP, TCP

from natlb.core import Core, CoreConfig
from natlb.schedulers import Candidate, maglev_table, wrr_table

from .services import BACKENDS, CLIENT, VIP, make_service


def spread(core, n, src=lambda i: f"198.51.100.{1 + i % 200}", sport=lambda i: 1024 + i):
    seen = Counter()
    for i in range(n):
        pkt = IP(src=src(i), dst=VIP) / TCP(sport=sport(i), dport=80, flags="S")
        _, out = core.process(bytes(pkt), 1)
        seen[IP(out).dst] += 1
    return seen


def fresh(svc):
    c = Core(CoreConfig(max_flows=1 << 16, workers=1))
    c.publish([svc])
    return c


def test_rr_even():
    seen = spread(fresh(make_service("rr")), 300)
    assert sorted(seen.values()) == [100, 100, 100]


def test_wrr_ratios():
    seen = spread(fresh(make_service("wrr", weights=[3, 1, 2])), 600)
    assert [seen[b] for b in BACKENDS] == [300, 100, 200]


def test_wrr_interleaves():
    seq = wrr_table([Candidate("a", 2, True), Candidate("b", 1, True)])
    assert seq == [0, 1, 0]  # not [0, 0, 1]: no burst to the heavier backend
    assert wrr_table([Candidate("a", 4, True), Candidate("b", 2, True)]) == [0, 1, 0]


def test_rr_skips_down_backend():
    seen = spread(fresh(make_service("rr", down=[BACKENDS[1]])), 100)
    assert BACKENDS[1] not in seen and sum(seen.values()) == 100


def test_sh_is_stable_per_client():
    c = fresh(make_service("sh"))
    seen = spread(c, 400, src=lambda i: f"198.51.100.{1 + i % 20}", sport=lambda i: 2000 + i)
    assert len(seen) >= 2  # clients do spread
    for client in range(1, 21):
        addr = f"198.51.100.{client}"
        got = spread(c, 10, src=lambda i, a=addr: a, sport=lambda i: 9000 + i)
        assert len(got) == 1


def test_lc_prefers_least_loaded():
    c = fresh(make_service("lc"))
    first = spread(c, 30)
    assert sorted(first.values()) == [10, 10, 10]


def test_lc_spreads_short_sequential_sessions():
    """Issue 9: 30 SMTP-like sessions one after the other all went to the
    first backend when lc counted open flows only."""
    c = fresh(make_service("lc"))
    seen = Counter()
    for i in range(30):
        sport = 20000 + i
        _, out = c.process(bytes(IP(src=CLIENT, dst=VIP) / TCP(sport=sport, dport=80,
                                                                flags="S")), i)
        be = IP(out).dst
        seen[be] += 1
        for src, dst, s, d, fl in ((be, CLIENT, 8080, sport, "SA"), (CLIENT, VIP, sport, 80, "A"),
                                   (CLIENT, VIP, sport, 80, "FA"),
                                   (be, CLIENT, 8080, sport, "FA"), (CLIENT, VIP, sport, 80, "A")):
            c.process(bytes(IP(src=src, dst=dst) / TCP(sport=s, dport=d, flags=fl)), i)
    assert sorted(seen.values()) == [10, 10, 10]


def test_maglev_moves_about_one_nth_on_removal():
    n = 10
    cands = [Candidate(f"203.0.113.{10 + i}:80", 1, True) for i in range(n)]
    before = maglev_table(cands)
    after = maglev_table([Candidate(c.key, 1, i != 4) for i, c in enumerate(cands)])
    changed = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    removed = before.count(4)
    assert abs(removed / len(before) - 1 / n) < 0.02  # each holds about 1/N
    # Slots of the survivors mostly stay: total movement about 1/N, not a reshuffle.
    assert changed / len(before) < 1 / n + 0.05


def test_maglev_in_data_path_spreads_evenly():
    seen = spread(fresh(make_service("maglev")), 3000)
    assert len(seen) == 3 and min(seen.values()) > 800
