"""GPU check: a vLLM actor (CUDA, bf16, CUDA graphs) and the DeepSpeed learner sharing ONE GPU, a ~0.5B random Qwen2.

The day a GPU is lent, this one command runs what CI cannot (no download; <= 8 minutes on one GPU),
each check named after the defect of issue 21 it guards (`guards`), every one asserted, not printed:

* `placement` (defect 1, shared GPUs): the learner (`Trainer`: DeepSpeed, bf16) takes the GPU first;
  then the vLLM actor starts on the same GPU with the memory share `treerpo/placement.py` plans for
  it (`up`'s rule), which vLLM must accept with the learner's memory already gone; the learner stays
  within its planned fraction.
* `backend` (defect 1, "Duplicate GPU"): this process and the vLLM worker name the same GPU UUID,
  so the sync group's backend resolves to gloo, and the syncs below run on it.
* `bf16_step` (DeepSpeed's bf16 optimizer never ran): one optimizer step under DeepSpeed bf16: finite
  loss, weights moved.
* `fidelity`: vLLM's processed log-probs against the learner's bf16 recompute (FlexAttention tree
  packing), before any sync.
* `sync_streaming` (defect 4, pause only to install): the weights, perturbed well away from vLLM's,
  synced while a round of tree requests streams: checksum acked, requests kept running through the
  pause, the pause shorter than the receive before it, every tree of the round finished.
* `installed` (defect 7, installed not only arrived): the mean log-prob gap of fresh trees to the
  learner after the sync must be a quarter of the gap the perturbation opened at most.
* `second_sync` (defect 3 / group reuse): a second perturbed sync on the kept group: acked, gap closed.
* `seed` (defect 5): on CUDA no request carries a seed of its own (one `exponential_` per seeded row).
* `nccl` (defects 2 and 3), where a second GPU exists: a receiver process on cuda:1 syncs over NCCL
  (checksum equal), then one that meets and dies before the communicator forms must fail the
  learner's sync within its deadline, the learner alive. Skipped, saying so, on one GPU.

One JSON line: every check (`ok`, `guards`, figures) and `ok` = all of them. Without CUDA (or
vLLM) it fails at once, exit code 2, with a JSON line saying what is missing; a failed check exits 1.

    python bench/gpu_check.py [--trees 32] [--segment-tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
BUDGET_S = 8 * 60


def fail(reason: str, code: int = 2) -> None:
    print(json.dumps({"bench": "gpu_check", "ok": False, "error": reason}), flush=True)
    sys.exit(code)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", type=int, default=32, help="trees per sampling round")
    ap.add_argument("--segment-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--keep", default="", help="build the model here and keep it (default: a temporary folder)")
    ap.add_argument("--nccl-peer", default=None, help=argparse.SUPPRESS)  # internal: a receiver on another GPU
    ap.add_argument("--die-after-meet", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def require_gpu() -> None:
    """Fail fast (before any heavy import) when this machine cannot run the check."""
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU (torch.cuda.is_available() is False): run it on a GPU machine")
    try:
        from vllm.platforms import current_platform  # noqa: PLC0415 -- optional, checked here
    except ImportError:
        fail("needs vLLM with CUDA: pip install -e '.[vllm]' (README: Run on GPUs)")
    if not current_platform.is_cuda():
        fail(f"vLLM's platform here is {current_platform.device_type!r}, not CUDA: install the CUDA vLLM")


def build_model(path: Path) -> Path:
    """A random-init Qwen2 of Qwen2-0.5B's shape (bf16) and a word-level tokenizer of its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415 -- with the model
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: PLC0415

    from treerpo.tinymodel import ALPHABET, SPECIAL_TOKENS  # noqa: PLC0415 -- after sys.path

    path.mkdir(parents=True, exist_ok=True)
    words = SPECIAL_TOKENS + ALPHABET
    words += [f"<w{i}>" for i in range(QWEN2_05B["vocab_size"] - len(words))]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                            unk_token="?").save_pretrained(str(path))
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_05B, pad_token_id=0, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(path))
    return path


def sample(engine, cfg, prompts, seed: int):
    from actor.sampler import TreeSampler  # noqa: PLC0415 -- after sys.path and the GPU check
    from common.rewards import make_reward  # noqa: PLC0415

    reward = make_reward("arithmetic")
    try:
        t0 = time.perf_counter()
        trees = TreeSampler(engine, cfg, reward, "gpu-check", seed=seed).sample(prompts)
        seconds = time.perf_counter() - t0
    finally:
        reward.close()
    return trees, sum(t.num_tokens() for t in trees) / seconds


def logprob_gap(trainer, trees, temperature: float, version: int) -> tuple[float, float]:
    """(mean, max) |vLLM's log-prob - the learner's bf16 recompute| over every generated token."""
    from learner.logprobs import token_logprobs  # noqa: PLC0415
    from learner.packing import pack_trees  # noqa: PLC0415

    lc = trainer.cfg.learner
    total, count, worst = 0.0, 0, 0.0
    with torch.no_grad():
        for batch in pack_trees(trees, trainer.cfg.advantage, "tree", lc.micro_batch_tokens, version):
            lp = token_logprobs(trainer.module, batch, temperature, tree_attention="mask")  # (B, T)
            where = batch.generated.to(lp.device)
            gap = (lp - batch.behaviour_logprobs.to(lp.device))[where].abs().float()
            total, count, worst = total + gap.sum().item(), count + gap.numel(), max(worst, gap.max().item())
    return total / max(1, count), worst


def perturb(trainer, scale: float, seed: int) -> None:
    """Move every weight well away from what vLLM holds (noise of `scale` x the tensor's std)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in trainer.module.parameters():
            std = p.float().std().item() if p.numel() > 1 else 1.0
            p.add_((torch.randn(p.shape, generator=gen, device=p.device) * (scale * (std or 1.0))).to(p.dtype))


def sync(pub, trainer, engine, version: int, member_gpu: str) -> dict:
    """One sync of the learner's weights into the vLLM engine, in flight; what it did."""
    prepared = pub.prepare(pub.plan(trainer.parameter_specs(), version), ["gpu-check"], all_have_cuda=True,
                           gpus=[member_gpu], epoch=("gpu-check",))
    got: dict = {}

    def receive() -> None:
        try:
            got["ack"] = engine.receive_weights(prepared.announcements[0])
        except Exception as e:  # noqa: BLE001 - reported in the check
            got["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=receive, name="gpu-check-receive")
    thread.start()
    result = pub.broadcast(prepared, trainer.named_parameters_for_sync())
    thread.join(300)
    return {"backend": prepared.announcements[0].backend, "ok": bool(result.ok and "ack" in got
                                                                     and got["ack"][0] == result.checksum),
            "sync_s": round(result.seconds, 3), "receive_s": round(engine.last_receive_s, 3),
            "pause_ms": round(1e3 * engine.last_pause_s, 1), "kept_requests": engine.last_pause_requests,
            "error": got.get("error", result.error)}


def nccl_peer(args) -> None:
    """A receiver on this process's GPU (the check's second device): joins the announced NCCL group
    and receives, or (--die-after-meet) checks in at the store and dies before the communicator forms."""
    from common.wire import WeightAnnounce  # noqa: PLC0415
    from weightsync.group import bound_nccl_setup, connect_store, meet  # noqa: PLC0415
    from weightsync.receiver import WeightReceiver  # noqa: PLC0415
    from weightsync.seal import group_store  # noqa: PLC0415

    ann = WeightAnnounce(**json.loads(args.nccl_peer))
    bound_nccl_setup(ann.timeout_s)
    torch.cuda.set_device(0)
    if args.die_after_meet:
        store = connect_store(ann.rendezvous_host, ann.rendezvous_port, ann.timeout_s)
        meet(group_store(store, ann.group, ann.secret), ann.rank, ann.world_size, ann.timeout_s)
        os._exit(0)  # a peer lost between the rendezvous and the communicator
    held: dict = {}
    checksum, seconds = WeightReceiver(checksum=True).receive(
        ann, lambda named: held.update((n, t.clone()) for n, t in named), checksum_received=True)
    print(json.dumps({"checksum": checksum, "seconds": seconds, "tensors": len(held)}), flush=True)


def nccl_checks(trainer, version: int) -> dict:
    """Defects 2 and 3 on real NCCL, with a receiver process on the second GPU."""
    import subprocess  # noqa: PLC0415

    from common.config import WeightsConfig  # noqa: PLC0415
    from common.device import gpu_uuid  # noqa: PLC0415
    from treerpo.placement import visible_gpus  # noqa: PLC0415
    from weightsync.publisher import WeightPublisher  # noqa: PLC0415

    if torch.cuda.device_count() < 2:
        return {"ok": True, "skipped": "one GPU: NCCL needs two devices (run on a 2-GPU machine to check it)"}
    out: dict = {}
    peer_gpu = gpu_uuid(torch.device("cuda", 1))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible_gpus(os.environ)[1]}
    for case, timeout_s in (("receives", 120.0), ("dies_after_meet", 20.0)):
        pub = WeightPublisher(WeightsConfig(backend="auto", rendezvous_port=0, timeout_s=timeout_s), "127.0.0.1",
                              gpu=gpu_uuid(torch.device("cuda", 0)))
        prepared = pub.prepare(pub.plan(trainer.parameter_specs(), version), ["peer"], all_have_cuda=True,
                               gpus=[peer_gpu], epoch=(case,))
        ann = prepared.announcements[0]
        cmd = [sys.executable, __file__, "--nccl-peer", json.dumps(dataclasses.asdict(ann))]
        peer = subprocess.Popen(cmd + (["--die-after-meet"] if case == "dies_after_meet" else []), env=env,
                                stdout=subprocess.PIPE, text=True)
        t0 = time.perf_counter()
        result = pub.broadcast(prepared, trainer.named_parameters_for_sync())
        took = time.perf_counter() - t0
        stdout, _ = peer.communicate(timeout=300)
        if case == "receives":
            line = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
            out[case] = {"backend": ann.backend, "ok": bool(ann.backend == "nccl" and result.ok
                                                             and line.get("checksum") == result.checksum),
                         "sync_s": round(result.seconds, 3)}
        else:  # the learner's sync fails by its deadline and the learner lives on
            out[case] = {"ok": bool(not result.ok and took <= timeout_s + 15.0), "reason": result.reason,
                         "seconds": round(took, 1), "deadline_s": timeout_s}
    out["ok"] = all(v["ok"] for v in out.values())
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    require_gpu()
    if args.nccl_peer is not None:
        nccl_peer(args)
        return {}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from actor.engine import GenerationRequest  # noqa: PLC0415 -- after the GPU check
    from actor.engines import make_engine  # noqa: PLC0415
    from common.config import JobConfig  # noqa: PLC0415
    from common.data import Prompt  # noqa: PLC0415
    from common.device import gpu_uuid  # noqa: PLC0415
    from learner.trainer import Trainer  # noqa: PLC0415
    from treerpo.placement import plan_placement, visible_gpus  # noqa: PLC0415
    from weightsync.group import bound_nccl_setup  # noqa: PLC0415
    from weightsync.publisher import WeightPublisher  # noqa: PLC0415

    checks: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(args.keep) if args.keep else Path(tmp) / "qwen2-0.5b-random")
        cfg = JobConfig.model_validate({
            "model": {"path": str(path), "dtype": "bfloat16", "device": "cuda",
                      "attn_implementation": "flex_attention"},
            "tree": {"depth": 3, "branching": [2, 2, 2], "split": "tokens", "segment_tokens": args.segment_tokens,
                     "max_tokens": args.max_tokens, "temperature": 1.0},
            "actor": {"engine": "vllm", "enforce_eager": False, "max_model_len": 1024, "num_actors": 1},
            "learner": {"lr": 1e-5, "micro_batch_tokens": 4096, "tree_attention": "mask", "zero_stage": 0},
            "weights": {"backend": "auto", "rendezvous_port": 0, "timeout_s": 120, "bucket_mb": 256},
        })
        bound_nccl_setup(cfg.weights.timeout_s)  # before any NCCL use, as the learner and actors do
        # defect 1: `up`'s plan for a learner and a vLLM actor on one GPU, the learner's memory taken first
        _, (actor_place,) = plan_placement(cfg, visible_gpus(os.environ)[:1], 1)
        share = float(dict(o.split("=", 1) for o in actor_place.overrides)["actor.gpu_memory_utilization"])
        cfg.actor.gpu_memory_utilization = share
        trainer = Trainer(cfg, str(path))
        total = torch.cuda.get_device_properties(0).total_memory
        t0 = time.perf_counter()
        engine = make_engine(cfg)  # vLLM checks the free memory against its share here
        t_engine = time.perf_counter() - t0
        tok = engine.tokenizer
        prompts = [Prompt(f"g{i}", f"{10 + i}+{20 + 2 * i}=", str(30 + 3 * i),
                          np.array(tok.encode(f"{10 + i}+{20 + 2 * i}="), dtype=np.int32)) for i in range(args.trees)]
        trees, vllm_tok_s = sample(engine, cfg.tree, prompts, seed=1)
        gap0 = logprob_gap(trainer, trees, cfg.tree.temperature, version=0)
        checks["fidelity"] = {"guards": "vLLM's log-probs = the learner's recompute (bf16, CUDA graphs)",
                              "ok": gap0[0] < 0.1, "mean_gap": round(gap0[0], 4), "max_gap": round(gap0[1], 4)}
        # DeepSpeed's bf16 optimizer: one step
        before = next(trainer.module.parameters()).detach().float().clone()
        t0 = time.perf_counter()
        metrics = trainer.train_step(trees, learner_version=0)
        learner_tok_s = metrics.get("forward_tokens", sum(t.num_tokens() for t in trees)) / (time.perf_counter() - t0)
        moved = (next(trainer.module.parameters()).detach().float() - before).abs().max().item()
        checks["bf16_step"] = {"guards": "DeepSpeed's bf16 optimizer never ran", "loss": metrics.get("loss"),
                               "ok": bool(np.isfinite(metrics.get("loss", float("nan"))) and moved > 0),
                               "max_weight_change": moved}
        learner_fraction = torch.cuda.max_memory_reserved(0) / total
        checks["placement"] = {"guards": "defect 1: vLLM actors on a shared GPU refused their memory",
                               "ok": learner_fraction <= cfg.up.learner_memory_fraction, "vllm_share": share,
                               "learner_fraction": round(learner_fraction, 3), "engine_start_s": round(t_engine, 1)}
        # defects 1, 4, 7: a sync on the shared GPU while a round of trees streams, weights far from vLLM's
        mine, worker = gpu_uuid(torch.device("cuda", 0)), gpu_uuid(engine.device)
        pub = WeightPublisher(cfg.weights, "127.0.0.1", gpu=mine)
        perturb(trainer, 0.5, seed=1)
        opened = logprob_gap(trainer, trees, cfg.tree.temperature, version=1)[0]
        streamed: dict = {}
        stream = threading.Thread(target=lambda: streamed.update(
            out=sample(engine, cfg.tree, prompts * 4, seed=3)), name="gpu-check-stream")
        stream.start()
        while engine.running == 0 and stream.is_alive():
            time.sleep(0.005)
        first = sync(pub, trainer, engine, 1, worker)
        stream.join(300)
        checks["backend"] = {"guards": "defect 1: two NCCL ranks on one GPU ('Duplicate GPU detected')",
                             "ok": bool(mine and mine == worker and first["backend"] == "gloo"),
                             "learner_gpu": mine, "actor_gpu": worker, "sync_backend": first["backend"]}
        finished = "out" in streamed and len(streamed["out"][0]) == 4 * len(prompts)
        checks["sync_streaming"] = {"guards": "defect 4: generation paused for the whole transfer", **first,
                                    "ok": bool(first["ok"] and first["kept_requests"] > 0 and finished
                                               and first["pause_ms"] / 1e3 < first["receive_s"]),
                                    "stream_finished": finished}
        fresh, _ = sample(engine, cfg.tree, prompts, seed=2)
        closed = logprob_gap(trainer, fresh, cfg.tree.temperature, version=1)[0]
        checks["installed"] = {"guards": "defect 7: the ack covers what arrived, not what was installed",
                               "ok": bool(closed <= opened / 4), "gap_opened": round(opened, 4),
                               "gap_after_install": round(closed, 4)}
        # a second sync on the kept group
        trainer.train_step(fresh, learner_version=1)
        perturb(trainer, 0.5, seed=2)
        opened2 = logprob_gap(trainer, fresh, cfg.tree.temperature, version=2)[0]
        second = sync(pub, trainer, engine, 2, worker)
        fresh2, _ = sample(engine, cfg.tree, prompts, seed=4)
        closed2 = logprob_gap(trainer, fresh2, cfg.tree.temperature, version=2)[0]
        checks["second_sync"] = {"guards": "defect 3 / the kept group: a second sync of the same members", **second,
                                 "ok": bool(second["ok"] and closed2 <= opened2 / 4 and engine.version == 2),
                                 "gap_opened": round(opened2, 4), "gap_after_install": round(closed2, 4)}
        seeded = engine.sampling_params(GenerationRequest(context=prompts[0].token_ids, n=2, max_tokens=8, seed=7))
        checks["seed"] = {"guards": "defect 5: a seed per request (one exponential_ launch per seeded row)",
                          "ok": seeded.seed is None}
        nccl = nccl_checks(trainer, 3)
        checks["nccl"] = {"guards": "defects 2 and 3: NCCL posting errors and communicator setup past the deadline",
                          **nccl}
        engine.close()
    out = {
        "bench": "gpu_check", "ok": all(c["ok"] for c in checks.values()), "gpu": torch.cuda.get_device_name(0),
        "failed": [name for name, c in checks.items() if not c["ok"]],
        "params": sum(int(np.prod(s)) for _, s, _ in trainer.parameter_specs()),
        "vllm_tok_s": round(vllm_tok_s, 1), "learner_tok_s": round(learner_tok_s, 1), "checks": checks,
        "seconds": round(time.perf_counter() - started, 1), "budget_s": BUDGET_S,
    }
    print(json.dumps(out, default=float), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(0 if main().get("ok", True) else 1)
