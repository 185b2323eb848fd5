"""The training loop: trainer, checkpointing, stepping, position and RNG state, the monitor."""
