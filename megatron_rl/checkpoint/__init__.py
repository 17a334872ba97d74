"""Checkpoints: megatron-core distributed checkpoints for training state; HF conversion (later)."""
