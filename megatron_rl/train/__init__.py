"""The training step: Megatron forward/backward adapter, loss scaling, optimizer."""
