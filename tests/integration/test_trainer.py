"""learner/trainer.py: real DeepSpeed on CPU (gloo), the tiny HF model, real trees."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from actor.sampler import TreeSampler
from common.config import AdvantageConfig, JobConfig, TreeConfig
from common.data import Prompt
from common.metrics import STEP_RECORD
from common.rewards import make_reward
from common.tree import Node, ReasoningTree, new_tree_id
from common.treerpo import step_advantages
from learner.ranks import split_by_tokens
from learner.trainer import Trainer
from tests.support.ds_worker import job_config
from tests.support.ds_worker import make_trees as worker_trees
from tests.support.models import hf_engine
from tests.support.paths import REPO
from tests.support.treegen import random_tree, tree_from_parents

torch.set_num_threads(1)


def make_cfg(**learner) -> JobConfig:
    base = {"lr": 1e-3, "micro_batch_tokens": 48}
    base.update(learner)
    return JobConfig.model_validate({"learner": base})


def make_trees(seed: int, count: int = 4, vocab_size: int = 50) -> list[ReasoningTree]:
    rng = np.random.default_rng(seed)
    return [random_tree(rng, vocab_size=vocab_size, max_depth=3, max_branch=3) for _ in range(count)]


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


def with_own_logprobs(tree: ReasoningTree, model) -> ReasoningTree:
    """The same tree with each node's behaviour log-probs replaced by the model's (one forward per node)."""
    nodes = []
    with torch.no_grad():
        for i, node in enumerate(tree.nodes):
            ctx = tree.context_ids(i)
            ids = torch.from_numpy(np.concatenate([ctx, node.token_ids]).astype(np.int64))[None]  # (1, C + L)
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (C + L, V)
            pos = torch.arange(len(ctx) - 1, ids.shape[1] - 1)  # positions predicting the node's tokens
            own = logp[pos, ids[0, len(ctx):]].numpy().astype(np.float32)  # (L,)
            nodes.append(Node(parent=node.parent, token_ids=node.token_ids, logprobs=own, version=node.version,
                              finish=node.finish, reward=node.reward))
    return ReasoningTree(tree_id=new_tree_id(), prompt_id=tree.prompt_id, actor_id=tree.actor_id,
                         prompt_token_ids=tree.prompt_token_ids, nodes=nodes).validate()


# ----------------------------------------------------------------------------------------------
# One process (a 1-rank gloo world made by the trainer)
# ----------------------------------------------------------------------------------------------
def test_train_step_updates_parameters_and_reports_metrics(tiny_model_dir):
    trainer = Trainer(make_cfg(warmup_steps=2), tiny_model_dir)
    trees = make_trees(0, vocab_size=trainer.vocab_size)
    before = params(trainer)
    lrs = []
    for step in range(3):
        m = trainer.train_step(trees, learner_version=step)
        lrs.append(m["learning_rate"])
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
        assert m["step_applied"] == 1.0
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # warm-up (k+1)/2, then constant
    after = params(trainer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    # counts derived from the trees themselves
    trainable = sum(len(t.nodes[i]) for t in trees for i in np.flatnonzero(step_advantages(t, AdvantageConfig())[1]))
    assert m["trainable_tokens"] == trainable
    assert m["forward_tokens"] == sum(len(t.prompt_token_ids) + t.num_tokens() for t in trees)  # tree packing
    assert m["trees_consumed"] == len(trees)
    assert m["leaves_consumed"] == sum(len(t.path_lengths()) for t in trees)
    assert m["path_tokens"] == sum(int(t.path_lengths().sum()) for t in trees)
    assert m["leaf_reward_mean"] == pytest.approx(np.concatenate([t.leaf_rewards() for t in trees]).mean())
    assert m["response_tokens_mean"] == pytest.approx(np.concatenate([t.path_lengths() for t in trees]).mean())
    assert m["token_staleness_max"] == 2.0  # versions 0, learner_version 2
    assert trainer.steps == 3 and trainer.skipped_steps == 0
    for key in ("clip_fraction_low", "is_weight_mean", "entropy", "step_duration_seconds",
                "micro_batches"):
        assert key in m
    assert set(m) <= set(STEP_RECORD), set(m) - set(STEP_RECORD)  # one name per quantity: the metric table's


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_all_pruned_batch_is_zero_loss_and_only_weight_decay(tiny_model_dir, zero_stage):
    cfg = make_cfg(zero_stage=zero_stage, weight_decay=0.1, lr=1e-2)
    cfg.advantage.min_group_std = 0.1
    trainer = Trainer(cfg, tiny_model_dir)
    # every group's values are equal (all leaves reward 1): every group pruned
    trees = [tree_from_parents([-1, -1, 0, 0, 1, 1], {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, seed=s) for s in range(3)]
    before = params(trainer)
    m = trainer.train_step(trees, learner_version=0)
    assert m["loss"] == 0.0 and m["trainable_tokens"] == 0 and m["grad_norm"] == 0.0
    # AdamW with zero gradients: m = v = 0, so the step is only p <- p * (1 - lr * wd) on matrices
    for name, p in trainer.module.named_parameters():
        want = before[name] * (1 - 1e-2 * 0.1) if p.ndim >= 2 else before[name]
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("model", ["qwen2-char", "llama-bpe"])
@pytest.mark.parametrize("proximal_forward", [False, True])
def test_proximal_recompute_equals_behaviour_for_the_models_own_logprobs(make_tiny_model, model, proximal_forward):
    # llama-bpe: a chat model's architecture (SmolLM2's); its decoder builds masks unlike Qwen2's
    architecture, tokenizer = model.split("-")
    model_dir = make_tiny_model(architecture=architecture, tokenizer=tokenizer)
    trainer = Trainer(make_cfg(proximal_forward=proximal_forward, micro_batch_tokens=40), model_dir)
    trees = [with_own_logprobs(t, trainer.module) for t in make_trees(1, vocab_size=trainer.vocab_size)]
    m = trainer.train_step(trees, learner_version=0)
    assert m["micro_batches"] >= 2  # the check spans several micro-batches
    # p (recomputed, packed) == b (naive per-node forward): importance weight exp(p - b) = 1
    assert m["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["is_weight_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["approx_kl_behaviour"] == pytest.approx(0.0, abs=1e-9)
    # θ vs p: ratio 1 whether p is stop-grad(θ) or a separate no-grad forward
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["approx_kl_proximal"] == pytest.approx(0.0, abs=1e-10)


def _truncated_trees(model_dir, tree_cfg) -> list[ReasoningTree]:
    """Trees the HF engine samples with the config's temperature / top-k / top-p."""
    engine = hf_engine(model_dir)
    tok = engine.tokenizer
    prompts = [Prompt(f"p{i}", text, "0", np.array(tok.encode(text), dtype=np.int32))
               for i, text in enumerate(["12+34=", "7*8=", "(3+4)*5="])]
    return TreeSampler(engine, tree_cfg, make_reward("arithmetic", 5.0), "a", seed=3).sample(prompts)


def test_learner_recomputes_the_truncated_distribution_the_engine_sampled(tiny_model_dir):
    # the setting: T = 0.8, top_k = 10, top_p = 0.9; without the learner-side truncation
    # the on-policy IS weights exp(p - b) average ~0.44 instead of 1
    cfg = make_cfg(micro_batch_tokens=64)
    cfg.tree = TreeConfig(depth=2, branching=[3, 2], segment_tokens=6, max_tokens=12, temperature=0.8,
                          top_k=10, top_p=0.9)
    trees = _truncated_trees(tiny_model_dir, cfg.tree)
    trainer = Trainer(cfg, tiny_model_dir)
    m = trainer.train_step(trees, learner_version=0)
    assert m["trainable_tokens"] > 50
    assert m["is_weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["is_weight_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["approx_kl_behaviour"] == pytest.approx(0.0, abs=1e-9)
    assert m["truncated_token_fraction"] == 0.0  # every sampled token lies in the learner's kept set


def test_tokens_outside_the_learners_kept_set_leave_the_loss(tiny_model_dir):
    # sampled with top_k = 10, trained as if top_k = 1: only each position's most likely token is kept
    sample_cfg = TreeConfig(depth=2, branching=[3, 2], segment_tokens=6, max_tokens=12, top_k=10)
    trees = _truncated_trees(tiny_model_dir, sample_cfg)
    cfg = make_cfg(micro_batch_tokens=64)
    cfg.tree = sample_cfg.model_copy(update={"top_k": 1})
    trainer = Trainer(cfg, tiny_model_dir)
    # hand count: trainable tokens that are not the argmax of a plain forward over their context
    argmax_ok, total = 0, 0
    with torch.no_grad():
        for tree in trees:
            trainable = step_advantages(tree, cfg.advantage)[1]
            for i in np.flatnonzero(trainable):
                node, ctx = tree.nodes[i], tree.context_ids(i)
                ids = torch.from_numpy(np.concatenate([ctx, node.token_ids]).astype(np.int64))[None]
                best = trainer.module(input_ids=ids).logits[0, len(ctx) - 1:-1].argmax(-1)  # (L,)
                argmax_ok += int((best == ids[0, len(ctx):]).sum())
                total += len(node)
    m = trainer.train_step(trees, learner_version=0)
    assert m["trainable_tokens"] == total and 0 < argmax_ok < total
    assert m["truncated_token_fraction"] == pytest.approx(1 - argmax_ok / total, abs=1e-6)
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) and m["step_applied"] == 1.0
    assert all(torch.isfinite(p).all() for p in params(trainer).values())


def test_log_prob_forwards_run_without_dropout(tiny_model_dir, tmp_path):
    # a policy whose config has dropout: in train mode θ and p would be noisy draws (on-policy
    # IS weights spread around 1); every log-prob forward must be the deterministic policy
    model_dir = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["attention_dropout"] = 0.5
    (model_dir / "config.json").write_text(json.dumps(config))
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()  # b: dropout off, as an actor samples
    trainer = Trainer(make_cfg(proximal_forward=True, micro_batch_tokens=40), model_dir)
    assert trainer.module.training  # train mode kept (gradient checkpointing needs it), dropout zeroed
    trees = [with_own_logprobs(t, reference) for t in make_trees(1, vocab_size=trainer.vocab_size)]
    m = trainer.train_step(trees, learner_version=0)
    assert m["is_weight_max"] == pytest.approx(1.0, abs=1e-5)  # p == b
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # θ == p
    assert m["approx_kl_proximal"] == pytest.approx(0.0, abs=1e-10)


def test_minibatches_equal_successive_steps_on_the_shares_when_p_is_behaviour(tiny_model_dir):
    # with loss.proximal = behaviour nothing is recomputed, so k = 2 minibatches are exactly two
    # k = 1 steps on the same two shares (split_by_tokens), in order
    trees = make_trees(3, count=6)
    cfg_k2 = make_cfg(minibatches=2)
    cfg_k2.loss.proximal = "behaviour"
    cfg_k1 = make_cfg()
    cfg_k1.loss.proximal = "behaviour"
    together, apart = Trainer(cfg_k2, tiny_model_dir), Trainer(cfg_k1, tiny_model_dir)
    m = together.train_step(trees, learner_version=0)
    for share in split_by_tokens(trees, 2, cfg_k1.learner.packing):
        apart.train_step([trees[i] for i in share], learner_version=0)
    assert m["optimizer_steps"] == 2.0 and together.steps == apart.steps == 2
    for (name, a), (_, b) in zip(params(together).items(), params(apart).items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_minibatches_make_the_trust_region_live(tiny_model_dir):
    # k = 1: p = stop-grad(θ), ratio 1, nothing to clip. k = 2: the second step's θ moved away
    # from p (the pre-batch weights), so the ratio leaves 1 and the proximal KL is positive
    trees = [with_own_logprobs(t, AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
             for t in make_trees(4, count=6)]
    one = Trainer(make_cfg(lr=5e-2), tiny_model_dir).train_step(trees, learner_version=0)
    two = Trainer(make_cfg(lr=5e-2, minibatches=2), tiny_model_dir).train_step(trees, learner_version=0)
    assert one["approx_kl_proximal"] == pytest.approx(0.0, abs=1e-10) and one["ratio_mean"] == pytest.approx(1.0)
    assert two["approx_kl_proximal"] > 1e-6
    assert abs(two["ratio_mean"] - 1.0) > 1e-5
    assert two["optimizer_steps"] == 2.0 and two["micro_batches"] >= 2


def test_kl_reference_is_zero_before_the_first_update(tiny_model_dir):
    cfg = make_cfg(lr=1e-2)
    cfg.loss.kl_coef = 0.1
    trainer = Trainer(cfg, tiny_model_dir)
    trees = make_trees(2, vocab_size=trainer.vocab_size)
    first = trainer.train_step(trees, 0)
    second = trainer.train_step(trees, 0)
    assert first["kl_ref"] == pytest.approx(0.0, abs=1e-10)  # θ == ref: exp(0) - 0 - 1
    assert second["kl_ref"] > 1e-8


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_non_finite_step_is_skipped(tiny_model_dir, zero_stage):
    trainer = Trainer(make_cfg(zero_stage=zero_stage), tiny_model_dir)
    trees = make_trees(3, vocab_size=trainer.vocab_size)
    with torch.no_grad():
        trainer.module.model.norm.weight[0] = float("nan")
    before = params(trainer)
    lr_before = trainer.current_lr()
    m = trainer.train_step(trees, 0)
    assert m["step_applied"] == 0.0 and trainer.skipped_steps == 1
    assert not math.isfinite(m["loss"])
    for name, p in trainer.module.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], rtol=0, atol=0, equal_nan=True)
    assert trainer.current_lr() == lr_before


def test_sync_and_export_under_zero3(tiny_model_dir, tmp_path):
    trainer = Trainer(make_cfg(zero_stage=3), tiny_model_dir)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    synced = dict(trainer.named_parameters_for_sync())
    assert list(synced) == [n for n, _ in original.named_parameters()]
    assert trainer.parameter_specs() == [(n, tuple(p.shape), p.dtype) for n, p in original.named_parameters()]
    for name, p in original.named_parameters():
        torch.testing.assert_close(synced[name], p.detach(), rtol=0, atol=0)
    m = trainer.train_step(make_trees(4, vocab_size=trainer.vocab_size), 0)
    assert m["step_applied"] == 1.0 and math.isfinite(m["grad_norm"])
    trained = dict(trainer.named_parameters_for_sync())
    assert any(not torch.equal(trained[n], synced[n]) for n in synced)
    exported = AutoModelForCausalLM.from_pretrained(trainer.export_hf(tmp_path / "hf"))
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p.detach(), trained[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Two ranks
# ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(model_dir, out, zero_stage: int, minibatches: int = 1) -> tuple[dict, dict, list]:
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(REPO / "tests" / "support" / "ds_worker.py"),
           "--model", model_dir, "--out", str(out), "--steps", "3", "--zero-stage", str(zero_stage),
           "--minibatches", str(minibatches)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=540)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    return r0, r1, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(("zero_stage", "minibatches"), [(2, 1), (3, 2)])
def test_two_ranks_train_checkpoint_and_match_one_rank(tiny_model_dir, tmp_path, zero_stage, minibatches):
    # (3, 2): ZeRO-3 with k = 2 minibatches runs dummy forwards on a rank short of micro-batches;
    # a dummy that took another path through the model than the real forwards hung both ranks
    out = tmp_path / "w2"
    r0, r1, metrics = run_two_ranks(tiny_model_dir, out, zero_stage=zero_stage, minibatches=minibatches)
    assert r0["start"] == r1["start"]
    assert r0["trained"] != r0["start"]  # training moved the weights
    assert r0["moved"] != r0["trained"]  # ... and one more step after the checkpoint moved them again
    assert r0["reloaded"] == r0["trained"] and r0["reloaded_step"] == 3  # the checkpoint brought them back
    assert r1["final"] == r0["reloaded"]  # both ranks end identical
    assert all(m["step_applied"] == 1.0 for m in metrics)
    assert all(m["optimizer_steps"] == minibatches for m in metrics)
    if minibatches > 1:  # the minibatches are cut from each rank's share: no one-rank twin to compare
        assert any(m["approx_kl_proximal"] > 0 for m in metrics)  # the second step saw a moved policy
        return

    # the same step-1 trees on one rank: same global token-mean normaliser, same update
    trainer = Trainer(job_config(2, str(tmp_path / "r1")), tiny_model_dir)
    one = trainer.train_step(worker_trees(0, 6, trainer.vocab_size), learner_version=0)
    two = metrics[0]
    assert one["trainable_tokens"] == two["trainable_tokens"]
    assert one["forward_tokens"] == two["forward_tokens"]
    assert one["loss"] == pytest.approx(two["loss"], rel=1e-6, abs=1e-9)
    assert one["grad_norm"] == pytest.approx(two["grad_norm"], rel=1e-5)
    step1 = load_file(str(out / "params_step1.safetensors"))
    for name, p in trainer.module.named_parameters():
        torch.testing.assert_close(p.detach(), step1[name], rtol=0, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_step_on_cuda(tiny_model_dir):
    trainer = Trainer(make_cfg(zero_stage=2), tiny_model_dir)
    assert trainer.dtype == torch.bfloat16 and trainer.device.type == "cuda"
    before = {n: p.float().cpu() for n, p in trainer.named_parameters_for_sync()}
    m = trainer.train_step(make_trees(5, vocab_size=trainer.vocab_size), 0)
    assert m["step_applied"] == 1.0 and math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    after = dict(trainer.named_parameters_for_sync())
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    assert any(not torch.equal(after[n].float().cpu(), before[n]) for n in before)
