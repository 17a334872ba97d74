"""The console line's ETA and the phase memory peaks."""

from megatron_rl.observe import PhasePeaks, eta_seconds


def test_the_eta_ignores_the_first_steps_warm_up():
    # step 1 took 10 s (engine start, compilation), then 1 s a step: at step 3 of 100, 97 s left
    assert eta_seconds(3, 1, 100, first_done=10.0, now=12.0, step_s=1.0) == 97.0
    # from the run's start it would say (12 / 3) * 97 = 388 s
    assert eta_seconds(1, 1, 100, first_done=10.0, now=10.0, step_s=10.0) == 990.0
    assert eta_seconds(100, 1, 100, first_done=10.0, now=109.0, step_s=1.0) == 0.0


def test_phase_peaks_report_nothing_without_a_gpu():
    import torch

    peaks = PhasePeaks()
    peaks.end("rollout")
    assert (peaks.metrics() == {}) == (not torch.cuda.is_available())
