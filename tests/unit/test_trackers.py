"""wandb and MLflow beside TensorBoard, offline: the config once, each step's metrics, the
samples; a resumed run continues the same tracker run."""

from __future__ import annotations

import pytest

from megatron_rl.observe import RunLog
from megatron_rl.trackers import check_installed, make_trackers

CONFIG = {"train": {"lr": 0.001, "steps": 3}, "algo": {"loss": {"name": "gspo"}}}


def _log(run_dir, steps, names):
    log = RunLog(run_dir, 3, config_yaml="x: 1\n", tensorboard=False, quiet=True,
                 start_step=steps[0] - 1,
                 trackers=make_trackers(names, run_dir, "megatron-rl-test", "run", CONFIG))
    for s in steps:
        log.log(s, {"reward/mean": 0.1 * s, "val/pass@4": 0.5})
    log.samples(steps[-1], [{"prompt": "p", "response": "r", "reward": 1.0}])
    log.close()


def test_mlflow_gets_params_metrics_and_samples_and_a_resume_continues_its_run(tmp_path,
                                                                               monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    _log(tmp_path, [1, 2], ["mlflow"])
    _log(tmp_path, [3], ["mlflow"])          # the resumed run
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri((tmp_path / "mlruns").resolve().as_uri())
    [exp] = [e for e in MlflowClient().search_experiments() if e.name == "megatron-rl-test"]
    [run] = MlflowClient().search_runs([exp.experiment_id])
    history = MlflowClient().get_metric_history(run.info.run_id, "reward/mean")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert run.data.params["train.lr"] == "0.001" and "val/pass_4" in run.data.metrics
    artifacts = [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "samples")]
    assert artifacts == ["samples/step_00000002.jsonl", "samples/step_00000003.jsonl"]


def test_wandb_offline_writes_a_run_and_a_resume_keeps_its_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the test extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log(tmp_path, [1, 2], ["wandb"])
    first = (tmp_path / "trackers.json").read_text()
    _log(tmp_path, [3], ["wandb"])
    assert (tmp_path / "trackers.json").read_text() == first
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(list(r.glob("run-*.wandb")) for r in runs)


def test_a_tracker_that_is_not_installed_is_named_with_its_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "mlflow" else real(n, *a))
    with pytest.raises(ValueError, match=r"mlflow not installed; pip install mlflow-skinny"):
        check_installed(["mlflow"])
