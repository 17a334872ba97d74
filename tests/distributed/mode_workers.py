"""Worker for test_cpu_modes: a real trainer run (world 1, vLLM's CPU build) that records how many
torch-function modes are active when each phase of a step starts."""

from __future__ import annotations

import functools
import sys

from torch.overrides import _len_torch_function_stack


def watch_everywhere(module, name, wrapped):
    """Replace ``module.name`` and every megatron_rl module's reference to the same function.

    Modules import these functions by name, so patching only the defining module would miss the
    call the step makes; a phase never seen then fails the test rather than passing vacuously."""
    original = getattr(module, name)
    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron_rl") and getattr(mod, name, None) is original:
            setattr(mod, name, wrapped)


def modes_by_phase(rank, world, out_dir):
    import megatron_rl.rollout.collect as collect
    import megatron_rl.rollout.weight_sync as weight_sync
    import megatron_rl.train.megatron_loss as megatron_loss
    import megatron_rl.train.rl_batch as rl_batch
    import megatron_rl.train.rollout_batch as rollout_batch
    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer  # before the watch: it loads every importer

    seen = {}

    def watch(name, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            seen.setdefault(name, set()).add(_len_torch_function_stack())
            return fn(*args, **kwargs)
        return wrapped

    watch_everywhere(rollout_batch, "group_sequences", watch("batch", rollout_batch.group_sequences))
    watch_everywhere(rollout_batch, "build_step_batch",
                     watch("batch", rollout_batch.build_step_batch))
    watch_everywhere(rl_batch, "logprob_passes", watch("megatron", rl_batch.logprob_passes))
    watch_everywhere(rl_batch, "run_updates", watch("megatron", rl_batch.run_updates))
    watch_everywhere(weight_sync, "sync_weights", watch("sync", weight_sync.sync_weights))
    watch_everywhere(collect, "score_groups", watch("rewards", collect.score_groups))
    # inside Megatron's schedule: the loss functions' log-prob kernel and the model's forward
    watch_everywhere(megatron_loss, "logprobs_entropy", watch("loss", megatron_loss.logprobs_entropy))
    cfg = load_config("tiny_moe_gspo", [f"train.output_dir={out_dir}", "train.steps=2",
                                        "train.prompts_per_step=2", "train.micro_batch_size=8",
                                        "train.loggers=[]", "train.export_hf=false",
                                        "rollout.probe_every=0"])
    trainer = Trainer(cfg, quiet=True)
    trainer.engine.generate = watch("generate", trainer.engine.generate)
    for chunk in trainer.ms.model:
        chunk.register_forward_pre_hook(
            lambda *_: seen.setdefault("forward", set()).add(_len_torch_function_stack()))
    try:
        code = trainer.run()
    finally:
        trainer.close()
    return {"code": code, **{k: sorted(v) for k, v in seen.items()}}
