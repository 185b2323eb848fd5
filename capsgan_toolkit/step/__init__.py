"""One training step's machinery, each module owning its recipe table.

Optimizers, the divergence guard, EMA, augmentation, speed options, CUDA graphs, several processes.
"""
