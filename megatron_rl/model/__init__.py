"""Model construction (Megatron-Core GPTModel with MoE layers) and its config section."""
