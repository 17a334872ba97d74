"""Prompt data: rows load or fail naming file and line; the sampler resumes; shards keep groups."""

import json
import pathlib

import pytest

from megatron_rl.data.prompts import (PromptRow, PromptSampler, load_prompts, render_prompt,
                                       shard_for_rank)
from megatron_rl.data.synthetic import TASKS, make_rows, word_tokenizer, write_jsonl
from megatron_rl.rewards import score

BAD_LINES = [
    (b'{"prompt": "ok", "label": "1"}\n', None),
    (b'{"label": "1"}\n', "missing field 'prompt'"),
    (b'{"prompt": 7}\n', "non-empty string or list"),
    (b'{"prompt": "   "}\n', "empty prompt"),
    (b'{"prompt": [{"role": "user"}]}\n', "'role' and 'content'"),
    (b'["not", "an", "object"]\n', "must be a JSON object"),
    (b'{"prompt": "x", \n', "invalid JSON"),
    (b'{"prompt": "\xff\xfe"}\n', "invalid UTF-8"),
    (b'{"prompt": "x", "metadata": 3}\n', "'metadata' must be an object"),
]


@pytest.mark.parametrize("line,needle", [b for b in BAD_LINES if b[1]])
def test_a_malformed_row_is_an_error_naming_file_and_line(tmp_path, line, needle):
    p = tmp_path / "d.jsonl"
    p.write_bytes(BAD_LINES[0][0] + line)
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: .*{needle}"):
        load_prompts(str(p))


def test_malformed_rows_can_be_skipped_and_counted(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"".join(line for line, _ in BAD_LINES) + b"\n")  # + a blank line
    rep = load_prompts(str(p), on_bad_row="skip")
    assert [r.prompt for r in rep.rows] == ["ok"]
    assert [n.rsplit(":", 1)[1] for n, _ in rep.skipped] == [
        str(i) for i in range(2, len(BAD_LINES) + 1)]


def test_parquet_rows_load_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed")
    import pyarrow.parquet as pq

    rows = make_rows("sort", 5, seed=1)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    rep = load_prompts(str(tmp_path / "d.parquet"))
    assert [(r.prompt, r.label) for r in rep.rows] == [(r["prompt"], r["label"]) for r in rows]


def test_sampler_resumes_with_the_same_next_prompts():
    a = PromptSampler(7, seed=3)
    a.next_indices(5)
    state = a.state_dict()
    want = a.next_indices(12)                     # crosses two epoch boundaries
    b = PromptSampler(7, seed=3)
    b.load_state_dict(json.loads(json.dumps(state)))
    assert b.next_indices(12) == want
    epoch = PromptSampler(7, seed=3).next_indices(7)
    assert sorted(epoch) == list(range(7))        # an epoch sees every row once


def test_dp_shards_are_whole_prompts_and_cover_the_step():
    step = list(range(8))
    shards = [shard_for_rank(step, r, 4) for r in range(4)]
    assert sum(shards, []) == step
    with pytest.raises(ValueError, match="multiple of the data-parallel size 3"):
        shard_for_rank(step, 0, 3)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_synthetic_labels_score_one_and_tokenise_without_unknowns(task, tmp_path):
    rows = make_rows(task, 20, seed=0)
    tok = word_tokenizer()
    rep = load_prompts(str(write_jsonl(rows, tmp_path / "t.jsonl")))
    for row in rep.rows:
        assert score("exact_match", row.label, row.label).score == 1.0
        ids = render_prompt(row, tok, chat=False, max_tokens=64)
        assert tok.unk_token_id not in ids and tok.decode(ids) == row.prompt
    assert make_rows(task, 20, seed=0) == rows    # deterministic


def test_an_overlong_prompt_is_named():
    row = PromptRow(3, "sort 1 2 3 4 5 =")
    with pytest.raises(ValueError, match="row 3 has 7 tokens, more than rollout.max_prompt_len=4"):
        render_prompt(row, word_tokenizer(), chat=False, max_tokens=4)


def test_the_long_task_answers_with_its_pattern_for_answer_len_words():
    rows = make_rows("repeat", 5, min_len=2, max_len=3, seed=0, answer_len=2000)
    for row in rows:
        pattern = row["prompt"].split()[1:-1]
        words = row["label"].split()
        assert len(words) == 2000 and 2 <= len(pattern) <= 3
        assert words == [pattern[i % len(pattern)] for i in range(2000)]
    with pytest.raises(ValueError, match="applies to synthetic:repeat only, not synthetic:copy"):
        make_rows("copy", 5, answer_len=100)


def _verl_rows(n=4):
    """verl's parquet schema: chat-message prompts, the answer under reward_model.ground_truth."""
    return [{"data_source": "openai/gsm8k",
             "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
             "extra_info": {"split": "train", "index": i}} for i in range(n)]


def test_a_verl_parquet_loads_as_is_with_a_dotted_label_and_its_metadata(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow not installed")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_verl_rows()), tmp_path / "train.parquet")
    rep = load_prompts(str(tmp_path / "train.parquet"), label_key="reward_model.ground_truth")
    assert [r.label for r in rep.rows] == ["0", "2", "4", "6"]
    assert rep.rows[1].prompt == [{"role": "user", "content": "What is 1 + 1?"}]
    assert rep.rows[1].metadata["data_source"] == "openai/gsm8k"
    assert rep.rows[1].metadata["extra_info"] == {"split": "train", "index": 1}
    # the default label key finds nothing there: an error naming the key, the count and the
    # keys the rows do have, never a run that scores None as 0 every step
    with pytest.raises(ValueError, match=r"data.label_key: 'label' is missing or null in 4 of 4 "
                                         r"rows .*reward_model.ground_truth"):
        load_prompts(str(tmp_path / "train.parquet"))


def test_a_missing_label_is_an_error_unless_skipped_or_allowed(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "label": "2"}\n'
                 '{"prompt": "c", "label": null}\n')
    with pytest.raises(ValueError, match=r"missing or null in 2 of 3 rows \(first at .*d.jsonl:1, "
                                         r"whose keys are prompt, answer\)"):
        load_prompts(str(p))
    skipped = load_prompts(str(p), on_missing_label="skip")
    assert [r.prompt for r in skipped.rows] == ["b"] and len(skipped.skipped) == 2
    allowed = load_prompts(str(p), on_missing_label="allow")
    assert [r.label for r in allowed.rows] == [None, "2", None]
    assert [r.label for r in load_prompts(str(p), label_key="answer",
                                          on_missing_label="allow").rows] == ["1", None, None]


def test_json_arrays_directories_and_globs_load_every_file_in_order(tmp_path):
    (tmp_path / "shards").mkdir()
    for k in range(3):
        rows = [{"prompt": f"p{k}{i}", "label": str(i)} for i in range(2)]
        (tmp_path / "shards" / f"part-{k}.json").write_text(json.dumps(rows))
    (tmp_path / "shards" / "README.txt").write_text("not data")
    by_dir = load_prompts(str(tmp_path / "shards"))
    assert [r.prompt for r in by_dir.rows] == ["p00", "p01", "p10", "p11", "p20", "p21"]
    assert [r.index for r in by_dir.rows] == list(range(6))
    by_glob = load_prompts(str(tmp_path / "shards" / "part-[12].json"))
    assert [r.prompt for r in by_glob.rows] == ["p10", "p11", "p20", "p21"]
    with pytest.raises(ValueError, match="matches no file"):
        load_prompts(str(tmp_path / "shards" / "*.parquet"))
    (tmp_path / "obj.json").write_text('{"prompt": "x"}')
    with pytest.raises(ValueError, match="must hold an array of row objects"):
        load_prompts(str(tmp_path / "obj.json"))


def test_skipped_rows_are_reported_with_their_count_and_first_reason(tmp_path):
    from megatron_rl.config import load_config
    from megatron_rl.train.setup import load_rows

    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "label": "1"}\n{"prompt": 7}\n{"prompt": "c"}\n')
    recipe = pathlib.Path(__file__).resolve().parents[2] / "configs/recipes/tiny_moe_gspo.yaml"
    cfg = load_config(recipe, [f"data.path={p}", "data.on_bad_row=skip",
                               "data.on_missing_label=skip"])
    notes = []
    rows = load_rows(cfg, notes)
    assert [r.prompt for r in rows] == ["a"]
    assert len(notes) == 1 and "2 row(s) of" in notes[0] and "d.jsonl:2" in notes[0]


def test_chat_template_kwargs_reach_every_rendering():
    from megatron_rl.data.prompts import with_template_kwargs

    tok = word_tokenizer()
    tok.chat_template = ("{% if enable_thinking is defined and not enable_thinking %}b {% endif %}"
                         "{{ messages[0]['content'] }}")
    row = PromptRow(0, [{"role": "user", "content": "a"}])
    plain = render_prompt(row, tok, chat=True, max_tokens=16)
    tok = with_template_kwargs(tok, {"enable_thinking": False})
    assert render_prompt(row, tok, chat=True, max_tokens=16) == tok.encode("b a", add_special_tokens=False)
    assert plain == tok.encode("a", add_special_tokens=False)
    # a call's own value wins
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                   enable_thinking=True) == "a"
