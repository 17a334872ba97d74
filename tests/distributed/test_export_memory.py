"""Export streams: each HF tensor goes to its place in the shard file as it is gathered, so the
writing runs under a memory limit of about one tensor, far below the shard it fills (4 GB by
default; a model this size is one shard)."""

import glob
import math
import os

import pytest

from tests.distributed.harness import spawn

SIZE = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, moe_intermediate_size=512, num_experts=16,
            num_experts_per_tok=2)
# the same width in 8 thinner layers: a segment (one layer, ~25 MB) is an eighth of the model
STREAM_SIZE = {**SIZE, "num_hidden_layers": 8, "num_experts": 8}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    from safetensors import safe_open

    from megatron_rl.model.tiny import write_tiny_hf_model
    from tests.distributed import export_memory_workers as w

    root = tmp_path_factory.mktemp("export_memory")
    hf = str(root / "hf")
    write_tiny_hf_model("qwen3_moe", hf, seed=0, **SIZE)
    sizes = []
    for f in glob.glob(os.path.join(hf, "*.safetensors")):
        with safe_open(f, framework="pt") as h:
            sizes += [h.get_slice(k).get_shape() for k in h.keys()]
    nbytes = [4 * math.prod(s) for s in sizes]
    # one tensor, its dtype cast and its bytes view, plus allocator slack
    limit = 3 * max(nbytes) + (24 << 20)
    out = spawn(w.export_growth, 1, hf, str(root), limit)
    return {**out, "model": sum(nbytes), "limit": limit}


def test_export_runs_under_a_memory_limit_of_about_one_tensor(result):
    r = result
    assert r["model"] > 4 * r["limit"], r             # the shard would not fit the limit
    assert not r["error"], f"the export failed under a {r['limit'] >> 20} MiB limit: {r['error']}"
    assert r["growth"] <= r["limit"], (
        f"the export's writing added {r['growth'] / 1e6:.0f} MB for a "
        f"{r['model'] / 1e6:.0f} MB model (limit {r['limit'] / 1e6:.0f} MB)")


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    from megatron_rl.model.tiny import write_tiny_hf_model
    from tests.distributed import export_memory_workers as w

    root = tmp_path_factory.mktemp("export_stream")
    hf = str(root / "hf")
    write_tiny_hf_model("qwen3_moe", hf, seed=0, **STREAM_SIZE)
    model = sum(os.path.getsize(f) for f in glob.glob(os.path.join(hf, "*.safetensors")))
    limit = model // 2            # a segment and its reads fit; the model does not
    spawn(w.import_and_export, 1, hf, str(root))
    return {"streamed": spawn(w.export_under_limit, 1, str(root), limit, True),
            "whole": spawn(w.export_under_limit, 1, str(root), limit, False),
            "model": model, "limit": limit}


def test_streamed_export_of_a_model_twice_the_memory_limit_writes_the_same_files(streamed):
    r = streamed
    assert r["model"] >= 2 * r["limit"], r
    assert not r["streamed"]["error"], (
        f"the streamed export failed under a {r['limit'] >> 20} MiB limit: {r['streamed']}")
    assert r["streamed"]["same"], "the streamed export's files differ from the whole export's"
    assert r["streamed"]["growth"] <= r["limit"], r
    # the check has teeth: the whole model does not fit the same limit
    assert r["whole"]["error"], f"the whole-model export fit the limit too: {r['whole']}"


@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2), dict(ep=2), dict(tp=2, ep=2, etp=1)],
                         ids=["tp2", "pp2", "ep2", "tp2_ep2"])
def test_streamed_export_writes_the_files_of_the_whole_model_export(tmp_path, layout):
    from megatron_rl.model.tiny import write_tiny_hf_model
    from tests.distributed import export_memory_workers as w

    hf = str(tmp_path / "hf")
    write_tiny_hf_model("qwen3_moe", hf, seed=0)
    assert spawn(w.streamed_equals_whole, 2, hf, str(tmp_path), layout)
