"""Shared fixtures: loaded plugins and a tiny recipe that trains in seconds."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TINY_RECIPE

from capsgan_toolkit.plugin.manager import load_plugins

torch.set_num_threads(min(2, torch.get_num_threads()))


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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: their tensors are tiny, and a second OpenMP
    thread only adds spin-waits, which turn into long stalls when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
