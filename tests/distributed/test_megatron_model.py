"""The Megatron-Core MoE model under TP / EP / PP / DP on CPU gives the single-process gradients.

A tiny Qwen3-MoE (hidden 64, 2 layers, 4 experts, top-2, vocab 256) -- and a tiny DeepSeek-V3
(multi-latent attention, a shared expert, sigmoid router with expert bias) -- one RL step with the GSPO or
future-KL GRPO loss through ``train.megatron_loss`` (Megatron's schedule, DDP, our loss adapter):
the loss and every parameter's gradient equal plain single-process autograd on the same weights
(fp32). The DP / micro-batch cases are the loss-scaling contract: 1 vs 4 micro-batches per rank
and DP 2 change nothing. With the router's load-balancing and z-losses on, the same holds against
a reference that averages each micro-batch's auxiliary loss over the step (Megatron's meaning).
"""

import pytest

from tests.distributed.conftest import (MODEL_CASES_2, MODEL_CASES_4, MODEL_CASES_AUX,
                                        MODEL_CASES_DEEPSEEK)

TOL = 2e-5  # fp32: TP changes summation order


@pytest.mark.parametrize("case", [c[0] for c in MODEL_CASES_2 + MODEL_CASES_4 + MODEL_CASES_DEEPSEEK
                                  + MODEL_CASES_AUX])
def test_megatron_step_gradients_equal_single_process(model_results, case):
    r = model_results[case]
    assert r["loss"] <= TOL, f"loss differs by {r['loss']:.2e}"
    assert r["grad"] <= TOL, f"{r['worst_param']} gradient differs by {r['grad']:.2e}: {r['bad']}"
    assert r["scale"] > 1e-4  # the gradients compared are not vanishing
