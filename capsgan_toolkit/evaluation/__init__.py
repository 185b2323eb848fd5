"""Evaluation: the evaluator, image scores, the latent prior and its fitting, FLOP counting."""
