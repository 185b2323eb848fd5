"""The plugin author's commands: ``capsgan new-plugin`` writes a package that passes the contract checks
and trains, and ``capsgan plugins`` shows each param's constraints readably at 80 columns."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import invoke

from capsgan_toolkit import testing as kit
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.interfaces import DatasetParams, EncoderParams, Params
from capsgan_toolkit.plugin.manager import load_plugins
from capsgan_toolkit.recipe.schema import resolve_file
from capsgan_toolkit.tools.scaffold import FAMILIES, new_plugin
from capsgan_toolkit.tools.scaffold_templates import RECIPE_TABLES, TEST_PARAMS

FAST = ["run.device=cpu", "run.epochs=1", "run.steps_per_epoch=2", "data.num_train=64", "data.num_test=32",
        "data.batch_size=8", "output.sample_images=4"]


@pytest.fixture
def importable(monkeypatch):
    """Put a generated package's folder on sys.path (as its pytest config does) and forget its module after."""
    added = []

    def add(folder: Path, module: str):
        monkeypatch.syspath_prepend(str(folder))
        added.append(module)
        return importlib.import_module(module)

    yield add
    for module in added:
        sys.modules.pop(module, None)


def test_new_plugin_writes_an_installable_encoder_package(tmp_path):
    folder = new_plugin("vit_tiny", "encoder", out=tmp_path / "pkg")
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        ".gitignore", "README.md", "capsgan_vit_tiny/__init__.py", "pyproject.toml",
        "recipes/vit_tiny_quickstart.toml", "tests/test_vit_tiny.py"]
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    assert project["project"]["name"] == "capsgan-vit-tiny"
    assert project["project"]["entry-points"]["capsgan"] == {"vit_tiny": "capsgan_vit_tiny"}
    assert any(dep.startswith("capsgan-toolkit") for dep in project["project"]["dependencies"])
    assert project["project"]["optional-dependencies"]["test"] == ["pytest>=7.4"]
    assert project["tool"]["setuptools"]["packages"] == ["capsgan_vit_tiny"]
    source = (folder / "capsgan_vit_tiny" / "__init__.py").read_text()
    assert "class VitTinyEncoder(Encoder)" in source and "class Params(EncoderParams)" in source
    assert "@hookimpl\ndef capsgan_register(registry):" in source
    assert 'registry.register("encoder", "vit_tiny", VitTinyEncoder)' in source
    test = (folder / "tests" / "test_vit_tiny.py").read_text()
    assert "from capsgan_toolkit.testing import check_encoder" in test and "check_encoder(VitTinyEncoder" in test
    recipe = tomllib.loads((folder / "recipes" / "vit_tiny_quickstart.toml").read_text())
    assert recipe["encoder"]["plugin"] == "vit_tiny" and recipe["data"]["plugin"] == "glyphs"
    readme = (folder / "README.md").read_text()
    assert "pip install -e" in readme and "capsgan run recipes/vit_tiny_quickstart.toml" in readme


def test_generated_encoder_meets_the_contract_and_its_recipe_trains(tmp_path, importable):
    folder = new_plugin("vit_tiny", "encoder", out=tmp_path / "pkg")
    module = importable(folder, "capsgan_vit_tiny")
    kit.check_encoder(module.VitTinyEncoder, TEST_PARAMS["encoder"])
    recipe = folder / "recipes" / "vit_tiny_quickstart.toml"
    sets = [arg for s in ['run.plugins=["capsgan_vit_tiny"]', *FAST, "run.log_every=1"] for arg in ("--set", s)]
    result = invoke("run", recipe, "--out", tmp_path / "run", "--quiet", *sets)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    saved = tomllib.loads((tmp_path / "run" / "recipe.toml").read_text())
    assert saved["encoder"]["plugin"] == "vit_tiny" and saved["encoder"]["channels"] == 16
    # The template's diagnostic stays on the device in forward and still reaches the log as a number.
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lengths = [r["capsule_len"] for r in rows if "capsule_len" in r]
    assert lengths and all(isinstance(v, float) and 0.0 <= v < 1.0 for v in lengths)


_BASES = {"encoder": EncoderParams, "dataset": DatasetParams}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_gets_a_component_that_passes_the_kit_and_a_recipe_that_validates(family, tmp_path, importable):
    name = f"my_{family}"
    folder = new_plugin(name, family, out=tmp_path / family)
    module = importable(folder, f"capsgan_{name}")
    plugins = load_plugins([f"capsgan_{name}"])
    assert not plugins.broken and not plugins.warnings, plugins.problems()
    comp = plugins.registry.get(family, name)
    assert comp.cls.__module__ == module.__name__
    assert issubclass(comp.params_model, _BASES.get(family, Params))
    kit.check_component(family, comp.cls, TEST_PARAMS.get(family))
    resolved = resolve_file(folder / "recipes" / f"{name}_quickstart.toml", plugins.registry, FAST)
    key = RECIPE_TABLES[family][0]
    assert resolved.recipe.spec(key).plugin == name


@pytest.mark.parametrize("name", ["My-Enc", "1st", "vit tiny", "class", "Vit", ""])
def test_a_name_that_is_no_lowercase_identifier_is_refused_with_one_message(name, tmp_path):
    with pytest.raises(CapsganError, match="is not a valid plugin name: use a lowercase Python identifier"):
        new_plugin(name, "encoder", out=tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_an_existing_non_empty_folder_or_a_built_in_name_is_refused(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(CapsganError, match="exists and is not an empty folder; nothing was written"):
        new_plugin("vit", "encoder", out=tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    with pytest.raises(CapsganError, match='encoder "cnn" is the name of a built-in component'):
        new_plugin("cnn", "encoder", out=tmp_path / "cnn")
    (tmp_path / "empty").mkdir()
    assert new_plugin("vit", "encoder", out=tmp_path / "empty") == tmp_path / "empty"


def test_new_plugin_command_writes_to_capsgan_name_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("new-plugin", "every_third", "--family", "gate")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "capsgan-every_third" / "capsgan_every_third" / "__init__.py").is_file()
    assert "pip install -e" in result.output and "every_third_quickstart.toml" in result.output
    again = invoke("new-plugin", "every_third", "--family", "gate")
    assert again.exit_code == 2 and "exists and is not an empty folder" in again.output
    bad = invoke("new-plugin", "Bad-Name")
    assert bad.exit_code == 2 and "not a valid plugin name" in bad.output and "Traceback" not in bad.output
    unknown = invoke("new-plugin", "x", "--family", "metric_features")
    assert unknown.exit_code == 2 and "metric_features" in unknown.output


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_generated_package_passes_its_own_tests_unchanged(family, tmp_path):
    folder = new_plugin(f"own_{family}", family, out=tmp_path / family)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_generated_package_pip_installs_registers_passes_its_tests_and_trains(tmp_path):
    name = "scaffold_probe"
    folder = new_plugin(name, "encoder", out=tmp_path / "pkg")
    pip = [sys.executable, "-m", "pip"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([*pip, "install", "-q", "-e", str(folder), "--no-deps", "--no-build-isolation"], check=True,
                   env=env, timeout=300)
    try:
        listed = subprocess.run([sys.executable, "-m", "capsgan_toolkit", "plugins", "--family", "encoder", "--json"],
                                capture_output=True, text=True, check=True, timeout=300)
        assert name in [c["name"] for c in json.loads(listed.stdout)["encoder"]]
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder,
                               capture_output=True, text=True, timeout=600)
        assert tests.returncode == 0, tests.stdout + tests.stderr
        sets = [arg for s in ["run.steps_per_epoch=2", "run.epochs=1", "run.device=cpu"] for arg in ("--set", s)]
        run = subprocess.run([sys.executable, "-m", "capsgan_toolkit", "run", f"recipes/{name}_quickstart.toml",
                              "--out", str(tmp_path / "run"), "--quiet", *sets], cwd=folder, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stdout + run.stderr
    finally:
        subprocess.run([*pip, "uninstall", "-q", "-y", f"capsgan-{name.replace('_', '-')}"], env=env, timeout=300)


# --------------------------------------------------------------------------- capsgan plugins


@pytest.fixture
def narrow(monkeypatch):
    """The CLI's console at 80 columns, as in a terminal with COLUMNS=80."""
    from rich.console import Console

    import capsgan_toolkit.cli.main as cli_module

    monkeypatch.setattr(cli_module, "console", Console(width=80))


def test_plugins_shows_every_param_with_its_default_and_constraints_at_80_columns(narrow):
    import capsgan_toolkit.cli.main as cli_module

    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    registry = load_plugins().registry
    for comp in registry.components():
        assert any(line.startswith(f"  {comp.name}  ") for line in lines), comp.name
        for name, field in comp.params_model.model_fields.items():
            key = field.alias or name
            head = f"    {key} = {cli_module._default(field)}"
            matching = [line for line in lines if line.startswith(head)]
            assert matching, f"{comp.family} {comp.name}: no line starts with {head!r}"
            for constraint in cli_module._constraints(field):
                assert any(f"[{constraint}]" in line for line in matching), (comp.name, key, constraint)
    long_heads = {f"    {f.alias or n} = {cli_module._default(f)}" for c in registry.components()
                  for n, f in c.params_model.model_fields.items()}
    for line in lines:  # only a line whose name and default alone are wider may pass 80 columns
        assert len(line) <= 80 or any(line.startswith(h) and len(h) > 60 for h in long_heads), line
    text = result.output
    assert "stages = 3  [1 <= x <= 5]  Number of stages" in text
    assert 'latent = "true_class"  ["all" | "true_class" | "predicted_class"]' in text
    assert "m_plus = 0.9  [0.0 < x <= 1.0]" in text and "lambda = 0.5  [x >= 0.0]" in text
    assert "channels = (unset)  [1 | 3]" in text and "root = (required)" in text
    assert "weight_init_std = (unset)  [x > 0]" in text


def test_plugins_json_and_no_params_still_work(narrow):
    result = invoke("plugins", "--family", "gate", "--json")
    assert result.exit_code == 0
    gates = json.loads(result.output)["gate"]
    band = next(g for g in gates if g["name"] == "accuracy_band")
    assert band["params"]["properties"]["warmup_accuracy"]["maximum"] == 1.0
    plain = invoke("plugins", "--family", "gate", "--no-params")
    assert plain.exit_code == 0 and "accuracy_band" in plain.output and "warmup_epochs" not in plain.output
