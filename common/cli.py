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


ARGUMENTS = {
    "config": add_config_args,
}


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
