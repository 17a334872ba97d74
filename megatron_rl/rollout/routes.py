"""Expert routes out of the rollout engine, one payload per response, whichever build produced it.

The payload (``Sample.routed_experts``): int16 ``[n, L, K]``, ``n`` the tokens the engine ran
through the model (the prompt's and every generated token but the last, which is sampled and
never fed back: it feeds no loss term, and training routes it live), ``L`` the model's MoE layers
in order (``RouteSpec.layers``), ``K`` the top-k expert ids each chose. Row ``p`` is the route
of token ``p`` of prompt + response: the token coordinates of the trainer's ``tokens``.

Two sources, one contract:
- GPU builds: vLLM's routed-experts output (``enable_return_routed_experts``; uint8/uint16
  ``[n, num_hidden_layers, K]``, dense layers' rows unused), narrowed by ``native_routes``.
- vLLM's CPU model runner has no routed-experts output: ``RouteRecorder`` captures the ids each
  MoE router of our in-process engine selects (vLLM's own capture hook on its routers), with the
  request and position of every row of each forward, and assembles the same payload.
Every payload is checked on arrival (``check_routes``): a wrong length, an id out of range or a
token routed twice to one expert fails in one line naming the response and the layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

UNKNOWN = -1


@dataclass(frozen=True)
class RouteSpec:
    """What a route payload must look like for this model."""

    layers: Tuple[int, ...]     # the MoE layers' 0-based indices, in order
    num_experts: int
    top_k: int
    num_layers: int             # every hidden layer (the layer axis of vLLM's own output)

    @classmethod
    def of(cls, hf) -> Optional["RouteSpec"]:
        """From an ``HFModel``; None for a dense model."""
        if not hf.num_experts:
            return None
        return cls(tuple(hf.moe_layers), hf.num_experts, hf.moe_top_k, int(hf.config["num_layers"]))

    def bytes_per_token(self) -> int:
        """Host bytes one token's routes take (int16)."""
        return 2 * len(self.layers) * self.top_k


def check_routes(routes: np.ndarray, n_tokens: int, spec: RouteSpec, where: str) -> np.ndarray:
    """``routes`` as the int16 payload, after checking that it covers ``n_tokens - 1`` or
    ``n_tokens`` tokens, ``len(spec.layers)`` layers and ``spec.top_k`` ids per token, every id in
    ``[0, num_experts)`` and no id twice for one token; else ``ValueError`` naming ``where`` (the
    response) and the layer."""
    r = np.asarray(routes)
    if r.ndim != 3 or r.shape[1:] != (len(spec.layers), spec.top_k):
        raise ValueError(f"expert routes of {where}: shape {tuple(r.shape)}, expected [tokens, "
                         f"{len(spec.layers)} MoE layers, top-k {spec.top_k}]")
    if r.shape[0] not in (n_tokens - 1, n_tokens):
        raise ValueError(f"expert routes of {where}: {r.shape[0]} tokens for a sequence of "
                         f"{n_tokens} (prompt + response; expected {n_tokens - 1})")
    ids = r.astype(np.int64)
    bad = (ids < 0) | (ids >= spec.num_experts)
    if bad.any():
        t, layer, k = (int(i[0]) for i in np.nonzero(bad))
        raise ValueError(f"expert routes of {where}: MoE layer {spec.layers[layer]}, token {t}: "
                         f"expert id {int(ids[t, layer, k])} outside [0, {spec.num_experts})")
    if spec.top_k > 1:
        s = np.sort(ids, axis=-1)
        dup = (s[..., 1:] == s[..., :-1]).any(-1)
        if dup.any():
            t, layer = (int(i[0]) for i in np.nonzero(dup))
            raise ValueError(f"expert routes of {where}: MoE layer {spec.layers[layer]}, token "
                             f"{t}: expert ids {ids[t, layer].tolist()} name one expert twice")
    return ids.astype(np.int16)


def native_routes(raw, n_tokens: int, spec: RouteSpec, where: str) -> Optional[np.ndarray]:
    """vLLM's routed-experts output of one response (``[n, num_hidden_layers, K]``; None when
    vLLM dropped it, e.g. after a preemption) as the payload: its MoE layers' columns, checked."""
    if raw is None:
        return None
    r = np.asarray(raw)
    if r.ndim == 3 and r.shape[1] == spec.num_layers:
        r = r[:, list(spec.layers)]
    return check_routes(r, n_tokens, spec, where)


_REQUEST = re.compile(r"^(?:(\d+)_)?(.+)-[0-9a-zA-Z]+$")


def request_key(runner_id: str) -> Tuple[str, int]:
    """``(external request id, sample index)`` of a vLLM 0.32 engine-core request id:
    ``"<external>-<suffix>"`` for a single sample, ``"<index>_<external>-<suffix>"`` for sample
    ``index`` of a request with ``n > 1`` (the tokens a request ran are checked against its output,
    so a format change fails loudly, never mis-assigns routes)."""
    m = _REQUEST.match(runner_id)
    if m is None:
        raise ValueError(f"expert-route recorder: unexpected vLLM request id {runner_id!r}")
    return m.group(2), int(m.group(1) or 0)


class RouteRecorder:
    """Captures the routes of vLLM's CPU model runner (in this process) and hands out one payload
    per response. ``install`` runs inside the engine's worker (``collective_rpc``)."""

    def __init__(self, runner, spec: RouteSpec):
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        self.spec, self.runner = spec, runner
        self._step: Dict[int, "object"] = {}
        self._rows: List[tuple] = []
        found = {}
        for module in runner.model.modules():
            if isinstance(module, MoERunner):
                found[int(module.layer_id)] = module
        if tuple(sorted(found)) != tuple(spec.layers):
            raise ValueError(f"expert-route recorder: the engine's MoE layers {sorted(found)} are "
                             f"not the model config's {list(spec.layers)}")
        self._column = {layer: i for i, layer in enumerate(spec.layers)}
        for layer, module in found.items():
            module.router.set_capture_fn(self._capture_fn(layer))
        forward = runner._model_forward

        def recorded_forward(*args, **kwargs):
            """The runner's model forward, its routes filed under their requests."""
            self._step = {}
            out = forward(*args, **kwargs)
            self._end_step(kwargs.get("input_ids"), kwargs.get("positions"))
            return out

        runner._model_forward = recorded_forward

    @staticmethod
    def install(worker, spec: RouteSpec) -> "RouteRecorder":
        """For ``collective_rpc``: a recorder on ``worker``'s model runner."""
        return RouteRecorder(worker.model_runner, spec)

    def _capture_fn(self, layer: int):
        def capture(topk_ids):
            """vLLM's capture hook: this forward's top-k ids of one MoE layer."""
            self._step[self._column[layer]] = topk_ids.detach().to("cpu", copy=True)
        return capture

    def _end_step(self, input_ids, positions) -> None:
        """File this forward's rows under their requests (a profiling or dummy run has none)."""
        batch = self.runner.input_batch
        n_req = int(batch.num_reqs)
        if not n_req or len(self._step) != len(self.spec.layers) or positions is None \
                or input_ids is None:
            return
        starts = np.asarray(self.runner.query_start_loc.np[:n_req + 1]).copy()
        rows = int(starts[-1])
        routes = np.stack([self._step[i][:rows].numpy() for i in range(len(self.spec.layers))], 1)
        self._rows.append((list(batch.req_ids[:n_req]), starts,
                           positions[:rows].to("cpu").numpy().astype(np.int64),
                           input_ids[:rows].to("cpu").numpy().astype(np.int64),
                           routes.astype(np.int16)))

    def start(self) -> None:
        """Forget what earlier engine calls recorded."""
        self._rows = []

    def collect(self) -> Dict[Tuple[str, int], Tuple[np.ndarray, np.ndarray]]:
        """``{(external id, sample index): (token ids [n], routes [n, L, K])}`` of every request
        since ``start``, by position (a position seen twice, after a preemption, keeps the first
        pass's route: the one the following token was sampled under)."""
        per: Dict[Tuple[str, int], list] = {}
        for req_ids, starts, pos, ids, routes in self._rows:
            for i, rid in enumerate(req_ids):
                a, b = starts[i], starts[i + 1]
                per.setdefault(request_key(rid), []).append((pos[a:b], ids[a:b], routes[a:b]))
        self._rows = []
        out = {}
        for key, parts in per.items():
            pos = np.concatenate([p for p, _, _ in parts])
            n = int(pos.max()) + 1
            tokens = np.full(n, -1, dtype=np.int64)
            table = np.full((n, len(self.spec.layers), self.spec.top_k), UNKNOWN, dtype=np.int16)
            for p, i, r in reversed(parts):      # earlier passes written last: they win
                tokens[p], table[p] = i, r
            out[key] = (tokens, table)
        return out


def recorded_routes(recorded, key: Tuple[str, int], token_ids: List[int], spec: RouteSpec,
                    where: str) -> Optional[np.ndarray]:
    """The payload of one response from ``RouteRecorder.collect``'s output (``token_ids``: prompt
    + response), or None when the engine ran none of it (counted as missing by the caller)."""
    got = recorded.get(key)
    if got is None:
        return None
    tokens, table = got
    n = len(token_ids) - 1
    if len(tokens) < n or not np.array_equal(tokens[:n], np.asarray(token_ids[:n])):
        raise ValueError(f"expert-route recorder: the tokens recorded for {where} are not its "
                         "prompt and response (the vLLM request-id format changed?)")
    if (table[:n, :, 0] == UNKNOWN).any():
        return None   # a position the engine skipped (a prefix-cache hit): no full route
    return check_routes(table[:n], len(token_ids), spec, where)
