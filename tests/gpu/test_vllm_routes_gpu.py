"""vLLM's own routed-experts output on a GPU build, through our engine wrapper: the payload the CPU
recorder's tests pin (int16 ``[prompt + response - 1, MoE layers, top-k]``, checked on arrival),
and the routes themselves against the routers of transformers' model on the same weights.

Needs a CUDA GPU and vLLM's GPU build (the Docker image); skipped, saying which is missing,
elsewhere. The bare lent GPU machine has no vLLM (it cannot be carried there), so this runs where
users run: ``make gpu-check`` inside the image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _hf_routes(model_dir: str, ids, layers, top_k: int) -> np.ndarray:
    """``[len(ids), L, K]``: transformers' router choices for every token (fp32, one sequence)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).cuda()
    with torch.no_grad():
        out = model(torch.tensor([ids], device="cuda"), output_router_logits=True)
    logits = [out.router_logits[i] for i in range(len(layers))]
    return torch.stack([lg.float().topk(top_k, -1).indices for lg in logits], 1).cpu().numpy()


def test_vllm_native_routes_follow_the_payload_contract_and_the_models_routers(tmp_path):
    pytest.importorskip("vllm", reason="needs vLLM's GPU build (the Docker image); the bare lent "
                                       "GPU machine has none")
    from megatron_rl.model.hf_config import load_hf_config
    from megatron_rl.model.tiny import write_tiny_hf_model
    from megatron_rl.rollout.engine import EngineSettings, RolloutEngine
    from megatron_rl.rollout.routes import RouteSpec

    hf_dir = tmp_path / "qwen3_moe"
    write_tiny_hf_model("qwen3_moe", hf_dir, seed=3)
    spec = RouteSpec.of(load_hf_config(str(hf_dir)))
    engine = RolloutEngine(EngineSettings(str(hf_dir), dtype="float32", max_model_len=128,
                                          seed=1, routes=spec, sleep_mode=False,
                                          gpu_memory_utilization=0.3))
    prompts = [[5, 17, 3, 99, 42], [7, 8, 9], list(range(10, 40))]
    groups = engine.generate(prompts, n=4, max_tokens=16, seed=11)
    engine.shutdown()
    agree, slots = 0, 0
    for group in groups:
        for s in group:
            assert not s.routes_missing
            r = s.routed_experts
            assert r.dtype == np.int16 and r.shape == (len(s.prompt_ids) + len(s.token_ids) - 1,
                                                       len(spec.layers), spec.top_k)
            ids = s.prompt_ids + s.token_ids[:-1]
            want = _hf_routes(str(hf_dir), ids, spec.layers, spec.top_k)
            agree += sum(len(set(a) & set(b)) for a, b in zip(r.reshape(-1, spec.top_k).tolist(),
                                                               want.reshape(-1, spec.top_k).tolist()))
            slots += r.size
    assert agree / slots >= 0.99, f"vLLM's routes agree with transformers' on {agree / slots:.4f}"
