"""The run-time state a crash restart keeps (natlb/runstate.py), without
root: the file's round trip, a damaged file ignored, health not kept, the
file removed with the other host changes."""

import json
import logging

from natlb import runstate
from natlb.config import parse
from natlb.core import Core, CoreConfig
from natlb.pool import Pool
from natlb.pool_state import DISABLED, DOWN, DRAINING
from natlb.undo import _undo_one


def pool(weights=(1, 1, 1)) -> Pool:
    backends = [{"address": f"203.0.113.{10 + i}", "port": 8080, "weight": w}
                for i, w in enumerate(weights)]
    return Pool(parse({"service": [{"name": "web", "vip": "192.0.2.100", "port": 80,
                                    "backend": backends}]}), Core(CoreConfig(max_flows=64)))


def test_admin_and_weight_come_back_health_does_not(tmp_path):
    path = str(tmp_path / "natlb.sock.state")
    crashed = pool()
    web = crashed.services[0].backends
    crashed.set_admin("web", web[0].cfg.key, "disabled")
    crashed.set_admin("web", web[1].cfg.key, "draining")
    crashed.set_weight("web", web[2].cfg.key, 9)
    web[2].health = DOWN
    runstate.save(path, crashed)
    again = pool()
    assert runstate.restore_pool(again, runstate.load(path), health=False) == 3
    b = again.services[0].backends
    assert [x.admin for x in b] == [DISABLED, DRAINING, "enabled"]
    assert b[2].weight == 9 and b[2].health == "up"     # checks decide health afresh
    # A weight the config changed meanwhile is the config's.
    changed = pool(weights=(1, 1, 4))
    runstate.restore_pool(changed, runstate.load(path), health=False)
    assert changed.services[0].backends[2].weight == 4


def test_every_operator_change_is_told(tmp_path):
    p = pool()
    told = []
    p.operator_changed = lambda: told.append(1)
    key = p.services[0].backends[0].cfg.key
    p.set_admin("web", key, "draining")
    p.set_weight("web", key, 3)
    assert len(told) == 2


def test_a_damaged_or_missing_file_is_the_config(tmp_path, caplog):
    path = tmp_path / "natlb.sock.state"
    assert runstate.load(str(path)) is None
    good = {"service": "web", "backend": "203.0.113.10:8080", "admin": "disabled",
            "weight": 1, "cfg_weight": 1, "health": "up"}
    for text in ("{not json", json.dumps({"a": 1}), json.dumps([{"service": "web"}]),
                 # a newer natlb's state, a weight of another type
                 json.dumps([{**good, "admin": "maintenance"}]),
                 json.dumps([{**good, "weight": "5"}])):
        path.write_text(text)
        with caplog.at_level(logging.WARNING):
            assert runstate.load(str(path)) is None
        assert "backends start from the config" in caplog.text
        caplog.clear()
    path.write_text(json.dumps([good]))
    assert runstate.load(str(path)) == [good]


def test_the_file_goes_with_the_other_host_changes(tmp_path):
    path = tmp_path / "natlb.sock.state"
    runstate.save(str(path), pool())
    (tmp_path / "natlb.sock.state.tmp4321").write_text("left by a crash mid-write")
    _undo_one({"kind": "run_state", "module": "natlb.runstate", "path": str(path)})
    assert list(tmp_path.iterdir()) == []
    _undo_one({"kind": "run_state", "module": "natlb.runstate", "path": str(path)})  # twice
