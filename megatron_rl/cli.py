"""``megatron-rl`` command line: parse, load the recipe, dispatch.

  megatron-rl print-config RECIPE [key=value ...]
  megatron-rl train --config RECIPE [key=value ...]

Bad input ends in one line on stderr naming the key or file, and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from megatron_rl.config import ConfigError, load_config, to_yaml


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-rl", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("print-config", help="print the resolved config of a recipe")
    pc.add_argument("recipe")
    pc.add_argument("overrides", nargs="*", metavar="key=value")
    tr = sub.add_parser("train", help="run RL training from a recipe")
    tr.add_argument("--config", required=True, metavar="RECIPE")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "print-config":
            print(to_yaml(load_config(args.recipe, args.overrides)), end="")
            return 0
        cfg = load_config(args.config, args.overrides)
        return _train(cfg, args.quiet)
    except ConfigError as e:
        print(f"megatron-rl: config error: {e}", file=sys.stderr)
        return 2


def _train(cfg, quiet: bool) -> int:
    if cfg.model.kind == "toy":
        from megatron_rl.toy_trainer import train_toy

        train_toy(cfg, quiet=quiet)
        return 0
    raise ConfigError(f"model.kind: {cfg.model.kind!r} has no trainer yet")
