"""The streaming safetensors writer (``checkpoint.safetensors_stream``, ``hf_io.HFWriter``):
files safetensors reads back bit for bit, tensors in any order, shards cut at the budget with an
index, and every way of getting the layout wrong refused in one line (a file with a tensor never
written would read as zeros)."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_rl.checkpoint.hf_io import INDEX, HFWriter
from megatron_rl.checkpoint.safetensors_stream import SafetensorsFile

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float64, torch.float8_e4m3fn]


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = [(3, 5), (7,), (2, 3, 4), (), (0, 4)][i % 5]
        x = torch.randn(shape, generator=g) * 50
        out[f"t{i}.{str(dtype).split('.')[-1]}"] = (x > 0) if dtype == torch.bool else x.to(dtype)
    return out


def test_a_streamed_file_reads_back_bit_for_bit_written_in_any_order(tmp_path):
    tensors = _tensors()
    f = SafetensorsFile(tmp_path / "x.safetensors",
                        [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    for name in reversed(list(tensors)):
        f.write(name, tensors[name])
    assert f.complete
    f.close()
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape
        assert torch.equal(back[n].reshape(-1).view(torch.uint8),
                           t.contiguous().reshape(-1).view(torch.uint8)), n
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as h:
        assert h.metadata() == {"format": "pt"}


def test_views_and_non_contiguous_tensors_are_written_as_their_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    parts = {"a": base[:, :3], "b": base.t(), "c": base[1:3]}
    f = SafetensorsFile(tmp_path / "v.safetensors",
                        [(n, tuple(t.shape), t.dtype) for n, t in parts.items()])
    for n, t in parts.items():
        f.write(n, t)
    f.close()
    back = load_file(str(tmp_path / "v.safetensors"))
    assert all(torch.equal(back[n], t) for n, t in parts.items())


def test_the_writer_cuts_shards_at_the_budget_and_indexes_them(tmp_path):
    tensors = {f"layer.{i}.w": torch.full((10, 10), float(i)) for i in range(7)}   # 400 B each
    layout = [(n, (10, 10), torch.float32) for n in tensors]
    w = HFWriter(tmp_path / "out", layout, shard_bytes=1000)
    for n in reversed(list(tensors)):
        w.add(n, tensors[n])
    weight_map = w.close()
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 2800
    for f in files:
        for n, t in load_file(str(tmp_path / "out" / f)).items():
            assert weight_map[n] == f and torch.equal(t, tensors[n])
    assert [len([n for n in weight_map if weight_map[n] == f]) for f in files] == [2, 2, 2, 1]


def test_one_file_has_no_index(tmp_path):
    w = HFWriter(tmp_path / "one", [("a", (2,), torch.float32)])
    w.add("a", torch.ones(2))
    w.close()
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["model.safetensors"]


@pytest.mark.parametrize("mistake,needle", [
    ("missing", "1 laid-out tensor(s) never written, e.g. b"),
    ("twice", "tensor 'a' written twice"),
    ("unknown", "tensor 'zz' is not in the export's layout"),
    ("shape", "tensor 'a' is (3,) torch.float32, laid out as (2,) torch.float32"),
    ("dtype", "tensor 'a' is (2,) torch.bfloat16, laid out as (2,) torch.float32"),
])
def test_a_layout_mistake_is_refused_naming_the_tensor(tmp_path, mistake, needle):
    w = HFWriter(tmp_path / "bad", [("a", (2,), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        if mistake == "missing":
            w.add("a", torch.ones(2))
            w.close()
        elif mistake == "twice":
            w.add("a", torch.ones(2))
            w.add("a", torch.ones(2))
        elif mistake == "unknown":
            w.add("zz", torch.ones(2))
        elif mistake == "shape":
            w.add("a", torch.ones(3))
        else:
            w.add("a", torch.ones(2, dtype=torch.bfloat16))
    w.abort()


def test_a_name_laid_out_twice_is_refused(tmp_path):
    with pytest.raises(ValueError, match="laid out twice"):
        HFWriter(tmp_path / "dup", [("a", (2,), torch.float32), ("a", (2,), torch.float32)])
