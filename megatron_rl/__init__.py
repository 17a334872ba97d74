"""megatron_rl: reinforcement-learning post-training of Mixture-of-Experts LLMs on Megatron-Core."""

__version__ = "0.1.0"
