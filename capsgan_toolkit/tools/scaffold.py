"""What ``capsgan new-plugin NAME --family FAMILY`` does: write an installable plugin package to start from.

The package holds a working component of the family (:mod:`capsgan_toolkit.tools.scaffold_templates`)
with a pydantic params model and its ``@hookimpl capsgan_register``; a ``pyproject.toml``
declaring the ``capsgan`` entry point; ``tests/test_NAME.py``, which runs the family's contract
checks (:mod:`capsgan_toolkit.testing`), checks the registration and trains the recipe two
steps; ``recipes/NAME_quickstart.toml``, a tiny glyphs recipe naming the component; and a
README. It installs with ``pip install -e DIR`` and passes its own tests unchanged::

    from capsgan_toolkit.tools.scaffold import new_plugin
    folder = new_plugin("vit", "encoder", out="capsgan-vit")
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

from capsgan_toolkit import __version__
from capsgan_toolkit.errors import CapsganError
from capsgan_toolkit.tools.scaffold_templates import RECIPE_TABLES, SOURCES, TEST_PARAMS

__all__ = ["FAMILIES", "new_plugin"]

FAMILIES: tuple[str, ...] = tuple(SOURCES)
"""The families the scaffold writes a component for (all but ``metric_features``)."""

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SUFFIX = {"encoder": "Encoder", "generator": "Generator", "discriminator": "Discriminator",
           "classification_loss": "ClassificationLoss", "reconstruction_loss": "ReconstructionLoss",
           "adversarial_loss": "AdversarialLoss", "gate": "Gate", "dataset": "Dataset", "objective": "Objective"}
_CHECK = {family: f"check_{family}" for family in FAMILIES}

_BASE_RECIPE: dict = {
    "run": {"name": "__NAME__-quickstart", "seed": 0, "epochs": 1, "device": "auto", "log_every": 5},
    "data": {"plugin": "glyphs", "image_size": 28, "channels": 1, "num_train": 1000, "num_test": 200,
             "batch_size": 32},
    "encoder": {"plugin": "cnn", "channels": 16, "capsule_dim": 8, "latent": "true_class"},
    "generator": {"plugin": "dcgan", "base_channels": 16},
    "discriminator": {"plugin": "dcgan", "base_channels": 16},
    "losses": {"classification": {"plugin": "margin"}, "reconstruction": {"plugin": "mse"},
               "adversarial": {"plugin": "minimax"}, "generator_weight": 1.0, "adversarial_weight": 0.01},
    "optim": {"encoder_generator": {"lr": 1e-3, "betas": [0.5, 0.999]},
              "discriminator": {"lr": 2e-4, "betas": [0.5, 0.999]}},
    "gate": {"plugin": "always"},
    "output": {"sample_images": 16},
}
"""The quickstart recipe before the new component takes its table: the report's reconstruction GAN
with a small CNN encoder and DCGAN generator and discriminator on 28x28 grey glyphs."""

_PYPROJECT = '''[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "__DIST__"
version = "0.1.0"
description = "A capsgan plugin: the __NAME__ __FAMILY_WORDS__."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["capsgan-toolkit>=__TOOLKIT__", "torch>=2.1", "pydantic>=2.5,<3"]

[project.optional-dependencies]
test = ["pytest>=7.4"]

# The line that makes capsgan find the plugin: group "capsgan", the value is the module
# holding the @hookimpl functions.
[project.entry-points.capsgan]
__NAME__ = "__MODULE__"

[tool.setuptools]
packages = ["__MODULE__"]

[tool.pytest.ini_options]
testpaths = ["tests"]
pythonpath = ["."]
'''

_TEST = '''"""Tests of the ``__NAME__`` __FAMILY_WORDS__: the toolkit's contract checks, its registration, its recipe.

Run them with ``pytest`` in the package folder (``pip install -e '.[test]'`` brings pytest).
"""

from pathlib import Path

from capsgan_toolkit import api
from capsgan_toolkit.plugin.manager import load_plugins
from capsgan_toolkit.testing import __CHECK__

from __MODULE__ import __CLASS__

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "__NAME___quickstart.toml"
SMALL = __SMALL__  # params that keep the component small in the contract checks
# Named in run.plugins, the module is found before the package is installed too; the rest shrinks the run.
SETS = ['run.plugins=["__MODULE__"]', "run.device=cpu", "run.epochs=1", "run.steps_per_epoch=2",
        "data.num_train=64", "data.num_test=32", "data.batch_size=8", "output.sample_images=4"]


def test_meets_the___FAMILY___contract():
    __CHECK__(__CLASS__, SMALL)


def test_is_registered_under_its_name():
    plugins = load_plugins(["__MODULE__"])
    assert not plugins.broken, plugins.broken
    assert plugins.registry.get("__FAMILY__", "__NAME__").cls is __CLASS__


def test_quickstart_recipe_names_it_and_trains_two_steps(tmp_path):
    _, resolved = api.load_recipe(RECIPE, SETS)
    assert resolved.recipe.spec("__KEY__").plugin == "__NAME__"
    summary = api.train(RECIPE, out=tmp_path / "run", sets=SETS)
    assert summary["steps"] == 2
'''

_README = '''# __DIST__

A capsgan (capsgan-toolkit) plugin: the `__NAME__` __FAMILY_WORDS__
(`__MODULE__.__CLASS__`), written by `capsgan new-plugin __NAME__ --family __FAMILY__` as a
working starting point. Change the component in `__MODULE__/__init__.py`; keep its contract
(the tests check it).

## Install

```bash
pip install -e '.[test]'      # registers it through the "capsgan" entry point
capsgan plugins --family __FAMILY__   # lists "__NAME__" with its params
```

## Test

```bash
pytest
```

`tests/test___NAME__.py` runs the toolkit's contract checks for the family
(`capsgan_toolkit.testing.__CHECK__`: shapes, value ranges, finite values, gradients,
determinism under a seed, the params round trip, clear errors), checks the registration, and
trains the quickstart recipe for two steps.

## Train

```bash
capsgan run recipes/__NAME___quickstart.toml
capsgan run recipes/__NAME___quickstart.toml --set run.steps_per_epoch=2 --set run.epochs=1  # a smoke test
```

The recipe is a small reconstruction GAN on the built-in glyphs data set (no download) whose
`[__KEY__]` table names `plugin = "__NAME__"`; its params sit beside `plugin`. Any other recipe
can use the component the same way.

## Where things are

- `__MODULE__/__init__.py`: the component, its `Params` model (unknown keys are errors; every
  field has a description, shown by `capsgan plugins`), and `capsgan_register`.
- `pyproject.toml`: the `[project.entry-points.capsgan]` line capsgan finds it by.
- `tests/test___NAME__.py`: the tests; `recipes/__NAME___quickstart.toml`: the recipe.

The contract of each family and the hooks are described in capsgan-toolkit's
`docs/writing-plugins.md`.
'''


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name) or keyword.iskeyword(name):
        raise CapsganError(
            f'"{name}" is not a valid plugin name: use a lowercase Python identifier (letters, digits and '
            'underscores, starting with a letter, not a Python keyword), such as "vit_tiny". It names the '
            "component in recipes and the package's module (capsgan_<name>).")


def _check_not_builtin(name: str, family: str) -> None:
    from capsgan_toolkit.plugin.manager import load_plugins

    registry = load_plugins().registry
    if any(c.builtin and c.name == name for c in registry.components(family)):
        raise CapsganError(f'{family} "{name}" is the name of a built-in component, so recipes naming it would '
                           "get the built-in. Choose another name.")


def _recipe_toml(name: str, family: str) -> str:
    import copy

    from capsgan_toolkit.recipe.toml_io import dumps_toml

    recipe = copy.deepcopy(_BASE_RECIPE)
    key, table = RECIPE_TABLES[family]
    table = {k: (name if v == "__NAME__" else v) for k, v in table.items()}
    if family == "objective":  # the template objective: encoder, generator, two losses, optimizer "model"
        for gone in ("discriminator",):
            recipe.pop(gone)
        recipe["losses"].pop("adversarial")
        recipe["losses"].pop("adversarial_weight")
        recipe["optim"] = {"model": {"lr": 1e-3}}
    node = recipe
    *outer, last = key.split(".")
    for part in outer:
        node = node[part]
    node[last] = table
    recipe["run"]["name"] = f"{name}-quickstart"
    header = (f"# A tiny recipe that names the {family.replace('_', ' ')} \"{name}\" in [{key}]: a reconstruction GAN on\n"
              "# the built-in glyphs data set (no download) that trains in seconds to a minute on a CPU.\n"
              f"#   capsgan run recipes/{name}_quickstart.toml\n"
              f"#   capsgan run recipes/{name}_quickstart.toml --set run.steps_per_epoch=2 --set run.epochs=1\n"
              "# The plugin must be installed (pip install -e .), or its module named in run.plugins.\n\n")
    return header + dumps_toml(recipe) + "\n"


def _class_name(name: str, family: str) -> str:
    """``vit_tiny`` -> ``VitTinyEncoder``; ``my_encoder`` -> ``MyEncoder`` (no ``MyEncoderEncoder``)."""
    camel = "".join(part.capitalize() for part in name.split("_"))
    return camel if camel.endswith(_SUFFIX[family]) else camel + _SUFFIX[family]


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def new_plugin(name: str, family: str = "encoder", out: str | Path | None = None) -> Path:
    """Write a plugin package for component ``name`` of ``family`` into ``out``; return the folder.

    Args:
        name: the component's name in recipes; the module is ``capsgan_<name>`` and the
            distribution ``capsgan-<name>``.
        family: one of :data:`FAMILIES`.
        out: the folder (default: ``./capsgan-<name>``); it must not exist or be empty.

    Raises:
        CapsganError: a name that is not a lowercase identifier or is a built-in's, an unknown
            family, or a folder that exists and is not empty.
    """
    _check_name(name)
    if family not in SOURCES:
        raise CapsganError(f'The scaffold writes no "{family}" plugin; families: {", ".join(FAMILIES)}.')
    folder = Path(out) if out is not None else Path.cwd() / f"capsgan-{name}"
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CapsganError(f"{folder} exists and is not an empty folder; nothing was written. Choose another "
                           "--out, or remove it first.")
    _check_not_builtin(name, family)
    module = f"capsgan_{name}"
    values = {
        "__MODULE__": module, "__DIST__": f"capsgan-{name.replace('_', '-')}", "__FAMILY_WORDS__": family.replace("_", " "),
        "__CLASS__": _class_name(name, family),
        "__CHECK__": _CHECK[family], "__SMALL__": repr(TEST_PARAMS.get(family, {})),
        "__KEY__": RECIPE_TABLES[family][0], "__TOOLKIT__": ".".join(__version__.split(".")[:2]),
        "__FAMILY__": family, "__NAME__": name,
    }
    doc = f'"""The ``{name}`` {family.replace("_", " ")} plugin for capsgan (written by capsgan new-plugin)."""\n\n'
    files = {
        "pyproject.toml": _fill(_PYPROJECT, values),
        "README.md": _fill(_README, values),
        f"{module}/__init__.py": doc + "from __future__ import annotations\n\n" + _fill(SOURCES[family], values),
        f"tests/test_{name}.py": _fill(_TEST, values),
        f"recipes/{name}_quickstart.toml": _recipe_toml(name, family),
        ".gitignore": "runs/\n*.egg-info/\n__pycache__/\n.pytest_cache/\n",
    }
    for relative, text in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder
