"""Distributed checkpoints: an interrupted run resumes bit-identically; saves are atomic."""

import pytest

from tests.distributed.conftest import RESUME_LAYOUTS


@pytest.mark.parametrize("layout", sorted(RESUME_LAYOUTS))
def test_train_save_train_equals_load_train_bit_for_bit(resume_results, layout):
    # 3 steps, save, 3 more  vs  fresh model (other seed), load, the same 3 steps; distributed
    # optimizer (Adam moments, step count), cosine LR schedule with warm-up, RNG states
    r = resume_results[layout]
    assert r["resumed"] == r["straight"]
    assert r["identical_weights"]
    assert r["trainer_state"] == {"consumed": 3} and r["latest"] == 3


def test_only_the_last_n_checkpoints_are_kept(hygiene_results):
    assert hygiene_results["kept"] == ["step_00000002", "step_00000003"]


def test_a_half_written_save_never_becomes_latest(hygiene_results):
    assert hygiene_results["latest"] == 3 and hygiene_results["state"] == {"step": 3}
    assert hygiene_results["tmp_left"]  # the debris stays for inspection, but is never loaded
    assert "no manifest.json" in hygiene_results["partial_error"]


def test_a_clean_checkpoint_resumes(integrity_results):
    assert integrity_results["clean"] == {"step": 2, "warned": []}


def test_a_truncated_file_is_named_and_not_loaded(integrity_results):
    r, shard = integrity_results, integrity_results["shard"]
    err = r["truncated"]["error"]
    assert f"step_00000002: {shard} is truncated" in err and "train.resume_fallback=true" in err
    assert "\n" not in err


def test_fallback_to_the_previous_complete_checkpoint_only_when_allowed(integrity_results):
    r = integrity_results["truncated_fallback"]
    assert r["step"] == 1 and "is truncated" in r["warned"][0]


def test_an_altered_byte_is_found_by_its_checksum(integrity_results):
    shard = integrity_results["shard"]
    assert f"{shard} was altered (its SHA-256 differs" in integrity_results["altered"]["error"]


def test_a_damaged_or_missing_manifest_is_refused(integrity_results):
    assert "manifest.json is damaged" in integrity_results["bad_manifest"]["error"]
    assert "no manifest.json" in integrity_results["no_manifest"]["error"]


def test_no_complete_checkpoint_left_is_an_error_not_a_fresh_start(integrity_results):
    err = integrity_results["none_left"]["error"]
    assert "no complete checkpoint to resume from" in err and "choose a new train.output_dir" in err


@pytest.mark.parametrize("case", ["deleted", "cut", "empty", "garbled"])
@pytest.mark.parametrize("fallback", [False, True])
def test_resume_takes_the_newest_complete_checkpoint_whatever_latest_says(
        latest_damage_results, case, fallback):
    """`latest` deleted, cut from 30 to 3, emptied or garbled: step 30 is resumed (not a fresh
    start at step 1), and the disagreement is reported in one line."""
    r = latest_damage_results[case + ("_fallback" if fallback else "")]
    assert r.get("step") == 30, r
    said = {"deleted": "latest is missing", "cut": "latest names step 3,",
            "empty": "expected a step number, found ''",
            "garbled": "expected a step number, found 'banana'"}[case]
    assert len(r["warned"]) == 1 and said in r["warned"][0]
    assert "newest complete checkpoint is step_00000030" in r["warned"][0]


def test_a_save_never_deletes_a_checkpoint_newer_than_itself(latest_damage_results):
    r = latest_damage_results
    assert r["after_early_save"] == ["step_00000001", "step_00000025", "step_00000030"]


def test_a_checkpoint_mixing_two_runs_is_refused(latest_damage_results):
    r = latest_damage_results
    assert r["run_ids"][0] == r["run_ids"][1] and r["run_ids"][0]   # saved: one run id in both
    err = r["mixed"]["error"]
    assert "mixes two runs" in err and "another-run" in err and "\n" not in err


def test_a_latest_pointer_without_any_checkpoint_stops_the_run(latest_damage_results):
    err = latest_damage_results["no_directories_left"]["error"]
    assert "no step_* checkpoint directory is left" in err


def test_a_forged_checkpoint_with_a_matching_manifest_runs_no_code(integrity_results):
    r = integrity_results["forged"]
    assert "holds objects that loading would have to execute" in r["error"]
    assert "refused to unpickle" in r["error"] and not r["ran"]


@pytest.mark.parametrize("case", ["nan_loss_on_rank1", "inf_grad_on_rank1"])
def test_a_nonfinite_update_is_skipped_on_every_rank_touching_nothing(nonfinite_results, case):
    r = nonfinite_results[case]
    # rank 0's result. The NaN loss on rank 1 reaches rank 0's gradients through the DP reduce;
    # the Inf written into rank 1's gradient after the reduce does not, and rank 0 still skips
    assert r["local_flag"] == (0.0 if case == "inf_grad_on_rank1" else 1.0)
    assert not r["applied"]
    assert r["weights_untouched"] and r["optimizer_untouched"] and r["schedule_untouched"]


def test_a_clean_step_after_skipped_ones_applies(nonfinite_results):
    assert nonfinite_results["clean_step_moves_weights"]


CKPT_DIR_CASES = {
    # case: what the one-line error must say (after the directory's name)
    "same model <- missing": "nope: does not exist",
    "same model <- empty dir": "not a megatron-core distributed checkpoint",
    "same model <- a file": "file.bin: is a file",
    "same model <- random files": "not a megatron-core distributed checkpoint",
    "same model <- hf model dir": "a Hugging Face model, not a megatron-core checkpoint",
    "same model <- no manifest": "no manifest.json",
    "same model <- no metadata": "not a megatron-core distributed checkpoint",
    "same model <- no .metadata": ".metadata is missing",
    "same model <- truncated shard": "is truncated",
    "wider model <- good": "does not fit the model",
    "more experts <- good": "does not fit the model",
    "other architecture <- good": "does not fit the model",
}


def test_checkpoint_dir_fuzz_each_case_is_one_line_naming_the_problem(ckpt_dir_fuzz_results):
    r = ckpt_dir_fuzz_results
    assert set(r) == set(CKPT_DIR_CASES)
    for case, evidence in CKPT_DIR_CASES.items():
        msg = r[case]
        assert evidence in msg and "\n" not in msg and len(msg) < 700, (case, msg)


@pytest.mark.parametrize("case", ["tp2_to_dp2", "dp2_to_tp2", "pp2_to_dp2", "cp2_to_dp2",
                                  "ep2_same_layout", "dp_reshardable_cp2_to_dp2"])
def test_optimizer_state_resumes_under_a_layout_its_format_allows(reshard_results, case):
    """The two steps after the load give the losses of the run that never stopped, within
    float32 rounding (another layout sums in another order): the first shows the weights, the
    second the Adam moments, step and LR schedule, which the weights alone do not reproduce."""
    r = reshard_results[case]
    assert not r["error"], r["error"]
    for got, want in zip(r["resumed"], r["straight"]):
        assert abs(got - want) <= 1e-6 * abs(want), r
    fresh = reshard_results["tp2_to_dp2_weights_only"]
    assert abs(fresh["resumed"][0] - fresh["straight"][0]) <= 1e-6 * abs(fresh["straight"][0])
    assert abs(fresh["resumed"][1] - fresh["straight"][1]) > 1e-4 * abs(fresh["straight"][1])


@pytest.mark.parametrize("case,needle", [
    ("ep2_to_dp2", "expert parallelism cannot change across a resume"),
    ("dp_reshardable_tp2_to_dp2", "save with train.optimizer_checkpoint=fully_reshardable"),
])
def test_a_layout_change_the_format_cannot_follow_is_refused_in_one_line(reshard_results, case,
                                                                         needle):
    err = reshard_results[case]["error"]
    assert "cannot follow this layout change" in err and needle in err and "\n" not in err


@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_optimizer_state_resumes_on_fewer_data_parallel_ranks(dp_world_results, fmt):
    r = dp_world_results[fmt]
    for got, want in zip(r["resumed"], r["straight"]):
        assert abs(got - want) <= 1e-6 * abs(want), r
