"""Asynchronous against synchronous training: trees trained per second, in one run.

Both modes run the same `treerpo up` job (learner + 2 HF actors, the demo preset on the demo's
warm model; `--tiny`: a random tiny model) for `--steps` optimizer steps, with the learner pinned
to one core and the actors to the others (`up.cpus`), as they would sit on separate GPUs (on
shared cores they compete and asynchrony can gain little). `learner.mode: sync` is the classic
on-policy loop: the actors generate a batch with the latest weights while the learner waits,
then wait while it trains and syncs. `async` lets them generate the next batches meanwhile
(bounded by `replay.max_staleness`).

From the sync run's own phases (steady state, the first `--skip` steps left out):

    L = mean learner time per step (train + weight sync)     G = mean step cycle - L
    ceiling = (G + L) / max(G, L)        the speed-up perfect overlap would give
    speedup = async trees/s / sync trees/s
    ratio   = speedup / ceiling                                    (target 0.8)

    python bench/async.py [--steps 40] [--skip 5] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import load_config  # noqa: E402
from common.rundir import read_jsonl  # noqa: E402
from treerpo.demo import child_env  # noqa: E402
from treerpo.supervisor import Supervisor  # noqa: E402
from treerpo.tinymodel import build_tiny_model  # noqa: E402
from treerpo.warmup import WarmupSettings, default_cache_dir, ensure_warm_model  # noqa: E402

TARGET = 0.8


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per mode")
    ap.add_argument("--skip", type=int, default=5, help="steps left out at the start (start-up, warm caches)")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="a random tiny model and a short run (the smoke test)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for both modes")
    ap.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    return ap.parse_args(argv)


def cpu_plan(actors: int) -> list[str] | None:
    """up.cpus: the learner on core 0, the actors on the rest (None on a single core)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    rest = ",".join(str(c) for c in cores[1:])
    return [str(cores[0])] + [rest] * actors


def run_mode(mode: str, model: Path, work: Path, args) -> dict:
    run_dir = work / mode
    cpus = cpu_plan(args.actors)
    overrides = [f"model.path={model}", f"run_dir={run_dir}", f"learner.mode={mode}", f"learner.max_steps={args.steps}",
                 f"learner.min_actors={args.actors}", f"actor.num_actors={args.actors}", "learner.resume=never",
                 "metrics.learner_port=0", "metrics.actor_port=0", *args.overrides]
    if cpus is not None:
        overrides.append(f"up.cpus={json.dumps(cpus)}")
    cfg = load_config(["demo"], overrides)
    sup = Supervisor(cfg, run_dir, args.actors, env=child_env(), grace_s=60.0, on_event=lambda m: None)
    try:
        sup.start()
        code = sup.wait(1800)
    finally:
        sup.stop()
    if code != 0:
        raise RuntimeError(f"{mode}: the learner ended with {code}; see {run_dir / 'logs'}")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    syncs = read_jsonl(run_dir / "syncs.jsonl")
    steady = rows[args.skip:]
    if len(steady) < 3:
        raise RuntimeError(f"{mode}: only {len(rows)} steps recorded; raise --steps above --skip + 2")
    span = steady[-1]["time"] - steady[0]["time"]
    trees = sum(len(r["tree_ids"]) for r in steady[1:])  # trained after the first steady step's record
    cycles = [b["time"] - a["time"] for a, b in zip(steady, steady[1:], strict=False)]
    train = [r["step_duration_seconds"] for r in steady[1:]]
    sync_s = [s["seconds"] for s in syncs if s.get("confirmed") and s["version"] > args.skip]
    return {"trees_per_s": trees / span, "steps": len(rows), "cycle_s": statistics.mean(cycles),
            "train_s": statistics.mean(train), "sync_s": statistics.mean(sync_s) if sync_s else 0.0,
            "staleness_mean": statistics.mean(r["staleness_mean"] for r in steady), "cpus": cpus}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.steps, args.skip = min(args.steps, 8), min(args.skip, 2)
    with tempfile.TemporaryDirectory(prefix="treerpo-async-") as tmp:
        work = Path(tmp)
        if args.tiny:
            model = build_tiny_model(work / "model", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                     max_position_embeddings=256)
        else:
            model, _ = ensure_warm_model(WarmupSettings(), default_cache_dir())
        result = {m: run_mode(m, Path(model), work, args) for m in ("sync", "async")}
    sync, asyn = result["sync"], result["async"]
    L = sync["train_s"] + sync["sync_s"]  # learner time per step
    G = max(0.0, sync["cycle_s"] - L)  # generation the learner waited for
    ceiling = (G + L) / max(G, L)
    speedup = asyn["trees_per_s"] / sync["trees_per_s"]
    out = {
        "sync_trees_per_s": round(sync["trees_per_s"], 3), "async_trees_per_s": round(asyn["trees_per_s"], 3),
        "speedup": round(speedup, 3), "generation_s": round(G, 3), "learner_s": round(L, 3),
        "learner_train_s": round(sync["train_s"], 3), "learner_sync_s": round(sync["sync_s"], 3),
        "ceiling": round(ceiling, 3), "ratio": round(speedup / ceiling, 3), "target": TARGET,
        "async_staleness_mean": round(asyn["staleness_mean"], 3), "sync_staleness_mean": sync["staleness_mean"],
        "steps": args.steps, "skip": args.skip, "cpus": sync["cpus"], "tiny": args.tiny,
        "loadavg": os.getloadavg()[0],
    }
    print(f"sync {out['sync_trees_per_s']:.2f} trees/s (G {G:.2f} s generating, L {L:.2f} s learning per step), "
          f"async {out['async_trees_per_s']:.2f} trees/s: speed-up {speedup:.2f}x of a {ceiling:.2f}x ceiling, "
          f"ratio {out['ratio']:.3f} (target {TARGET}); async staleness {out['async_staleness_mean']:.2f}, "
          f"cpus {out['cpus']}")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
