"""Export streams: each HF tensor goes to its place in the shard file as it is gathered, so the
writing adds about one tensor to the process, not the shard it fills (4 GB by default; a model
this size is one shard)."""

import glob
import os

import pytest

from tests.distributed.harness import spawn

SIZE = dict(vocab_size=4096, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64, moe_intermediate_size=512, num_experts=16,
            num_experts_per_tok=2)


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
    nbytes = [4 * __import__("math").prod(s) for s in sizes]
    out = spawn(w.export_growth, 1, hf, str(root))
    return {**out, "model": sum(nbytes), "largest": max(nbytes)}


def test_export_adds_about_one_tensor_not_the_shard(result):
    r = result
    assert r["model"] > 100e6, r                       # the shard is big enough to be seen
    # one tensor, its dtype cast and its bytes view, plus allocator slack
    assert r["growth"] <= 3 * r["largest"] + 24e6, (
        f"the export's writing added {r['growth'] / 1e6:.0f} MB for a "
        f"{r['model'] / 1e6:.0f} MB model whose largest tensor is {r['largest'] / 1e6:.0f} MB")
