"""Prompt data: rows load or fail naming file and line; the sampler resumes; shards keep groups."""

import json

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
    assert [n for n, _ in rep.skipped] == list(range(2, len(BAD_LINES) + 1))


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
