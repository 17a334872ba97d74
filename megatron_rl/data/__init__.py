"""Prompt datasets and the synthetic tasks of the CPU demo."""
