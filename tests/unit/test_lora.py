"""common/lora.py: adapter names, shapes and the merged weight, hand-derived; model.lora's config rules."""

from __future__ import annotations

import pytest
import torch

from common.config import load_config
from common.lora import adapter_specs, base_weight, delta, find_targets, matches, merged, wire_name


def test_targets_names_and_shapes():
    named = [("model.embed_tokens.weight", (10, 4)), ("model.layers.0.self_attn.q_proj.weight", (6, 4)),
             ("model.layers.0.self_attn.q_proj.bias", (6,)), ("model.layers.0.mlp.down_proj.weight", (4, 8)),
             ("model.layers.0.input_layernorm.weight", (4,)), ("lm_head.weight", (10, 4))]
    found = find_targets(named, ["q_proj", "down_proj"])
    assert [(t.module, t.in_features, t.out_features) for t in found] == [
        ("model.layers.0.self_attn.q_proj", 4, 6), ("model.layers.0.mlp.down_proj", 8, 4)]
    assert adapter_specs(found, 2) == [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", (2, 4)),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", (6, 2)),
        ("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight", (2, 8)),
        ("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight", (4, 2))]
    with pytest.raises(ValueError, match="matches no linear layer"):
        find_targets(named, ["c_attn"])
    assert matches("a.q_proj", ["q_proj"]) and not matches("a.xq_proj", ["q_proj"]) and matches("q_proj", ["q_proj"])


def test_live_and_wire_names():
    live = "base_model.model.model.layers.3.mlp.up_proj.lora_B.default.weight"
    assert wire_name(live) == "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight"
    assert wire_name("base_model.model.lm_head.weight") == "base_model.model.lm_head.weight"  # not an adapter
    assert base_weight(wire_name(live)) == ("model.layers.3.mlp.up_proj.weight", "B")
    with pytest.raises(ValueError, match="not a LoRA adapter tensor"):
        base_weight("model.layers.3.mlp.up_proj.weight")


def test_delta_and_merge_by_hand():
    a = torch.tensor([[1.0, 2.0, 0.0]])  # [r=1, in=3]
    b = torch.tensor([[1.0], [-1.0]])  # [out=2, r=1]
    # scale * B @ A = 0.5 * [[1, 2, 0], [-1, -2, 0]]
    assert torch.equal(delta(a, b, 0.5), torch.tensor([[0.5, 1.0, 0.0], [-0.5, -1.0, 0.0]]))
    base = {"m.q.weight": torch.ones(2, 3), "m.k.weight": torch.zeros(2, 3)}
    got = merged(base, {"base_model.model.m.q.lora_A.weight": a, "base_model.model.m.q.lora_B.weight": b}, 0.5)
    assert list(got) == ["m.q.weight"]  # only the adapted layer
    assert torch.equal(got["m.q.weight"], torch.tensor([[1.5, 2.0, 1.0], [0.5, 0.0, 1.0]]))
    with pytest.raises(ValueError, match="has only lora_A"):
        merged(base, {"base_model.model.m.q.lora_A.weight": a}, 0.5)


def test_lora_config():
    cfg = load_config("demo", ["model.lora.rank=8", "model.lora.alpha=32"])
    assert cfg.model.lora.enabled and cfg.model.lora.scale == 4.0
    assert not load_config("demo").model.lora.enabled
    with pytest.raises(ValueError, match="zero_stage=3 is not supported"):
        load_config("demo", ["model.lora.rank=8", "learner.zero_stage=3"])
    with pytest.raises(ValueError, match="are not module names"):
        load_config("demo", ["model.lora.rank=8", "model.lora.target_modules=['q proj']"])
