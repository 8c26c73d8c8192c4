"""The bench's nfqlb path without nfqlb: which paths run when its binary is missing,
and the checks that stand between a broken nfqlb deployment and its figures."""

import stat

import pytest

from bench import nfqlb_path
from bench.netbench import PATHS, main, select_paths

BACKENDS = ["b1", "b2", "b3"]


@pytest.fixture
def binary(tmp_path):
    b = tmp_path / "nfqlb"
    b.write_text("#!/bin/sh\n")
    b.chmod(b.stat().st_mode | stat.S_IXUSR)
    return str(b)


def test_default_paths_leave_nfqlb_out_with_one_line_when_no_binary(tmp_path):
    paths, note = select_paths(None, str(tmp_path / "missing"))
    assert "nfqlb" not in paths and paths == [p for p in PATHS if p != "nfqlb"]
    assert note == "nfqlb: no binary (--nfqlb PATH); not measured"
    assert select_paths(None, None) == (paths, note)


def test_default_paths_include_nfqlb_when_its_binary_runs(binary, tmp_path):
    assert select_paths(None, binary) == (list(PATHS), None)
    not_executable = tmp_path / "plain"
    not_executable.write_text("")
    assert "nfqlb" not in select_paths(None, str(not_executable))[0]


def test_named_nfqlb_without_binary_is_an_error_named_without_is_not():
    with pytest.raises(ValueError, match=r"^nfqlb: no binary \(--nfqlb PATH\); not measured$"):
        select_paths("natlb-fast,kernel,nfqlb", None)
    assert select_paths("natlb-fast,kernel", None) == (["natlb-fast", "kernel"], None)
    with pytest.raises(ValueError, match="--paths"):
        select_paths("natlb,nginx", None)


def test_bench_exits_2_before_building_anything(tmp_path, capsys):
    out = tmp_path / "results"
    rc = main(["--paths", "kernel,nfqlb", "--nfqlb", str(tmp_path / "missing"),
               "--out", str(out)])
    assert rc == 2
    assert capsys.readouterr().err.strip() == nfqlb_path.NO_BINARY
    assert not out.exists()


def test_queue_rules_take_only_new_flows_and_counters_read_back():
    cmds = nfqlb_path.queue_setup(4, "192.0.2.100")
    rules = [c for c in cmds if c[3:5] == ["-A", nfqlb_path.QUEUE_CHAIN]]
    assert len(rules) == 3 and all("--ctstate" in r and r[r.index("--ctstate") + 1] == "NEW"
                                   for r in rules)
    assert cmds[-1][3:] == ["-A", "PREROUTING", "-d", "192.0.2.100", "-j",
                            nfqlb_path.QUEUE_CHAIN]
    listing = (f"Chain {nfqlb_path.QUEUE_CHAIN} (1 references)\n"
               "    pkts      bytes target     prot opt in     out     source    destination\n"
               "      31     1860 NFQUEUE    6    --  *  *  0.0.0.0/0  192.0.2.100  tcp dpt:80\n"
               "       6      420 NFQUEUE    17   --  *  *  0.0.0.0/0  192.0.2.100  udp dpt:53\n"
               "       2      120 NFQUEUE    6    --  *  *  0.0.0.0/0  192.0.2.100  tcp dpt:5201\n")
    assert nfqlb_path.queued(listing) == {"tcp80": 31, "udp53": 6, "tcp5201": 2}
    with pytest.raises(RuntimeError):
        nfqlb_path.queued(listing.rsplit("\n", 2)[0])


def test_teardown_undoes_setup_and_drops_only_a_table_it_made():
    setup = nfqlb_path.queue_setup(6, "2001:db8::100")
    down = nfqlb_path.queue_teardown(6, "2001:db8::100", drop_table=True)
    assert all(c[0] == "ip6tables" for c in setup + down[:-1])
    assert down[0][3:] == ["-D", *setup[-1][4:]]
    assert down[-1] == ["nft", "delete", "table", "ip6", "mangle"]
    assert "nft" not in (c[0] for c in nfqlb_path.queue_teardown(6, "2001:db8::100", False))


def test_dnat_rules_follow_the_marks_nfqlb_is_given():
    text = nfqlb_path.ruleset("ip", "192.0.2.100", {"b1": "203.0.113.6", "b2": "203.0.113.10"})
    assert "meta mark 101 dnat to 203.0.113.6" in text
    assert "meta mark 102 dnat to 203.0.113.10" in text
    assert "type nat hook prerouting" in text


GOOD = {"seen": ["b1", "b2", "b3"] * 10, "dns_answered": 6}


def test_check_passes_a_working_syn_only_deployment():
    nfqlb_path.check(GOOD, {"tcp80": 30, "udp53": 6, "tcp5201": 0}, BACKENDS)


@pytest.mark.parametrize("probe,counts,why", [
    ({**GOOD, "seen": ["b1"] * 30}, {"tcp80": 30, "udp53": 6}, "reached"),
    ({**GOOD, "dns_answered": 0}, {"tcp80": 30, "udp53": 6}, "DNS"),
    # every packet of each connection queued: not SYN-only
    (GOOD, {"tcp80": 150, "udp53": 6}, "TCP packets queued"),
    # nothing queued: the traffic bypassed nfqlb
    (GOOD, {"tcp80": 0, "udp53": 0}, "TCP packets queued"),
])
def test_check_refuses_a_broken_deployment(probe, counts, why):
    with pytest.raises(RuntimeError, match=why):
        nfqlb_path.check(probe, counts, BACKENDS)
