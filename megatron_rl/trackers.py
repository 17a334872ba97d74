"""Experiment trackers beside TensorBoard: ``train.loggers: [tensorboard, wandb, mlflow]``
(rank 0 only).

Each gets the resolved config once, every logged step's metrics, and the sample generations as
text. A resumed run continues the same tracker run: its id is kept in the output directory
(``trackers.json``). Offline use is each library's own: ``WANDB_MODE=offline`` writes under
``<output_dir>/wandb``; MLflow logs to ``MLFLOW_TRACKING_URI``, by default a file store in
``<output_dir>/mlruns``. The libraries are optional (``pip install megatron-rl[trackers]``):
asking for one that is not installed fails at start-up, naming the package.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List

from megatron_rl.config.drift import flatten

TRACKERS = ("wandb", "mlflow")
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny"}


def check_installed(names) -> None:
    """``ValueError`` naming the package of each requested tracker that cannot be imported
    (``names``: ``train.loggers``; TensorBoard is not a tracker here)."""
    import importlib.util

    missing = [n for n in names if n in TRACKERS and importlib.util.find_spec(n) is None]
    if missing:
        raise ValueError(f"train.loggers: {', '.join(missing)} not installed; pip install "
                         f"{' '.join(_PACKAGES[n] for n in missing)} (or megatron-rl[trackers])")


class _Ids:
    """Tracker run ids kept in ``<run_dir>/trackers.json`` so that a resume continues the run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / "trackers.json"
        self.ids = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, name: str):
        """The id stored under ``name``, or None."""
        return self.ids.get(name)

    def put(self, name: str, value: str) -> None:
        """Store ``value`` under ``name`` and write the file."""
        self.ids[name] = value
        self.path.write_text(json.dumps(self.ids))


class WandbTracker:
    """Metrics and samples to Weights & Biases."""
    def __init__(self, run_dir: Path, project: str, name: str, config: Dict[str, Any], ids: _Ids):
        import wandb

        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config,
                              id=ids.get("wandb"), resume="allow")
        ids.put("wandb", self.run.id)

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        """Log a step's metrics."""
        self.run.log(dict(metrics), step=step)

    def text(self, step: int, rows: List[Dict[str, Any]]) -> None:
        """Log a step's samples as a table."""
        import wandb

        cols = sorted({k for r in rows for k in r})
        self.run.log({"samples": wandb.Table(columns=cols, data=[[r.get(c) for c in cols]
                                                                 for r in rows])}, step=step)

    def close(self) -> None:
        """Finish the run."""
        self.run.finish()


class MlflowTracker:
    """Metrics and samples to MLflow."""
    _BAD = re.compile(r"[^0-9A-Za-z_\-. /]")   # what MLflow allows in a metric name

    def __init__(self, run_dir: Path, project: str, name: str, config: Dict[str, Any], ids: _Ids):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # a plain directory, no server or database: MLflow 3 keeps its file store working
            # but asks for this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((Path(run_dir) / "mlruns").resolve().as_uri())
        mlflow.set_experiment(project)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_id=ids.get("mlflow"),
                                    run_name=None if ids.get("mlflow") else name)
        ids.put("mlflow", self.run.info.run_id)
        if not self.run.data.params:   # params are write-once: a resumed run has them

            mlflow.log_params({k: str(v)[:500] for k, v in flatten(config).items()})

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        """Log a step's metrics."""
        self.mlflow.log_metrics({self._BAD.sub("_", k): float(v) for k, v in metrics.items()},
                                step=step)

    def text(self, step: int, rows: List[Dict[str, Any]]) -> None:
        """Log a step's samples as a JSON-lines artifact."""
        self.mlflow.log_text("\n".join(json.dumps(r) for r in rows), f"samples/step_{step:08d}.jsonl")

    def close(self) -> None:
        """End the run."""
        self.mlflow.end_run()


def make_trackers(names, run_dir: Path, project: str, name: str,
                  config: Dict[str, Any]) -> List[Any]:
    """The trackers ``names`` asks for (wandb, mlflow), each started with the run's config."""
    ids = _Ids(run_dir)
    kinds = {"wandb": WandbTracker, "mlflow": MlflowTracker}
    return [kinds[n](Path(run_dir), project, name, config, ids) for n in names if n in kinds]
