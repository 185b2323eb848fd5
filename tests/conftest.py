"""Shared fixtures: loaded plugins and a tiny recipe that trains in seconds."""

from __future__ import annotations

import copy

import pytest
import torch

from capsgan_toolkit.plugin_manager import load_plugins

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_RECIPE = {
    "run": {"name": "tiny", "seed": 0, "epochs": 2, "device": "cpu", "steps_per_epoch": 3, "log_every": 1},
    "data": {"plugin": "glyphs", "image_size": 28, "channels": 1, "num_train": 64, "num_test": 32, "batch_size": 8},
    "encoder": {"plugin": "cnn", "channels": 8, "capsule_dim": 4, "latent": "true_class"},
    "generator": {"plugin": "dcgan", "base_channels": 8},
    "discriminator": {"plugin": "dcgan", "base_channels": 8},
    "losses": {
        "classification": {"plugin": "margin"},
        "reconstruction": {"plugin": "mse"},
        "adversarial": {"plugin": "minimax"},
        "generator_weight": 1.0,
    },
    "optim": {"encoder_generator": {"lr": 1e-3}, "discriminator": {"lr": 1e-3}},
    "gate": {"plugin": "accuracy_band", "warmup_epochs": 1, "warmup_accuracy": 1.0},
    "checkpoint": {"every_epochs": 1, "keep_last": 2},
    "output": {"sample_images": 4},
}


@pytest.fixture(scope="session")
def plugins():
    """All installed plugins (the built-ins through their entry points)."""
    loaded = load_plugins()
    assert not loaded.broken, loaded.broken
    return loaded


@pytest.fixture
def registry(plugins):
    return plugins.registry


@pytest.fixture
def tiny_recipe():
    """A fresh copy of a recipe dict that trains two 3-step epochs in seconds."""
    return copy.deepcopy(TINY_RECIPE)


def write_toml(path, data) -> str:
    """Write a recipe dict as TOML and return the path as a string."""
    from capsgan_toolkit.recipe import dumps_toml

    path.write_text(dumps_toml(data) + "\n", encoding="utf-8")
    return str(path)
