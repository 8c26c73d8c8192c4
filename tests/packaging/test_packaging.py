"""The systemd unit and scripts/install (into a temporary root: no root
privileges and nothing on this host touched)."""

import configparser
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from natlb.config import LBConfig

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "natlb.service"
INSTALL = REPO / "scripts" / "install"
EXAMPLE = REPO / "examples" / "natlb.toml"


def unit_section(text: str) -> configparser.SectionProxy:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # keys are case-sensitive in units
    cp.read_string(text)
    return cp["Service"]


def verify(unit_text: str, natlb_bin: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify, with ExecStart pointing at a natlb that exists
    here (verify insists the binary is there)."""
    path = tmp_path / "natlb.service"
    path.write_text(unit_text.replace("/opt/natlb/bin/natlb", natlb_bin))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


def test_unit_verifies(tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed (scripts/setup --test installs systemd)")
    natlb_bin = str(Path(sys.executable).parent / "natlb")
    assert os.access(natlb_bin, os.X_OK)
    r = verify(UNIT.read_text(), natlb_bin, tmp_path)
    # verify exits 0 even for unknown keys: its warnings must be empty too.
    assert (r.returncode, r.stderr, r.stdout) == (0, "", "")
    broken = verify(UNIT.read_text().replace("RestartSec=", "RestartSecs="), natlb_bin, tmp_path)
    assert "Unknown key" in broken.stderr   # the check above can fail


def test_unit_agrees_with_natlb():
    svc = unit_section(UNIT.read_text())
    assert svc["Type"] == "notify"
    assert svc["ExecStart"] == "/opt/natlb/bin/natlb run -c /etc/natlb/natlb.toml"
    # The outcome of the reload is its exit code (kill -HUP always passed).
    assert svc["ExecReload"] == "/opt/natlb/bin/natlb reload -c /etc/natlb/natlb.toml"
    assert svc["Restart"] == "on-failure"
    # The control socket natlb uses by default is in the unit's RuntimeDirectory.
    assert Path(LBConfig().control_socket).parent == Path("/run") / svc["RuntimeDirectory"]
    assert svc["RestartPreventExitStatus"] == "2"   # config errors do not loop


def install(root: Path, **env: str) -> subprocess.CompletedProcess:
    # TMPDIR: a failed install leaves its log there, so not in /tmp.
    return subprocess.run([str(INSTALL), "--root", str(root)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "TMPDIR": str(root.parent), **env})


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    r = install(root)
    assert r.returncode == 0, r.stderr
    return root, r


def test_install_into_a_root(installed, tmp_path):
    root, r = installed
    assert "installed in" in r.stdout and r.stderr == ""
    natlb_bin = root / "opt/natlb/bin/natlb"
    v = subprocess.run([str(natlb_bin), "--version"], capture_output=True, text=True)
    assert v.returncode == 0 and v.stdout.startswith("natlb ")
    assert filecmp.cmp(root / "etc/natlb/natlb.toml", EXAMPLE, shallow=False)
    # The tc fast path's BPF object is built with the package, beside the C core.
    (bpf,) = (root / "opt/natlb/lib").glob("python3*/site-packages/natlb/_fastpath.bpf.o")
    assert bpf.read_bytes()[:4] == b"\x7fELF"
    assert filecmp.cmp(root / "usr/local/lib/systemd/system/natlb.service", UNIT, shallow=False)
    assert not any(".old." in p or ".new." in p for p in tree(root))
    if shutil.which("systemd-analyze"):
        unit = (root / "usr/local/lib/systemd/system/natlb.service").read_text()
        assert verify(unit, str(natlb_bin), tmp_path).stderr == ""


def fake_python(tmp_path: Path) -> Path:
    """A python3 that passes the checks but cannot make a venv: the install
    fails after it has moved the old /opt/natlb aside."""
    p = tmp_path / "python3"
    p.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m venv" ] && exit 1\nexec {sys.executable} "$@"\n')
    p.chmod(0o755)
    return p


def test_failed_upgrade_keeps_the_old_install(installed, tmp_path):
    root, _ = installed
    before = tree(root)
    r = install(root, PYTHON=str(fake_python(tmp_path)))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "creating the venv" in r.stderr
    assert tree(root) == before
    v = subprocess.run([str(root / "opt/natlb/bin/natlb"), "--version"], capture_output=True)
    assert v.returncode == 0


def test_failed_install_leaves_nothing(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    r = install(root, PYTHON=str(fake_python(tmp_path)))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert tree(root) == set()
    (root / "opt").write_text("not a directory")
    r = install(root)
    assert (r.returncode, r.stderr) == (
        1, f"scripts/install: cannot create the directory {root}/opt\n")
    assert tree(root) == {"opt"}


def test_reinstall_keeps_the_config(installed):
    root, _ = installed
    conf = root / "etc/natlb/natlb.toml"
    conf.write_text(conf.read_text() + "# the operator's edit\n")
    r = install(root)
    assert r.returncode == 0, r.stderr
    assert "kept as it was" in r.stdout
    assert conf.read_text().endswith("# the operator's edit\n")
    assert subprocess.run([str(root / "opt/natlb/bin/natlb"), "--version"]).returncode == 0
    assert not any(".old." in p for p in tree(root))
