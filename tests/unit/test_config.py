"""Strict config: unknown keys, bounds, overrides, YAML round trip, presets."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from common.config import (
    AdvantageConfig,
    ConfigError,
    JobConfig,
    build_config,
    dump_config,
    load_config,
    preset_names,
)
from tests.support.paths import REPO


def test_unknown_key_fails_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tree:\n  depht: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "tree.depht" in msg and "did you mean 'depth'" in msg


def test_unknown_section_fails():
    with pytest.raises(ConfigError, match="unknown key 'treee'"):
        build_config({"treee": {}})


def test_bounds_say_how_to_fix():
    with pytest.raises(ConfigError, match="replay.max_staleness"):
        load_config(None, ["replay.max_staleness=-1"])
    with pytest.raises(ConfigError, match="one branching factor per level"):
        load_config(None, ["tree.depth=2"])


def test_overrides_nested_lists_bools_floats():
    cfg = load_config(
        None,
        [
            "tree.depth=2",
            "tree.branching=[4, 2]",
            "transport.curve=true",
            "transport.curve_dir=/keys",
            "loss.clip_high=0.28",
            "advantage.norm=tree",
            "data.paths=[a.jsonl, b.parquet]",
            "data.source=files",
        ],
    )
    assert cfg.tree.depth == 2 and cfg.tree.branching == [4, 2]
    assert cfg.transport.curve is True and cfg.transport.curve_dir == "/keys"
    assert cfg.loss.clip_high == pytest.approx(0.28)
    assert cfg.advantage.norm == "tree"
    assert cfg.data.paths == ["a.jsonl", "b.parquet"]


def test_override_into_a_value_fails():
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["tree.depth=3", "tree.depth.x=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["tree.depth"])


def test_files_merge_in_order_then_overrides(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("tree: {depth: 1, branching: [8]}\nloss: {clip_low: 0.1}\n")
    b.write_text("loss: {clip_high: 0.3}\n")
    cfg = load_config([a, b], ["loss.clip_low=0.15"])
    assert cfg.tree.branching == [8]
    assert (cfg.loss.clip_low, cfg.loss.clip_high) == (0.15, 0.3)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["tree.depth=1", "tree.branching=[8]", "advantage.min_group_std=0.1"])
    path = tmp_path / "resolved.yaml"
    dump_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()


def test_advantage_config_contract():
    cfg = AdvantageConfig(norm="none", eps=1e-6, min_group_std=0.1)
    assert (cfg.norm, cfg.eps, cfg.min_group_std) == ("none", 1e-6, 0.1)
    with pytest.raises(ValidationError):
        AdvantageConfig(norm="batch")


@pytest.mark.parametrize("name", preset_names())
def test_presets_validate(name):
    cfg = load_config(name)
    assert isinstance(cfg, JobConfig)


def test_common_never_imports_actor_or_learner():
    root = REPO / "common"
    pattern = re.compile(r"^\s*(from|import)\s+(actor|learner)\b", re.M)
    offenders = [p.name for p in root.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []
