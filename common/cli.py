"""`treerpo` console script: parse first, import the subcommand's module after.

Each subcommand names its module and function as a string, so `treerpo --help` imports neither
torch nor actor/learner code, and common/ stays free of actor/learner imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module:function, one-line help, function that adds its arguments)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "config": ("common.cli:run_config", "print the resolved config (preset/YAML + --set overrides) as YAML"),
    "learner": ("learner.main:run", "run the learner: ingest trees, train with TreeRPO, publish weights"),
    "actor": ("actor.main:run", "run one actor: sample reasoning trees and stream them to the learner"),
    "up": ("common.launch:run_up", "start a learner and N actors as processes and supervise them"),
    "demo": ("common.demo:run", "the CPU demo: warm up a tiny model, train it with TreeRPO, evaluate before/after"),
    "eval": ("actor.eval:run", "pass@1 / pass@k of a model on benchmark JSONL files or the synthetic task"),
    "warmup": ("learner.warmup:run", "build and warm up the demo's tiny model (cached)"),
}


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


ARGUMENTS = {
    "config": add_config_args,
    "learner": add_learner_args,
    "actor": add_actor_args,
    "up": add_up_args,
    "demo": lambda p: _demo_args().add_demo_args(p),
    "eval": lambda p: _demo_args().add_eval_args(p),
    "warmup": lambda p: _demo_args().add_warmup_args(p),
}


def _demo_args():
    """common/demo.py holds the demo, eval and warmup arguments (stdlib only at import)."""
    return importlib.import_module("common.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="treerpo",
        description="Asynchronous actor-learner TreeRPO for LLM reasoning.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (_, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](p)
    return parser


def run_config(args: argparse.Namespace) -> int:
    from common.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target, _ = SUBCOMMANDS[args.command]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    from common.config import ConfigError

    try:
        return int(func(args) or 0)
    except ConfigError as e:
        print(f"treerpo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
