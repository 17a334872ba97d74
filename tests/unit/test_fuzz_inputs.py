"""Bad input ends in one clear line naming the field or file: configs and dataset rows, generated
systematically (every field of the config tree gets values of the wrong type, below its bound,
outside its choices; every kind of bad row sits at a random line among good ones). Checkpoint
directories are fuzzed in tests/distributed/test_checkpoint_resume.py and tests/e2e.

docs/reliability.md reports how many cases each family holds (458 config values, 15 layouts,
27 row kinds x 3 seeds, 7 files)."""

from __future__ import annotations

import dataclasses
import json
import random
import typing

import pytest

from megatron_rl.config import ConfigError, RunConfig, load_config, validate_world

RECIPE = "configs/recipes/tiny_moe_gspo.yaml"


def _leaves(cls, prefix=""):
    """(dotted key, type, metadata) of every scalar field of the config tree."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _leaves(t, path + ".")
        elif t in (int, float, bool, str):
            yield path, t, f.metadata


WRONG_TYPE = {int: ["abc", "1.5", "[1, 2]", "{a: 1}", "null"], float: ["abc", "[1.0]", "{a: 1}", "null"],
              bool: ["maybe", "[true]", "{a: 1}", "null"], str: ["[1, 2]", "{a: 1}", "null"]}


def _cases():
    for key, t, meta in _leaves(RunConfig):
        for v in WRONG_TYPE[t]:
            yield key, f"{key}={v}"
        if meta.get("choices"):
            yield key, f"{key}=no_such_choice"
        for bound_key in ("ge", "gt"):
            b = meta.get(bound_key)
            if b is not None and t in (int, float):
                below = b - 1 if (bound_key == "ge" and t is int) else (b - 0.5 if bound_key == "ge" else b)
                yield key, f"{key}={below}"
        if meta.get("le") is not None and t in (int, float):
            yield key, f"{key}={meta['le'] + 1}"
        head, _, tail = key.rpartition(".")
        yield f"{head}.{tail}x" if head else f"{tail}x", f"{key}x=1"   # a misspelt key


CONFIG_CASES = list(_cases())


def _one_line(msg: str) -> None:
    assert msg and "\n" not in msg and "Traceback" not in msg and len(msg) < 600, msg


def test_config_fuzz_every_field_bad_values_give_one_line_naming_the_key():
    failures = []
    for key, override in CONFIG_CASES:
        try:
            load_config(RECIPE, [override])
            failures.append(f"{override}: accepted")
        except ConfigError as e:
            msg = str(e)
            if key not in msg or "\n" in msg:
                failures.append(f"{override}: {msg!r}")
    assert len(CONFIG_CASES) > 300
    assert not failures, "\n".join(failures[:20])


IMPOSSIBLE_LAYOUTS = [
    # (overrides, world size, the key the message must name)
    (["parallel.tensor_model_parallel_size=3"], 3, "parallel"),
    (["parallel.expert_model_parallel_size=3"], 3, "parallel"),
    (["parallel.pipeline_model_parallel_size=3"], 3, "parallel"),
    (["parallel.tensor_model_parallel_size=2"], 3, "parallel"),
    (["parallel.context_parallel_size=2", "parallel.tensor_model_parallel_size=2"], 2, "parallel"),
    (["parallel.expert_model_parallel_size=8"], 8, "parallel"),
    (["parallel.pipeline_model_parallel_size=4"], 4, "parallel"),
    (["rollout.tensor_parallel_size=3"], 4, "rollout.tensor_parallel_size"),
    (["train.prompts_per_step=6"], 4, "train.prompts_per_step"),
    (["train.updates_per_step=3"], 1, "train.updates_per_step"),
    (["train.micro_batch_size=1000"], 1, "train.micro_batch_size"),
    (["rollout.n_samples_per_prompt=1"], 1, "rollout.n_samples_per_prompt"),
    (["algo.overlong.buffer_len=64"], 1, "algo.overlong.buffer_len"),
    (["data.synthetic_min_len=9", "data.synthetic_max_len=3"], 1, "data.synthetic_min_len"),
    (["data.path="], 1, "data.path"),
]


@pytest.mark.parametrize("overrides,world,key", IMPOSSIBLE_LAYOUTS,
                         ids=[" ".join(o) + f"@{w}" for o, w, _ in IMPOSSIBLE_LAYOUTS])
def test_impossible_layouts_and_sizes_are_one_line_naming_the_key(overrides, world, key):
    with pytest.raises(ConfigError) as e:
        validate_world(load_config(RECIPE, overrides), world)
    _one_line(str(e.value))
    assert key in str(e.value)


GOOD = {"prompt": "copy: a b c", "label": "a b c"}
BAD_ROWS = {
    "missing prompt": (b'{"label": "x"}', "missing field 'prompt'"),
    "prompt null": (b'{"prompt": null}', "field 'prompt'"),
    "prompt int": (b'{"prompt": 7}', "field 'prompt'"),
    "prompt float": (b'{"prompt": 1.5}', "field 'prompt'"),
    "prompt bool": (b'{"prompt": true}', "field 'prompt'"),
    "prompt object": (b'{"prompt": {"a": 1}}', "field 'prompt'"),
    "prompt list of ints": (b'{"prompt": [1, 2]}', "field 'prompt'"),
    "chat without role": (b'{"prompt": [{"content": "hi"}]}', "field 'prompt'"),
    "chat content int": (b'{"prompt": [{"role": "user", "content": 3}]}', "field 'prompt'"),
    "empty chat": (b'{"prompt": []}', "field 'prompt'"),
    "empty prompt": (b'{"prompt": ""}', "empty prompt"),
    "blank prompt": (b'{"prompt": "   \\n\\t "}', "empty prompt"),
    "metadata list": (b'{"prompt": "a", "metadata": [1]}', "metadata"),
    "row is a list": (b'["prompt", "a"]', "must be a JSON object"),
    "row is a string": (b'"just text"', "must be a JSON object"),
    "row is a number": (b'42', "must be a JSON object"),
    "truncated JSON": (b'{"prompt": "a", "lab', "invalid JSON"),
    "trailing garbage": (b'{"prompt": "a"} xyz', "invalid JSON"),
    "single quotes": (b"{'prompt': 'a'}", "invalid JSON"),
    "NaN literal row": (b'{"prompt": NaN}', "field 'prompt'"),
    "lone continuation byte": (b'{"prompt": "a\x80b"}', "invalid UTF-8"),
    "overlong encoding": (b'{"prompt": "\xc0\xaf"}', "invalid UTF-8"),
    "surrogate bytes": (b'{"prompt": "\xed\xa0\x80"}', "invalid UTF-8"),
    "latin-1 text": (b'{"prompt": "caf\xe9"}', "invalid UTF-8"),
    "truncated multibyte": (b'{"prompt": "\xe2\x82"}', "invalid UTF-8"),
    "utf-16 bom": (b'\xff\xfe{\x00', "invalid UTF-8"),
    "nul bytes": (b'\x00\x00\x00', "invalid JSON"),
}


@pytest.mark.parametrize("seed", range(3))
def test_dataset_row_fuzz_each_bad_row_is_named_by_file_and_line(tmp_path, seed):
    from megatron_rl.data.prompts import load_prompts

    rng = random.Random(seed)
    failures = []
    for name, (raw, evidence) in BAD_ROWS.items():
        n_good = rng.randrange(0, 30)
        lines = [json.dumps(GOOD).encode()] * n_good
        at = rng.randrange(0, n_good + 1)
        lines.insert(at, raw)
        path = tmp_path / f"rows_{seed}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            load_prompts(str(path))
            failures.append(f"{name}: accepted")
            continue
        except ValueError as e:
            msg = str(e)
        if f"{path}:{at + 1}:" not in msg or evidence not in msg or "\n" in msg:
            failures.append(f"{name} at line {at + 1}: {msg!r}")
        # with on_bad_row=skip the same file loads its good rows and reports the bad one
        if n_good:
            report = load_prompts(str(path), on_bad_row="skip")
            if len(report.rows) != n_good or report.skipped[0][0] != f"{path}:{at + 1}":
                failures.append(f"{name}: skip mode kept {len(report.rows)} of {n_good}")
    assert not failures, "\n".join(failures)


BAD_FILES = {
    "missing": (None, "does not exist"),
    "empty": (b"", "no usable rows"),
    "only blank lines": (b"\n\n  \n", "no usable rows"),
    "binary garbage": (bytes(range(256)) * 4, "invalid"),
    "wrong extension": ("txt", "is not a .jsonl/.json/.parquet file"),
    "a directory": ("dir", "is a directory with no .jsonl, .json, .parquet file"),
    "garbage parquet": ("parquet", "not a readable Parquet file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_dataset_files_are_one_line_naming_the_file(tmp_path, name):
    from megatron_rl.data.prompts import load_prompts

    content, evidence = BAD_FILES[name]
    path = tmp_path / "data.jsonl"
    if content == "txt":
        path = tmp_path / "data.txt"
        path.write_text(json.dumps(GOOD))
    elif content == "dir":
        path.mkdir()
    elif content == "parquet":
        path = tmp_path / "data.parquet"
        path.write_bytes(b"PAR1 this is not parquet")
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        load_prompts(str(path))
    _one_line(str(e.value))
    assert str(path) in str(e.value) and evidence in str(e.value)


def test_over_long_prompts_are_found_before_the_first_step(tmp_path):
    """Every prompt is measured when the stream is built, not when the sampler reaches it hours
    into a run; ``on_bad_row=skip`` drops them and says how many."""
    from megatron_rl.data.prompts import load_prompts
    from megatron_rl.data.synthetic import word_tokenizer
    from megatron_rl.train.setup import PromptStream

    tok = word_tokenizer()
    rows = [GOOD] * 5 + [{"prompt": " ".join(["a"] * 50), "label": "x"}] + [GOOD] * 3
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_prompts(str(path)).rows
    with pytest.raises(ConfigError) as e:
        PromptStream(loaded, tok, chat=False, max_tokens=16, seed=0, shuffle=True)
    _one_line(str(e.value))
    assert "row 5" in str(e.value) and "rollout.max_prompt_len=16" in str(e.value)
    stream = PromptStream(loaded, tok, chat=False, max_tokens=16, seed=0, shuffle=True,
                          drop_too_long=True)
    assert len(stream.rows) == 8 and stream.dropped == 1
