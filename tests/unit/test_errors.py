"""Errors by blame: the user's (exit 2) or the host's (exit 1), one line,
never a traceback; and what works without the compiled C core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from natlb import cli, netsetup, undo
from natlb.config import LBConfig
from natlb.errors import ConfigError, HostError, UserError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "natlb.toml"

# Run natlb with its C extension made unimportable.
WITHOUT_CORE = """
import sys
sys.modules["natlb._natlb_core"] = None   # import raises ImportError
from natlb import cli, config
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
assert "natlb.core" not in sys.modules, "natlb.core was imported"
sys.exit(code)
"""


def run_without_core(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WITHOUT_CORE, *args],
                          capture_output=True, text=True, timeout=60)


def test_check_and_help_work_without_the_c_core(tmp_path: Path) -> None:
    r = run_without_core("check", "-c", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{EXAMPLE}: ok")
    r = run_without_core("--help")
    assert r.returncode == 0 and "natlb" in r.stdout, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[lb]\nworkers = 17\n')
    r = run_without_core("check", "-c", str(bad))
    assert (r.returncode, r.stderr) == (2, "natlb: config: lb.workers = 17: must be 1..16\n")


def test_core_limits_agree_with_the_header() -> None:
    from natlb import config
    from natlb._natlb_core import lib

    assert (config.MAX_SERVICES, config.MAX_BACKENDS, config.MAX_WORKERS) == (
        lib.NL_MAX_SERVICES, lib.NL_MAX_BACKENDS, lib.NL_MAX_WORKERS)


def test_core_config_defaults_are_the_configs() -> None:
    from natlb.core import CoreConfig

    assert CoreConfig() == CoreConfig.from_lb(LBConfig())
    assert CoreConfig().syn_timeout_ms == LBConfig().syn_timeout_ms


def _raising(exc: BaseException):
    def cmd(args: object) -> int:
        raise exc
    return cmd


@pytest.mark.parametrize("exc, code", [
    (ConfigError('lb.interface = "x": no such interface'), 2),
    (UserError("no service named 'x'"), 2),
    (HostError("nftables refused table natlb: Operation not permitted"), 1),
])
def test_exit_code_by_blame(monkeypatch, capsys, exc: Exception, code: int) -> None:
    monkeypatch.setattr(cli, "cmd_check", _raising(exc))
    assert cli.main(["check", "-c", "x.toml"]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(exc) in err


def test_netlink_error_is_one_line_not_a_traceback(monkeypatch, capsys) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    monkeypatch.setattr(cli, "cmd_check", _raising(NetlinkError(1, "Operation not permitted")))
    assert cli.main(["check", "-c", "x.toml"]) == 1
    assert capsys.readouterr().err == "natlb: netlink: Operation not permitted\n"


def test_missing_interface_is_the_same_error_everywhere() -> None:
    """Before start (preflight) and during setup (apply) alike; read-only."""
    lb = LBConfig(interface="nlnosuch0", control_socket="/tmp/natlb-test.sock")
    with pytest.raises(ConfigError) as before:
        netsetup.preflight(lb)
    with pytest.raises(ConfigError) as during:
        netsetup.apply(lb, [], undo.Journal(guardian=False))
    assert str(before.value) == str(during.value) == 'lb.interface = "nlnosuch0": no such interface'


def test_undo_journal_knows_no_modules_internals() -> None:
    code = ("import sys, natlb.undo; "
            "assert not {'pyroute2', 'natlb.steering', 'natlb.netsetup'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_undo_runs_each_kinds_registered_reverter() -> None:
    done: list[str] = []
    undo.reverter("test_thing")(lambda e: done.append(e["name"]))
    j = undo.Journal(guardian=False)
    j.record("test_thing", name="a")
    j.record("test_thing", name="b")
    assert j.entries[0]["module"] == __name__
    assert j.undo() == [] and done == ["b", "a"]  # newest first
    with pytest.raises(ValueError, match="no reverter"):
        j.record("never_registered")


def test_the_runtime_never_imports_the_testbed() -> None:
    """natlb_testbed is tooling: importing every runtime module loads none of it."""
    code = ("import pkgutil, importlib, sys, natlb\n"
            "for m in pkgutil.iter_modules(natlb.__path__):\n"
            "    if m.name not in ('_build', '__main__'):\n"
            "        importlib.import_module('natlb.' + m.name)\n"
            "assert not [m for m in sys.modules if m.startswith('natlb_testbed')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
