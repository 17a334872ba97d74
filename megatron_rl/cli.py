"""``megatron-rl`` command line: parse, load the recipe, dispatch.

  megatron-rl print-config RECIPE [key=value ...]
  megatron-rl train --config RECIPE [key=value ...]
  megatron-rl eval --config RECIPE --model HF_DIR [--prompts N] [--n N] [key=value ...]
  megatron-rl convert import HF_DIR OUT_CKPT [--tp N --pp N --ep N --etp N] [--dtype D]
                             [--no-verify] [--allow-unknown-config-keys]
  megatron-rl convert export CKPT OUT_HF_DIR [layout] [--hf-config F] [--tokenizer DIR] [--dtype D] [--no-stream]
  megatron-rl convert verify HF_DIR CKPT [--tp N --ep N] [--tolerance X]

Every command runs as one process or under torchrun (the layout's product must divide the world).

Bad input ends in one line on stderr naming the key or file, and exit status 2; a write that
fails (full disk, quota, read-only) in one line naming the path and the errno, and status 74.
``train`` also exits 75 when stopped on request (requeue it), 3 after repeated NaN steps, and 69
when the reward service (``reward.http``) is down (rerun once it is back: it resumes).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional

# megatron_rl.config (and torch under it) is imported inside `main`, after `train` has started
# recording preemption signals: the imports take seconds, a SIGTERM during them must not kill


EXAMPLES = """examples:
  megatron-rl train --config configs/recipes/tiny_moe_gspo.yaml          # the CPU demo
  megatron-rl train --config tiny_moe_ppo train.steps=50 --quiet         # a recipe by name
  megatron-rl train --config my.yaml data.path=data/train.parquet \\
      data.label_key=reward_model.ground_truth reward.name=my_reward.py:compute_score
  megatron-rl print-config tiny_moe_gspo train.lr=2e-3                   # the resolved config
  megatron-rl eval --config tiny_moe_gspo --model runs/tiny_moe_gspo/hf
  megatron-rl convert export runs/tiny_moe_gspo/checkpoints/step_00000500 out/hf
  torchrun --nproc-per-node 8 -m megatron_rl train --config configs/recipes/qwen3_30b_a3b_8xh100.yaml

recipes: a path, or the name of one in configs/recipes; key=value overrides may come anywhere
after the command (flags too); every key with its help: docs/config.md"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-rl", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True)
    pc = sub.add_parser("print-config", help="print the resolved config of a recipe")
    pc.add_argument("recipe")
    pc.add_argument("overrides", nargs="*", metavar="key=value")
    tr = sub.add_parser("train", help="run RL training from a recipe")
    tr.add_argument("--config", required=True, metavar="RECIPE")
    tr.add_argument("overrides", nargs="*", metavar="key=value")
    tr.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    ev = sub.add_parser("eval", help="mean reward of an HF model on a recipe's prompts (vLLM)")
    ev.add_argument("--config", required=True, metavar="RECIPE", help="data, reward and rollout settings")
    ev.add_argument("--model", required=True, help="HF model directory (e.g. a run's hf/)")
    ev.add_argument("--prompts", type=int, default=64, help="the first N prompts of data.path")
    ev.add_argument("--n", type=int, default=1, help="samples per prompt")
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ev.add_argument("--val", action="store_true", help="the prompts of data.val_path")
    ev.add_argument("--samples", default=None, metavar="FILE",
                    help="also write every prompt, response and reward to this JSONL file")
    ev.add_argument("overrides", nargs="*", metavar="key=value")
    _convert_parser(sub)
    return p


def _layout_args(p: argparse.ArgumentParser) -> None:
    for flag, what in (("--tp", "tensor"), ("--pp", "pipeline"), ("--ep", "expert")):
        p.add_argument(flag, type=int, default=1, help=f"{what}-parallel size on the Megatron side")
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)")


def _convert_parser(sub) -> None:
    cv = sub.add_parser("convert", help="Hugging Face <-> megatron-core checkpoints")
    verbs = cv.add_subparsers(dest="verb", required=True)
    im = verbs.add_parser("import", help="HF safetensors directory -> distributed checkpoint")
    im.add_argument("hf_dir")
    im.add_argument("out")
    im.add_argument("--dtype", default="auto", help="parameter dtype: auto (config.json's), fp32, bf16")
    im.add_argument("--no-verify", action="store_true",
                    help="skip comparing the import's logits with transformers' (on by default)")
    im.add_argument("--verify-tolerance", type=float, default=1e-3,
                    help="max abs logit difference (fp32) the import's check accepts")
    _unknown_keys_arg(im)
    _layout_args(im)
    ex = verbs.add_parser("export", help="distributed checkpoint -> HF safetensors directory")
    ex.add_argument("ckpt")
    ex.add_argument("out")
    ex.add_argument("--hf-config", help="config.json (or HF dir) when the checkpoint has no hf/")
    ex.add_argument("--tokenizer", help="directory whose tokenizer/generation files to copy")
    ex.add_argument("--dtype", default=None, help="tensor dtype of the export (default: the checkpoint's)")
    ex.add_argument("--shard-size-gb", type=float, default=4.0)
    ex.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                    help="load and export one decoder layer at a time (the default; "
                         "--no-stream loads the whole model first)")
    _unknown_keys_arg(ex)
    _layout_args(ex)
    ve = verbs.add_parser("verify", help="compare logits of an HF model and a distributed checkpoint")
    ve.add_argument("hf_dir")
    ve.add_argument("ckpt")
    ve.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference (fp32)")
    _unknown_keys_arg(ve)
    _layout_args(ve)


def _unknown_keys_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unknown-config-keys", action="store_true",
                   help="ignore config.json keys megatron_rl does not know (printed) instead of "
                        "refusing them: only when you know they do not change the model")


# megatron-core announces on import what a CPU stack lacks; users cannot act on any of it
_KNOWN_NOISE = ("Transformer Engine and Apex are not installed", "Apex is not installed",
                "full scope is deprecated", "The following imports from `dynamic_context.py`",
                "`torch.jit.script_method` is deprecated", "`load_state_dict` is deprecated",
                "Please use DTensor instead")


def quiet_third_party() -> None:
    """Silence what other packages announce that a user cannot act on, narrowly (by category and
    module or message; everything else still shows): megatron-core's notes on a CPU stack, vLLM's
    own deprecated-API use, torch 2.13's renamed collectives called inside megatron-core (ours call
    the new names), and vLLM's CPU build finding a Triton without a CPU backend."""
    import logging

    for message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\."
                            r"(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated")
    logging.getLogger("vllm.triton_utils.importing").addFilter(
        lambda record: "doesn't include CPU backend" not in record.getMessage())


def main(argv: Optional[List[str]] = None) -> int:
    """The ``megatron-rl`` command: parse, run the verb, and turn known failures into one line and
    an exit status."""
    quiet_third_party()
    parser = _parser()
    # key=value overrides may sit among the flags (`train --config R a=1 --quiet b=2`)
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if r.startswith("-") or "=" not in r]
    if stray or (rest and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or rest)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    if args.command == "train":  # a preemption during start-up is a stop, not a kill
        # lazy: a config error is reported before megatron-core, vLLM or torch.distributed load
        from megatron_rl.runtime.preempt import record_signals_early

        record_signals_early()
    # lazy: a config error is reported before megatron-core, vLLM or torch.distributed load
    from megatron_rl.config import ConfigError, load_config, to_yaml
    from megatron_rl.io_errors import EXIT_IO, WriteFailed
    from megatron_rl.rewards.http import EXIT_UNAVAILABLE, ServiceDown

    try:
        if args.command == "print-config":
            print(to_yaml(load_config(args.recipe, args.overrides)), end="")
            return 0
        if args.command == "convert":
            return _convert(args)
        if args.command == "eval":
            return _eval(args)
        cfg = load_config(args.config, args.overrides)
        return _train(cfg, args.quiet)
    except ConfigError as e:
        print(f"megatron-rl: config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"megatron-rl: error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"megatron-rl: {e}", file=sys.stderr)
        return EXIT_IO
    except ServiceDown as e:   # every rank knows it; one line is enough
        if os.environ.get("RANK", "0") == "0":
            print(f"megatron-rl: reward service down: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _convert(args) -> int:
    import torch.distributed as dist

    # lazy: a config error is reported before megatron-core, vLLM or torch.distributed load
    from megatron_rl.checkpoint import convert
    from megatron_rl.parallel.config import Layout
    from megatron_rl.parallel.launch import shutdown_distributed

    layout = Layout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    try:
        if args.verb == "import":
            line = convert.import_hf(args.hf_dir, args.out, layout, args.dtype,
                                     args.allow_unknown_config_keys, not args.no_verify,
                                     args.verify_tolerance).line("imported")
        elif args.verb == "export":
            line = convert.export_hf(args.ckpt, args.out, layout, args.hf_config, args.tokenizer,
                                     args.dtype, int(args.shard_size_gb * 2**30),
                                     args.allow_unknown_config_keys,
                                     stream=args.stream).line("exported")
        else:
            r = convert.verify(args.hf_dir, args.ckpt, layout,
                               allow_unknown_keys=args.allow_unknown_config_keys)
            ok = r["max_abs_diff"] <= args.tolerance
            line = (f"verify: max |logit diff| {r['max_abs_diff']:.3e} (mean {r['mean_abs_diff']:.3e}, "
                    f"logits up to {r['logit_scale']:.3g}) over {r['tokens']} tokens: "
                    f"{'OK' if ok else 'FAIL'} at tolerance {args.tolerance:g}")
            if not ok:
                raise ValueError(line)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(line)
        return 0
    finally:
        shutdown_distributed()


def _eval(args) -> int:
    import json

    # lazy: a config error is reported before megatron-core, vLLM or torch.distributed load
    from megatron_rl.config import ConfigError, load_config

    # lazy: a config error is reported before megatron-core, vLLM or torch.distributed load
    from megatron_rl.evaluate import evaluate

    if args.prompts < 1 or args.n < 1 or args.temperature < 0:
        raise ConfigError("eval: --prompts and --n must be >= 1 and --temperature >= 0")
    if args.temperature == 0 and args.n > 1:
        raise ConfigError(f"eval: --n {args.n} samples of a greedy decode are all the same; "
                          "give --temperature > 0 or --n 1")
    cfg = load_config(args.config, args.overrides)
    if args.val and not cfg.data.val_path:
        raise ConfigError("eval --val: the recipe has no data.val_path; set it (data.val_path=...)")
    print(json.dumps(evaluate(cfg, args.model, num_prompts=args.prompts, n=args.n,
                              temperature=args.temperature, validation=args.val,
                              samples_file=args.samples)))
    return 0


def _train(cfg, quiet: bool) -> int:
    # lazy: a config error is reported before megatron-core, vLLM or torch.distributed load
    from megatron_rl.trainer import train

    return train(cfg, quiet=quiet)
