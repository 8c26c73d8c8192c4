"""README's config reference and examples/natlb.toml against the config
natlb reads, and README's CLI table against the command line: every key
and flag natlb takes is documented where README says it is."""

import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from natlb import cli
from natlb.config import (
    HEALTH_KINDS,
    BackendConfig,
    FailoverConfig,
    LBConfig,
    RouteConfig,
    ServiceConfig,
    parse,
)

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
EXAMPLE = (REPO / "examples" / "natlb.toml").read_text()

# How each section's keys are named in TOML (dataclass field -> key).
RENAMED = {"timeouts_s": "timeouts", "routes": "route", "backends": "backend"}
NESTED = {"timeouts", "route", "backend", "health", "failover"}   # sections of their own


def _keys(cls) -> set[str]:
    return {RENAMED.get(f.name, f.name) for f in fields(cls)} - NESTED


SECTIONS = {
    "lb": _keys(LBConfig),
    "lb.timeouts": set(LBConfig().timeouts_s),
    "lb.route": _keys(RouteConfig),
    "service": _keys(ServiceConfig),
    "service.health": {"kind"} | {f.name for c in HEALTH_KINDS.values() for f in fields(c)},
    "service.failover": _keys(FailoverConfig),
    "service.backend": _keys(BackendConfig),
}


def config_block() -> str:
    """README's config reference: the first toml block under Configuration."""
    after = README[README.index("\n## Configuration\n"):]
    return after[after.index("```toml\n") + 8:after.index("\n```", after.index("```toml"))]


def sections(text: str) -> dict[str, str]:
    """Each section's lines (comments included), by its header's name; a
    section that comes again (a second [[service]]) adds to the first."""
    out: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        m = re.match(r"\[\[?([\w.]+)\]\]?", line)
        if m:
            name = m.group(1)
            continue
        out[name] = out.get(name, "") + line + "\n"
    return out


def missing(text: str) -> list[str]:
    got = sections(text)
    return [f"{section}.{key}" for section, keys in SECTIONS.items() for key in sorted(keys)
            if not re.search(rf"\b{key}\b", got.get(section, ""))]


def test_readmes_config_reference_is_a_config_natlb_takes():
    config = parse(tomllib.loads(config_block()))
    assert config.services[0].name == "web"


@pytest.mark.parametrize("where", ["README", "examples/natlb.toml"])
def test_every_key_is_shown(where):
    """README says examples/natlb.toml shows every key."""
    assert missing(config_block() if where == "README" else EXAMPLE) == []


def test_every_command_and_flag_is_in_the_cli_table():
    p = cli.parser()
    sub = next(a for a in p._actions if a.dest == "command")
    absent = []
    for name, sp in sub.choices.items():
        if f"`natlb {name}" not in README:
            absent.append(name)
        for a in sp._actions:
            if a.help == "==SUPPRESS==" or not a.option_strings or a.dest == "help":
                continue
            if not any(re.search(rf"`natlb {name}[^`]*{re.escape(o)}\b", README)
                       for o in a.option_strings):
                absent.append(f"{name} {'/'.join(a.option_strings)}")
    assert absent == []
