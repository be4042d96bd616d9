"""learner/checkpoint.py: save/resume with real DeepSpeed on CPU, atomicity, keep-last-K."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.config import JobConfig
from common.errors import CheckpointError
from learner.checkpoint import (
    LATEST,
    LearnerState,
    checkpoint_due,
    checkpoint_root,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    read_learner_state,
    save_checkpoint,
)
from learner.trainer import Trainer
from tests.support.treegen import random_tree

torch.set_num_threads(1)


def make_trainer(model_dir, zero_stage: int = 2) -> Trainer:
    cfg = JobConfig.model_validate({"learner": {
        "lr": 1e-3, "micro_batch_tokens": 48, "zero_stage": zero_stage, "warmup_steps": 3, "weight_decay": 0.01,
    }})
    return Trainer(cfg, model_dir)


def make_trees(seed: int, vocab_size: int, count: int = 3):
    rng = np.random.default_rng(seed)
    return [random_tree(rng, vocab_size=vocab_size, max_depth=3, max_branch=3) for _ in range(count)]


def params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.module.named_parameters()}


def optimizer_tensors(trainer: Trainer) -> list[torch.Tensor]:
    """Every tensor of the base torch optimizer's state (ZeRO wraps it), in a fixed order."""
    opt = getattr(trainer.ds.optimizer, "optimizer", trainer.ds.optimizer)
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key in sorted(opt.state[p]):
                out.append(torch.as_tensor(opt.state[p][key]).clone())
    return out


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_resume_restores_weights_optimizer_schedule_and_state(tiny_model_dir, tmp_path, zero_stage):
    run = tmp_path / "run"
    a = make_trainer(tiny_model_dir, zero_stage)
    for step in range(2):
        a.train_step(make_trees(step, a.vocab_size), learner_version=step)
    data_state = {"epoch": 1, "order": np.arange(5, dtype=np.int64), "name": "x"}
    path = save_checkpoint(a, run, LearnerState(version=2, incarnation=0, step=2, data=data_state,
                                                buffer={"seen": ["t1", "t2"]}))
    after_save = (random.random(), float(np.random.rand()), float(torch.rand(())))
    assert path.name == "step-000000002" and find_latest(run) == path

    b = make_trainer(tiny_model_dir, zero_stage)
    assert any(not torch.equal(b.module.get_parameter(n), p) for n, p in params(a).items())
    state = load_checkpoint(b, find_latest(run))
    assert (state.version, state.incarnation, state.step) == (2, 0, 2)
    assert state.buffer == {"seen": ["t1", "t2"]}
    assert state.data["epoch"] == 1 and state.data["name"] == "x"
    np.testing.assert_array_equal(state.data["order"], np.arange(5))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == after_save  # RNG restored
    assert b.steps == a.steps == 2
    for name, p in params(a).items():
        assert torch.equal(b.module.get_parameter(name), p), name
    opt_a, opt_b = optimizer_tensors(a), optimizer_tensors(b)
    assert len(opt_a) == len(opt_b) > 0
    assert all(torch.equal(x, y) for x, y in zip(opt_a, opt_b, strict=True))
    assert b.current_lr() == a.current_lr() == pytest.approx(1e-3)  # warm-up step 3 of 3

    # both continue identically: same update (optimizer moments + LR schedule restored)
    trees = make_trees(7, a.vocab_size)
    ma, mb = a.train_step(trees, learner_version=2), b.train_step(trees, learner_version=2)
    assert ma["learning_rate"] == mb["learning_rate"] and ma["loss"] == mb["loss"]
    assert b.steps == 3
    for name, p in params(a).items():
        assert torch.equal(b.module.get_parameter(name), p), name


def test_hf_export_sits_beside_each_checkpoint(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, 0)
    trainer.train_step(make_trees(0, trainer.vocab_size), 0)
    path = save_checkpoint(trainer, tmp_path, LearnerState(version=1, step=1))
    exported = AutoModelForCausalLM.from_pretrained(path / "hf")
    assert len(AutoTokenizer.from_pretrained(path / "hf")) == trainer.vocab_size
    for name, p in exported.named_parameters():
        assert torch.equal(p, trainer.module.get_parameter(name)), name
    assert (path / "config.yaml").is_file()
    _, _, header = read_learner_state(path)
    assert header["world_size"] == 1 and header["zero_stage"] == 0


def test_crash_mid_save_leaves_no_partial_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, 2)
    good = save_checkpoint(trainer, tmp_path, LearnerState(step=1), export_hf=False)

    def crash(out_dir):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(trainer, "export_hf", crash)
    with pytest.raises(CheckpointError, match="simulated") as err:
        save_checkpoint(trainer, tmp_path, LearnerState(step=2), export_hf=True)
    assert err.value.reason == "io_error" and err.value.recoverable  # an OSError; one rank: training may go on
    root = checkpoint_root(tmp_path)
    assert find_latest(tmp_path) == good
    assert list_checkpoints(tmp_path) == [good]
    assert (root / LATEST).read_text().strip() == good.name
    assert not (root / "step-000000002").exists()
    assert sorted(p.name for p in root.iterdir()) == [LATEST, good.name]  # its partial files removed at once

    monkeypatch.undo()
    done = save_checkpoint(trainer, tmp_path, LearnerState(step=2), export_hf=False)
    assert find_latest(tmp_path) == done


def test_keep_last_k_and_latest_fallback(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, 0)
    for step in (1, 2, 3, 4):
        save_checkpoint(trainer, tmp_path, LearnerState(step=step), keep=2, export_hf=False)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000000003", "step-000000004"]
    assert find_latest(tmp_path).name == "step-000000004"
    # a pointer naming a missing checkpoint: fall back to the highest complete step
    (checkpoint_root(tmp_path) / LATEST).write_text("step-000000009\n")
    assert find_latest(tmp_path).name == "step-000000004"
    # re-saving a step replaces it (the newer state wins)
    save_checkpoint(trainer, tmp_path, LearnerState(step=4, version=9), keep=2, export_hf=False)
    assert read_learner_state(find_latest(tmp_path))[0].version == 9
    assert find_latest(tmp_path / "nothing-here") is None


def test_checkpoint_due():
    assert [s for s in range(0, 11) if checkpoint_due(s, 4)] == [4, 8]
    assert not any(checkpoint_due(s, 0) for s in range(10))
