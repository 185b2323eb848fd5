"""Plugin manager and registry: entry points, broken plugins, duplicates, bad registrations."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch

import capsgan_toolkit
from capsgan_toolkit import hookspecs
from capsgan_toolkit.errors import PluginLoadError, RegistryError
from capsgan_toolkit.interfaces import Encoder, EncoderParams
from capsgan_toolkit.plugin_manager import load_plugins
from capsgan_toolkit.registry import Registry

ROOT = Path(__file__).resolve().parents[1]


def _fake_distribution(tmp_path: Path, monkeypatch, name: str, module_source: str) -> None:
    """Install a plugin distribution the way pip would, visible to importlib.metadata."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(module_source), encoding="utf-8")
    info = tmp_path / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[capsgan]\n{name} = {name}\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))


GOOD_PLUGIN = """
    import torch
    from capsgan_toolkit import hookimpl
    from capsgan_toolkit.interfaces import Encoder, EncoderParams


    class TinyEncoder(Encoder):
        '''A linear encoder from a third-party package.'''

        class Params(EncoderParams):
            scale: float = 1.0

        def __init__(self, params, *, image_shape, num_classes):
            super().__init__(params, image_shape=image_shape, num_classes=num_classes)
            self.capsule_dim = 4
            c, h, w = image_shape
            self.fc = torch.nn.Linear(c * h * w, num_classes * 4)

        def forward(self, images):
            return self.fc(images.flatten(1)).view(images.shape[0], self.num_classes, 4) * self.params.scale


    @hookimpl
    def capsgan_register(registry):
        registry.register("encoder", "tiny_linear", TinyEncoder)
"""


def test_builtins_register_through_entry_points(plugins):
    for family in ("encoder", "generator", "discriminator", "loss", "gate", "dataset"):
        assert plugins.registry.list(family), f"no built-in {family}"
    sources = {c.source for c in plugins.registry.components()}
    assert all(s.startswith("builtin_") for s in sources)
    assert all("capsgan-toolkit" in plugins.sources[s] for s in sources)


def test_third_party_entry_point_plugin_is_loaded(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, "capsgan_fake_encoder", GOOD_PLUGIN)
    loaded = load_plugins()
    comp = loaded.registry.get("encoder", "tiny_linear")
    assert comp.source == "capsgan_fake_encoder"
    assert loaded.sources["capsgan_fake_encoder"] == "capsgan_fake_encoder 1.0"
    enc = loaded.registry.create("encoder", "tiny_linear", {"scale": 2.0}, image_shape=(1, 4, 4), num_classes=3)
    assert enc(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4)


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, "capsgan_broken", "import no_such_module_anywhere\n")
    loaded = load_plugins()
    [broken] = [b for b in loaded.broken if b.name == "capsgan_broken"]
    assert broken.distribution == "capsgan_broken 1.0"
    assert "no_such_module_anywhere" in broken.error
    assert "capsgan_broken" in broken.describe()
    assert "cnn" in loaded.registry.list("encoder")


def test_plugin_whose_register_hook_raises_is_isolated(tmp_path, monkeypatch):
    source = """
        from capsgan_toolkit import hookimpl

        @hookimpl
        def capsgan_register(registry):
            raise RuntimeError("exploded while registering")
    """
    _fake_distribution(tmp_path, monkeypatch, "capsgan_explodes", source)
    loaded = load_plugins()
    assert any(b.name == "capsgan_explodes" and "exploded" in b.error for b in loaded.broken)
    assert "dcgan" in loaded.registry.list("generator")


def test_duplicate_name_is_refused_naming_both_plugins(tmp_path, monkeypatch):
    source = GOOD_PLUGIN.replace('"tiny_linear"', '"cnn"')
    _fake_distribution(tmp_path, monkeypatch, "capsgan_dupe", source)
    loaded = load_plugins()
    [broken] = [b for b in loaded.broken if b.name == "capsgan_dupe"]
    assert "builtin_cnn" in broken.error and '"cnn"' in broken.error
    # the original keeps its place
    assert loaded.registry.get("encoder", "cnn").source == "builtin_cnn"


def test_recipe_named_module_is_loaded_and_a_missing_one_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "capsgan_local_plugin.py").write_text(textwrap.dedent(GOOD_PLUGIN), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_plugins(["capsgan_local_plugin"])
    assert loaded.registry.get("encoder", "tiny_linear").source == "capsgan_local_plugin"
    with pytest.raises(PluginLoadError, match="run.plugins"):
        load_plugins(["capsgan_module_that_does_not_exist"])


class _Enc(Encoder):
    """Encoder used to test registration checks."""

    class Params(EncoderParams):
        pass


@pytest.mark.parametrize(
    "family, name, cls, message",
    [
        ("encoders", "x", _Enc, 'unknown family "encoders".*Did you mean "encoder"'),
        ("encoder", "Bad-Name", _Enc, "lowercase identifiers"),
        ("generator", "x", _Enc, "does not subclass"),
        ("encoder", "x", int, "does not subclass"),
    ],
)
def test_registry_rejects_bad_registrations(family, name, cls, message):
    reg = Registry()
    reg.current_source = "some_plugin"
    with pytest.raises(RegistryError, match=message):
        reg.register(family, name, cls)


def test_registry_rejects_non_pydantic_params():
    reg = Registry()
    with pytest.raises(RegistryError, match="not a pydantic model"):
        reg.register("encoder", "x", _Enc, params=dict)


def test_registry_lookup_suggests_close_names(registry):
    with pytest.raises(RegistryError, match='Did you mean "capsnet"'):
        registry.get("encoder", "capsnett")
    assert registry.list("loss", "*max*") == ["minimax"]


def test_registry_create_validates_params(registry):
    with pytest.raises(RegistryError, match="Bad params for encoder"):
        registry.create("encoder", "cnn", {"no_such_param": 1}, image_shape=(1, 28, 28), num_classes=10)


def test_every_hook_is_tested_and_documented():
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("capsgan_")]
    assert "capsgan_register" in hooks
    docs = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    tests = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "tests").glob("test_*.py") if p.name != Path(__file__).name)
    tests += Path(__file__).read_text(encoding="utf-8").split("def test_every_hook_is_tested_and_documented")[0]
    for hook in hooks:
        assert re.search(rf"\b{hook}\b", docs), f"hook {hook} is not documented in docs/writing-plugins.md"
        assert re.search(rf"\b{hook}\b", tests), f"hook {hook} has no test"


def test_run_event_hook_sees_training_events(tmp_path, tiny_recipe):
    from capsgan_toolkit.recipe import resolve
    from capsgan_toolkit.trainer import Trainer

    seen = []

    class Observer:
        @capsgan_toolkit.hookimpl
        def capsgan_run_event(self, event, payload):
            seen.append((event, sorted(payload)))

    loaded = load_plugins([])
    loaded.manager.register(Observer(), name="observer")
    resolved = resolve(tiny_recipe, loaded.registry)
    (tmp_path / "checkpoints").mkdir()
    Trainer(resolved, loaded, tmp_path).fit()
    events = [e for e, _ in seen]
    assert events == ["run_start", "epoch_end", "epoch_end", "run_end"]
    assert "metrics" in seen[1][1] and "summary" in seen[-1][1]
