"""The console line's ETA and the phase memory peaks."""

from megatron_rl.observe import PhasePeaks, eta_seconds


def test_the_eta_ignores_the_first_steps_warm_up():
    # step 1 took 10 s (engine start, compilation), then 1 s a step: at step 3 of 100, 97 s left
    assert eta_seconds(3, 1, 100, first_done=10.0, now=12.0) == 97.0
    # from the run's start it would say (12 / 3) * 97 = 388 s; from step 1 alone, 990 s
    assert eta_seconds(1, 1, 100, first_done=10.0, now=10.0) is None   # no step after warm-up yet
    assert eta_seconds(100, 1, 100, first_done=10.0, now=109.0) == 0.0


def test_the_console_shows_no_eta_before_a_step_after_warm_up(tmp_path, capsys):
    from megatron_rl.observe import RunLog

    log = RunLog(tmp_path, 10, config_yaml="", tensorboard=False)
    log.log(1, {"time/step_s": 30.0})
    log.log(2, {"time/step_s": 1.0})
    first, second = capsys.readouterr().err.splitlines()
    assert "ETA" not in first and "ETA 0:" in second
    log.close()


def test_phase_peaks_report_nothing_without_a_gpu():
    import torch

    peaks = PhasePeaks()
    peaks.end("rollout")
    assert (peaks.metrics() == {}) == (not torch.cuda.is_available())


def test_advantage_stats_are_derived_from_the_reduced_sums():
    import torch

    from megatron_rl.parallel.loss import prepare_micro_batch
    from megatron_rl.parallel.cp_layout import CPShard
    from megatron_rl.train.megatron_loss import PolicyMicroBatch
    from megatron_rl.train.rl_batch import StepBatch, advantage_sums
    from megatron_rl.train.step_metrics import derive

    adv = torch.tensor([[0.5, -2.0, 9.0, 7.0], [1.5, 0.0, 3.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])   # 9, 7, 0, 8: no actions
    shard = prepare_micro_batch(CPShard.bshd(2, 4, 1, 0), mask, torch.tensor([0, 0]), None)
    mb = PolicyMicroBatch(tokens=torch.zeros(2, 4, dtype=torch.long), position_ids=None,
                          labels=None, shard=shard, old_logprobs=None, advantages=adv)
    sums = advantage_sums(StepBatch([mb], [], [None], has_logprobs=True))
    m = derive({k: float(v) for k, v in sums.items()} | {"perf/tokens": 0.0}, 1.0)
    want = torch.tensor([0.5, -2.0, 1.5, 3.0], dtype=torch.float64)
    assert abs(m["advantage/mean"] - float(want.mean())) < 1e-12
    assert abs(m["advantage/std"] - float(want.std(unbiased=False))) < 1e-12
    assert m["advantage/min"] == -2.0 and m["advantage/max"] == 3.0


def test_validation_pass_at_k_counts_prompts_with_a_solved_response():
    from megatron_rl.train.validation import val_metrics

    m = val_metrics([[0.0, 1.0, 0.5], [0.2, 0.3, 0.9], [1.0, 1.0, 1.0]],
                    [[3, 4, 5], [1, 1, 1], [2, 2, 2]], failures=0)
    assert m["val/pass@3"] == 2 / 3 and abs(m["val/reward_mean"] - 5.9 / 9) < 1e-12
    assert m["val/response_length_mean"] == 21 / 9
