import json
import pathlib

import torch

from megatron_rl import toy
from megatron_rl.cli import main
from megatron_rl.config import load_config
from megatron_rl.toy_trainer import train_toy

RECIPES = pathlib.Path(__file__).resolve().parents[2] / "configs" / "recipes"


def test_toy_reward_counts_reversed_digits_before_eos():
    prompts = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    responses = torch.tensor([[3, 2, 1], [3, 0, 1], [1, 2, 3]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(toy.reward(prompts, responses, mask), torch.tensor([1.0, 1 / 3, 1 / 3]))


def test_generate_masks_after_eos_and_reports_sampler_logprobs():
    cfg = toy.ToyConfig(vocab_size=4, prompt_len=3)
    policy = toy.ToyPolicy(cfg, 5)
    prompts = toy.sample_prompts(64, cfg, torch.Generator().manual_seed(0))
    tokens, mask, lp = toy.generate(policy, prompts, 5, temperature=1.0, top_p=1.0,
                                    gen=torch.Generator().manual_seed(1))
    for i in range(64):
        eos = (tokens[i] == toy.EOS).nonzero()
        end = int(eos[0]) + 1 if len(eos) else 5
        assert mask[i, :end].all() and not mask[i, end:].any()
    train_lp, _ = toy.token_logprobs(policy(prompts, tokens), tokens, 1.0)
    torch.testing.assert_close(train_lp * mask, lp, atol=1e-6, rtol=0)


def test_top_p_sampling_never_draws_outside_the_nucleus():
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, -1.0, -2.0]]), -1)
    filtered = toy._top_p_filter(logp, 0.8)
    assert torch.isinf(filtered[0, 2:]).all() and torch.isfinite(filtered[0, :2]).all()
    torch.testing.assert_close(filtered.exp().sum(), torch.tensor(1.0))


def test_gspo_and_future_kl_recipes_learn_the_toy_task(tmp_path):
    for recipe in ("toy_gspo.yaml", "toy_future_kl_grpo.yaml"):
        cfg = load_config(RECIPES / recipe, [f"train.output_dir={tmp_path / recipe}"])
        hist = train_toy(cfg, quiet=True)
        first = sum(r["reward/mean"] for r in hist[:5]) / 5
        last = sum(r["reward/mean"] for r in hist[-5:]) / 5
        assert first < 0.35 and last > 0.8, (recipe, first, last)
        assert any(r["train/clip_frac_high"] + r["train/clip_frac_low"] > 0 for r in hist)


def test_train_command_writes_config_and_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--config", str(RECIPES / "toy_gspo.yaml"), "train.steps=3",
               f"train.output_dir={out}", "algo.dynamic_sampling=true", "algo.overlong.buffer_len=2",
               "rollout.top_p=0.9", "algo.loss.params.tis_cap=2.0"])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "dapo/kept_frac" in rows[0] and "train/rollout_mismatch_k3" in rows[0]
    assert "steps: 3" in (out / "config.yaml").read_text()
    assert "reward" in capsys.readouterr().out
