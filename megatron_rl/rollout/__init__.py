"""Rollout generation (vLLM engine, weight sync) and its config section."""
