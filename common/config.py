"""Strict configuration for every treerpo process (pydantic v2).

One YAML file describes a whole job; each process reads the sections it needs. Every model
forbids unknown keys, bounds every field with `Field(...)` and documents it. Loading order:
preset or YAML file(s) (later files override earlier ones key by key), then dotted overrides
(`--set tree.depth=3`), then validation. `dump_config` writes the resolved config back as YAML.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.data import GYM_MAX_SEED, GYM_TRAIN_SEED_OFFSET, check_reasoning_gym
from common.errors import ConfigError  # defined with its exit code there; callers import it from here too
from common.rewards import check_reward_name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------
class TreeConfig(Section):
    """How actors sample a reasoning tree (design §3.1)."""

    depth: int = Field(3, ge=1, le=16, description="Levels of segments below the prompt (1 = GRPO).")
    branching: list[int] = Field(
        default_factory=lambda: [2, 2, 2],
        description="Children per node at each level; one entry per level, each >= 1.",
    )
    split: Literal["tokens", "step"] = Field(
        "tokens",
        description="Cut non-final levels after segment_tokens ('tokens') or at a step delimiter ('step').",
    )
    segment_tokens: int = Field(384, ge=1, le=65536, description="Token budget of one non-final segment.")
    max_tokens: int = Field(2048, ge=1, le=262144, description="Total generated-token budget along one path.")
    step_delimiter: str = Field("\n\n", min_length=1, description="Reasoning-step delimiter for split='step'.")
    branch_at: Literal["segment", "entropy"] = Field(
        "segment",
        description="Where a node's children fork: at the end of a fixed segment ('segment': split and "
        "segment_tokens), or at the highest-entropy token of a sampled response, which runs to EOS or max_tokens "
        "and whose rest becomes the first child ('entropy', design §3.1).",
    )
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature (log-probs use it too).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 = off.")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0 = off.")

    @model_validator(mode="after")
    def _check(self) -> TreeConfig:
        if len(self.branching) != self.depth:
            raise ValueError(
                f"tree.branching has {len(self.branching)} entries but tree.depth is {self.depth}: "
                f"give one branching factor per level, e.g. branching={[2] * self.depth}"
            )
        if any(b < 1 or b > 1024 for b in self.branching):
            raise ValueError(f"tree.branching={self.branching}: every factor must lie in [1, 1024]")
        if self.branch_at == "entropy" and self.split == "step":
            raise ValueError(
                "tree.branch_at=entropy forks at the highest-entropy token of each response, not at step "
                "delimiters: set tree.split=tokens (segment_tokens does not apply either)"
            )
        if self.branch_at == "segment" and self.depth > 1 and self.segment_tokens * (self.depth - 1) >= self.max_tokens:
            raise ValueError(
                f"tree.max_tokens={self.max_tokens} leaves nothing for the last level after "
                f"{self.depth - 1} segments of {self.segment_tokens} tokens: raise max_tokens or "
                "lower segment_tokens"
            )
        return self

    @property
    def leaves_per_tree(self) -> int:
        out = 1
        for b in self.branching:
            out *= b
        return out


class AdvantageConfig(Section):
    """Step-level advantages (design §3.3, §3.4)."""

    norm: Literal["group", "none", "tree", "level"] = Field(
        "group", description="Divide by the group's std ('group'), nothing ('none'), the tree's std ('tree'), or "
        "the std of the tree's nodes at the same depth ('level')."
    )
    weight: Literal["node", "leaves"] = Field(
        "node", description="Each node's tokens count once ('node'), or as often as root-to-leaf paths run through "
        "the node ('leaves': the path-expanded, GRPO-equivalent weighting, rescaled to the tree's token mean).",
    )
    eps: float = Field(1e-6, gt=0.0, le=1.0, description="Added to the std before dividing.")
    min_group_std: float = Field(
        0.0, ge=0.0, description="Prune groups whose value std is below this (tau); 0 prunes only singletons."
    )


class LossConfig(Section):
    """The staleness-aware clipped loss (design §4.1, §4.2)."""

    clip_low: float = Field(0.2, ge=0.0, lt=1.0, description="epsilon_low: ratio clipped below at 1 - clip_low.")
    clip_high: float = Field(0.2, ge=0.0, le=10.0, description="epsilon_high: ratio clipped above at 1 + clip_high.")
    is_cap: float = Field(2.0, ge=1.0, le=1000.0, description="Cap of the behaviour->proximal importance weight.")
    kl_coef: float = Field(
        0.0, ge=0.0, le=10.0, description="beta of the k3 KL to a frozen reference (0 = no reference)."
    )
    staleness_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="gamma: each token's loss times gamma**staleness; 1.0 = off."
    )
    proximal: Literal["recompute", "behaviour"] = Field(
        "recompute", description="Proximal log-probs: recomputed by the learner, or the behaviour ones."
    )


class TransportConfig(Section):
    """ZeroMQ data and control planes (design §5.4, §5.5, §8.1)."""

    bind_host: str = Field("127.0.0.1", min_length=1, description="Address the learner binds.")
    learner_host: str = Field("127.0.0.1", min_length=1, description="Address actors connect to.")
    data_port: int = Field(5555, ge=0, le=65535, description="Learner PULL port for trees (0 = any free port).")
    control_port: int = Field(5556, ge=0, le=65535, description="Learner ROUTER port for control (0 = any free port).")
    send_hwm: int = Field(64, ge=1, le=1_000_000, description="Actor PUSH high-water mark (messages).")
    recv_hwm: int = Field(256, ge=1, le=1_000_000, description="Learner PULL high-water mark (messages).")
    max_message_bytes: int = Field(
        256 * 2**20, ge=1024, description="Largest message accepted; bigger ones are refused by ZeroMQ."
    )
    heartbeat_interval_s: float = Field(2.0, gt=0.0, le=600.0, description="Actor heartbeat period.")
    peer_timeout_s: float = Field(
        15.0, gt=0.0, le=3600.0, description="A peer silent this long is considered gone."
    )
    curve: bool = Field(False, description="Authenticate and encrypt with ZeroMQ CURVE.")
    curve_dir: str | None = Field(
        None, description="Folder with learner.key(_secret) and actors/*.key (allow-list); needed when curve."
    )
    insecure: bool = Field(
        False, description="Allow binding a non-loopback address without CURVE (explicit opt-in)."
    )
    curve_key_name: str | None = Field(
        None,
        min_length=1,
        description="Actor key pair name in curve_dir/private/ (default: the actor id); "
        "its public key must be in curve_dir/actors/.",
    )
    linger_s: float = Field(
        1.0, ge=0.0, le=60.0, description="close() waits at most this long to flush queued messages, then drops them."
    )

    @model_validator(mode="after")
    def _check(self) -> TransportConfig:
        if self.curve and not self.curve_dir:
            raise ValueError("transport.curve is true but transport.curve_dir is unset: point it at the key folder")
        if self.data_port and self.data_port == self.control_port:
            raise ValueError("transport.data_port and transport.control_port must differ")
        return self


class WeightsConfig(Section):
    """Learner -> actor weight sync (design §6)."""

    sync_every: int = Field(1, ge=1, le=100_000, description="Publish new weights every this many optimizer steps.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend; auto = nccl when both sides have CUDA, else gloo."
    )
    rendezvous_port: int = Field(29600, ge=0, le=65535, description="TCPStore port for the sync group (0 = any).")
    bucket_mb: float = Field(256.0, gt=0.0, le=16384.0, description="Flattened bucket size in MiB.")
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="Deadline of each sync collective.")
    checksum: bool = Field(
        True, description="Hash the weights on both sides (XXH3-128 of raw bytes) and compare them on ack."
    )


class ReplayConfig(Section):
    """The learner's replay buffer and admission control (design §4.3)."""

    capacity: int = Field(1024, ge=1, le=10_000_000, description="Trees held at most; the oldest is evicted beyond.")
    max_staleness: int = Field(4, ge=0, le=1_000_000, description="eta: trees staler than this are dropped.")
    sampling: Literal["oldest", "newest", "uniform"] = Field(
        "oldest", description="Which admissible trees a batch takes first."
    )
    batch_trees: int = Field(8, ge=1, le=100_000, description="Trees per optimizer step.")
    batch_tokens: int | None = Field(
        None, ge=1, description="If set, a batch is cut when its tokens would exceed this (at least one tree)."
    )
    credits_per_actor: int = Field(8, ge=1, le=100_000, description="Trees an actor may have in flight.")
    remember_ids: int = Field(
        200_000, ge=1, le=100_000_000,
        description="Tree ids remembered (LRU) to refuse duplicates; saved in checkpoints.",
    )


LORA_TARGETS_DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Section):
    """LoRA adapters (PEFT) instead of full weights: the learner trains them, a sync sends only them
    (common/lora.py, design §6.7). rank 0 = full-weight training."""

    rank: int = Field(0, ge=0, le=512, description="LoRA rank r (0 = off: full-weight training).")
    alpha: float = Field(16.0, gt=0.0, le=4096.0, description="LoRA alpha: the update is (alpha / rank) * B @ A.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS_DEFAULT), min_length=1,
        description="Linear layers that get an adapter, by module-name suffix (PEFT's matching): Llama/Qwen2 "
                    "attention and MLP projections by default.",
    )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if not re.fullmatch(r"[A-Za-z_][\w.]*", t)]
        if bad:
            raise ValueError(f"model.lora.target_modules: {bad} are not module names (e.g. 'q_proj')")
        return value


class ModelConfig(Section):
    """The policy model (HF format)."""

    path: str = Field("", description="HF model folder (or hub id resolvable offline); '' = the demo's tiny model.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = Field("sdpa", description="Attention kernel.")
    trust_remote_code: bool = Field(False, description="Passed to from_pretrained.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class DataConfig(Section):
    """Where prompts come from and how leaves are scored (common/data.py, common/rewards.py)."""

    source: Literal["synthetic", "files", "reasoning_gym"] = Field(
        "synthetic",
        description="The synthetic task, local files (paths), or a reasoning-gym dataset (dataset, dataset_args).",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="source='files': .jsonl/.parquet files, .arrow files or datasets save_to_disk folders.",
    )
    eval_paths: list[str] = Field(
        default_factory=list,
        description="source='files': the held-out files of learner.eval_every (same formats and fields as paths; "
                    "no problem may also be in paths: checked).",
    )
    dataset: str = Field("", description="source='reasoning_gym': the dataset name, e.g. 'chain_sum'.")
    dataset_args: dict[str, Any] = Field(
        default_factory=dict,
        description="source='reasoning_gym': keyword arguments of reasoning_gym.create_dataset (not seed or size).",
    )
    id_field: str = Field("id", min_length=1, description="Row field holding the prompt id.")
    problem_field: str = Field("problem", min_length=1, description="Row field holding the problem text.")
    answer_field: str = Field("answer", min_length=1, description="Row field holding the gold answer.")
    prompt_template: str = Field(
        "{problem}", min_length=1,
        description="Text around '{problem}'; only '{problem}' is replaced, other braces stay.",
    )
    chat_template: bool = Field(False, description="Wrap the prompt in the tokenizer's chat template.")
    reward: str = Field(
        "arithmetic", min_length=1,
        description="A registry name ('math', 'arithmetic', 'dataset' = the data source's own verifier) or a "
                    "function 'package.module:function' / 'path/to/file.py:function' (contract: common/rewards.py).",
    )
    reward_timeout_s: float = Field(5.0, gt=0.0, le=600.0, description="Time bound of one reward evaluation.")
    shuffle: bool = Field(True, description="Shuffle prompts (seeded) each epoch.")
    seed: int = Field(0, ge=0, description="Seed of prompt order and of the synthetic and reasoning-gym generators.")
    # synthetic task knobs
    operand_min: int = Field(2, ge=0, le=10**6, description="Smallest operand of the synthetic task.")
    operand_max: int = Field(14, ge=1, le=10**6, description="Largest operand of the synthetic task.")
    num_problems: int = Field(
        100_000, ge=1, le=10**8, description="Size of the synthetic or reasoning-gym training pool."
    )
    task: Literal["add_mul", "chain"] = Field(
        "add_mul",
        description="Synthetic task shape: '(a+b)*c', or a chain of task_steps + - * steps (common/tasks.py).",
    )
    task_steps: int = Field(2, ge=1, le=32, description="Steps of a 'chain' problem (ignored by 'add_mul').")
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Share of synthetic problems held out for eval (never trained on)."
    )
    split: Literal["train", "eval"] = Field(
        "train", description="Split a synthetic or reasoning-gym source serves (eval: the held-out set)."
    )
    num_eval_problems: int = Field(
        500, ge=1, le=10**6, description="Distinct held-out problems for eval (synthetic and reasoning-gym)."
    )
    warmup_right_fraction: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of warm-up examples worked with the right plan (common/tasks.py)."
    )

    @field_validator("reward")
    @classmethod
    def _check_reward(cls, value: str) -> str:
        return check_reward_name(value)  # a ConfigError is a ValueError: pydantic reports it as the field's

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.source == "files" and not self.paths:
            raise ValueError("data.source='files' needs data.paths: .jsonl, .parquet or .arrow files or datasets "
                             "save_to_disk folders")
        if self.source == "reasoning_gym":
            if not self.dataset:
                raise ValueError("data.source='reasoning_gym' needs data.dataset, e.g. 'chain_sum'")
            check_reasoning_gym(self.dataset, self.dataset_args)
            top = self.seed + GYM_TRAIN_SEED_OFFSET + self.num_problems
            if top > GYM_MAX_SEED:
                raise ValueError(f"data.seed={self.seed}: reasoning-gym train items would be seeded up to {top}, past "
                                 f"2**32; use data.seed <= {GYM_MAX_SEED - GYM_TRAIN_SEED_OFFSET - self.num_problems}")
        elif self.dataset or self.dataset_args:
            raise ValueError(f"data.dataset / data.dataset_args are for data.source='reasoning_gym' (it is "
                             f"{self.source!r}): remove them or set the source")
        if self.reward == "dataset" and self.source == "files":
            raise ValueError("data.reward='dataset' is the data source's own verifier, and files have none: use "
                             "'math', 'arithmetic' or a function 'package.module:function'")
        if self.operand_min > self.operand_max:
            raise ValueError(f"data.operand_min={self.operand_min} exceeds data.operand_max={self.operand_max}")
        if "{problem}" not in self.prompt_template:
            raise ValueError("data.prompt_template must contain '{problem}'")
        if self.eval_paths and self.source != "files":
            raise ValueError(f"data.eval_paths are for data.source='files' (it is {self.source!r}, whose held-out "
                             "set is built in): remove them")
        return self

    def check_held_out(self, problems: int) -> None:
        """learner.eval_every: the source has a held-out set of at least `problems` problems (as far as the
        config tells; the evaluator checks the set itself against the training prompts)."""
        if self.source == "files":
            if not self.eval_paths:
                raise ValueError("learner.eval_every needs a held-out set: with data.source='files' give "
                                 "data.eval_paths (files whose problems are not in data.paths)")
        elif problems > self.num_eval_problems:
            raise ValueError(f"learner.eval_problems={problems} exceeds the held-out set "
                             f"(data.num_eval_problems={self.num_eval_problems}): lower it or raise num_eval_problems")


class MetricsConfig(Section):
    """Prometheus endpoint of a process (/metrics, /health, /ready)."""

    enabled: bool = Field(True, description="Serve metrics over HTTP.")
    host: str = Field("127.0.0.1", min_length=1, description="Address the metrics server binds.")
    learner_port: int = Field(9400, ge=0, le=65535, description="Learner metrics port (0 = any free port).")
    actor_port: int = Field(9401, ge=0, le=65535, description="Actor metrics port (0 = any free port).")


TrackerBackend = Literal["tensorboard", "wandb", "mlflow"]
TRACKER_BACKENDS: tuple[str, ...] = get_args(TrackerBackend)  # also the metric label's values (common/metrics.py)


class TrackingConfig(Section):
    """Experiment trackers the learner feeds (learner/tracking.py): step records, syncs, evals, the config."""

    backends: list[TrackerBackend] = Field(
        default_factory=list, description="Trackers to feed: any of tensorboard, wandb, mlflow (none by default).")
    project: str = Field("treerpo", min_length=1, description="W&B project and MLflow experiment name.")
    run_name: str | None = Field(None, description="The tracker runs' display name (None: the tracker's own).")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="W&B mode: offline writes RUN_DIR/tracking/wandb (`wandb sync` uploads it).")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (None: a file store in RUN_DIR/tracking/mlruns).")

    @field_validator("backends")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"tracking.backends={v} names a tracker twice")
        return v


# --------------------------------------------------------------------------------------------
# Per-process sections
# --------------------------------------------------------------------------------------------
class ActorConfig(Section):
    """One actor process."""

    engine: Literal["hf", "vllm"] = Field("hf", description="Inference engine.")
    num_actors: int = Field(2, ge=1, le=4096, description="Actors `treerpo up` starts.")
    prompts_per_batch: int = Field(4, ge=1, le=100_000, description="Prompts whose trees are expanded together.")
    gpu_memory_utilization: float = Field(
        0.85, gt=0.0, le=1.0,
        description="vLLM: fraction of its GPU's memory an actor takes. `up` and launch_local.sh treat it as what "
                    "the processes sharing a GPU plan for together and split it among the vLLM actors there, after "
                    "the learner's up.learner_memory_fraction (design §1.5).",
    )
    seed: int = Field(0, ge=0, description="Base sampling seed; each actor offsets it by its index.")
    max_batch_rows: int = Field(
        256, ge=1, le=1_000_000, description="HF engine: most sequences decoded together; bigger calls are chunked."
    )
    max_model_len: int | None = Field(
        None, ge=16, description="vLLM: context window (prompt + generation); None = the model's."
    )
    enforce_eager: bool = Field(False, description="vLLM: disable CUDA graphs (faster start, slower decode).")
    vllm_max_num_seqs: int = Field(256, ge=1, le=100_000, description="vLLM: most sequences decoded together.")
    vllm_block_size: int | None = Field(
        None, ge=1, le=1024,
        description="vLLM: KV-cache block size in tokens (prefix caching shares full blocks only); None = vLLM's "
                    "default (16 on CUDA, 128 on CPU, where it must be a multiple of 32).",
    )


class LearnerConfig(Section):
    """The learner process: optimizer, DeepSpeed, packing, checkpoints."""

    lr: float = Field(1e-6, gt=0.0, le=1.0, description="Peak learning rate.")
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up steps.")
    schedule: Literal["constant", "cosine", "linear"] = Field("constant", description="LR after warm-up.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Global grad-norm clip; 0 = off.")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage.")
    packing: Literal["tree", "flat"] = Field(
        "tree", description="Pack each node once with a tree mask, or one row per path."
    )
    micro_batch_tokens: int = Field(4096, ge=16, description="Token budget of one micro-batch row set.")
    micro_batch_rows: int = Field(1, ge=1, le=4096, description="Rows of micro_batch_tokens tokens per micro-batch.")
    tree_attention: Literal["auto", "span", "mask"] = Field(
        "auto",
        description="Tree-packed rows: 'span' = exact block-sparse span attention (learner/attention.py), 'mask' = "
        "the model kernel with the tree mask (dense for sdpa/eager, BlockMask for flex_attention); 'auto' = span "
        "on CPU with sdpa, else mask.",
    )
    proximal_forward: bool = Field(
        False,
        description="loss.proximal='recompute': get p from a separate no-grad forward instead of stop-grad(theta) "
        "of the training forward (the same weights with one optimizer step per batch; costs a forward).",
    )
    minibatches: int = Field(
        1, ge=1, le=64,
        description="Optimizer steps per batch (k). k > 1 splits the batch's trees into k minibatches and takes "
        "one step on each, with proximal log-probs from one no-grad forward before the first step, so the "
        "decoupled-PPO clip is live (AReaL); k = 1 takes p = stop-grad(theta) (no second forward).",
    )
    checkpoint_hf: bool = Field(True, description="Write an HF-format export (save_pretrained) inside each checkpoint.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute the decoder layers' activations in the backward (less memory, ~1/3 more compute)."
    )
    follower_timeout_s: float = Field(
        86400.0, gt=0.0, description="Multi-rank: how long ranks > 0 wait for rank 0's next command."
    )
    mode: Literal["async", "sync"] = Field(
        "async",
        description="'async': actors generate while the learner trains (bounded by replay.max_staleness); "
        "'sync': the classic on-policy loop, each batch made entirely by the weights of the last sync while the "
        "learner waits, and the actors wait while it trains.",
    )
    max_steps: int = Field(1000, ge=0, description="Optimizer steps before the learner stops (0 = forever).")
    max_generated_tokens: int = Field(
        0, ge=0,
        description="Stop once the trees trained hold this many generated tokens in all (a token budget, as in "
        "bench/study.py; 0 = none). With max_steps, whichever comes first.",
    )
    seed: int = Field(0, ge=0, description="Learner RNG seed.")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N steps (0 = only on stop).")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Checkpoints kept.")
    resume: Literal["never", "auto"] = Field("auto", description="Resume from the latest checkpoint in run_dir.")
    min_actors: int = Field(
        1, ge=1, le=4096, description="Train only while at least this many actors hold the current weights."
    )
    log_trees: bool = Field(
        False, description="Append one line per received tree (id, actor, versions, verdict) to RUN_DIR/trees.jsonl."
    )
    eval_every: int = Field(
        0, ge=0,
        description="Evaluate the current weights on the held-out set every N steps, at step 0 and at the end, "
                    "without stopping training: the learner exports them (RUN_DIR/evals/step-N), `treerpo up` "
                    "runs the evaluator beside it, results go to RUN_DIR/evals.jsonl, Prometheus and the "
                    "trackers (0 = off; design §8.5).",
    )
    eval_problems: int = Field(
        100, ge=1, le=10**6,
        description="Held-out problems per evaluation: the first N of the held-out set (synthetic and "
                    "reasoning-gym: of data.num_eval_problems; files: of data.eval_paths).",
    )
    eval_k: int = Field(4, ge=1, le=1024, description="Samples per held-out problem (pass@1 and pass@k).")
    eval_temperature: float | None = Field(
        None, ge=0.0, le=10.0, description="Sampling temperature of the evaluations (None = tree.temperature)."
    )
    eval_threads: int = Field(1, ge=1, le=1024, description="CPU threads of the evaluator (torch), run at nice 10.")
    eval_final_wait_s: float = Field(
        300.0, ge=0.0, le=86400.0,
        description="A learner that reached its end waits this long for the evaluation of its final weights "
                    "(while an evaluator is alive), so it reaches the trackers.",
    )

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"learner.betas={self.betas}: give two values in [0, 1), e.g. [0.9, 0.999]")
        if self.schedule != "constant" and self.max_steps == 0:
            raise ValueError(
                f"learner.schedule={self.schedule!r} decays over learner.max_steps, which is 0 (forever): "
                "set max_steps or use schedule='constant'"
            )
        return self


class SupervisorConfig(Section):
    """`treerpo up`: how the supervisor restarts its children (design §7)."""

    learner_restarts: int = Field(
        5, ge=0, le=1000,
        description="Restarts of a learner that died (resumed from its latest checkpoint as a new incarnation, "
                    "same ports); 0 = the job ends with the learner.",
    )
    start_failures: int = Field(
        3, ge=1, le=1000,
        description="A child that exits before it ever became ready this many times in a row stops the job.",
    )
    backoff_s: float = Field(1.0, gt=0, le=600, description="First restart delay; doubles per restart of a child.")
    max_backoff_s: float = Field(30.0, gt=0, le=3600, description="Longest restart delay.")
    grace_s: float = Field(60.0, gt=0, le=3600, description="SIGTERM-to-SIGKILL grace when stopping a child.")
    devices: Literal["auto", "inherit"] | list[str] = Field(
        "auto",
        description="GPUs per child, as CUDA_VISIBLE_DEVICES: 'auto' = of the visible GPUs, the learner gets the "
                    "first and the actors the others round-robin (all share it when there is one); 'inherit' = "
                    "children see what `up` sees; a list = [learner, actor-0, actor-1, ...] (actors cycle over "
                    "their entries; '' = no GPU). vLLM actors sharing a GPU split its memory (design §1.5).",
    )
    learner_memory_fraction: float = Field(
        0.4, ge=0.0, lt=1.0,
        description="Where vLLM actors share the learner's GPU: the fraction of that GPU left to the learner; the "
                    "actors there split actor.gpu_memory_utilization minus it (design §1.5).",
    )

    cpus: list[str] | None = Field(
        None,
        description="CPU cores per child (taskset lists such as '0-3,8'): [learner, actor-0, actor-1, ...], actors "
                    "cycling over their entries; None = no pinning. E.g. keep the learner and the actors off each "
                    "other's cores (bench/async.py).",
    )

    @model_validator(mode="after")
    def _check_devices(self) -> SupervisorConfig:
        if self.cpus is not None:
            _check_child_list("up.cpus", self.cpus, r"\d+(-\d+)?(,\d+(-\d+)?)*", "",
                              "CPU lists (e.g. '0', '2-3' or '0,4-7')")
        if isinstance(self.devices, list):
            _check_child_list("up.devices", self.devices, r"[\w-]+(,[\w-]+)*|", ", or use 'auto'",
                              "CUDA_VISIBLE_DEVICES values (e.g. '0', '1,2' or '')")
        return self


def _check_child_list(key: str, entries: list[str], pattern: str, alternative: str, what: str) -> None:
    """A per-child list of `up`: [learner, actor...], at least two entries, each matching `pattern`."""
    if len(entries) < 2:
        raise ValueError(f"{key}={entries}: give the learner's entry and at least one actor's, e.g. ['0', '1']"
                         f"{alternative}")
    bad = [e for e in entries if not re.fullmatch(pattern, e)]
    if bad:
        raise ValueError(f"{key}: {bad} are not {what}")


class JobConfig(Section):
    """A whole treerpo job; each process reads its sections."""

    run_dir: str = Field("runs/default", min_length=1, description="Where logs, endpoints.json, checkpoints go.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    tree: TreeConfig = Field(default_factory=TreeConfig)
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    transport: TransportConfig = Field(default_factory=TransportConfig)
    weights: WeightsConfig = Field(default_factory=WeightsConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    actor: ActorConfig = Field(default_factory=ActorConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    up: SupervisorConfig = Field(default_factory=SupervisorConfig)

    @model_validator(mode="after")
    def _check_mode(self) -> JobConfig:
        if self.model.lora.enabled and self.learner.zero_stage == 3:
            raise ValueError("model.lora with learner.zero_stage=3 is not supported (DeepSpeed's ZeRO-3 leaves the "
                             "adapters of a frozen model without gradients here): use zero_stage 2; with LoRA the "
                             "optimizer state is the adapter's, small, and the frozen base model is replicated")
        if self.learner.eval_every:
            self.data.check_held_out(self.learner.eval_problems)
        if self.learner.mode == "sync":
            if self.weights.sync_every != 1:
                raise ValueError("learner.mode='sync' publishes the weights after every batch: set "
                                 f"weights.sync_every=1 (it is {self.weights.sync_every})")
            if self.replay.batch_trees > self.replay.credits_per_actor:
                raise ValueError(f"learner.mode='sync': replay.batch_trees={self.replay.batch_trees} exceeds "
                                 f"replay.credits_per_actor={self.replay.credits_per_actor}; a round must fit one "
                                 "actor's credits (raise credits_per_actor)")
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
PRESETS_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections at the top level")
    return data


def resolve_source(source: str | Path) -> Path:
    """A YAML path, or the name of a packaged preset."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = PRESETS_DIR / f"{source}.yaml"
    if candidate.exists():
        return candidate
    raise ConfigError(f"no config file {source!r} and no preset of that name; presets: {preset_names()}")


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'tree.branching=[2,2]' -> (['tree', 'branching'], [2, 2]); values parse as YAML scalars."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. tree.depth=3)")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(x) for x in loc) or "<config>"
        if e["type"] == "extra_forbidden":
            model = _model_for(loc)
            known = sorted(model.model_fields) if model else []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {where!r}{hint} (known keys here: {', '.join(known)})")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{where}: {e['msg']}{shown}")
    return "invalid config:\n  " + "\n  ".join(lines)


def build_config(data: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def load_config(sources: list[str | Path] | str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Presets/YAML files merged in order, then dotted overrides, then strict validation."""
    if sources is None:
        sources = []
    elif isinstance(sources, (str, Path)):
        sources = [sources]
    data: dict[str, Any] = {}
    for source in sources:
        data = deep_merge(data, _read_yaml(resolve_source(source)))
    data = apply_overrides(data, list(overrides or []))
    return build_config(data)


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def config_params(cfg: BaseModel) -> dict[str, Any]:
    """The resolved config as flat dotted keys (`loss.clip_low`), in section order: a tracker run's parameters."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value

    walk("", config_to_dict(cfg))
    return out


def dump_config(cfg: BaseModel, path: str | Path | None = None) -> str:
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return text
