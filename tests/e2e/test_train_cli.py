"""The whole loop through the CLI on CPU: a tiny random MoE, vLLM (CPU build) rollouts,
Megatron-Core training. A run leaves metrics, TensorBoard events, a checkpoint, an HF export and a
reward curve; a rerun resumes the step counter and the data position; SIGUSR1 stops at the next
step with a checkpoint and exit status 75."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "recipes" / "tiny_moe_gspo.yaml")
P = 4   # prompts per step


def _args(out: pathlib.Path, steps: int, *extra: str):
    return [sys.executable, "-m", "megatron_rl", "train", "--config", RECIPE,
            f"train.output_dir={out}", f"train.steps={steps}", f"train.prompts_per_step={P}",
            "rollout.n_samples_per_prompt=4", "train.micro_batch_size=8", "train.checkpoint_every=2",
            "rollout.probe_every=2", *extra]


def _train(out, steps, *extra):
    r = subprocess.run(_args(out, steps, *extra), cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _trainer_state(out):
    latest = int((out / "checkpoints" / "latest").read_text())
    return latest, json.loads((out / "checkpoints" / f"step_{latest:08d}" / "trainer_state.json").read_text())


@pytest.mark.vllm
def test_train_produces_metrics_checkpoint_tensorboard_export_and_resumes(tmp_path):
    out = tmp_path / "run"
    r = _train(out, 3, "train.samples_every=2")
    assert "step    3/3" in r.stderr and "reward" in r.stdout + r.stderr
    # a quiet console: no warning line from another package (ours start "warning: ")
    noise = [ln for ln in (r.stdout + r.stderr).splitlines()
             if "Warning" in ln or "deprecated" in ln or "Disabling Triton" in ln]
    assert not noise, noise
    assert "ETA" not in next(ln for ln in r.stderr.splitlines() if ln.startswith("step    1/3"))
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2} and len(samples) == 4 * 4   # 4 groups of 4
    assert {"prompt", "label", "response", "reward", "finish_reason"} <= samples[0].keys()
    assert _steps(out) == [1, 2, 3]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])   # step 2: a probe step
    for key in ("reward/mean", "train/loss", "train/entropy", "train/clip_frac_low", "mismatch/mean",
                "sync/seconds", "time/rollout_s", "time/train_s", "time/logprob_s", "perf/tokens_per_s",
                "response/length_mean", "moe/imbalance_layer01/max", "sync/probe_mismatch/max"):
        assert key in row, key
    assert row["mismatch/mean"] < 1e-4 and row["sync/probe_mismatch/max"] < 1e-4
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file() and json.loads((out / "run_info.json").read_text())["git_sha"]
    latest, state = _trainer_state(out)
    assert latest == 3 and state["trainer"]["sampler"] == {"epoch": 0, "position": 3 * P}
    hf = out / "hf"
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()
    from safetensors import safe_open

    with safe_open(str(next(hf.glob("*.safetensors"))), "pt") as f:
        assert any("experts" in k for k in f.keys())

    # the export serves: `megatron-rl eval` scores it through vLLM with the recipe's reward
    ev = subprocess.run([sys.executable, "-m", "megatron_rl", "eval", "--config", RECIPE, "--model",
                         str(hf), "--prompts", "4", "--n", "2", "--temperature", "1", "--val",
                         "data.val_path=synthetic:copy", "--samples", str(tmp_path / "ev.jsonl")],
                        cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads(ev.stdout.strip().splitlines()[-1])
    assert report["prompts"] == 4 and report["samples"] == 8 and report["failures"] == 0
    assert 0.0 <= report["pass@2"] <= 1.0
    dumped = [json.loads(ln) for ln in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert len(dumped) == 8 and {"prompt", "response", "reward", "label"} <= dumped[0].keys()
    assert 0.0 <= report["reward_mean"] <= 1.0 and 1 <= report["length_mean"] <= 5

    # a rerun with more steps resumes: the counter and the data position continue
    r = _train(out, 5, "train.samples_every=2")
    assert "resumed from step 3" in r.stderr
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 16 + [4] * 16
    assert _steps(out) == [1, 2, 3, 4, 5]
    latest, state = _trainer_state(out)
    assert latest == 5 and state["trainer"]["sampler"] == {"epoch": 0, "position": 5 * P}


@pytest.mark.vllm
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_checkpoints_at_the_next_step_and_exits_for_requeue(tmp_path, sig):
    """SIGUSR1 (SLURM's warning) and Ctrl-C alike; Ctrl-C used to end in a traceback through
    vLLM and lose the run's work."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_args(out, 200, "train.checkpoint_every=0", "train.export_hf=false"),
                            cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    deadline = time.time() + 400
    try:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("step    1/"):
                proc.send_signal(sig)
                break
            assert time.time() < deadline, "".join(lines[-20:])
        rest = proc.communicate(timeout=300)[1]
    finally:
        proc.kill()
    assert proc.returncode == 75, rest[-2000:]
    assert "stopping after step" in rest and sig.name in rest and "Traceback" not in rest
    assert "s after the request (grace 240 s)" in rest
    assert sig.name in (out / "REQUEUE").read_text()   # for launchers behind torchrun
    latest, state = _trainer_state(out)
    assert 1 <= latest < 200 and state["trainer"]["step"] == latest
    assert not (out / "hf").exists()


@pytest.mark.vllm
def test_torchrun_two_ranks_tensor_parallel_trainer_and_engine(tmp_path):
    """TP 2 in Megatron and in vLLM: the engine agrees with the trainer, and the logged metrics
    are the single-model values (a near-uniform random policy has entropy ~ ln(vocab); a metric
    summed over the TP ranks without dividing would read 2 x ln(32))."""
    import math

    out = tmp_path / "run"
    args = _args(out, 2, "parallel.tensor_model_parallel_size=2", "rollout.tensor_parallel_size=2",
                 "train.export_hf=false")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                "--nproc-per-node=2"]
    r = subprocess.run(torchrun + args[1:], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "world 2" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert abs(rows[0]["train/entropy"] - math.log(32)) < 0.05
    assert rows[0]["train/updates"] == 1.0
    assert max(row["mismatch/mean"] for row in rows) < 1e-4


@pytest.mark.vllm
def test_nonfinite_steps_are_skipped_then_the_run_stops_with_the_last_good_weights(tmp_path):
    """An absurd learning rate: step 1 applies and blows the weights up to ~1e30, the forward of
    every later step overflows to NaN, its update is skipped; after train.max_bad_steps (2) the
    run stops with status 3 and a checkpoint whose weights are still those of step 1."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    out = tmp_path / "run"
    r = subprocess.run(_args(out, 8, "train.lr=1e30", "train.max_bad_steps=2", "train.checkpoint_every=1",
                             "train.keep_checkpoints=3", "train.export_hf=false"),
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 3, r.stderr[-3000:]
    assert "stopping: 2 steps in a row (to step 3) had a NaN/Inf" in r.stderr
    assert "as of step 1" in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["train/skipped_updates"] for row in rows] == [0.0, 1.0, 1.0]
    latest, _ = _trainer_state(out)
    assert latest == 3 and not (out / "hf").exists()

    def model(step):
        sd = _load_state_dict_from_keys(checkpoint_id=str(out / "checkpoints" / f"step_{step:08d}"))
        return {k: v for k, v in sd.items() if not k.startswith("optimizer.")
                and isinstance(v, torch.Tensor) and v.is_floating_point()}

    first, last = model(1), model(3)
    assert first.keys() == last.keys() and first
    assert all(torch.equal(first[k], last[k]) for k in first)


@pytest.mark.parametrize("case", ["bad_row", "init_from_hf_dir", "unknown_key"])
def test_bad_input_through_the_cli_is_one_line_and_writes_nothing(tmp_path, case):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"prompt": "copy: a b", "label": "a b"}\n' * 3 + b'{"prompt": "caf\xe9"}\n')
    extra = {"bad_row": [f"data.path={data}"],
             "init_from_hf_dir": [f"model.init_from={ROOT / 'configs' / 'models' / 'qwen3_30b_a3b'}"],
             "unknown_key": ["train.stepz=3"]}[case]
    out = tmp_path / "run"
    r = subprocess.run(_args(out, 2, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("megatron-rl:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert {"bad_row": f"{data}:4: invalid UTF-8", "init_from_hf_dir": "model.init_from: ",
            "unknown_key": "unknown key train.stepz"}[case] in errors[0]
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.vllm
def test_a_run_from_hf_weights_starts_the_engine_from_them_without_a_copy(tmp_path):
    """The engine loads ``model.hf_config``'s directory itself: no ``hf_init`` copy of the
    starting weights (61 GB for Qwen3-30B-A3B), and its log-probs are the trainer's."""
    from megatron_rl.data.synthetic import word_tokenizer
    from megatron_rl.model.tiny import write_tiny_hf_model

    hf = tmp_path / "hf_start"
    write_tiny_hf_model("qwen3_moe", hf, vocab_size=32)
    word_tokenizer().save_pretrained(str(hf))
    out = tmp_path / "run"
    # with validation every step on another draw of the task
    _train(out, 2, f"model.hf_config={hf}", f"data.tokenizer={hf}", "train.export_hf=false",
           "data.val_path=synthetic:copy", "train.val_every=1", "train.val_prompts=4",
           "train.val_n=2")
    assert not (out / "hf_init").exists()
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and max(r["mismatch/mean"] for r in rows) < 1e-4
    for r in rows:
        assert 0.0 <= r["val/reward_mean"] <= 1.0 and 0.0 <= r["val/pass@2"] <= 1.0
        assert 1 <= r["val/response_length_mean"] <= 5
