"""Hugging Face <-> megatron-core conversion is exact, layout-independent, and loud on bad input.

Tiny random HF models (written by transformers, offline) are imported; the Megatron forward gives
transformers' logits; the export gives back every tensor bit for bit; TP / EP / PP / TP x EP on
the Megatron side give byte-identical files to the plain layout; broken inputs fail with one
message naming the tensor, field or file, and leave no output behind.
"""

import glob
import os

import pytest
import torch

from tests.distributed.harness import spawn

MODELS = {  # name: (tiny config, overrides)
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
    "qwen2": ("qwen2", {}),
    "mixtral": ("mixtral", {}),
    "deepseek_v3": ("deepseek_v3", {}),
}
CASES_2 = [  # case, model, layout
    ("qwen3_moe_tp2", "qwen3_moe", {"tp": 2}),
    ("qwen3_moe_ep2", "qwen3_moe", {"ep": 2}),
    ("qwen3_moe_pp2", "qwen3_moe", {"pp": 2}),
    ("qwen2_tp2", "qwen2", {"tp": 2}),
    ("qwen3_tied_pp2", "qwen3_tied", {"pp": 2}),
    ("mixtral_tp2", "mixtral", {"tp": 2}),
    ("deepseek_v3_ep2", "deepseek_v3", {"ep": 2}),
]
CASES_4 = [
    ("qwen3_moe_tp2_ep2", "qwen3_moe", {"tp": 2, "ep": 2}),
    ("mixtral_tp2_ep2_etp1", "mixtral", {"tp": 2, "ep": 2, "etp": 1}),
]
LOGIT_TOL = 1e-4  # fp32


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    from megatron_rl.model.tiny import write_tiny_hf_model

    root = tmp_path_factory.mktemp("hf_models")
    out = {}
    for name, (tiny, overrides) in MODELS.items():
        write_tiny_hf_model(tiny, root / name, seed=3, **overrides)
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="session")
def round_trip_results(hf_models, tmp_path_factory):
    from tests.distributed import hf_workers

    return spawn(hf_workers.round_trips, 1, str(tmp_path_factory.mktemp("rt")), hf_models)


@pytest.fixture(scope="session")
def layout_results(hf_models, tmp_path_factory):
    from tests.distributed import hf_workers

    out = spawn(hf_workers.layouts, 2, str(tmp_path_factory.mktemp("l2")), hf_models, CASES_2)
    out.update(spawn(hf_workers.layouts, 4, str(tmp_path_factory.mktemp("l4")), hf_models, CASES_4))
    return out


def _tensors(directory):
    from safetensors.torch import load_file

    out = {}
    for f in glob.glob(os.path.join(directory, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("model", sorted(MODELS))
def test_imported_model_gives_transformers_logits(round_trip_results, model):
    v = round_trip_results[model]["verify"]
    assert v["max_abs_diff"] <= LOGIT_TOL, v
    assert v["logit_scale"] > 0.1  # the logits compared are not all zero


@pytest.mark.parametrize("model", sorted(MODELS))
def test_a_bf16_import_checks_its_mapping_at_fp32(round_trip_results, model):
    r = round_trip_results[model]["bf16_check"]
    assert "verified: max |logit diff| vs transformers" in r["notes"], r
    assert r["max_abs_diff"] <= LOGIT_TOL and r["logit_scale"] > 0.1, r


@pytest.mark.parametrize("model", sorted(MODELS))
def test_export_returns_every_original_tensor_bit_for_bit(round_trip_results, hf_models, model):
    r = round_trip_results[model]
    original, exported = _tensors(hf_models[model]), _tensors(r["out_dir"])
    assert r["imported"] == len(original) == r["exported"]   # counted both ways: nothing dropped
    assert sorted(exported) == sorted(original)
    bad = [k for k in original if not torch.equal(original[k], exported[k])]
    assert not bad, f"differ: {bad[:5]}"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_export_is_a_loadable_hf_directory(round_trip_results, hf_models, model):
    from transformers import AutoModelForCausalLM

    out = round_trip_results[model]["out_dir"]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tokens = torch.arange(24)[None] % 200
    original = AutoModelForCausalLM.from_pretrained(hf_models[model])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, original(tokens).logits)


@pytest.mark.parametrize("case", [c[0] for c in CASES_2 + CASES_4])
def test_every_layout_imports_and_exports_the_same_files(layout_results, case):
    r = layout_results[case]
    assert r["reference"], "no files exported"
    assert r["import_at_layout"] == r["reference"], "import at this layout changed the weights"
    assert r["export_at_layout"] == r["reference"], "export at this layout changed the files"
    if "verify" in r:
        assert r["verify"]["max_abs_diff"] <= LOGIT_TOL, r["verify"]


def test_layout_export_matches_the_original_checkpoint(layout_results, hf_models):
    original = _tensors(hf_models["qwen3_moe"])
    exported = _tensors(layout_results["qwen3_moe_tp2_ep2"]["out_dir"])
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)


@pytest.fixture(scope="session")
def bad_input_results(hf_models, tmp_path_factory):
    from tests.distributed import hf_workers

    return spawn(hf_workers.bad_inputs, 1, str(tmp_path_factory.mktemp("bad")), hf_models)


@pytest.mark.parametrize("case,needles", [
    ("index_wrong_shard", ["maps 1 tensor(s) to a shard that does not hold", "-of-00002",
                           "it is in", "index does not match"]),
    ("truncated_shard", ["model.safetensors"]),
    ("unknown_config_key", ["foo=1", "--allow-unknown-config-keys"]),
    ("transformers_rejects", ["rejects this config.json", "num_attention_heads"]),
    ("verify_mismatch", ["does not reproduce transformers", "nothing was kept"]),
    ("missing_expert", ["missing 1 tensor", "model.layers.1.mlp.experts.3.up_proj.weight"]),
    ("shape_mismatch", ["model.layers.0.mlp.experts.0.gate_proj.weight", "[64, 64]", "[32, 64]",
                        "config.json"]),
    ("config_disagrees", ["does not use", "model.layers.1.", "config.json disagrees"]),
    ("unknown_architecture", ["GPT2LMHeadModel", "supported", "Qwen3MoeForCausalLM"]),
    ("pickle_only", ["pytorch_model.bin", "not loaded", "safe_serialization"]),
    ("not_a_directory", ["nowhere", "not a directory"]),
    ("output_not_empty", ["not empty", "nothing was written"]),
    ("export_needs_config", ["no hf/config.json", "--hf-config"]),
    ("export_wrong_model", ["does not fit the model"]),
    ("export_not_a_checkpoint", ["a Hugging Face model, not a megatron-core checkpoint"]),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(bad_input_results, case, needles):
    r = bad_input_results[case]
    msg = r["message"]
    assert msg != "NO ERROR"
    assert "\n" not in msg and len(msg) < 600, msg
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    if case != "output_not_empty":  # that case's output is the existing checkpoint
        assert not r["output_exists"], "a failed conversion left an output directory"
    assert not r["partial_left"], "a failed conversion left a partial directory"


VLLM_MODELS = ("qwen3_moe", "mixtral", "qwen3")
VLLM_TOL = 1e-3  # fp32; measured ~5e-7


@pytest.fixture(scope="session")
def vllm_results(hf_models, tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (CPU: pip install -e '.[cpu]')")
    from tests.distributed import hf_workers

    return spawn(hf_workers.vllm_agreement, 1, str(tmp_path_factory.mktemp("vllm")),
                 {m: hf_models[m] for m in VLLM_MODELS})


@pytest.mark.parametrize("model", VLLM_MODELS)
def test_vllm_serves_the_export_with_megatron_logprobs(vllm_results, model):
    r = vllm_results[model]
    assert r["tokens"] >= 48  # 3 prompts x 2 samples x up to 16 tokens were compared
    assert r["max_abs_diff"] <= VLLM_TOL, r


def test_a_training_checkpoint_exports_to_the_same_weights(hf_models, tmp_path):
    from tests.distributed import hf_workers

    r = spawn(hf_workers.training_checkpoint_export, 1, str(tmp_path), hf_models["qwen3_moe"])
    original, exported = _tensors(hf_models["qwen3_moe"]), _tensors(r["out_dir"])
    assert sorted(original) == sorted(exported)
    assert all(torch.equal(original[k], exported[k]) for k in original)
