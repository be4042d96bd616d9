"""DeepSpeed trainer: one optimizer step per batch of reasoning trees (design §4.4, §6.2, §7).

Guarantees
* One `train_step(trees, v)` is `learner.minibatches` = k optimizer steps (default 1): the trees
  are split into k minibatches of about equal token cost, one step each. For each step the trees
  are packed (`learner.packing`) into
  micro-batches of at most `micro_batch_rows` rows of `micro_batch_tokens` tokens, their gradients
  accumulated, and every micro-batch loss divided by the step's GLOBAL trainable-token count N
  (summed over micro-batches and ranks), so the step minimises the token mean

      L = Σ_ranks Σ_micro Σ_{t ∈ mask} ℓ_t / N

  whatever the packing and the number of ranks. DeepSpeed averages gradients over the W
  data-parallel ranks, so each rank back-propagates W · L_rank.
* Multi-rank (torchrun / deepspeed launcher): rank 0 owns the trees. It splits them over the ranks
  by token count and sends each rank its share (learner/ranks.py: the command protocol and its
  guarantees). All ranks run the same number of micro-batches (a rank short of data runs
  zero-loss dummies), so ZeRO's per-micro-batch collectives stay matched. Ranks > 0 sit in
  `follow()`, executing rank 0's commands (train, save, load, gather) until `stop_followers()`.
* Proximal log-probs (`loss.proximal='recompute'`) come from the weights in force when the batch
  was drawn. With k = 1 nothing steps between micro-batches, so those are the weights the
  gradient is taken at: by default p = stop-grad(θ) of the training forward (ratio 1, the clip
  inert); `learner.proximal_forward` recomputes them in a separate no-grad forward over the same
  packing (same numbers, one more forward). With k > 1 one no-grad forward over every minibatch
  before the first step gives p, so steps 2..k see ratios away from 1 and the clip is live.
* Truncated sampling (tree.top_k / tree.top_p): θ, proximal and reference log-probs are of the
  distribution the actors sampled from (common/sampling.py, design §4.1). A trainable token outside
  the learner's kept set under any of them leaves the loss (its share is
  `truncated_token_fraction`); it still counts in the step's normaliser N, which is fixed before
  the forwards.
* Collapse guard: a step whose loss (on any rank) or gradient norm is not finite is skipped: no
  update, gradients cleared, LR schedule not advanced; reported as `step_applied` = 0 and counted
  in `Trainer.skipped_steps`.
* `named_parameters_for_sync()` yields (HF name, full tensor in the model dtype) on rank 0; under
  ZeRO-3 every rank takes part in each parameter's gather.
* LoRA (`model.lora.rank` > 0; common/lora.py, design §6.7): the model is wrapped by PEFT, only the
  adapters train, and `named_parameters_for_sync()` / `parameter_specs()` cover only the adapter
  tensors, under their PEFT-saved names (under ZeRO-3 only they are gathered). The adapted layers
  are exactly `common.lora.find_targets` of the base model (ConfigError otherwise), so every engine
  knows which tensors a sync must hold. `export_hf` writes the merged model (base + scale·B·A) as
  a plain HF folder, `save_adapter` the adapter as PEFT saves it.
* Metric keys are names of the step record in common/metrics.py's table (`STEP_RECORD`).

Naming: "engine" in treerpo means the actor's inference engine; DeepSpeed's wrapper of model +
optimizer (its `DeepSpeedEngine`) is `Trainer.ds`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import JobConfig, LearnerConfig, LoraConfig
from common.device import resolve_device_dtype
from common.errors import ConfigError, ModelError, one_line
from common.lora import PREFIX as LORA_PREFIX
from common.lora import adapter_specs, find_targets, merged, wire_name
from common.tree import ReasoningTree
from learner.logprobs import dummy_logprobs, token_logprobs
from learner.loss import LossInputs, treerpo_loss
from learner.packing import pack_trees
from learner.ranks import (
    CMD_GATHER,
    CMD_LOAD,
    CMD_SAVE,
    CMD_STOP,
    CMD_TRAIN,
    MetricSum,
    RankGroup,
    decode_share,
    encode_share,
    init_distributed,
    split_by_tokens,
)

DS_TAG = "deepspeed"  # the tag (sub-folder) of the DeepSpeed state inside a checkpoint folder


# ----------------------------------------------------------------------------------------------
# Setup helpers
# ----------------------------------------------------------------------------------------------
def lr_factor(lc: LearnerConfig):
    """LR multiplier for optimizer step k (0-based): linear warm-up (k+1)/w, then the schedule."""

    def factor(k: int) -> float:
        if k < lc.warmup_steps:
            return (k + 1) / lc.warmup_steps
        if lc.schedule == "constant":
            return 1.0
        progress = min(1.0, (k - lc.warmup_steps) / max(1, lc.max_steps - lc.warmup_steps))
        if lc.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def with_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """`model` wrapped by PEFT with LoRA adapters on `lora.target_modules` (dropout 0: the log-prob
    forwards are the policy's); ConfigError unless PEFT adapted exactly `common.lora.find_targets`."""
    try:
        from peft import LoraConfig as PeftLoraConfig  # noqa: PLC0415 -- only when model.lora is on
        from peft import get_peft_model  # noqa: PLC0415
    except ImportError as e:
        raise ConfigError(f"model.lora needs PEFT ({e}): pip install -e '.[lora]'") from None
    try:
        found = find_targets(((n, p.shape) for n, p in model.named_parameters()), lora.target_modules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    peft_model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                      target_modules=list(lora.target_modules), bias="none"))
    got = {wire_name(n): tuple(p.shape) for n, p in peft_model.named_parameters() if p.requires_grad}
    want = dict(adapter_specs(found, lora.rank))
    if got != want:
        odd = sorted(set(got) ^ set(want))[:3]
        raise ConfigError(f"model.lora.target_modules={lora.target_modules}: PEFT adapted other tensors than the "
                          f"model's linear layers of those names (e.g. {odd}); target linear layers only")
    return peft_model


def merged_state(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's full state dict -> the base model's, the adapters merged into their weights."""
    base: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if ".lora_" in name:
            adapter[wire_name(name)] = t
            continue
        plain = name.removeprefix(LORA_PREFIX).replace(".base_layer.", ".")
        base[plain] = t
    return {**base, **merged(base, adapter, scale)}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices decay, vectors (biases, norm gains) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # LoRA trains matrices only; DeepSpeed drops an empty group


def deepspeed_config(lc: LearnerConfig, dtype: torch.dtype) -> dict[str, Any]:
    """One micro-batch per backward; the step boundary is set by hand (variable micro-batch count)."""
    bf16: dict[str, Any] = {"enabled": dtype == torch.bfloat16}
    try:  # skip bf16 steps with non-finite gradients (the default from DeepSpeed 0.19; older ones lack the key)
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config  # noqa: PLC0415

        if "check_grad_overflow" in DeepSpeedBF16Config.model_fields:
            bf16["check_grad_overflow"] = True
    except ImportError:  # pragma: no cover - older layout
        pass
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage},
        "bf16": bf16,
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------------------------
# Step metrics
# ----------------------------------------------------------------------------------------------
def tree_metrics(trees: Sequence[ReasoningTree]) -> dict[str, float]:
    rewards = np.concatenate([t.leaf_rewards() for t in trees])
    lengths = np.concatenate([t.path_lengths() for t in trees])
    return {"trees_consumed": float(len(trees)), "leaves_consumed": float(lengths.size),
            "path_tokens": float(lengths.sum()), "leaf_reward_mean": float(rewards.mean()),
            "response_tokens_mean": float(lengths.mean())}


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
def combine_minibatch_metrics(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """The metrics of k optimizer steps on one batch as one step record: loss and grad norm are
    means over the steps, counts add up, the loss terms are trainable-token-weighted (_max/_min:
    max/min), `step_applied` is 1 only if every step was applied, the LR is the first step's."""
    totals = ("trainable_tokens", "forward_tokens", "micro_batches", "optimizer_steps")
    per_step = ("loss", "grad_norm")
    special = {*totals, *per_step, "learning_rate", "step_applied", "trainable_token_fraction",
               "step_duration_seconds"}
    stats = MetricSum()
    for r in results:
        stats.add({key: value for key, value in r.items() if key not in special}, r["trainable_tokens"])
    out = stats.result()
    out.update({key: float(sum(r[key] for r in results)) for key in totals})
    out.update({key: float(np.mean([r[key] for r in results])) for key in per_step})
    generated = sum(r["trainable_tokens"] / r["trainable_token_fraction"] for r in results
                    if r["trainable_token_fraction"] > 0)
    out["trainable_token_fraction"] = out["trainable_tokens"] / generated if generated > 0 else 0.0
    out["learning_rate"] = results[0]["learning_rate"]
    out["step_applied"] = float(min(r["step_applied"] for r in results))
    return out


def disable_dropout(model: torch.nn.Module) -> int:
    """Zero every dropout of `model` (nn.Dropout modules and attention-probability dropout that
    transformers reads from `module.attention_dropout` in train mode); returns how many it zeroed."""
    zeroed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, zeroed = 0.0, zeroed + 1
        if isinstance(getattr(module, "attention_dropout", None), float) and module.attention_dropout > 0:
            module.attention_dropout, zeroed = 0.0, zeroed + 1
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return zeroed


class Trainer:
    """An HF causal LM wrapped by DeepSpeed (`self.ds`), trained with the TreeRPO loss."""

    def __init__(self, cfg: JobConfig, model_path: str) -> None:
        import deepspeed  # noqa: PLC0415 - heavy, imported by the process that trains
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

        self.cfg = cfg
        lc = cfg.learner
        self.model_path = str(model_path)
        self.device, self.dtype = resolve_device_dtype(cfg.model, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        init_distributed("nccl" if self.device.type == "cuda" else "gloo")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.ranks = RankGroup(lc.follower_timeout_s)
        self.rank, self.world_size = self.ranks.rank, self.ranks.world_size
        torch.manual_seed(lc.seed)

        load = dict(dtype=self.dtype, attn_implementation=cfg.model.attn_implementation,
                    trust_remote_code=cfg.model.trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path,
                                                           trust_remote_code=cfg.model.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(self.model_path, **load)
        except OSError as e:
            raise ModelError(f"cannot load the policy from {self.model_path!r}: {one_line(e)}") from e
        model.config.use_cache = False
        self.lora = cfg.model.lora if cfg.model.lora.enabled else None
        if self.lora is not None:
            model = with_lora(model, self.lora)
        if lc.gradient_checkpointing:  # activations of the decoder layers recomputed in the backward
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # train mode (gradient checkpointing needs it) with every dropout at 0: θ, proximal and
        # reference log-probs must be the policy the actors sampled from (design §4.1)
        model.to(self.device).train()
        disable_dropout(model)
        self.vocab_size = int(model.get_input_embeddings().weight.shape[0])
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else 0)

        optimizer = torch.optim.AdamW(param_groups(model, lc.weight_decay), lr=lc.lr, betas=tuple(lc.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(lc))
        # DeepSpeed's wrapper of model + optimizer ("engine" in DeepSpeed's words; not treerpo's engine)
        self.ds, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(lc, self.dtype)
        )
        # plain fp32 without ZeRO is DeepSpeed's one path without a non-finite-gradient check: do it here
        self._manual_guard = lc.zero_stage == 0 and self.dtype == torch.float32

        self.ref_model = None
        if cfg.loss.kl_coef > 0:
            ref = AutoModelForCausalLM.from_pretrained(self.model_path, **load).to(self.device).eval()
            ref.requires_grad_(False)
            if lc.zero_stage == 3:  # partition the reference like the policy
                ref_cfg = {k: v for k, v in deepspeed_config(lc, self.dtype).items() if k != "gradient_clipping"}
                ref = deepspeed.initialize(model=ref, config=ref_cfg)[0].module
            self.ref_model = ref
        self.steps = 0  # train_step calls (optimizer steps attempted)
        self.skipped_steps = 0

    # -- public API --------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        """The HF model inside DeepSpeed's wrapper (ZeRO hooks live on its submodules)."""
        return self.ds.module

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps, self.skipped_steps = int(state["steps"]), int(state["skipped_steps"])

    def train_step(self, trees: Sequence[ReasoningTree], learner_version: int) -> dict[str, float]:
        """One optimizer step on `trees` (rank 0; ranks > 0 run `follow()`). Returns the step's metrics."""
        self.ranks.require_rank0("train_step")
        if not trees:
            raise ValueError("train_step needs at least one tree")
        self._check_trees(trees, learner_version)
        t0 = time.perf_counter()
        if self.world_size > 1:
            shares = split_by_tokens(trees, self.world_size, self.cfg.learner.packing)
            self.ranks.send(CMD_TRAIN, learner_version, [encode_share([trees[i] for i in s]) for s in shares])
            local = [trees[i] for i in shares[0]]
        else:
            local = list(trees)
        metrics = self._train(local, learner_version)
        metrics.update(tree_metrics(trees))
        metrics["step_duration_seconds"] = time.perf_counter() - t0
        return metrics

    def follow(self) -> None:
        """Ranks > 0: execute rank 0's commands until it sends stop."""

        def gather(arg: int, payload: bytes) -> None:
            for _ in self._gathered_params(adapter_only=bool(arg)):
                pass

        self.ranks.follow({
            CMD_TRAIN: lambda arg, payload: self._train(decode_share(payload, self.vocab_size), arg),
            CMD_SAVE: lambda arg, payload: self._save_deepspeed(payload.decode()),
            CMD_LOAD: lambda arg, payload: self._load_deepspeed(payload.decode()),
            CMD_GATHER: gather,
        })

    def stop_followers(self) -> None:
        """Rank 0: let the ranks > 0 return from `follow()` (no-op with one rank)."""
        self.ranks.require_rank0("stop_followers")
        if self.world_size > 1:
            self.ranks.send(CMD_STOP, 0)

    def named_parameters_for_sync(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0: (HF name, full tensor in the model dtype), tied weights once; with LoRA only the
        adapter tensors, under their PEFT-saved names (common/lora.py).

        Without ZeRO-3 the tensors are the live parameters (copy them before the next step);
        under ZeRO-3 each is a gathered copy, and the other ranks join each gather.
        """
        self.ranks.require_rank0("named_parameters_for_sync")
        yield from self._full_parameters(adapter_only=self.lora is not None)

    def parameter_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, full shape, dtype) of every tensor a sync sends, in sync order; no collective (ZeRO-3: ds_shape)."""
        return [(self._sync_name(name), tuple(getattr(p, "ds_shape", p.shape)), p.dtype)
                for name, p in self.module.named_parameters() if self._synced(p)]

    def _synced(self, p: torch.nn.Parameter) -> bool:
        return self.lora is None or p.requires_grad  # with LoRA: the adapters (nothing else trains)

    def _sync_name(self, name: str) -> str:
        return wire_name(name) if self.lora is not None else name

    def _full_parameters(self, *, adapter_only: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank 0: (name, full tensor) of the parameters (adapter_only: the adapters, sync names);
        under ZeRO-3 gathered, the other ranks joining each gather."""
        only = adapter_only and self.lora is not None
        if self.cfg.learner.zero_stage == 3:
            if self.world_size > 1:
                self.ranks.send(CMD_GATHER, int(only))
            for name, p in self._gathered_params(adapter_only=only):
                yield (self._sync_name(name) if only else name), p
        else:
            for name, p in self.module.named_parameters():
                if not only or self._synced(p):
                    yield (self._sync_name(name) if only else name), p.detach()

    def export_hf(self, out_dir: str | Path) -> Path:
        """Rank 0: save_pretrained (safetensors) + tokenizer into out_dir, ZeRO-3 aware; with LoRA the
        base model with the adapter merged in (a plain HF folder: eval, vLLM serving)."""
        self.ranks.require_rank0("export_hf")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.cfg.learner.zero_stage == 3:
            state = dict(self._full_parameters(adapter_only=False))
            params = {n for n, _ in self.module.named_parameters()}
            for name, buf in self.module.state_dict().items():  # persistent buffers, if any
                if name not in params and name not in state and buf.numel() > 0:
                    state[name] = buf
        else:
            state = self.module.state_dict()
        if self.lora is None:
            self.module.save_pretrained(str(out), state_dict=state)
        else:
            self.module.get_base_model().save_pretrained(str(out), state_dict=merged_state(state, self.lora.scale))
        self.tokenizer.save_pretrained(str(out))
        return out

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Rank 0, LoRA: the adapter as PEFT saves it (adapter_config.json + adapter_model.safetensors),
        loadable with `PeftModel.from_pretrained(base, out_dir)`; ZeRO-3 aware."""
        self.ranks.require_rank0("save_adapter")
        if self.lora is None:
            raise ValueError("save_adapter: model.lora is off (rank 0)")
        out = Path(out_dir)
        live = {n: p.detach() for n, p in self.module.named_parameters() if self._synced(p)}
        if self.cfg.learner.zero_stage == 3:
            gathered = dict(self._full_parameters(adapter_only=True))
            live = {n: gathered[wire_name(n)] for n in live}
        self.module.save_pretrained(str(out), state_dict=live)
        return out

    def save_deepspeed_state(self, directory: str | Path) -> None:
        """Rank 0: DeepSpeed state (weights, optimizer, LR scheduler) into directory/deepspeed; all ranks write."""
        self.ranks.require_rank0("save_deepspeed_state")
        self.ranks.send(CMD_SAVE, 0, self.ranks.same_for_all(str(directory).encode()))
        self._save_deepspeed(str(directory))

    def load_deepspeed_state(self, directory: str | Path) -> None:
        """Rank 0: restore what `save_deepspeed_state` wrote; all ranks load."""
        self.ranks.require_rank0("load_deepspeed_state")
        self.ranks.send(CMD_LOAD, 0, self.ranks.same_for_all(str(directory).encode()))
        self._load_deepspeed(str(directory))

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # -- one step on this rank's share -------------------------------------------------------
    def _check_trees(self, trees: Sequence[ReasoningTree], learner_version: int) -> None:
        """Refuse what packing would refuse, before any rank is told to train."""
        budget = self.cfg.learner.micro_batch_tokens
        for t in trees:
            longest = len(t.prompt_token_ids) + int(t.path_lengths().max())
            if longest > budget:
                raise ValueError(f"tree {t.tree_id}: prompt + longest path = {longest} tokens > "
                                 f"learner.micro_batch_tokens={budget}: raise it above the longest path")
            if t.min_version() < 0 or max(n.version for n in t.nodes) > learner_version:
                raise ValueError(f"tree {t.tree_id} has node versions above learner_version={learner_version}")

    def _train(self, trees: list[ReasoningTree], learner_version: int) -> dict[str, float]:
        """k = learner.minibatches optimizer steps on this rank's trees (every rank runs k steps)."""
        lc = self.cfg.learner
        k = lc.minibatches
        if k == 1:
            return self._minibatch_step(self._pack(trees, learner_version), None)
        shares = split_by_tokens(trees, k, lc.packing)
        minibatches = [self._pack([trees[i] for i in share], learner_version) for share in shares]
        counts = self.ranks.all_gather_ints([len(b) for b in minibatches])  # (W, k) micro-batches
        live = [j for j in range(k) if counts[:, j].sum() > 0]  # a minibatch empty on every rank: no step
        proximal: list[list[torch.Tensor]] | None = None
        if self.cfg.loss.proximal == "recompute":  # the weights in force when the batch was drawn
            proximal = [[] for _ in range(k)]
            with torch.no_grad():
                for j in live:
                    for i in range(int(counts[:, j].max())):  # every rank runs as many forwards (ZeRO-3)
                        if i < len(minibatches[j]):
                            proximal[j].append(self._logprobs(self.module, minibatches[j][i]))
                        else:
                            self._dummy_forward(self.module)
        results = [self._minibatch_step(minibatches[j], proximal[j] if proximal else None) for j in live]
        if self.rank != 0:
            return {}
        return combine_minibatch_metrics(results)

    def _pack(self, trees: list[ReasoningTree], learner_version: int) -> list:
        lc = self.cfg.learner
        return (pack_trees(trees, self.cfg.advantage, lc.packing, lc.micro_batch_tokens, learner_version,
                           max_batch_rows=lc.micro_batch_rows) if trees else [])

    def _logprobs(self, model: torch.nn.Module, batch, *, return_entropy: bool = False):
        """(B, T) log-probs of the batch's tokens under the actors' sampling distribution (tree.*)."""
        tc = self.cfg.tree
        return token_logprobs(model, batch.to(self.device), tc.temperature, tc.top_k, tc.top_p,
                              return_entropy=return_entropy, tree_attention=self.cfg.learner.tree_attention)

    def _minibatch_step(self, batches: list, proximal: list[torch.Tensor] | None) -> dict[str, float]:
        """One optimizer step over this rank's packed micro-batches (proximal: precomputed p per batch)."""
        local = [sum(b.num_trainable_tokens for b in batches), len(batches),
                 sum(b.num_tokens for b in batches), sum(int(b.generated.sum()) for b in batches)]
        per_rank = self.ranks.all_gather_ints(local)  # (W, 4)
        global_tokens = int(per_rank[:, 0].sum())
        n_micro = int(per_rank[:, 1].max())
        stats = MetricSum()
        local_loss = torch.zeros((), dtype=torch.float64)
        loss_finite = True
        for i in range(n_micro):
            last = i == n_micro - 1
            self.ds.set_gradient_accumulation_boundary(last)
            if i < len(batches):
                loss, m = self._micro_loss(batches[i], global_tokens, proximal[i] if proximal else None)
                stats.add(m, float(batches[i].num_trainable_tokens))
            else:
                loss = self._dummy_loss()
            local_loss += loss.detach().double().cpu()
            if last:
                step_loss = self.ranks.all_reduce_sum(local_loss)
                loss_finite = math.isfinite(step_loss)
                if not loss_finite and not self._manual_guard:
                    loss = loss * float("nan")  # non-finite gradients on every rank: DeepSpeed drops the step
            self.ds.backward(loss * self.world_size)
        lr = self.current_lr()
        grad_norm, applied = self._optimizer_step(loss_finite)
        merged = self.ranks.gather_metrics(stats)
        if self.rank != 0:
            return {}
        out = merged.result()
        out.update({
            "loss": step_loss,
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "step_applied": float(applied),
            "trainable_tokens": float(global_tokens),
            "trainable_token_fraction": global_tokens / max(1, int(per_rank[:, 3].sum())),
            "forward_tokens": float(per_rank[:, 2].sum()),
            "micro_batches": float(n_micro),
            "optimizer_steps": 1.0,
        })
        return out

    def _micro_loss(self, batch, normalizer: int,
                    proximal: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        batch = batch.to(self.device)
        logprobs, entropy = self._logprobs(self.module, batch, return_entropy=True)  # (B, T)
        if self.cfg.loss.proximal != "recompute":
            proximal = None
        elif proximal is not None:
            proximal = proximal.to(self.device)  # k > 1: from the no-grad forward before the first step
        else:
            if self.cfg.learner.proximal_forward:
                with torch.no_grad():
                    proximal = self._logprobs(self.module, batch)  # (B, T)
            else:
                proximal = logprobs.detach()
        ref = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref = self._logprobs(self.ref_model, batch)  # (B, T)
        # top-k/top-p: a token outside the learner's kept set (-inf under θ, p or ref) leaves the loss;
        # NaN stays in (a collapsed policy must reach the collapse guard, not be masked away)
        kept = logprobs.detach() != float("-inf")
        for other in (proximal, ref):
            if other is not None:
                kept &= other != float("-inf")
        mask = batch.loss_mask & kept  # (B, T)
        inputs = LossInputs(
            logprobs=logprobs, proximal_logprobs=proximal, behaviour_logprobs=batch.behaviour_logprobs,
            advantages=batch.advantages, mask=mask, ref_logprobs=ref, staleness=batch.staleness,
            normalizer=float(normalizer), entropy=entropy, valid=batch.generated,
        )
        loss, metrics = treerpo_loss(inputs, self.cfg.loss)
        cut = int((batch.loss_mask & ~kept).sum())
        metrics["truncated_token_fraction"] = cut / max(1, batch.num_trainable_tokens)
        return loss, metrics

    def _dummy_forward(self, model: torch.nn.Module) -> torch.Tensor:
        """A zero scalar through the modules a real log-prob forward calls (learner.logprobs.dummy_logprobs)."""
        return dummy_logprobs(model, self.pad_token_id)

    def _dummy_loss(self) -> torch.Tensor:
        """Zero loss through the same forwards as a real micro-batch (matches ZeRO's collectives)."""
        zero = self._dummy_forward(self.module)  # ()
        with torch.no_grad():
            second = self.cfg.learner.minibatches == 1 and self.cfg.learner.proximal_forward
            if self.cfg.loss.proximal == "recompute" and second:
                self._dummy_forward(self.module)
            if self.ref_model is not None:
                self._dummy_forward(self.ref_model)
        return zero

    def _optimizer_step(self, loss_finite: bool) -> tuple[float, bool]:
        """Step (or skip) the optimizer; returns (grad norm before clipping, applied)."""
        self.steps += 1
        if self._manual_guard:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            applied = loss_finite and math.isfinite(norm)
            if applied:
                self.ds.step()
            else:
                self.ds.zero_grad()
        else:
            self.ds.step()
            applied = bool(self.ds.was_step_applied()) and loss_finite
            raw = self.ds.get_global_grad_norm()
            norm = float(raw) if raw is not None else float("nan")
        if not applied:
            self.skipped_steps += 1
        return norm, applied

    # -- ZeRO-3 gather -------------------------------------------------------------------------
    def _gathered_params(self, *, adapter_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed  # noqa: PLC0415

        pending = iter([(n, p) for n, p in self.module.named_parameters() if not adapter_only or self._synced(p)])
        try:
            for name, p in pending:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if self.rank == 0:
                        yield name, p.detach().clone()
        finally:  # the consumer stopped early: finish the gathers the other ranks are in
            for _, p in pending:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    pass

    # -- DeepSpeed state ----------------------------------------------------------------------
    def _save_deepspeed(self, directory: str) -> None:
        self.ds.save_checkpoint(directory, tag=DS_TAG, client_state={}, save_latest=False)
        self.ranks.barrier()

    def _load_deepspeed(self, directory: str) -> None:
        path, _ = self.ds.load_checkpoint(directory, tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"no DeepSpeed state under {directory}/{DS_TAG}: is it a treerpo checkpoint?")
        self.ranks.barrier()
