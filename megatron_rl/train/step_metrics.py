"""A step's metrics before and after the world's reduction (``parallel.metrics_comm``): what each
rank adds to the sum, and the metrics derived from the reduced sums."""

from __future__ import annotations

from typing import Dict

from megatron_rl.algo.value import explained_variance_from_moments

# the same on every rank (the optimizers' global norms and counts)
EVERY_RANK = ("train/grad_norm", "train/updates", "train/skipped_updates",
              "critic/skipped_updates")
EV_KEYS = ("critic/ev/n", "critic/ev/g", "critic/ev/g2", "critic/ev/r", "critic/ev/r2")


def rank_shares(sums: Dict[str, float], tp: int, world: int) -> Dict[str, float]:
    """What this rank adds to the world's sum: loss metrics are partial sums over DP x CP,
    repeated on the TP ranks of a position; optimizer metrics are repeated on every rank."""
    out = {}
    for k, v in sums.items():
        if k.endswith("/max"):
            out[k] = v
        else:
            every = k in EVERY_RANK or k.endswith("/grad_norm")   # epoch<k>/grad_norm
            out[k] = v / (world if every else tp)
    return out


def derive(m: Dict[str, float], seconds: float) -> Dict[str, float]:
    """Ratios of reduced sums, in place: the mismatch means, the routers' agreement with the
    engine, tokens per second and the critic's explained variance (of the rollout's values
    against the returns)."""
    import torch

    if m.get("mismatch/tokens"):
        n = m.pop("mismatch/tokens")
        m["mismatch/mean"] = m.pop("mismatch/abs_sum") / n
        m["mismatch/k1"] = m.pop("mismatch/k1_sum") / n
        m["mismatch/k3"] = m.pop("mismatch/k3_sum") / n
    if m.get("r3/slots"):
        m["r3/route_agreement"] = m.pop("r3/agree_slots") / m.pop("r3/slots")
    if m.get("advantage/tokens"):
        n = m.pop("advantage/tokens")
        mean = m.pop("advantage/sum") / n
        m["advantage/mean"] = mean
        m["advantage/std"] = max(m.pop("advantage/sumsq") / n - mean * mean, 0.0) ** 0.5
        m["advantage/min"] = -m.pop("advantage/neg_min/max")
    if EV_KEYS[0] in m:
        moments = torch.tensor([m.pop(k) for k in EV_KEYS], dtype=torch.float64)
        m["critic/explained_variance"] = float(explained_variance_from_moments(moments))
    m["time/step_s"] = seconds
    m["perf/tokens_per_s"] = m.pop("perf/tokens") / max(seconds, 1e-9)
    return m


class BadSteps:
    """Counts steps in a row whose updates were skipped for NaN/Inf (the skip itself happens in
    ``optimizer_step``, on every rank alike). The metrics are already reduced, so every rank
    decides the same without a collective."""

    def __init__(self, limit: int):
        self.limit, self.count, self.last_good = limit, 0, 0

    def update(self, step: int, metrics: Dict[str, float]):
        """The stop line when ``limit`` (0: never) is reached at ``step``, else None."""
        if metrics.get("train/skipped_updates", 0.0) > 0:
            self.count += 1
        else:
            self.count, self.last_good = 0, step
        if not self.limit or self.count < self.limit:
            return None
        return (f"stopping: {self.count} steps in a row (to step {step}) had a NaN/Inf loss or "
                f"gradient, so their updates were skipped; the checkpoint of step {step} holds the "
                f"weights and optimizer state as of step {self.last_good}. Look at reward/* and "
                "train/grad_norm before the first skip; lower train.lr or train.max_grad_norm, or "
                "raise train.max_bad_steps to wait longer")
