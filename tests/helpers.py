"""Helpers shared by the test modules: import them from here, never from another test module.

``from helpers import TINY_RECIPE, invoke, offline, random_inception_weights, write_toml``
(pytest puts this folder on ``sys.path``, as it does for ``conftest``).
"""

from __future__ import annotations

import copy
import errno
import fnmatch
import os
import re
from pathlib import Path
from unittest import mock

import torch

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
"""A recipe that trains two 3-step epochs in seconds; copy it (:func:`tiny_recipe`) before changing it."""


def tiny_recipe() -> dict:
    """A fresh deep copy of :data:`TINY_RECIPE`."""
    return copy.deepcopy(TINY_RECIPE)


def write_toml(path: Path, data: dict) -> str:
    """Write a recipe dict as TOML and return the path as a string."""
    from capsgan_toolkit.recipe.toml_io import dumps_toml

    path.write_text(dumps_toml(data) + "\n", encoding="utf-8")
    return str(path)


def invoke(*args, catch_exceptions: bool = False, **kwargs):
    """Run the ``capsgan`` command line in-process with ``args`` (made strings); return click's Result.

    Exceptions the CLI does not turn into an exit code propagate, so a traceback fails the
    test where it happens; pass ``catch_exceptions=True`` to inspect ``result.exception``
    instead (the bad-input tests do). Other keyword arguments go to ``CliRunner.invoke``.
    """
    from click.testing import CliRunner

    from capsgan_toolkit.cli.main import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=catch_exceptions, **kwargs)


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """Write a randomly initialised torch-fidelity Inception-v3 weights file (for plumbing tests only).

    Conv weights are He-normal so activations keep their scale through the 94 layers;
    the scores it gives mean nothing beyond "the pipeline runs".
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(seed)
    with mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None), \
            mock.patch.object(fe.torch, "load", return_value={}):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="-")
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


def offline(monkeypatch, tmp_path: Path) -> None:
    """No Inception weights in torch.hub's cache, and a download URL that refuses at once."""
    from capsgan_plugins import metric_features as mf

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(mf, "INCEPTION_URL", "http://127.0.0.1:9/weights-inception-2015-12-05-6726825d.pth")


class FullDiskAt:
    """Stands in for ``open`` in :mod:`capsgan_toolkit.rundir.writes`: the disk fills up at one file.

    Writes to the files whose name matches ``name`` (a glob; the temporary twin ``.NAME.tmp-PID``
    of a file counts as the file) fail
    with ENOSPC from the ``nth`` time it is opened on, after half of the data landed, as on a
    real full disk. Every other file is written normally. ``hits`` counts the failed opens.
    """

    def __init__(self, name: str, nth: int = 1):
        self.name, self.nth, self.opened, self.hits = name, nth, 0, 0

    def _targets(self, file) -> bool:
        name = Path(file).name
        twin = re.fullmatch(r"\.(.+)\.tmp-\d+", name)
        return fnmatch.fnmatch(twin.group(1) if twin else name, self.name)

    def __call__(self, file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)
        if "r" in mode or not self._targets(file):
            return handle
        self.opened += 1
        if self.opened < self.nth:
            return handle
        self.hits += 1
        real_write = handle.write

        def write(data):
            real_write(data[: len(data) // 2])  # part of it lands
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        handle.write = write
        return handle
