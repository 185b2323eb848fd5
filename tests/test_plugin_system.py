"""Plugin manager and registry: entry points, broken plugins, duplicates, bad registrations."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path

import pytest
import torch

import capsgan_toolkit
from capsgan_toolkit.errors import NameClashError, PluginError, PluginLoadError, RegistryError
from capsgan_toolkit.interfaces import Encoder, EncoderParams
from capsgan_toolkit.plugin import spec as hookspecs
from capsgan_toolkit.plugin.manager import STRICT_ENV, load_plugins
from capsgan_toolkit.plugin.registry import PluginOrigin, Registry

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _fake_distribution(tmp_path: Path, monkeypatch, name: str, module_source: str, *,
                       dist: str | None = None, entry: str | None = None) -> None:
    """Install a plugin distribution the way pip would, visible to importlib.metadata.

    The module is ``name``; the distribution (``dist``) and its entry point (``entry``)
    are called ``name`` too unless given.
    """
    dist, entry = dist or name, entry or name
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(module_source), encoding="utf-8")
    info = tmp_path / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[capsgan]\n{entry} = {name}\n", encoding="utf-8")
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
    # Third-party capsgan plugins installed beside the toolkit add components of their own: only the
    # toolkit's own entry points are checked here (a researcher's venv must not fail this test).
    builtin = [c for c in plugins.registry.components() if "capsgan-toolkit" in plugins.sources.get(c.source, "")]
    families = {c.family for c in builtin}
    for family in ("encoder", "generator", "discriminator", "gate", "dataset"):
        assert family in families, f"no built-in {family}"
    assert all(f in families for f in plugins.registry.families if "loss" in f)
    assert {c.source for c in builtin} and all(c.source.startswith("builtin_") for c in builtin)
    assert {c.name for c in builtin} >= {"capsnet", "cnn", "dcgan", "glyphs", "margin", "mse", "minimax"}


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
    assert "capsgan_broken" in broken.describe() and "could not be imported" in broken.describe()
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


def test_a_builtins_name_stays_the_builtins_and_the_third_party_is_reachable_qualified(tmp_path, monkeypatch):
    source = GOOD_PLUGIN.replace(
        'registry.register("encoder", "tiny_linear", TinyEncoder)',
        'registry.register("encoder", "cnn", TinyEncoder)\n        registry.register("encoder", "tiny_linear", TinyEncoder)',
    )
    _fake_distribution(tmp_path, monkeypatch, "capsgan_dupe", source)
    loaded = load_plugins()
    assert not loaded.broken, loaded.broken
    # the original keeps its place; the newcomer is there under its distribution's name
    assert loaded.registry.get("encoder", "cnn").source == "builtin_cnn"
    assert loaded.registry.get("encoder", "capsgan-dupe:cnn").source == "capsgan_dupe"
    assert loaded.registry.get("encoder", "capsgan-toolkit:cnn").source == "builtin_cnn"
    assert loaded.registry.get("encoder", "tiny_linear").source == "capsgan_dupe"  # its other names: untouched
    assert {"cnn", "capsgan-dupe:cnn", "tiny_linear"} <= set(loaded.registry.list("encoder"))
    [warning] = [w for w in loaded.warnings if "capsgan_dupe" in w]
    assert "built-in" in warning and 'plugin = "capsgan-dupe:cnn"' in warning and "\n" not in warning


CLASH_A = GOOD_PLUGIN.replace(
    'registry.register("encoder", "tiny_linear", TinyEncoder)',
    'registry.register("encoder", "vit", TinyEncoder)\n        registry.register("encoder", "vit_small", TinyEncoder)',
)
CLASH_B = GOOD_PLUGIN.replace(
    'registry.register("encoder", "tiny_linear", TinyEncoder)',
    'registry.register("encoder", "vit", TinyEncoder, description="The lite one.")\n'
    '        registry.register("encoder", "vit_lite", TinyEncoder)',
)


def _two_vits(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, "capsgan_vit_mod", CLASH_A, dist="capsgan-vit", entry="vit")
    _fake_distribution(tmp_path, monkeypatch, "vitlite_mod", CLASH_B, dist="capsgan-vit-lite", entry="vit")


def test_a_name_two_third_parties_register_is_refused_for_both(tmp_path, monkeypatch):
    _two_vits(tmp_path, monkeypatch)
    loaded = load_plugins()
    assert not loaded.broken, loaded.broken
    reg = loaded.registry
    with pytest.raises(NameClashError) as info:
        reg.get("encoder", "vit")
    message = str(info.value)
    for needle in ("from capsgan-vit)", "capsgan-vit-lite", 'plugin = "capsgan-vit:vit"', 'plugin = "capsgan-vit-lite:vit"',
                   "run.plugins", '"capsgan_vit_mod"', '"vitlite_mod"'):
        assert needle in message, needle
    assert isinstance(info.value, RegistryError)
    with pytest.raises(NameClashError):
        reg.create("encoder", "vit", {}, image_shape=(1, 4, 4), num_classes=3)
    # qualified names choose; the distribution name is normalised (capsgan_vit_lite == capsgan-vit-lite)
    lite = reg.get("encoder", "capsgan_vit_lite:vit")
    assert lite.description == "The lite one." and lite.distribution == "capsgan-vit-lite"
    assert reg.get("encoder", "capsgan-vit:vit").module == "capsgan_vit_mod"
    assert reg.validate_params("encoder", "capsgan-vit:vit", {"scale": 3.0}).scale == 3.0
    enc = reg.create("encoder", "capsgan-vit-lite:vit", {"scale": 2.0}, image_shape=(1, 4, 4), num_classes=3)
    assert enc(torch.zeros(2, 1, 4, 4)).shape == (2, 3, 4)
    # every other registration of both plugins is usable under its bare name
    assert reg.get("encoder", "vit_small").distribution == "capsgan-vit"
    assert reg.get("encoder", "vit_lite").distribution == "capsgan-vit-lite"
    names = reg.list("encoder")
    assert "vit" not in names and {"capsgan-vit:vit", "capsgan-vit-lite:vit", "vit_small", "vit_lite"} <= set(names)
    with pytest.raises(RegistryError, match='No plugin "capsgan-other" registers encoder "vit".*capsgan-vit:vit'):
        reg.get("encoder", "capsgan-other:vit")
    # both entry points are called "vit": both load, neither hides the other
    assert {"capsgan-vit 1.0", "capsgan-vit-lite 1.0"} <= set(loaded.sources.values())
    [warning] = [w for w in loaded.warnings if '"vit"' in w]
    assert "capsgan-vit-lite" in warning and "none of them" in warning and "\n" not in warning


def test_listing_a_clashing_plugin_in_run_plugins_chooses_it(tmp_path, monkeypatch):
    _two_vits(tmp_path, monkeypatch)
    for module, dist in (("vitlite_mod", "capsgan-vit-lite"), ("capsgan_vit_mod", "capsgan-vit")):
        loaded = load_plugins([module])
        assert loaded.registry.get("encoder", "vit").distribution == dist
        assert "vit" in loaded.registry.list("encoder")
        assert not [w for w in loaded.warnings if '"vit"' in w], loaded.warnings
    # a recipe module that no distribution installs wins over installed plugins as well
    (tmp_path / "capsgan_local_vit.py").write_text(textwrap.dedent(CLASH_A), encoding="utf-8")
    loaded = load_plugins(["capsgan_local_vit"])
    assert loaded.registry.get("encoder", "vit").source == "capsgan_local_vit"
    assert loaded.registry.get("encoder", "capsgan_local_vit:vit").source == "capsgan_local_vit"


def test_a_name_registered_twice_by_one_distribution_or_plugin_is_still_an_error():
    reg = Registry()
    reg.set_origin("a", PluginOrigin(distribution="capsgan-x", module="x.a"))
    reg.set_origin("b", PluginOrigin(distribution="Capsgan_X", module="x.b"))
    reg.current_source = "a"
    reg.register("encoder", "x", _Enc)
    with pytest.raises(RegistryError, match='plugin "a" registered that name already'):
        reg.register("encoder", "x", _Enc)
    reg.current_source = "b"
    with pytest.raises(RegistryError, match='plugin "a" registered that name already'):
        reg.register("encoder", "x", _Enc)
    reg.current_source = "c"  # no known distribution: another third party, so a clash, not an error
    reg.register("encoder", "x", _Enc)
    with pytest.raises(NameClashError):
        reg.get("encoder", "x")
    assert reg.get("encoder", "c:x").source == "c" and reg.get("encoder", "capsgan-x:x").source == "a"


MISSPELT = """
    from capsgan_toolkit import hookimpl

    @hookimpl
    def capsgan_regster(registry):
        raise AssertionError("never called")
"""


def test_a_misspelt_or_unmarked_hook_is_a_warning(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, "capsgan_typo", MISSPELT)
    unmarked = GOOD_PLUGIN.replace("    @hookimpl\n    def capsgan_register", "    def capsgan_register")
    assert unmarked != GOOD_PLUGIN
    _fake_distribution(tmp_path, monkeypatch, "capsgan_unmarked", unmarked)
    loaded = load_plugins()
    assert not loaded.broken, loaded.broken
    [typo] = [w for w in loaded.warnings if "capsgan_typo" in w]
    for needle in ('plugin "capsgan_typo"', "module capsgan_typo", "capsgan_typo 1.0", "capsgan_regster",
                   'did you mean "capsgan_register"', "never called"):
        assert needle in typo, needle
    [unmarked_warning] = [w for w in loaded.warnings if "capsgan_unmarked" in w]
    assert "without the @hookimpl marker" in unmarked_warning and "capsgan_unmarked 1.0" in unmarked_warning
    assert all("\n" not in w for w in loaded.warnings)

    monkeypatch.syspath_prepend(str(TESTS))  # the same through run.plugins
    loaded = load_plugins(["plugins_for_tests.misspelt_hook"], entry_points=False)
    [warning] = loaded.warnings
    assert "plugins_for_tests.misspelt_hook" in warning and "recipe run.plugins" in warning
    assert "capsgan_regster" in warning


def test_a_plugin_that_registers_nothing_is_a_warning_but_an_observer_is_not(tmp_path, monkeypatch):
    empty = """
        from capsgan_toolkit import hookimpl

        @hookimpl
        def capsgan_register(registry):
            pass
    """
    _fake_distribution(tmp_path, monkeypatch, "capsgan_empty", empty)
    _fake_distribution(tmp_path, monkeypatch, "capsgan_nohooks", "X = 1\n")
    observed = [n for n in _hook_names() if n != "capsgan_register"]
    if observed:  # an observer-only plugin (a logger) registers no component, and that is fine
        args = ", ".join(inspect.signature(getattr(hookspecs, observed[0])).parameters)
        observer = f"from capsgan_toolkit import hookimpl\n\n@hookimpl\ndef {observed[0]}({args}):\n    pass\n"
        _fake_distribution(tmp_path, monkeypatch, "capsgan_observer", observer)
    loaded = load_plugins()
    for name in ("capsgan_empty", "capsgan_nohooks"):
        [warning] = [w for w in loaded.warnings if f'"{name}"' in w]
        assert "registers nothing" in warning and f"module {name}" in warning and f"{name} 1.0" in warning
    assert not [w for w in loaded.warnings if "capsgan_observer" in w]


def test_no_warnings_for_the_builtins_even_when_strict(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "1")
    loaded = load_plugins(strict=True)
    assert loaded.warnings == [] and loaded.broken == []


def test_strict_mode_turns_broken_plugins_and_warnings_into_one_error(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, "capsgan_broken", "import no_such_module_anywhere\n")
    _fake_distribution(tmp_path, monkeypatch, "capsgan_typo", MISSPELT)
    monkeypatch.delenv(STRICT_ENV, raising=False)
    relaxed = load_plugins()
    assert relaxed.broken and relaxed.warnings  # not strict: reported, the rest loads
    for strict, env in ((True, None), (False, "1"), (False, "true")):
        if env is None:
            monkeypatch.delenv(STRICT_ENV, raising=False)
        else:
            monkeypatch.setenv(STRICT_ENV, env)
        with pytest.raises(PluginError) as info:
            load_plugins(strict=strict)
        message = str(info.value)
        assert "\n" not in message and isinstance(info.value, PluginLoadError)
        assert "(1)" in message and "(2)" in message and STRICT_ENV in message
        assert "no_such_module_anywhere" in message and "capsgan_regster" in message
    monkeypatch.setenv(STRICT_ENV, "0")
    assert load_plugins().broken


WRONG_SIGNATURE = """
    from capsgan_toolkit import hookimpl

    @hookimpl
    def capsgan_register(self, wrong_arg):
        pass
"""


def test_a_wrong_hook_signature_is_reported_as_such(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, monkeypatch, "capsgan_wrongsig", WRONG_SIGNATURE)
    loaded = load_plugins()
    [broken] = [b for b in loaded.broken if b.name == "capsgan_wrongsig"]
    text = broken.describe()
    assert "implements hook capsgan_register with a wrong signature" in text
    assert "wrong_arg" in text and "registry" in text and "could not be imported" not in text
    assert "\n" not in text

    monkeypatch.syspath_prepend(str(TESTS))  # named in run.plugins: an error, and the same words
    with pytest.raises(PluginLoadError) as info:
        load_plugins(["plugins_for_tests.wrong_signature"], entry_points=False)
    message = str(info.value)
    assert 'plugin module "plugins_for_tests.wrong_signature"' in message
    assert "implements hook capsgan_register with a wrong signature" in message
    assert "could not be imported" not in message and "wrong_arg" in message
    relaxed = load_plugins(["plugins_for_tests.wrong_signature"], entry_points=False, strict_extra=False)
    assert "wrong signature" in relaxed.broken[0].describe()


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
    family = "adversarial_loss" if "adversarial_loss" in registry.families else "loss"
    assert registry.list(family, "*max*") == ["minimax"]


def test_registry_create_validates_params(registry):
    with pytest.raises(RegistryError, match="Bad params for encoder"):
        registry.create("encoder", "cnn", {"no_such_param": 1}, image_shape=(1, 28, 28), num_classes=10)


def _hook_names() -> list[str]:
    """Every hook capsgan_toolkit/plugin/spec.py specifies (functions carrying the hookspec marker)."""
    marker = f"{hookspecs.NAME}_spec"
    return sorted(n for n, f in vars(hookspecs).items() if inspect.isfunction(f) and hasattr(f, marker))


def _hookimpl_marker(decorator: ast.expr) -> ast.expr | None:
    """The ``hookimpl`` / ``x.hookimpl`` / ``hookimpl(...)`` decorator, else None."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    return decorator if name == "hookimpl" else None


def _exercised_hooks(source: str) -> set[str]:
    """Hooks a test source really exercises, found in its syntax tree, never in comments or mentions.

    Counted: a call ``<anything>.hook.<name>(...)``; a function decorated with ``hookimpl``
    (its name, or its ``specname=``), also inside a plugin source held in a string literal.
    """
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "hook"):
            found.add(node.func.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for marker in filter(None, map(_hookimpl_marker, node.decorator_list)):
                specname = [k.value for k in getattr(marker, "keywords", []) if k.arg == "specname"]
                found.add(specname[0].value if specname and isinstance(specname[0], ast.Constant) else node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "hookimpl" in node.value:
            found |= _exercised_hooks(node.value)
    return found


def test_the_hook_check_counts_calls_and_implementations_not_mentions():
    assert _exercised_hooks("# capsgan_a is tested\nx = 'capsgan_a'\nprint(capsgan_a, pm.hook.capsgan_a)") == set()
    assert _exercised_hooks("pm.hook.capsgan_b.get_hookimpls()") == set()
    assert _exercised_hooks("loaded.manager.hook.capsgan_c(event=1)") == {"capsgan_c"}
    assert _exercised_hooks("class O:\n    @capsgan_toolkit.hookimpl\n    def capsgan_d(self, e): pass") == {"capsgan_d"}
    assert _exercised_hooks("@hookimpl(specname='capsgan_e')\ndef f(x): pass\ndef capsgan_f(x): pass") == {"capsgan_e"}
    assert _exercised_hooks('SRC = "@hookimpl\\ndef capsgan_g(registry): pass"') == {"capsgan_g"}


def test_every_hook_is_tested_and_documented():
    hooks = _hook_names()
    assert "capsgan_register" in hooks
    docs = (ROOT / "docs" / "writing-plugins.md").read_text(encoding="utf-8")
    exercised: set[str] = set()
    for path in sorted(TESTS.rglob("*.py")):
        exercised |= _exercised_hooks(path.read_text(encoding="utf-8"))
    for hook in hooks:
        assert re.search(rf"\b{hook}\b", docs), f"hook {hook} is not documented in docs/writing-plugins.md"
        assert hook in exercised, (
            f"hook {hook} has no test: no test calls pm.hook.{hook}(...) or implements it with @hookimpl"
        )


def test_typed_run_event_hooks_see_training_events(tmp_path, tiny_recipe):
    from capsgan_toolkit.plugin import events as ev
    from capsgan_toolkit.recipe.schema import resolve
    from capsgan_toolkit.training.trainer import Trainer

    seen = []

    class Observer:
        @capsgan_toolkit.hookimpl
        def capsgan_run_start(self, event):
            seen.append(event)

        @capsgan_toolkit.hookimpl
        def capsgan_epoch_end(self, event):
            seen.append(event)

        @capsgan_toolkit.hookimpl
        def capsgan_checkpoint_saved(self, event):
            seen.append(event)

        @capsgan_toolkit.hookimpl
        def capsgan_evaluation_done(self, event):
            seen.append(event)

        @capsgan_toolkit.hookimpl
        def capsgan_run_end(self, event):
            seen.append(event)

    loaded = load_plugins([])
    loaded.manager.register(Observer(), name="observer")
    tiny_recipe["eval"] = {"every_epochs": 2, "metrics": ["acc", "rec"], "num_images": 16}
    resolved = resolve(tiny_recipe, loaded.registry)
    (tmp_path / "checkpoints").mkdir()
    summary = Trainer(resolved, loaded, tmp_path).fit()
    kinds = [type(e).__name__ for e in seen]
    # Two 3-step epochs: a checkpoint after epoch 1 (and best.pt whenever validation accuracy improves),
    # an evaluation after epoch 2, the final checkpoint, the end.
    assert kinds[0] == "RunStart" and kinds[-2:] == ["CheckpointSaved", "RunEnd"]
    assert [k for k in kinds if k in ("EpochEnd", "EvaluationDone")] == ["EpochEnd", "EvaluationDone", "EpochEnd"]
    epochs = [e for e in seen if isinstance(e, ev.EpochEnd)]
    assert [e.epoch for e in epochs] == [0, 1] and epochs[-1].metrics["step"] == 6
    saved = [e for e in seen if isinstance(e, ev.CheckpointSaved)]
    assert all(e.path.is_file() for e in saved) and saved[-1].path.name == "final.pt"
    evaluation = next(e for e in seen if isinstance(e, ev.EvaluationDone))
    assert "acc32_test" in evaluation.metrics and evaluation.protocol["acc32_test"]
    assert seen[-1].summary == summary and seen[0].recipe["run"]["name"] == "tiny" and not seen[0].resumed
