"""Recipe validation: every error names the file, the dotted key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib
from helpers import write_toml

from capsgan_toolkit.errors import RecipeError
from capsgan_toolkit.recipe.schema import apply_overrides, parse_override, resolve, resolve_file
from capsgan_toolkit.recipe.toml_io import dumps_toml

ROOT = Path(__file__).resolve().parents[1]


def _error(recipe_dict, registry, tmp_path, overrides=()):
    path = write_toml(tmp_path / "r.toml", recipe_dict)
    with pytest.raises(RecipeError) as info:
        resolve_file(path, registry, list(overrides))
    text = str(info.value)
    assert path in text
    return text


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.toml")
                                           if not p.name.startswith("compare_")))  # those are comparison specs
def test_shipped_recipes_validate(recipe, registry):
    resolved = resolve_file(ROOT / "recipes" / recipe, registry)
    assert resolved.recipe.run.epochs >= 1


def test_resolved_recipe_fills_defaults_and_round_trips(tiny_recipe, registry, tmp_path):
    resolved = resolve(tiny_recipe, registry)
    data = resolved.to_dict()
    assert data["gate"]["discriminator_max_disc_acc"] == 0.9  # a default filled in
    assert data["losses"]["classification"]["lambda"] == 0.5  # alias written back as in recipes
    text = dumps_toml(data)
    again = resolve(tomllib.loads(text), registry)
    assert again.to_dict() == data
    assert again.digest() == resolved.digest()


def test_unknown_top_level_and_section_keys(tiny_recipe, registry, tmp_path):
    tiny_recipe["trainer"] = {"x": 1}
    tiny_recipe["run"]["epoch"] = 3
    text = _error(tiny_recipe, registry, tmp_path)
    assert "trainer: unknown key" in text
    assert "run.epoch: unknown key" in text


def test_wrong_type_names_key_and_value(tiny_recipe, registry, tmp_path):
    tiny_recipe["run"]["epochs"] = "many"
    text = _error(tiny_recipe, registry, tmp_path)
    assert "run.epochs" in text and "'many'" in text and "integer" in text


def test_unknown_plugin_suggests_a_name_and_lists_allowed(tiny_recipe, registry, tmp_path):
    tiny_recipe["encoder"]["plugin"] = "capsnett"
    text = _error(tiny_recipe, registry, tmp_path)
    assert "encoder.plugin" in text and 'Did you mean "capsnet"' in text and "cnn" in text


def test_bad_component_param_is_checked_against_the_component(tiny_recipe, registry, tmp_path):
    tiny_recipe["encoder"]["chanels"] = 8
    tiny_recipe["gate"]["warmup_accuracy"] = 1.5
    tiny_recipe["encoder"]["latent"] = "everything"
    text = _error(tiny_recipe, registry, tmp_path)
    assert "encoder.chanels: unknown key" in text
    assert "gate.warmup_accuracy" in text and "1.5" in text
    assert "encoder.latent" in text and "'all'" in text and "'true_class'" in text


def test_loss_in_the_wrong_slot(tiny_recipe, registry, tmp_path):
    tiny_recipe["losses"]["reconstruction"] = {"plugin": "margin"}
    text = _error(tiny_recipe, registry, tmp_path)
    # One family per slot: margin is no reconstruction loss, and the message lists those that are.
    assert "losses.reconstruction.plugin" in text and 'unknown reconstruction_loss "margin"' in text and "mse" in text


def test_missing_required_table(tiny_recipe, registry, tmp_path):
    del tiny_recipe["encoder"]
    assert 'encoder: the "reconstruction_gan" objective needs the [encoder] table' in _error(tiny_recipe, registry, tmp_path)


def test_malformed_toml_gives_line_and_column(registry, tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[run]\nepochs = = 3\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"broken.toml: not valid TOML.*line 2, column"):
        resolve_file(path, registry)


def test_missing_file(registry, tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        resolve_file(tmp_path / "nope.toml", registry)


def test_overrides_are_applied_and_validated(tiny_recipe, registry, tmp_path):
    path = write_toml(tmp_path / "r.toml", tiny_recipe)
    resolved = resolve_file(path, registry, ["run.epochs=7", "encoder.dropout=0.25", "run.name=other"])
    assert resolved.recipe.run.epochs == 7 and resolved.params["encoder"].dropout == 0.25
    assert resolved.recipe.run.name == "other"  # bare words are taken as strings
    text = _error(tiny_recipe, registry, tmp_path, ["encoder.channels=-3"])
    assert "encoder.channels" in text and "from --set encoder.channels=-3" in text


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(RecipeError, match="--set"):
        parse_override(bad)


def test_override_through_a_value_is_refused():
    with pytest.raises(RecipeError, match='"run.epochs" is a value, not a table'):
        apply_overrides({"run": {"epochs": 3}}, ["run.epochs.x=1"])


def test_generator_needs_some_loss(tiny_recipe, registry, tmp_path):
    del tiny_recipe["losses"]["reconstruction"]
    del tiny_recipe["losses"]["adversarial"]
    assert "at least one of losses.reconstruction and losses.adversarial" in _error(tiny_recipe, registry, tmp_path)


def test_switching_a_plugin_with_set_says_how_to_replace_the_table(tiny_recipe, registry, tmp_path):
    # The tiny recipe's encoder is a cnn with cnn parameters; --set encoder.plugin=capsnet keeps them.
    text = _error(tiny_recipe, registry, tmp_path, ["encoder.plugin=capsnet"])
    assert "encoder.channels: unknown key" in text
    assert "--set 'encoder={plugin=\"capsnet\"}'" in text and "capsgan plugins" in text
    # A recipe's own unknown key (no --set of the plugin) gets no such hint.
    tiny_recipe["encoder"]["chanels"] = 8
    assert "Replace the whole table" not in _error(tiny_recipe, registry, tmp_path)
