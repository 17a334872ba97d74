"""Pure tensor math of the RL algorithms: KL estimators, advantages, IS ratios, weights, losses.

Nothing here imports the distributed package, Megatron or vLLM, and nothing syncs with the host
(no scalar reads back to Python, no data-dependent shapes): every function can run inside the
training step on any device. Shapes: ``B`` sequences (responses), ``T`` padded response positions; ``mask[B,T]`` is 1 on
the policy's own action tokens and 0 on padding and environment/tool tokens.
"""

from megatron_rl.algo import advantages, dapo, kl, losses, ratios, weights

__all__ = ["advantages", "dapo", "kl", "losses", "ratios", "weights"]
