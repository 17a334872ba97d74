"""Context parallelism without TransformerEngine: the CP attention alone, then one RL step through
the real Megatron-Core model, equal to the single-process (CP 1) run.

The attention: every rank keeps its zigzag chunks of q / k / v, all-gathers K/V over the CP group
and attends by global position (no mask: the keys before a chunk and its causal diagonal block
merged by log-sum-exp); outputs and q / k / v gradients, gathered and un-sharded, equal a
brute-force float64 reference (BSHD and packed THD with uneven lengths, GQA, key and value head
dims that differ as in MLA). The model: GSPO and future-KL GRPO (future ratio) through Megatron's
schedule, DDP and our loss adapter at CP 2 / 4, combined with TP / EP / PP / DP, BSHD and THD,
for Qwen3-MoE, Mixtral and the DeepSeek-V3-style MLA model: the loss and every parameter's
gradient equal plain single-process autograd. Each family has a mutant that must fail.
"""

import pytest

from tests.distributed.conftest import (MODEL_CASES_CP_2, MODEL_CASES_CP_4, MODEL_CASES_CP_MUTANT,
                                        MODEL_CASES_CP_OTHER)
from tests.distributed.cp_workers import CASES, MUTATIONS

TOL_MODEL = 2e-5   # the tolerance of the other layout tests (fp32, summation order)
TOL_ATTN = {"float64": 1e-10, "float32": 1e-5}


@pytest.mark.parametrize("case", [f"{layout}_{dtype}_cp{cp}_{method}"
                                  for layout, dtype, cp, method in CASES])
def test_cp_attention_outputs_and_qkv_grads_equal_single_process(cp_attention_results, case):
    errs = cp_attention_results[case]
    tol = TOL_ATTN[case.split("_")[1]]
    assert max(errs.values()) <= tol, errs


@pytest.mark.parametrize("mutation,layout,cp", MUTATIONS)
def test_cp_attention_mutants_are_caught(cp_attention_results, mutation, layout, cp):
    errs = cp_attention_results[f"mutant_{mutation}_{layout}_cp{cp}"]
    if mutation in ("identity_backward", "ring_grads_not_sent_home"):
        # the forward is untouched; the K/V gradients lose the other ranks' queries' terms
        assert errs["out"] <= 1e-10 and errs["dq"] <= 1e-10, errs
        assert min(errs["dk"], errs["dv"]) > 0.1, errs
    elif mutation in ("part_lse_backward", "ring_block_lse_backward"):
        # the merged forward is untouched; every gradient of a merged chunk goes wrong
        assert errs["out"] <= 1e-10, errs
        assert min(errs["dq"], errs["dk"], errs["dv"]) > 0.1, errs
    else:
        # queries attend keys by local index: outputs and every gradient go wrong
        assert min(errs.values()) > 0.1, errs


ALL_CP = MODEL_CASES_CP_2 + MODEL_CASES_CP_4 + [c for cs in MODEL_CASES_CP_OTHER.values() for c in cs]


@pytest.mark.parametrize("case", [c[0] for c in ALL_CP])
def test_rl_step_under_context_parallel_equals_single_process(cp_model_results, case):
    r = cp_model_results[case]
    assert r["loss"] <= TOL_MODEL, f"loss differs by {r['loss']:.2e}"
    assert r["grad"] <= TOL_MODEL, f"{r['worst_param']} gradient differs by {r['grad']:.2e}: {r['bad']}"
    assert r["scale"] > 1e-4


@pytest.mark.parametrize("case", ["cp4_thd_fkl_short", "cp4_bshd_gspo_short"])
def test_cp_ranks_without_response_tokens_still_give_exact_gradients(cp_model_results, case):
    held = cp_model_results[case]["response_tokens_by_rank"]
    assert held[:3] == [0.0, 0.0, 0.0] and held[3] > 0, held   # the case is what it claims


@pytest.mark.parametrize("case", [c[0] for c in MODEL_CASES_CP_MUTANT])
def test_cp_loss_factor_applied_twice_is_caught(cp_model_results, case):
    r = cp_model_results[case]
    assert r["loss"] <= TOL_MODEL           # the logged loss is unscaled ...
    assert abs(r["grad"] - 1.0) < 1e-3, r   # ... but every gradient comes out doubled
