"""LoRA (model.lora): the learner trains PEFT adapters and a sync sends only them; the HF engine
merges them into its copy and samples exactly what the learner recomputes; the export merges them;
the adapter saves as PEFT saves it. Real DeepSpeed (1-rank gloo), real gloo sync in threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from actor.engines import make_engine
from actor.sampler import TreeSampler
from common.config import ActorConfig, JobConfig, ModelConfig, TreeConfig, WeightsConfig
from common.data import Prompt
from common.lora import adapter_specs, find_targets
from common.rewards import make_reward
from learner.trainer import Trainer
from tests.support.sync import sync_weights
from tests.support.treegen import random_tree
from weightsync.errors import WeightSyncError
from weightsync.publisher import WeightPublisher
from weightsync.seal import tensor_checksum

torch.set_num_threads(1)
LORA = {"rank": 4, "alpha": 8.0}


def lora_cfg(model_dir, **learner) -> JobConfig:
    return JobConfig.model_validate({"model": {"path": str(model_dir), "lora": LORA},
                                     "learner": {"lr": 1e-2, "micro_batch_tokens": 64, **learner}})


def randomise_adapter(trainer: Trainer, seed: int = 0) -> None:
    """B starts at 0 (PEFT), which makes the adapter a no-op: give A and B values that change the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def sync_to(trainer: Trainer, engine, version: int, named=None):
    """One sync of the trainer's adapter (or `named`) into `engine` through a real publisher over gloo:
    (the publisher's result, engine.receive_weights' Installed or WeightSyncError)."""
    pub = WeightPublisher(WeightsConfig(backend="gloo", rendezvous_port=0, bucket_mb=1 / 64, timeout_s=30.0),
                          "127.0.0.1")
    try:
        _, result, got = sync_weights(engine, pub, named if named is not None else trainer.named_parameters_for_sync(),
                                      version)
    finally:
        pub.close()
    return result, got


def lora_engine(model_dir, **actor):
    return make_engine(ModelConfig(path=str(model_dir), lora=LORA), ActorConfig(max_batch_rows=64, **actor))


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_only_the_adapter_trains_and_a_sync_holds_exactly_it(tiny_model_dir, zero_stage):
    trainer = Trainer(lora_cfg(tiny_model_dir, zero_stage=zero_stage), tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    want = adapter_specs(find_targets(((n, p.shape) for n, p in base.named_parameters()),
                                      ModelConfig().lora.target_modules), 4)
    assert [(n, s) for n, s, _ in trainer.parameter_specs()] == want
    assert len(want) == 2 * 7 * base.config.num_hidden_layers  # A and B of q, k, v, o, gate, up, down
    before = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    rng = np.random.default_rng(0)
    trees = [random_tree(rng, vocab_size=trainer.vocab_size, max_depth=3, max_branch=3) for _ in range(4)]
    for version in range(2):
        m = trainer.train_step(trees, learner_version=version)
        assert m["step_applied"] == 1.0 and m["grad_norm"] > 0
    after = {n: p.detach().clone() for n, p in trainer.module.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".lora_" in n for n in changed)  # the base model never moves
    assert any(".lora_B." in n for n in changed)  # B left 0: the adapter now changes the model
    sent = list(trainer.named_parameters_for_sync())
    assert [n for n, _ in sent] == [n for n, _ in want]
    assert sum(t.numel() for _, t in sent) < sum(p.numel() for p in base.parameters()) / 10


def test_the_hf_engine_samples_exactly_what_the_learner_recomputes_with_lora(tiny_model_dir):
    trainer = Trainer(lora_cfg(tiny_model_dir, micro_batch_tokens=96), tiny_model_dir)
    randomise_adapter(trainer)
    engine = lora_engine(tiny_model_dir)
    result, installed = sync_to(trainer, engine, version=3)
    sent = tensor_checksum(trainer.named_parameters_for_sync())
    assert result.ok and installed.checksum == sent == result.checksum and engine.version == 3
    assert result.bytes == sum(t.numel() * 4 for _, t in trainer.named_parameters_for_sync())
    # the engine's model is now base + scale * B @ A: its samples are the learner's policy
    tree_cfg = TreeConfig(depth=2, branching=[3, 2], segment_tokens=6, max_tokens=12, temperature=1.0)
    tok = engine.tokenizer
    prompts = [Prompt(f"p{i}", text, "0", np.array(tok.encode(text), dtype=np.int32))
               for i, text in enumerate(["12+34=", "7*8=", "(3+4)*5="])]
    trees = TreeSampler(engine, tree_cfg, make_reward("arithmetic", 5.0), "a", seed=3).sample(prompts)
    assert all(n.version == 3 for t in trees for n in t.nodes)
    trainer.cfg.tree = tree_cfg
    m = trainer.train_step(trees, learner_version=3)
    assert m["trainable_tokens"] > 30
    assert m["is_weight_mean"] == pytest.approx(1.0, abs=1e-4)  # exp(p - b): learner's p, the engine's b
    assert m["is_weight_max"] == pytest.approx(1.0, abs=2e-4)
    assert m["approx_kl_behaviour"] == pytest.approx(0.0, abs=1e-7)
    # and the base model would not have sampled them: the adapter matters
    plain = make_engine(ModelConfig(path=str(tiny_model_dir)), ActorConfig(max_batch_rows=64))
    ctx = np.concatenate([trees[0].prompt_token_ids, trees[0].nodes[0].token_ids])
    with torch.no_grad():
        a = engine.model(input_ids=torch.from_numpy(ctx.astype(np.int64))[None]).logits
        b = plain.model(input_ids=torch.from_numpy(ctx.astype(np.int64))[None]).logits
    assert (a - b).abs().max() > 0.1


def test_a_sync_that_is_not_exactly_the_adapter_changes_nothing(tiny_model_dir):
    trainer = Trainer(lora_cfg(tiny_model_dir), tiny_model_dir)
    randomise_adapter(trainer, seed=1)
    engine = lora_engine(tiny_model_dir)
    held = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    full = list(trainer.named_parameters_for_sync())
    norm = ("model.norm.weight", torch.ones(engine.model.config.hidden_size))
    cases = {"left out": full[1:], "a full-weight name": [*full, norm]}
    for what, named in cases.items():
        result, err = sync_to(trainer, engine, version=5, named=named)
        assert result.ok, what
        assert isinstance(err, WeightSyncError) and err.reason == "load", (what, err)
        assert engine.version == 0 and engine.adapter.read_back() == []
        assert all(torch.equal(p, held[n]) for n, p in engine.model.named_parameters()), what
    result, installed = sync_to(trainer, engine, version=5)  # the adapter itself installs
    assert installed.checksum == result.checksum and engine.version == 5


def test_export_merges_the_adapter_and_the_adapter_saves_as_peft_saves_it(tiny_model_dir, tmp_path):
    from peft import PeftModel  # noqa: PLC0415

    trainer = Trainer(lora_cfg(tiny_model_dir), tiny_model_dir)
    randomise_adapter(trainer, seed=2)
    ids = torch.tensor([[3, 5, 7, 9, 11, 13, 2, 4]])
    with torch.no_grad():
        want = trainer.module(input_ids=ids).logits
    merged = AutoModelForCausalLM.from_pretrained(str(trainer.export_hf(tmp_path / "hf")))
    assert not any("lora" in n for n, _ in merged.named_parameters())  # a plain HF folder
    adapter = trainer.save_adapter(tmp_path / "adapter")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), str(adapter))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=0, atol=2e-5)
        torch.testing.assert_close(peft(input_ids=ids).logits, want, rtol=0, atol=1e-6)


def test_up_with_lora_syncs_only_the_adapter_to_hf_actors(make_tiny_model, tmp_path):
    from tests.support.system import SYSTEM_MODEL, System  # noqa: PLC0415

    model = make_tiny_model(**SYSTEM_MODEL)
    system = System(tmp_path / "job", model, ["model.lora.rank=4", "model.lora.alpha=8", "learner.max_steps=4",
                                              "weights.bucket_mb=0.05"], num_actors=2)
    try:
        system.start()
        system.wait(lambda: system.all_exited(), 600, "the LoRA run to reach learner.max_steps and end")
    finally:
        system.stop()
    base = AutoModelForCausalLM.from_pretrained(str(model))
    specs = adapter_specs(find_targets(((n, p.shape) for n, p in base.named_parameters()),
                                       ModelConfig().lora.target_modules), 4)
    adapter_bytes = 4 * sum(a * b for _, (a, b) in specs)
    syncs = system.syncs()
    assert len([s for s in syncs if s["confirmed"]]) >= 4 and all(s["bytes"] == adapter_bytes for s in syncs)
    assert adapter_bytes < sum(p.numel() * 4 for p in base.parameters()) / 4
    for s in syncs:
        assert all(ack["problem"] is None and ack["checksum"] == s["checksum"] for ack in s["acks"].values()), s
    steps = system.steps()
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and {t["actor_id"] for t in system.trees()} == {
        "actor-0", "actor-1"}
    final = tmp_path / "job" / "checkpoints" / "step-000000004"
    assert (final / "adapter" / "adapter_model.safetensors").exists() and (final / "hf" / "config.json").exists()
