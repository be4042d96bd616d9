"""GPU check: a vLLM actor (CUDA, bf16) and the DeepSpeed learner on ONE GPU, a ~0.5B random Qwen2.

The day a GPU is lent, this one command runs what CI cannot (no download; <= 8 minutes on one GPU):

1. builds a random-init Qwen2 of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads,
   vocab 151,936: ~0.5B parameters, bf16) and a word-level tokenizer of that vocabulary;
2. starts the vLLM engine (AsyncLLM, CUDA, bf16, `gpu_memory_utilization` 0.35) and samples
   trees (`TreeSampler`, D = 3, branching [2, 2, 2]): vLLM tokens/s;
3. starts the learner (`Trainer`: DeepSpeed, bf16, FlexAttention tree packing with a compiled
   BlockMask) on the same GPU and recomputes every node's log-probs (bf16): the max |gap| to
   vLLM's processed_logprobs;
4. takes one optimizer step on the trees: learner tokens/s;
5. syncs the new weights to the vLLM worker through vLLM's weight-transfer API in flight
   (gloo between the two processes: NCCL needs two devices), checks the checksum, and compares
   log-probs again on fresh trees;

and prints one JSON line: `vllm_tok_s`, `learner_tok_s`, `sync_s`, `pause_ms`,
`max_logprob_gap`, `max_logprob_gap_after_sync`, `checksum_ok`, `seconds`. Without CUDA (or
vLLM) it fails at once, exit code 2, with a JSON line saying what is missing.

    python bench/gpu_check.py [--trees 32] [--segment-tokens 64] [--gpu-memory-utilization 0.35]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="vLLM's share of the GPU")
    ap.add_argument("--keep", default="", help="build the model here and keep it (default: a temporary folder)")
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


def logprob_gap(trainer, trees, temperature: float, version: int) -> float:
    """Max |vLLM's log-prob - the learner's bf16 recompute| over every generated token."""
    from learner.logprobs import token_logprobs  # noqa: PLC0415
    from learner.packing import pack_trees  # noqa: PLC0415

    lc = trainer.cfg.learner
    gap = 0.0
    with torch.no_grad():
        for batch in pack_trees(trees, trainer.cfg.advantage, "tree", lc.micro_batch_tokens, version):
            lp = token_logprobs(trainer.module, batch, temperature, tree_attention="mask")  # (B, T)
            where = batch.generated.to(lp.device)
            gap = max(gap, (lp - batch.behaviour_logprobs.to(lp.device))[where].abs().max().item())
    return gap


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    require_gpu()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from actor.engines import make_engine  # noqa: PLC0415 -- after the GPU check
    from common.config import JobConfig  # noqa: PLC0415
    from common.data import Prompt  # noqa: PLC0415
    from learner.trainer import Trainer  # noqa: PLC0415
    from learner.weights import WeightPublisher  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(args.keep) if args.keep else Path(tmp) / "qwen2-0.5b-random")
        cfg = JobConfig.model_validate({
            "model": {"path": str(path), "dtype": "bfloat16", "device": "cuda",
                      "attn_implementation": "flex_attention"},
            "tree": {"depth": 3, "branching": [2, 2, 2], "split": "tokens", "segment_tokens": args.segment_tokens,
                     "max_tokens": args.max_tokens, "temperature": 1.0},
            "actor": {"engine": "vllm", "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": True,
                      "max_model_len": 1024},
            "learner": {"lr": 1e-5, "micro_batch_tokens": 4096, "tree_attention": "mask", "zero_stage": 0},
            "weights": {"backend": "gloo", "rendezvous_port": 0, "timeout_s": 120, "bucket_mb": 256},
        })
        engine = make_engine(cfg)
        t_engine = time.perf_counter() - started
        tok = engine.tokenizer
        prompts = [Prompt(f"g{i}", f"{10 + i}+{20 + 2 * i}=", str(30 + 3 * i),
                          np.array(tok.encode(f"{10 + i}+{20 + 2 * i}="), dtype=np.int32)) for i in range(args.trees)]
        trees, vllm_tok_s = sample(engine, cfg.tree, prompts, seed=1)
        trainer = Trainer(cfg, str(path))
        gap = logprob_gap(trainer, trees, cfg.tree.temperature, version=0)
        t0 = time.perf_counter()
        metrics = trainer.train_step(trees, learner_version=0)
        learner_tok_s = metrics.get("forward_tokens", sum(t.num_tokens() for t in trees)) / (time.perf_counter() - t0)
        # the new weights to the vLLM worker, in flight, through vLLM's weight-transfer API
        pub = WeightPublisher(cfg.weights, "127.0.0.1")
        specs = trainer.parameter_specs()
        prepared = pub.prepare(pub.plan(specs, 1), ["gpu-check"], all_have_cuda=False, epoch=("gpu-check",))
        got: dict = {}
        thread = threading.Thread(target=lambda: got.update(ack=engine.receive_weights(prepared.announcements[0])))
        thread.start()
        result = pub.broadcast(prepared, trainer.named_parameters_for_sync())
        thread.join(300)
        checksum_ok = bool(result.ok and "ack" in got and got["ack"][0] == result.checksum)
        trees_after, _ = sample(engine, cfg.tree, prompts, seed=2)
        gap_after = logprob_gap(trainer, trees_after, cfg.tree.temperature, version=1)
        engine.close()
    out = {
        "bench": "gpu_check", "ok": checksum_ok, "gpu": torch.cuda.get_device_name(0),
        "params": sum(int(np.prod(s)) for _, s, _ in specs),
        "vllm_tok_s": round(vllm_tok_s, 1), "learner_tok_s": round(learner_tok_s, 1),
        "sync_s": round(result.seconds, 3), "pause_ms": round(1e3 * engine.last_pause_s, 1),
        "max_logprob_gap": round(gap, 4), "max_logprob_gap_after_sync": round(gap_after, 4),
        "checksum_ok": checksum_ok, "engine_start_s": round(t_engine, 1),
        "seconds": round(time.perf_counter() - started, 1), "budget_s": BUDGET_S,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
