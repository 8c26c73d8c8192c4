"""The C core under AddressSanitizer and UndefinedBehaviorSanitizer: the unit
tests against an instrumented build (scripts/sanitize), and a short run of
each libFuzzer target (scripts/fuzz) with its crash reproducers replayed
first.  Both need clang and libclang-rt-14-dev (scripts/setup --test); no root."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ_SECONDS = 10


def run(*cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_unit_tests_pass_under_asan_and_ubsan():
    r = run("scripts/sanitize", "-x", timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    assert " passed" in r.stdout


@pytest.mark.parametrize("target", ["core", "nfq"])
def test_fuzz_target_finds_nothing(target):
    r = run("scripts/fuzz", "--seconds", str(FUZZ_SECONDS), target, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-8000:]
    assert "no findings" in r.stdout
