"""Our CPU seconds per RL step against TRL's, on the same workload, on the same machine.

    python bench/vs_trl.py --make-venv        # once: TRL in its own venv, .venv-trl (CPU torch)
    python bench/vs_trl.py                    # 100 steps each, two interleaved rounds
    python bench/vs_trl.py --trl-python PATH  # a TRL install elsewhere (or MEGATRON_RL_TRL_PYTHON)
    python bench/vs_trl.py --max-response 128 --model mid --steps 8 --skip 2 --no-before

The workload is the README's main job: the tiny random Qwen3-MoE (4 experts, top-2, 2 layers,
hidden 64) on ``synthetic:copy`` prompts with the ``word_match`` reward, 16 prompts x 8 samples a
step, responses of at most 5 tokens at temperature 1, GSPO (sequence ratio, clip 3e-3 / 4e-3,
sequence-mean of token-means; TRL: ``importance_sampling_level="sequence"``, ``loss_type="grpo"``),
no KL, one Adam update a step (two micro-batches of 64), lr 1e-3, gradient clip 1.0. Both sides
start from the same weights and tokenizer, written here, and read the same prompt file. A third
run is ours as the step was before issue 23 (``bench/profile_step.py``'s baseline: megatron-core's
CPU function modes on everywhere, a separate old-policy log-prob pass): the before/after ratio.

TRL generates with plain Hugging Face ``generate`` from the training model; we generate with
vLLM's CPU engine and push the weights to it after each update. Each side runs in a fresh process
with one thread (``OMP_NUM_THREADS=1``); a step's cost is the process's CPU time (all threads)
from one step's start to the next's, so logging counts on both sides; the first ``--skip`` steps
(warm-up, compilation) and the last are left out. The runs of a round are interleaved, so a drift
of the machine hits each side.
TRL is not a dependency of ours: without it the benchmark says so and exits 0.

At real lengths and sizes: ``--max-response N`` makes both sides generate exactly ``N`` tokens
(ours ``rollout.ignore_eos``, TRL ``min_new_tokens``; without it, at most 5 as above) and
``--model mid`` swaps the tiny MoE for a mid-size one (hidden 512, 4 layers, 8 heads, 8 experts of
256, top-2). Each side's phase split is printed too: generation (ours: ``time/rollout_s``, vLLM
and the reward; TRL: wall time inside ``generate``) against the rest of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_VENV = ROOT / ".venv-trl"
# TRL 1.16 is the version measured in docs/benchmarks.md; torch is pinned so pip reuses the CPU
# build instead of pulling a CUDA one
TRL_PINS = ["torch==2.13.0", "trl==1.16.0"]
SIDES = {"ours": "ours", "before": "ours before issue 23", "trl": "TRL"}
PROMPTS, SAMPLES, MAX_RESPONSE, LR, EPS_LOW, EPS_HIGH = 16, 8, 5, 1.0e-3, 3.0e-3, 4.0e-3
MODELS = {"tiny": {},   # the README's main job's model
          "mid": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=64, num_experts=8,
                      moe_intermediate_size=256, intermediate_size=1024)}


def _workload(d: Path, model: str = "tiny") -> None:
    """The shared starting point: weights, tokenizer and prompts."""
    from megatron_rl.data.synthetic import make_rows, word_tokenizer, write_jsonl
    from megatron_rl.model.tiny import write_tiny_hf_model

    write_tiny_hf_model("qwen3_moe", d / "model", seed=0, vocab_size=32, **MODELS[model])
    word_tokenizer().save_pretrained(str(d / "model"))
    write_jsonl(make_rows("copy", 4096, min_len=2, max_len=3, seed=0), d / "prompts.jsonl")


def _ours(d: Path, steps: int, result: Path, before: bool = False, exact: int = 0) -> None:
    from profile_step import keep_cpu_modes_everywhere, run_each_step, run_separate_old_pass

    if before:
        keep_cpu_modes_everywhere()
    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config("tiny_moe_gspo", [
        f"model.hf_config={d / 'model'}", "model.hf_overrides={}", f"data.path={d / 'prompts.jsonl'}",
        f"train.output_dir={result.with_suffix('')}", f"train.steps={steps}", "train.loggers=[]",
        "train.export_hf=false", "train.checkpoint_every=0", "train.samples_every=0",
        *([f"rollout.max_response_len={exact}", "rollout.ignore_eos=true"] if exact else [])])
    trainer = Trainer(cfg, quiet=True)
    if before:
        run_separate_old_pass(trainer)
    starts, rewards, gen, lengths = [], [], [], []

    def marked(step):
        starts.append(time.process_time())
        out = step()
        rewards.append(out["reward/mean"])
        gen.append((out["time/rollout_s"], out["time/step_s"]))
        lengths.append(out["response/length_mean"])
        return out

    run_each_step(trainer, marked)
    result.write_text(json.dumps({"starts": starts, "rewards": rewards, "generate": gen,
                                  "lengths": lengths}))


def _trl(d: Path, steps: int, result: Path, exact: int = 0) -> None:
    """Runs under the TRL venv's Python: imports nothing of ours but the reward (pure Python)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_rl.rewards.builtin import word_match

    from transformers.generation.utils import GenerationMixin

    torch.set_num_threads(1)
    starts, walls, in_generate = [], [], [0.0]
    plain_generate = GenerationMixin.generate

    def timed_generate(self, *a, **kw):
        """HF ``generate``, its wall time summed (the generation phase)."""
        t0 = time.perf_counter()
        try:
            return plain_generate(self, *a, **kw)
        finally:
            in_generate[0] += time.perf_counter() - t0

    GenerationMixin.generate = timed_generate

    class Starts(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            starts.append(time.process_time())
            walls.append((time.perf_counter(), in_generate[0]))

    def reward(prompts, completions, label, **kw):
        return [word_match(c, lab) for c, lab in zip(completions, label)]

    args = GRPOConfig(
        output_dir=str(result.with_suffix("")), use_cpu=True, max_steps=steps, seed=1234,
        per_device_train_batch_size=PROMPTS * SAMPLES // 2, gradient_accumulation_steps=2,
        num_generations=SAMPLES, max_completion_length=exact or MAX_RESPONSE, temperature=1.0,
        generation_kwargs={"min_new_tokens": exact} if exact else None,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=0.0, importance_sampling_level="sequence", loss_type="grpo",
        epsilon=EPS_LOW, epsilon_high=EPS_HIGH, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, bf16=False, fp16=False)
    model = AutoModelForCausalLM.from_pretrained(str(d / "model"), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(d / "model"))
    data = load_dataset("json", data_files=str(d / "prompts.jsonl"), split="train")
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Starts()])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    # a step's generation time and wall time, start to start
    gen = [(g1 - g0, t1 - t0) for (t0, g0), (t1, g1) in zip(walls, walls[1:])]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history
               if "completions/mean_length" in h]
    result.write_text(json.dumps({"starts": starts, "rewards": rewards, "generate": gen,
                                  "lengths": lengths}))


def _run(python: str, side: str, d: Path, steps: int, skip: int, pair: int, exact: int = 0) -> dict:
    result = d / f"{side}-{pair}.json"   # its run directory: the same name without .json
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.run([python, __file__, "--child", side, "--dir", str(d), "--steps",
                           str(steps), "--result", str(result), "--exact", str(exact)], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"the {side} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    out = json.loads(result.read_text())
    starts, rewards = out["starts"], out["rewards"]
    if len(starts) != steps or len(rewards) != steps:
        sys.exit(f"the {side} run recorded {len(starts)} step starts and {len(rewards)} rewards, "
                 f"not {steps}: the timing hooks missed steps")
    # start to start: a step and its logging; the last step is left out (its end has the
    # final checkpoint on our side and nothing on TRL's)
    per_step = [b - a for a, b in zip(starts[skip:], starts[skip + 1:])]
    gen = out["generate"][skip:]
    return {"cpu": statistics.mean(per_step), "command": time.perf_counter() - t,
            "gen_share": sum(g for g, _ in gen) / max(sum(w for _, w in gen), 1e-9),
            "length": statistics.mean(out["lengths"] or [float("nan")]),
            "reward_last": rewards[-1], "reward_last10": statistics.mean(rewards[-10:])}


def _trl_python(arg) -> str:
    for cand in (arg, os.environ.get("MEGATRON_RL_TRL_PYTHON"), TRL_VENV / "bin" / "python"):
        if cand and Path(cand).exists():
            return str(cand)
    return ""


def _make_venv() -> None:
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(TRL_VENV / "bin" / "pip"), "install", "-q", *TRL_PINS], check=True)
    print(f"TRL installed in {TRL_VENV}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the mean")
    p.add_argument("--pairs", type=int, default=2,
                   help="interleaved rounds of (ours, ours before issue 23, TRL)")
    p.add_argument("--trl-python", help="a Python with trl installed (default: .venv-trl)")
    p.add_argument("--make-venv", action="store_true", help=f"install {' '.join(TRL_PINS)} in .venv-trl")
    p.add_argument("--max-response", type=int, default=0,
                   help="both sides generate exactly this many tokens (default: at most 5)")
    p.add_argument("--model", choices=tuple(MODELS), default="tiny")
    p.add_argument("--no-before", action="store_true",
                   help="leave out the run of ours as the step was before issue 23")
    p.add_argument("--child", choices=tuple(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--exact", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.child == "trl":
            return _trl(Path(a.dir), a.steps, Path(a.result), exact=a.exact)
        return _ours(Path(a.dir), a.steps, Path(a.result), before=a.child == "before",
                     exact=a.exact)
    if a.make_venv:
        return _make_venv()
    if a.skip >= a.steps - 1:
        sys.exit(f"--skip {a.skip} leaves no step of --steps {a.steps} to measure")
    trl = _trl_python(a.trl_python)
    if not trl:
        print("skipped: no TRL install found (.venv-trl, --trl-python or MEGATRON_RL_TRL_PYTHON); "
              "make one with: python bench/vs_trl.py --make-venv")
        return
    sides = {k: v for k, v in SIDES.items() if not (a.no_before and k == "before")}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _workload(d, a.model)
        runs = {side: [] for side in sides}
        for pair in range(a.pairs):
            for side in sides:
                py = trl if side == "trl" else sys.executable
                runs[side].append(_run(py, side, d, a.steps, a.skip, pair, a.max_response))
    length = f"exactly {a.max_response}" if a.max_response else f"at most {MAX_RESPONSE}"
    print(f"{a.model} Qwen3-MoE GSPO, {PROMPTS} prompts x {SAMPLES}, responses of {length} "
          f"tokens, CPU time of steps {a.skip + 1}-{a.steps - 1} (start to start), one thread, "
          f"{a.pairs} interleaved rounds, cpus={os.cpu_count()}")
    print(f"{'':24s} {'CPU s/step (each run)':>22s} {'mean':>7s} {'generate':>9s} {'length':>7s} "
          f"{'command s':>10s} {'reward@' + str(a.steps):>11s} {'last 10':>8s}")
    mean = {}
    for side, label in sides.items():
        r = runs[side]
        mean[side] = statistics.mean(x["cpu"] for x in r)
        each = " ".join(f"{x['cpu']:.3f}" for x in r)
        print(f"{label:24s} {each:>22s} {mean[side]:7.3f} "
              f"{statistics.mean(x['gen_share'] for x in r):8.0%} "
              f"{statistics.mean(x['length'] for x in r):7.1f} "
              f"{statistics.mean(x['command'] for x in r):10.1f} "
              f"{statistics.mean(x['reward_last'] for x in r):11.3f} "
              f"{statistics.mean(x['reward_last10'] for x in r):8.3f}")
    line = f"ours / TRL, CPU per step: {mean['ours'] / mean['trl']:.2f}x"
    if "before" in mean:
        line += f"; ours / before: {mean['ours'] / mean['before']:.2f}x"
    print(line + "  (generate: the share of the step's wall time spent generating)")


if __name__ == "__main__":
    main()
