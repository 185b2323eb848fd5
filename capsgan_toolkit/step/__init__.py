"""One training step's machinery, each owning its recipe table: optimizers, divergence guard, EMA, augmentation, speed, CUDA graphs, several processes."""
