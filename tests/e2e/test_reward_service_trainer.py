"""Training scored by a reward service over HTTP (``reward.name: http``), through the CLI on CPU:
- the reference JSON service scoring the recipe's reward gives the run the in-process reward
  gives, step for step (the same rewards, losses and weights);
- a service that dies mid-run: the step it is down for trains on nothing (its groups skipped,
  counted), the next failed call stops the run with exit 69 and one line naming the URL, the
  checkpoints stay, and the same command resumes once the service is back;
- an LLM judge: vLLM's OpenAI-compatible server (CPU build) with a tiny model, its verdict
  constrained to a digit, scores a run; each logged reward is what the judge answers when asked
  again."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = pathlib.Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "configs" / "recipes" / "tiny_moe_gspo.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out, steps, *extra, world=1):
    launch = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
        f"--nproc-per-node={world}"]
    return [*launch, "-m", "megatron_rl", "train", "--config", RECIPE,
            f"train.output_dir={out}", f"train.steps={steps}", "train.prompts_per_step=4",
            "rollout.n_samples_per_prompt=4", "train.micro_batch_size=8",
            "train.checkpoint_every=1", "train.export_hf=false", "rollout.probe_every=0", *extra]


def _train(out, steps, *extra, code=0, world=1):
    r = subprocess.run(_args(out, steps, *extra, world=world), cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=ENV)
    # torchrun turns a worker's status into its own failure (1): only 0 is kept through it
    assert r.returncode == code or (world > 1 and code and r.returncode), r.stderr[-3000:]
    return r


def _rows(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _wait_up(url: str, proc, seconds: float = 600) -> None:
    """Until ``url`` answers (``proc`` must stay alive)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.poll() is None, f"the server exited with {proc.returncode}"
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not come up in {seconds} s")


def _spawn(args, cwd=ROOT, env=ENV):
    """A server in a process group of its own (vLLM's server starts engine processes: killing
    the group leaves none behind)."""
    return subprocess.Popen(list(args), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _service(port, *args):
    proc = _spawn(args)
    _wait_up(f"http://127.0.0.1:{port}/health", proc)
    return proc


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:   # the group is gone already
        pass
    proc.wait(30)


def test_a_run_scored_by_the_json_service_equals_the_run_scored_in_process(tmp_path):
    port = _port()
    srv = _service(port, sys.executable, "-m", "megatron_rl.rewards.service",
                   "--reward", "word_match", "--port", str(port))
    try:
        _train(tmp_path / "local", 3)
        _train(tmp_path / "http", 3, "reward.name=http",
               f"reward.http.url=http://127.0.0.1:{port}/score", "reward.http.batch_size=5")
    finally:
        _stop(srv)
    local, http = _rows(tmp_path / "local"), _rows(tmp_path / "http")
    for a, b in zip(local, http):
        for key in ("reward/mean", "reward/std", "train/loss", "train/grad_norm", "train/entropy"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        assert b["reward/http_calls"] == 4.0 and b["reward/http_failed_calls"] == 0.0  # 16 / 5
        assert b["reward/groups_skipped"] == 0.0 and b["reward/http_latency_s"] > 0
    assert len(local) == len(http) == 3 and len({r["reward/mean"] for r in local}) > 1


@pytest.mark.parametrize("placement", ["colocated", "separate_one_step_off"])
def test_a_service_that_dies_mid_run_skips_then_stops_with_69_and_the_rerun_resumes(tmp_path,
                                                                                   placement):
    """Separate placement: step 4 was generated (and found the service down) while step 3
    trained, so step 3's checkpoint holds it in flight; the rerun draws its prompts again."""
    world = 1 if placement == "colocated" else 2
    layout = [] if world == 1 else ["rollout.placement=separate", "rollout.engine_ranks=1",
                                    "rollout.max_staleness=1", "algo.mismatch.tis_cap=2.0"]
    port = _port()
    url = f"http://127.0.0.1:{port}/score"
    out = tmp_path / "run"
    flaky = _service(port, sys.executable, str(ROOT / "tests/e2e/flaky_reward_service.py"),
                     "--port", str(port), "--answers", "2")   # steps 1 and 2, then gone
    service = ["reward.name=http", f"reward.http.url={url}", "reward.http.retries=1",
               "reward.http.backoff_s=0.1", "reward.http.max_consecutive_failures=2", *layout]
    try:
        r = _train(out, 5, *service, code=69, world=world)
    finally:
        _stop(flaky)
    rows = _rows(out)
    assert [row["step"] for row in rows] == [1, 2, 3]
    # step 3: its one call failed (twice, retried): every group skipped, nothing trained, no zero
    assert rows[2]["reward/groups_skipped"] == 4.0 and rows[2]["reward/http_failed_calls"] == 1.0
    assert rows[2]["train/skipped_steps"] == 1.0 and rows[2]["reward/http_retries"] == 1.0
    assert rows[2]["reward/failures"] == 16.0
    # step 4's failed call is the second in a row: one line naming the URL, exit 69
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("megatron-rl: reward service")]
    assert len(lines) == 1 and url in lines[0] and "step 4" in lines[0], r.stderr[-2000:]
    # (torchrun reports a worker's non-zero status with its own traceback: none from a rank)
    assert "resume from step 3's checkpoint" in lines[0] and "]: Traceback" not in r.stderr
    assert world > 1 or "Traceback" not in r.stderr
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts[-1] == "step_00000003"
    srv = _service(port, sys.executable, "-m", "megatron_rl.rewards.service",
                   "--reward", "word_match", "--port", str(port))
    try:
        r = _train(out, 5, *service, world=world)
    finally:
        _stop(srv)
    rows = _rows(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    # step 4 generated again (separate: not the in-flight batch that found the service down)
    assert rows[3]["reward/http_calls"] == 1.0 and rows[3]["reward/http_failed_calls"] == 0.0
    assert rows[3]["reward/groups_skipped"] == 0.0 and rows[3].get("train/skipped_steps", 0.0) == 0.0


def test_an_llm_judge_served_by_vllm_scores_a_run(tmp_path):
    from megatron_rl.data.synthetic import word_tokenizer
    from megatron_rl.model.tiny import write_tiny_hf_model

    judge = tmp_path / "judge"
    write_tiny_hf_model("qwen3_moe", judge, vocab_size=32)
    word_tokenizer().save_pretrained(str(judge))
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} {% endfor %}")
    port = _port()
    proc = _spawn(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(judge),
         "--served-model-name", "judge", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-model-len", "128", "--enforce-eager",
         "--chat-template", str(template)],
        cwd=tmp_path, env={**ENV, "VLLM_CPU_KVCACHE_SPACE": "1"})
    body = {"structured_outputs": {"choice": [str(d) for d in range(10)]}}
    out = tmp_path / "run"
    try:
        _wait_up(f"http://127.0.0.1:{port}/v1/models", proc)
        _train(out, 2, "reward.name=http", f"reward.http.url=http://127.0.0.1:{port}/v1",
               "reward.http.protocol=openai", "reward.http.model=judge",
               "reward.http.prompt_template='{prompt} = {response}'", "reward.http.max_tokens=2",
               "reward.http.score_scale=0.1", f"reward.http.extra_body={json.dumps(body)}",
               "train.samples_every=1", "train.samples_per_step=4")
        rows = _rows(out)
        for row in rows:   # one chat completion per response, every one parsed
            assert row["reward/http_calls"] == 16.0 and row["reward/groups_skipped"] == 0.0
            assert row["reward/failures"] == 0.0
        samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 * 16
        for s in samples[:6]:   # the judge asked again gives the logged reward
            req = {"model": "judge", "max_tokens": 2, "temperature": 0.0, **body,
                   "messages": [{"role": "user", "content": f"{s['prompt']} = {s['response']}"}]}
            r = urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(req).encode(),
                {"Content-Type": "application/json"}), timeout=60)
            reply = json.loads(r.read())["choices"][0]["message"]["content"]
            assert s["reward"] == pytest.approx(int(reply.strip()[0]) * 0.1), (s, reply)
        assert len({s["reward"] for s in samples}) > 1
    finally:
        _stop(proc)
